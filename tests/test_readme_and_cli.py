"""The README's code runs, and the commands it names work."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from crosslmm.cli import app

ROOT = Path(__file__).parents[1]


def test_readme_python_example_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["out"].shape[0] == 1


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert commands[1] in ci  # the README's test command, verbatim, as one of CI's steps
    assert "python3 tools/deps.py test --lowest" in ci  # and the subset on the lowest supported transformers


def test_bench_efficiency_runs_end_to_end_on_a_tiny_preset(tmp_path):
    result = CliRunner().invoke(app, [
        "bench", "efficiency", "--preset", "tiny", "--frames", "2", "--tokens-per-frame", "1",
        "--repeats", "1", "--decode-tokens", "2", "--out", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results.json").read_text())
    by_model = {p["model"]: p for p in data["points"]}
    assert set(by_model) == {"llava-ov-layout", "transformers-llava-ov", "crosslmm-1"}
    # The tiny preset's 14x14 grid pools to 7x7 = 49 tokens per frame, plus one newline per video.
    assert by_model["llava-ov-layout"]["llm_tokens"] == by_model["transformers-llava-ov"]["llm_tokens"] == 64 + 2 * 49 + 1
    assert by_model["crosslmm-1"]["llm_tokens"] == 64 + 2
    for point in by_model.values():
        flops = point["flops"]
        assert flops["vision"] > 0 and flops["projector"] > 0 and flops["llm_mlp"] > 0 and flops["llm_self_attention"] > 0
        parts = sum(v for k, v in flops.items() if k not in ("total", "language_side"))
        assert parts <= flops["total"] * 1.0001
    assert by_model["crosslmm-1"]["flops"]["cross_attention_v2v"] > 0
    assert by_model["llava-ov-layout"]["flops"]["cross_attention_t2v"] == 0
    # The same shapes cost the same FLOPs on our code path and in transformers' implementation
    # (older transformers run SigLIP's pooling head in LLaVA-OV's vision tower although it is unused).
    ours, theirs = by_model["llava-ov-layout"]["flops"], by_model["transformers-llava-ov"]["flops"]
    for part in ("projector", "llm_mlp", "llm_self_attention", "lm_head"):
        assert ours[part] == theirs[part], part
    assert 0.95 * theirs["vision"] <= ours["vision"] <= theirs["vision"]
    assert "| crosslmm-1 | 2 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "fig4.png").stat().st_size > 10_000


def test_synth_command_writes_a_dataset(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path), "--n", "10", "--seed", "3"])
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "train.json").read_text())
    assert train and all((tmp_path / r["video"]).is_file() for r in train)
    assert json.loads((tmp_path / "meta.json").read_text())["params"]["seed"] == 3
