"""Prefill and decode cost of CrossLMM against LLaVA-OneVision, as in the paper's Fig. 4.

Three models, random weights at a preset's shapes, one prompt of `PROMPT_TOKENS` text
tokens around one video:
- `crosslmm-<g*g>`: CrossLMM, g*g pooled tokens per frame, DCAL every K layers;
- `llava-ov-layout`: the same code path computing LLaVA-OneVision (the `llava-ov`
  compatibility config: the ViT depth of released LLaVA-OV checkpoints, which drop
  SigLIP's last layer, 2x2 bilinear pooling after the projector, i.e.
  196 tokens per frame at 27x27, one newline per video, no DCAL): the like-for-like
  comparison of the two architectures;
- `transformers-llava-ov`: transformers' own `LlavaOnevisionForConditionalGeneration`
  at the same shapes, the implementation a user would otherwise run (end to end only: it
  cannot take precomputed vision features).

Every (model, frame count) point runs in a fresh subprocess so one measurement's
allocations cannot inflate another's peak. Per point: prefill latency (median of
repeats after a warm-up) and, end to end, the vision tower's share of it; decode
latency per token with the caches; peak memory of the process's first prefill beyond
what was resident before it (weights and inputs), and that resident size (CUDA: allocator
statistics; CPU: the resident set, its peak reset through /proc/self/clear_refs; measured
first because memory freed by earlier runs stays resident and would hide the peak; a
fixed glibc mmap threshold would make RSS exact but slowed prefill by up to 2x here, so
timings and memory come from the same unmodified process); FLOPs per
component (torch's FlopCounterMode, CPU attention counted by crosslmm.bench.flops).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from crosslmm import compat
from crosslmm.bench.flops import flop_counter
from crosslmm.model.modeling import CrossLMMForCausalLM
from crosslmm.presets import preset_config

PROMPT_TOKENS = 64  # system prompt and question around the video
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEER = "transformers-llava-ov"
LAYOUT = "llava-ov-layout"


@dataclass
class Point:
    model: str
    frames: int
    tokens_per_frame: int
    llm_tokens: int  # sequence length the LLM sees
    prefill_ms: float
    prefill_ms_all: list[float]
    vision_ms: float | None  # the vision tower alone (end to end only)
    decode_ms_per_token: float
    peak_mb_beyond_resident: float
    resident_mb: float
    flops: dict[str, float] = field(default_factory=dict)  # component -> FLOPs of one prefill


# ---- the models under test ----


@dataclass
class Subject:
    """What a measurement needs from a model: how to prefill, decode and time its vision side."""

    model: torch.nn.Module
    prefill: Callable[[], object]  # -> output with .logits and the KV cache
    decode_step: Callable[[object, torch.Tensor, torch.Tensor], object]  # (prefill output, token, mask) -> output
    prefill_mask: Callable[[object], torch.Tensor]
    vision: Callable[[], object] | None
    tokens_per_frame: int


def _prompt(media_token_id: int, vocab: int, media_width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, vocab - 2, (PROMPT_TOKENS,), generator=generator)
    half = PROMPT_TOKENS // 2
    media = torch.full((media_width,), media_token_id)
    return torch.cat([text[:half], media, text[half:]])[None]


def _media(config, frames: int, language_only: bool, device, dtype) -> dict:
    generator = torch.Generator().manual_seed(1)
    if language_only:
        n, width = config.vision_grid_size**2, config.vision_config.hidden_size
        return {"vision_features": torch.randn(frames, n, width, generator=generator).to(device, dtype)}
    size = config.image_size
    return {"pixel_values": torch.randn(frames, 3, size, size, generator=generator).to(device, dtype)}


def _crosslmm_subject(config, frames: int, language_only: bool, device, dtype) -> Subject:
    model = CrossLMMForCausalLM(config).to(device, dtype).eval()
    ids = _prompt(config.media_token_id, config.text_config.vocab_size, 1).to(device)
    media = _media(config, frames, language_only, device, dtype)
    media["media_num_frames"] = torch.tensor([frames], device=device)

    def decode_step(out, token, mask):
        return model(token, attention_mask=mask, cache=out.cache,
                     cross_attention_cache=out.cross_attention_cache, use_cache=True)

    return Subject(
        model=model,
        prefill=lambda: model(ids, use_cache=True, logits_to_keep=1, **media),
        decode_step=decode_step,
        prefill_mask=lambda out: out.attention_mask,
        vision=None if language_only else (lambda: model.vision_tower(media["pixel_values"])),
        tokens_per_frame=config.tokens_per_frame,
    )


def _transformers_llava_ov_subject(config, frames: int, device, dtype) -> Subject:
    """transformers' LlavaOnevisionForConditionalGeneration with the preset's shapes."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    vision_config = config.vision_config.to_dict() | {"vision_use_head": False}  # as in released LLaVA-OV checkpoints
    peer_config = LlavaOnevisionConfig(
        vision_config=vision_config, text_config=config.text_config.to_dict(),
        video_token_id=config.media_token_id, image_token_id=config.media_token_id - 1,
        vision_feature_layer=config.vision_feature_layer, vision_feature_select_strategy="full",
    )
    model = LlavaOnevisionForConditionalGeneration(peer_config).to(device, dtype).eval()
    pooled = math.ceil(config.vision_grid_size / 2) ** 2
    width = frames * pooled + 1  # the processor expands <video> to every frame's tokens plus one newline
    ids = _prompt(config.media_token_id, config.text_config.vocab_size, width).to(device)
    video = _media(config, frames, False, device, dtype)["pixel_values"][None]

    def decode_step(out, token, mask):
        return model(input_ids=token, attention_mask=mask, use_cache=True, **compat.cache_kwargs(compat.output_cache(out)))

    return Subject(
        model=model,
        prefill=lambda: model(input_ids=ids, pixel_values_videos=video, use_cache=True, logits_to_keep=1),
        decode_step=decode_step,
        prefill_mask=lambda out: torch.ones_like(ids),
        vision=lambda: model.model.vision_tower(video[0], output_hidden_states=True),
        tokens_per_frame=pooled,
    )


