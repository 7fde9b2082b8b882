"""Prefill and decode cost of CrossLMM against LLaVA-OneVision's token layout.

Both models run the same code path (`CrossLMMForCausalLM`) with random weights at a
preset's shapes; they differ only in what method.md says they differ in: CrossLMM feeds
g*g pooled tokens per frame to the LLM and adds DCAL cross-attentions, the LLaVA-OV
layout feeds 196 tokens per frame and has no DCAL. Each (model, frame count) point runs
in a fresh subprocess so one measurement's allocations cannot inflate another's peak.

Measured per point: prefill latency (median of repeats after a warm-up), decode
latency per token with both caches, peak memory of the prefill beyond what was resident
before it (CUDA: max_memory_allocated; CPU: the process's peak RSS, reset through
/proc/self/clear_refs), and FLOPs per component (torch's FlopCounterMode, with CPU
attention counted by crosslmm.bench.flops).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from crosslmm.bench.flops import flop_counter
from crosslmm.model.modeling import CrossLMMForCausalLM
from crosslmm.presets import preset_config

PROMPT_TOKENS = 64  # system prompt + question, before and after the video
LLAVA_OV_TOKENS_PER_FRAME = 196
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Point:
    model: str  # "crosslmm-9" or "llava-ov-layout"
    frames: int
    tokens_per_frame: int
    llm_tokens: int  # sequence length the LLM sees
    prefill_ms: float
    prefill_ms_all: list[float]
    decode_ms_per_token: float
    peak_mb_beyond_resident: float
    resident_mb: float
    flops: dict[str, float] = field(default_factory=dict)  # component -> FLOPs


def _model_config(preset: str, variant: str, tokens_per_frame: int):
    if variant == "llava-ov-layout":
        return preset_config(preset, tokens_per_frame=LLAVA_OV_TOKENS_PER_FRAME, use_v2v=False, use_t2v=False)
    return preset_config(preset, tokens_per_frame=tokens_per_frame)


def _inputs(config, frames: int, language_only: bool, device: torch.device, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    vocab = config.text_config.vocab_size - 1
    half = PROMPT_TOKENS // 2
    ids = torch.randint(3, vocab, (1, PROMPT_TOKENS + 1), generator=generator)
    ids[0, half] = config.media_token_id
    media = {"media_num_frames": torch.tensor([frames], device=device)}
    if language_only:
        n, width = config.vision_grid_size**2, config.vision_config.hidden_size
        media["vision_features"] = torch.randn(frames, n, width, generator=generator).to(device, dtype)
    else:
        size = config.image_size
        media["pixel_values"] = torch.randn(frames, 3, size, size, generator=generator).to(device, dtype)
    return ids.to(device), media


def _resident_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM, the peak resident set size


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _component_flops(counts: dict[str, dict]) -> dict[str, float]:
    """Group FlopCounterMode's per-module counts into the components of method.md."""
    total = lambda name: float(sum(counts.get(name, {}).values()))  # noqa: E731
    root = "CrossLMMForCausalLM"
    out = {
        "vision": total(f"{root}.vision_tower"),
        "projector": total(f"{root}.projector"),
        "llm_self_attention": 0.0,
        "llm_mlp": 0.0,
        "cross_attention_v2v": 0.0,
        "cross_attention_t2v": 0.0,
        "lm_head": total(f"{root}.language_model.lm_head"),
        "total": total("Global"),
    }
    layers = f"{root}.language_model.model.layers."
    for name in counts:
        if not name.startswith(layers) or name.count(".") != layers.count(".") + 1:
            continue
        kind = name.rsplit(".", 1)[1]
        key = {"self_attn": "llm_self_attention", "mlp": "llm_mlp", "v2v": "cross_attention_v2v", "t2v": "cross_attention_t2v"}.get(kind)
        if key:
            out[key] += total(name)
    out["language_side"] = out["total"] - out["vision"]
    return out


