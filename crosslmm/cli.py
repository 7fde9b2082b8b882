"""The `crosslmm` command line."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="CrossLMM video language models.")
bench_app = typer.Typer(no_args_is_help=True, help="Cost benchmarks (run by command, never as timed tests).")
app.add_typer(bench_app, name="bench")


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


@app.command()
def version() -> None:
    """Print the versions that matter for reproducing a result."""
    import torch
    import transformers

    import crosslmm

    typer.echo(f"crosslmm {crosslmm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")


@bench_app.command("efficiency")
def bench_efficiency(
    preset: str = typer.Option("reduced", help="Model shapes: crosslmm-2b, crosslmm-7b, reduced, tiny."),
    frames: str = typer.Option("16,64", help="Comma-separated frame counts."),
    tokens_per_frame: str = typer.Option("9", help="Comma-separated CrossLMM tokens per frame."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    repeats: int = typer.Option(3, help="Timed prefill repeats after one warm-up (the median is reported)."),
    decode_tokens: int = typer.Option(8, help="Decode steps timed after the prefill."),
    language_only: bool = typer.Option(False, help="Give the LLM precomputed vision features: time the language side only."),
    threads: int = typer.Option(0, help="OMP threads per measurement (0: torch's default)."),
    out: Path = typer.Option(Path("bench-out/efficiency"), help="Where results.json and results.md go."),
) -> None:
    """CrossLMM vs the LLaVA-OneVision token layout: prefill/decode time, peak memory, FLOPs."""
    from crosslmm.bench.efficiency import run

    run(
        preset, _int_list(frames), _int_list(tokens_per_frame), device, dtype, repeats, decode_tokens,
        language_only, out, threads or None, command=shlex.join(["crosslmm", *sys.argv[1:]]),
    )
    typer.echo((out / "results.md").read_text())


@bench_app.command("gqa-layout")
def bench_gqa_layout(
    frames: int = typer.Option(64, help="Frames whose 729 original tokens are the keys."),
    queries: int = typer.Option(128, help="Text queries."),
) -> None:
    """Time three ways of running grouped-query cross-attention (CrossLMM-2B head shapes)."""
    from crosslmm.bench.gqa import time_layouts

    for name, ms in time_layouts(queries=queries, frames=frames).items():
        typer.echo(f"{name:>26}: {ms:8.1f} ms")


if __name__ == "__main__":
    app()