def _subject(preset: str, variant: str, tokens_per_frame: int, frames: int, language_only: bool, device, dtype) -> Subject:
    # Released LLaVA-OV checkpoints keep a SigLIP tower with its last layer removed and read
    # its output: the same ViT depth as CrossLMM's second-to-last layer of the full tower.
    if variant == LAYOUT:  # LLaVA-OV's computation (2x2 pooling after the projector, newline) on our code path
        config = preset_config(preset, vision_feature_layer=-2).to_llava_ov_compatible()
        return _crosslmm_subject(config, frames, language_only, device, dtype)
    if variant == PEER:
        config = preset_config(preset, vision_feature_layer=-1)
        config.vision_config.num_hidden_layers -= 1
        return _transformers_llava_ov_subject(config, frames, device, dtype)
    return _crosslmm_subject(preset_config(preset, tokens_per_frame=tokens_per_frame), frames, language_only, device, dtype)


# ---- measuring one point ----


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
            f.write("5")  # resets VmHWM, the peak resident set size


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024


def _timed_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        del result
    return times


# Module names of each component in both model families (CrossLMM, transformers' LLaVA-OneVision).
COMPONENT_MODULES = {
    "vision": ("CrossLMMForCausalLM.vision_tower", "LlavaOnevisionForConditionalGeneration.model.vision_tower"),
    "projector": ("CrossLMMForCausalLM.projector", "LlavaOnevisionForConditionalGeneration.model.multi_modal_projector"),
    "lm_head": ("CrossLMMForCausalLM.language_model.lm_head", "LlavaOnevisionForConditionalGeneration.lm_head"),
}
DECODER_LAYERS = ("CrossLMMForCausalLM.language_model.model.layers.", "LlavaOnevisionForConditionalGeneration.model.language_model.layers.")
LAYER_PARTS = {"self_attn": "llm_self_attention", "mlp": "llm_mlp", "v2v": "cross_attention_v2v", "t2v": "cross_attention_t2v"}


def _component_flops(counts: dict[str, dict]) -> dict[str, float]:
    """Group FlopCounterMode's per-module counts into the components of method.md."""
    def total(name: str) -> float:
        return float(sum(counts.get(name, {}).values()))

    out = {part: sum(total(name) for name in names) for part, names in COMPONENT_MODULES.items()}
    out.update(dict.fromkeys(LAYER_PARTS.values(), 0.0))
    for name in counts:
        prefix = next((p for p in DECODER_LAYERS if name.startswith(p)), None)
        if prefix is None:
            continue
        index_and_part = name[len(prefix):].split(".")
        if len(index_and_part) == 2 and index_and_part[1] in LAYER_PARTS:
            out[LAYER_PARTS[index_and_part[1]]] += total(name)
    out["total"] = total("Global")
    out["language_side"] = out["total"] - out["vision"]
    return out