def measure_point(
    preset: str, variant: str, tokens_per_frame: int, frames: int, device: str, dtype: str,
    repeats: int, decode_tokens: int, language_only: bool,
) -> Point:
    """One (model, frame count) measurement; run it in a fresh process (see `run`)."""
    torch.manual_seed(0)
    dev, dt = torch.device(device), DTYPES[dtype]
    config = _model_config(preset, variant, tokens_per_frame)
    model = CrossLMMForCausalLM(config).to(dev, dt).eval()
    ids, media = _inputs(config, frames, language_only, dev, dt)

    def prefill():
        return model(ids, use_cache=True, logits_to_keep=1, **media)

    with torch.inference_mode():
        out = prefill()  # warm-up
        llm_tokens = out.attention_mask.shape[1]
        del out
        times = []
        for _ in range(repeats):
            _sync(dev)
            start = time.perf_counter()
            out = prefill()
            _sync(dev)
            times.append((time.perf_counter() - start) * 1e3)
            del out

        resident = _resident_mb(dev)
        _reset_peak(dev)
        out = prefill()
        _sync(dev)
        peak = _peak_mb(dev) - resident

        # Decode with both caches, as generate() does.
        mask = out.attention_mask
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(dev)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            step = model(token, attention_mask=mask, past_key_values=out.past_key_values,
                         cross_attention_cache=out.cross_attention_cache, use_cache=True)
            token = step.logits[:, -1].argmax(-1, keepdim=True)
        _sync(dev)
        decode_ms = (time.perf_counter() - start) * 1e3 / max(decode_tokens, 1)
        del out, step

        with flop_counter(depth=100) as counter:
            prefill()
    return Point(
        model=variant if variant == "llava-ov-layout" else f"crosslmm-{tokens_per_frame}",
        frames=frames,
        tokens_per_frame=config.tokens_per_frame,
        llm_tokens=llm_tokens,
        prefill_ms=statistics.median(times),
        prefill_ms_all=[round(t, 2) for t in times],
        decode_ms_per_token=decode_ms,
        peak_mb_beyond_resident=peak,
        resident_mb=resident,
        flops=_component_flops(counter.get_flop_counts()),
    )


def run(
    preset: str, frames: list[int], tokens_per_frame: list[int], device: str, dtype: str,
    repeats: int, decode_tokens: int, language_only: bool, out_dir: Path, threads: int | None = None,
    command: str | None = None,
) -> list[Point]:
    """Measure every point in its own subprocess, then write results.json and results.md."""
    points = []
    variants = [("llava-ov-layout", LLAVA_OV_TOKENS_PER_FRAME)] + [("crosslmm", t) for t in tokens_per_frame]
    for num_frames in frames:
        for variant, tokens in variants:
            args = dict(preset=preset, variant=variant, tokens_per_frame=tokens, frames=num_frames, device=device,
                        dtype=dtype, repeats=repeats, decode_tokens=decode_tokens, language_only=language_only)
            env = dict(os.environ)
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)
            proc = subprocess.run(
                [sys.executable, "-m", "crosslmm.bench.efficiency", json.dumps(args)],
                capture_output=True, text=True, env=env,
            )
            if proc.returncode:
                raise RuntimeError(f"measurement {args} failed:\n{proc.stderr[-4000:]}")
            point = Point(**json.loads(proc.stdout.strip().splitlines()[-1]))
            points.append(point)
            print(f"{point.model:>16} {num_frames:>4} frames: prefill {point.prefill_ms:9.1f} ms, "
                  f"peak +{point.peak_mb_beyond_resident:8.1f} MB, {point.flops['total'] / 1e12:7.3f} TFLOPs", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(preset=preset, device=device, dtype=dtype, repeats=repeats, decode_tokens=decode_tokens,
                language_only=language_only, prompt_tokens=PROMPT_TOKENS, machine=machine_description(device),
                torch=torch.__version__, threads=torch.get_num_threads() if threads is None else threads,
                command=command)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "points": [asdict(p) for p in points]}, indent=2))
    (out_dir / "results.md").write_text(markdown_table(points, meta))
    return points


def machine_description(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores"


def markdown_table(points: list[Point], meta: dict) -> str:
    side = "language side only (vision features given)" if meta["language_only"] else "end to end"
    lines = [
        f"Preset `{meta['preset']}`, {meta['device']} {meta['dtype']}, {side}, {meta['machine']}, torch {meta['torch']}.",
        "",
        f"Command: `{meta['command']}`" if meta.get("command") else "",
        "",
        "| model | frames | LLM tokens | prefill ms | vs LLaVA-OV | decode ms/token | peak MB beyond resident | TFLOPs | vs LLaVA-OV | cross-attn GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = {p.frames: p for p in points if p.model == "llava-ov-layout"}
    for p in points:
        ref = reference.get(p.frames)
        time_ratio = f"{100 * p.prefill_ms / ref.prefill_ms:.1f} %" if ref else "-"
        flop_ratio = f"{100 * p.flops['total'] / ref.flops['total']:.1f} %" if ref else "-"
        cross = (p.flops["cross_attention_v2v"] + p.flops["cross_attention_t2v"]) / 1e9
        lines.append(
            f"| {p.model} | {p.frames} | {p.llm_tokens} | {p.prefill_ms:.1f} | {time_ratio} | {p.decode_ms_per_token:.1f} | "
            f"{p.peak_mb_beyond_resident:.1f} | {p.flops['total'] / 1e12:.3f} | {flop_ratio} | {cross:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # one measurement in a fresh process: `python -m crosslmm.bench.efficiency '<json args>'`
    print(json.dumps(asdict(measure_point(**json.loads(sys.argv[1])))))