def measure_point(
    preset: str, variant: str, tokens_per_frame: int, frames: int, device: str, dtype: str,
    repeats: int, decode_tokens: int, language_only: bool,
) -> Point:
    """One (model, frame count) measurement; `run` calls it in a fresh process."""
    torch.manual_seed(0)
    dev, dt = torch.device(device), DTYPES[dtype]
    subject = _subject(preset, variant, tokens_per_frame, frames, language_only, dev, dt)
    with torch.inference_mode():
        # Memory first, on the process's first prefill: allocations freed by earlier runs
        # would stay resident (the allocator keeps them) and hide part of the peak.
        resident = _resident_mb(dev)
        _reset_peak(dev)
        out = subject.prefill()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        peak = _peak_mb(dev) - resident
        llm_tokens = subject.prefill_mask(out).shape[1]

        mask = subject.prefill_mask(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)

        def decode(steps: int) -> None:
            nonlocal mask, token
            for _ in range(steps):
                mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
                step = subject.decode_step(out, token, mask)
                token = step.logits[:, -1].argmax(-1, keepdim=True)

        decode(1)  # warm-up
        decode_ms = _timed_ms(lambda: decode(decode_tokens), dev, 1)[0] / max(decode_tokens, 1)
        out = None  # free the prefill caches before timing

        subject.prefill()  # warm-up for the timings
        times = _timed_ms(subject.prefill, dev, repeats)
        vision_ms = statistics.median(_timed_ms(subject.vision, dev, repeats)) if subject.vision else None
        with flop_counter(depth=100) as counter:
            subject.prefill()
    return Point(
        model=variant if variant in (LAYOUT, PEER) else f"crosslmm-{tokens_per_frame}",
        frames=frames, tokens_per_frame=subject.tokens_per_frame, llm_tokens=llm_tokens,
        prefill_ms=statistics.median(times), prefill_ms_all=[round(t, 2) for t in times], vision_ms=vision_ms,
        decode_ms_per_token=decode_ms, peak_mb_beyond_resident=peak, resident_mb=resident,
        flops=_component_flops(counter.get_flop_counts()),
    )


# ---- a whole run ----


def run(
    preset: str, frames: list[int], tokens_per_frame: list[int], device: str, dtype: str, repeats: int,
    decode_tokens: int, language_only: bool, out_dir: Path, threads: int | None = None, command: str | None = None,
    peer: bool = True,
) -> list[Point]:
    """Measure every point in its own subprocess; write results.json, results.md and fig4.png."""
    variants = [(LAYOUT, 0)]
    if peer and not language_only:
        variants.append((PEER, 0))
    variants += [("crosslmm", t) for t in tokens_per_frame]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    points = []
    for num_frames in frames:
        for variant, tokens in variants:
            args = dict(preset=preset, variant=variant, tokens_per_frame=tokens, frames=num_frames, device=device,
                        dtype=dtype, repeats=repeats, decode_tokens=decode_tokens, language_only=language_only)
            proc = subprocess.run([sys.executable, "-m", "crosslmm.bench.efficiency", json.dumps(args)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                raise RuntimeError(f"measurement {args} failed:\n{proc.stderr[-4000:]}")
            point = Point(**json.loads(proc.stdout.strip().splitlines()[-1]))
            points.append(point)
            print(f"{point.model:>22} {num_frames:>4} frames: prefill {point.prefill_ms:10.1f} ms, "
                  f"peak +{point.peak_mb_beyond_resident:9.1f} MB, {point.flops['total'] / 1e12:8.4f} TFLOPs", flush=True)

    meta = dict(preset=preset, device=device, dtype=dtype, repeats=repeats, decode_tokens=decode_tokens,
                language_only=language_only, prompt_tokens=PROMPT_TOKENS, machine=machine_description(device),
                torch=torch.__version__, threads=threads or torch.get_num_threads(), command=command)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "points": [asdict(p) for p in points]}, indent=2))
    (out_dir / "results.md").write_text(markdown_table(points, meta))
    plot(points, meta, out_dir / "fig4.png")
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


def _ratio(value: float, reference: float | None) -> str:
    return f"{100 * value / reference:.1f} %" if reference else "-"


def markdown_table(points: list[Point], meta: dict) -> str:
    side = "language side only (vision features given)" if meta["language_only"] else "end to end"
    lines = [
        f"Preset `{meta['preset']}`, {meta['device']} {meta['dtype']}, {side}, {meta['machine']}, "
        f"{meta['threads']} threads, torch {meta['torch']}; {meta['prompt_tokens']} text tokens around one video; "
        f"median of {meta['repeats']} prefills after a warm-up.",
        "",
    ]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    lines += [
        "| model | frames | LLM tokens | prefill ms | vs layout | vision ms | decode ms/token | peak MB beyond resident "
        "| vs layout | resident MB | TFLOPs | vs layout | language-side TFLOPs | cross-attn GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = {p.frames: p for p in points if p.model == LAYOUT}
    for p in points:
        ref = reference.get(p.frames)
        cross = (p.flops["cross_attention_v2v"] + p.flops["cross_attention_t2v"]) / 1e9
        vision = f"{p.vision_ms:.1f}" if p.vision_ms is not None else "-"
        lines.append(
            f"| {p.model} | {p.frames} | {p.llm_tokens} | {p.prefill_ms:.1f} | {_ratio(p.prefill_ms, ref and ref.prefill_ms)} "
            f"| {vision} | {p.decode_ms_per_token:.1f} | {p.peak_mb_beyond_resident:.1f} "
            f"| {_ratio(p.peak_mb_beyond_resident, ref and ref.peak_mb_beyond_resident)} | {p.resident_mb:.0f} "
            f"| {p.flops['total'] / 1e12:.4f} | {_ratio(p.flops['total'], ref and ref.flops['total'])} "
            f"| {p.flops['language_side'] / 1e12:.4f} | {cross:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(points: list[Point], meta: dict, path: Path) -> None:
    """Memory, FLOPs and prefill time against frames, with CrossLMM's reduction vs the
    layout written next to one CrossLMM curve (9 tokens per frame when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("peak_mb_beyond_resident", "peak memory beyond resident (MB)"), ("flops", "TFLOPs"),
               ("prefill_ms", "prefill time (ms)")]
    models = list(dict.fromkeys(p.model for p in points))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for axis, (key, label) in zip(axes, metrics):
        for model in models:
            series = sorted((p for p in points if p.model == model), key=lambda p: p.frames)
            values = [p.flops["total"] / 1e12 if key == "flops" else getattr(p, key) for p in series]
            axis.plot([p.frames for p in series], values, marker="o", label=model)
        reference = {p.frames: p for p in points if p.model == LAYOUT}
        crosslmm_models = [m for m in models if m.startswith("crosslmm")]
        annotated = "crosslmm-9" if "crosslmm-9" in crosslmm_models else (crosslmm_models or [None])[0]
        for p in points:
            if p.model == annotated and p.frames in reference:
                ref = reference[p.frames]
                value = p.flops["total"] / 1e12 if key == "flops" else getattr(p, key)
                base = ref.flops["total"] / 1e12 if key == "flops" else getattr(ref, key)
                if base:
                    axis.annotate(f"-{100 * (1 - value / base):.0f}%", (p.frames, value), textcoords="offset points",
                                  xytext=(0, -12), ha="center", fontsize=8)
        axis.set_xlabel("frames")
        axis.set_ylabel(label)
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    side = "language side" if meta["language_only"] else "end to end"
    figure.suptitle(f"{meta['preset']} on {meta['machine']} ({meta['device']} {meta['dtype']}, {side})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def replot(results_json: Path) -> Path:
    """Redraw fig4.png from a results.json (no measurement)."""
    data = json.loads(Path(results_json).read_text())
    path = Path(results_json).with_name("fig4.png")
    plot([Point(**p) for p in data["points"]], data["meta"], path)
    return path


if __name__ == "__main__":  # one measurement in a fresh process: `python -m crosslmm.bench.efficiency '<json args>'`
    print(json.dumps(asdict(measure_point(**json.loads(sys.argv[1])))))
