"""Pretrain a small SigLIP vision encoder on the synthetic world, as SigLIP is pretrained
for the real CrossLMM.

Why: the paper's claim is about a *pretrained, frozen-in-stage-1* ViT whose patch tokens
describe local content, and about what pooling those tokens to one per frame throws
away. A ViT trained end to end through a 1-token bottleneck instead learns to pack the
whole frame into the pooled token, which is a different experiment (and on a 2-core CPU
it does not learn at all in 15 minutes: first attempt in docs/synthetic.md). So the
small models get what the real ones get, a ViT that already sees: a `SiglipVisionModel`
trained from scratch to say, for every patch of a rendered frame, the colour, shape and
pattern of the sprite covering it (or "background"). Dense per-patch labels come free
from the renderer's ground truth, so a few minutes of CPU are enough.

The encoder is trained through `crosslmm.model.vision.VisionTower` (the exact module,
feature layer and preprocessing CrossLMM uses) and saved as an ordinary
`SiglipVisionModel` checkpoint that `crosslmm init --vision` and `crosslmm build` read.
Layers after the feature layer are never run by CrossLMM and stay at their initial
values.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from crosslmm.model.configuration import CrossLMMConfig
from crosslmm.model.vision import VisionTower
from crosslmm.synth.world import COLORS, PATTERNS, SHAPES, Scene, render, shape_mask
from crosslmm.train.state import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint

# Per-patch targets; class 0 of each is "no sprite here".
TARGETS: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES, "pattern": PATTERNS}
MIN_COVER = 1 / 8  # a patch is labelled with a sprite covering at least this fraction of it


def object_map(scene: Scene, t: int) -> np.ndarray:
    """(H, W) int: index into `scene.objects` of the sprite drawn at each pixel, -1 for
    background (later objects are drawn over earlier ones, as in `render`)."""
    ids = np.full((scene.size, scene.size), -1, dtype=np.int64)
    for index, obj in enumerate(scene.objects):
        if obj.visible(t):
            x0, y0, x1, y1 = obj.box(t)
            ids[y0:y1, x0:x1][shape_mask(obj.shape, obj.size)] = index
    return ids


def patch_owners(scene: Scene, t: int, grid: int) -> np.ndarray:
    """(grid * grid,) int: index into `scene.objects` of the sprite covering most of each
    of frame t's patches (row-major like the ViT's tokens), -1 where no sprite covers
    `MIN_COVER` of it."""
    ids = object_map(scene, t)
    side = scene.size // grid
    owners = np.full(grid * grid, -1, dtype=np.int64)
    for row in range(grid):
        for col in range(grid):
            patch = ids[row * side:(row + 1) * side, col * side:(col + 1) * side]
            counts = np.bincount(patch[patch >= 0], minlength=len(scene.objects))
            if counts.size and counts.max() >= MIN_COVER * side * side:
                owners[row * grid + col] = int(counts.argmax())
    return owners


def patch_labels(scene: Scene, t: int, grid: int) -> np.ndarray:
    """(grid * grid, 3) int labels (colour, shape, pattern; 0 = background) of frame t's
    patches, row-major like the ViT's tokens: the sprite covering most of each patch."""
    labels = np.zeros((grid * grid, len(TARGETS)), dtype=np.int64)
    for patch, owner in enumerate(patch_owners(scene, t, grid)):
        if owner >= 0:
            obj = scene.objects[owner]
            labels[patch] = (
                1 + TARGETS["color"].index(obj.color),
                1 + TARGETS["shape"].index(obj.shape),
                1 + TARGETS["pattern"].index(obj.pattern),
            )
    return labels


def frames_and_labels(scenes: Sequence[Scene], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All frames of `scenes`, (n, 3, S, S) float normalised like SigLIP's processor
    (mean = std = 0.5), and their patch labels (n, grid * grid, 3)."""
    frames, labels = [], []
    for scene in scenes:
        video = render(scene)  # (T, S, S, 3) uint8
        frames.append(video)
        labels.extend(patch_labels(scene, t, grid) for t in range(scene.frames))
    pixels = torch.from_numpy(np.concatenate(frames)).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    return pixels, torch.from_numpy(np.stack(labels))


class PatchProbe(nn.Module):
    """The vision tower plus one linear classifier per target on its patch tokens."""

    def __init__(self, config: CrossLMMConfig) -> None:
        super().__init__()
        self.tower = VisionTower(config)
        width = config.vision_config.hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(width, 1 + len(classes)) for name, classes in TARGETS.items()})

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor, return_tokens: bool = False):
        """(loss, per-target accuracy on sprite patches[, the tower's tokens (n, N, Dv)])."""
        tokens = self.tower(pixels)  # (n, N, Dv)
        loss = torch.zeros(())
        accuracy = {}
        for k, (name, head) in enumerate(self.heads.items()):
            logits = head(tokens)  # (n, N, classes)
            target = labels[..., k]
            loss = loss + F.cross_entropy(logits.flatten(0, 1), target.flatten())
            sprite = target > 0  # accuracy where it matters: patches that show a sprite
            accuracy[name] = float((logits.argmax(-1)[sprite] == target[sprite]).float().mean())
        return (loss, accuracy, tokens) if return_tokens else (loss, accuracy)


def fit_heads(probe: PatchProbe, encoder: VisionTower, pixels: torch.Tensor, labels: torch.Tensor,
              frames: int = 4096, steps: int = 300) -> None:
    """Fit the probe's linear heads alone on `encoder`'s (frozen) features of the first
    `frames` frames: full batch, Adam."""
    with torch.no_grad():
        features = torch.cat([encoder(pixels[i:i + 512]) for i in range(0, min(frames, len(pixels)), 512)])
    labels = labels[: len(features)]
    optimizer = torch.optim.Adam(probe.heads.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = sum(F.cross_entropy(head(features).flatten(0, 1), labels[..., k].flatten())
                   for k, head in enumerate(probe.heads.values()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def pretrain_vision(
    config: CrossLMMConfig,
    train_scenes: Sequence[Scene],
    eval_scenes: Sequence[Scene],
    out_dir: str | Path,
    steps: int = 600,
    batch_frames: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    init: str | Path | VisionTower | None = None,
    anchor: float = 0.0,
    checkpoints: str | Path | None = None,
    save_every: int = 500,  # about 50 s of the default recipe's pretraining on 2 cores
) -> dict:
    """Train the vision encoder of `config` on per-patch labels of `train_scenes`, save it
    to `out_dir` as a `SiglipVisionModel` checkpoint and return its held-out per-patch
    accuracy on `eval_scenes` (sprite patches only).

    `init` (a vision-encoder checkpoint of `config`'s shape, or a model's tower)
    continues an encoder instead of starting from random weights: a longer pretraining
    of the encoder a trained CrossLMM already reads. Its heads are first fitted on the
    frozen encoder's features, so random heads do not shake the tower in the first
    steps; `anchor` > 0 adds
    `anchor * |f - f0|^2 / |f0|^2` (f0: the starting encoder's features of the same
    frames), which keeps the features near what the downstream projector learned
    (docs/synthetic.md, "a better-trained encoder").

    `checkpoints` (a folder) gets the probe, optimizer, schedule and random state every
    `save_every` steps, atomically (`crosslmm.train.state`), and a call that finds one
    there resumes from it: the result is the same tensors as a run never stopped, since
    each step's frames follow from the seed and the step."""
    if config.vision_config.model_type != "siglip_vision_model":
        raise ValueError("synthetic-world pretraining builds a SigLIP vision encoder")
    grid = config.vision_grid_size
    if train_scenes[0].size != config.image_size:
        raise ValueError(f"scenes are {train_scenes[0].size} px; the vision encoder takes {config.image_size} px")
    if anchor and init is None:
        raise ValueError("anchor keeps an encoder near where it started: give init")
    torch.manual_seed(seed)
    probe = PatchProbe(config)
    pixels, labels = frames_and_labels(train_scenes, grid)
    initial = None  # the starting encoder, frozen: the anchor's reference
    if init is not None:
        if isinstance(init, VisionTower):
            encoder = init.vit.state_dict()
        else:
            from crosslmm.checkpoints.build import load_vision

            encoder = load_vision(init, dtype=torch.float32).state_dict()
        probe.tower.vit.load_state_dict({k: encoder[k].float() for k in probe.tower.vit.state_dict()})
        initial = copy.deepcopy(probe.tower).eval().requires_grad_(False)
        fit_heads(probe, initial, pixels, labels)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))
    first, seconds_before = 0, 0.0
    started_from = None if init is None else str(init) if isinstance(init, (str, Path)) else "a given tower"
    settings = {"steps": steps, "batch_frames": batch_frames, "learning_rate": learning_rate, "seed": seed,
                "train_frames": len(pixels), "anchor": anchor, "init": started_from}
    checkpoints = Path(checkpoints) if checkpoints is not None else None
    folder = latest_checkpoint(checkpoints) if checkpoints is not None else None
    if folder is not None:
        saved = load_checkpoint(folder, probe, optimizer, schedule)
        if saved["settings"] != settings:
            raise ValueError(f"{folder} is a pretraining with other settings ({saved['settings']}, not {settings}); "
                             "remove it to start over")
        first, seconds_before = saved["step"], saved["seconds"]
    started = time.perf_counter()
    probe.train()
    for step in range(first, steps):
        start = (step * batch_frames) % len(pixels)
        index = order[start:start + batch_frames]
        loss, _, tokens = probe(pixels[index], labels[index], return_tokens=True)
        if anchor:
            with torch.no_grad():
                reference = initial(pixels[index])  # (n, N, Dv)
            loss = loss + anchor * (tokens - reference).pow(2).mean() / reference.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if checkpoints is not None and save_every > 0 and (step + 1) % save_every == 0 and step + 1 < steps:
            done = {"step": step + 1, "settings": settings, "seconds": seconds_before + time.perf_counter() - started}
            save_checkpoint(checkpoints / f"step-{step + 1:07d}", dict(probe.named_parameters()), optimizer, schedule,
                            done, json.dumps({"what": "synthetic-world vision pretraining"}))
            prune_checkpoints(checkpoints, keep=1)
    seconds = seconds_before + time.perf_counter() - started

    probe.eval()
    eval_pixels, eval_labels = frames_and_labels(eval_scenes, grid)
    with torch.no_grad():
        loss, accuracy = probe(eval_pixels, eval_labels)
    save_vision_encoder(probe.tower, config.vision_config, out_dir)
    report = {"steps": steps, "batch_frames": batch_frames, "learning_rate": learning_rate,
              "init": started_from,
              "anchor": anchor, "train_frames": len(pixels), "seconds": round(seconds, 1),
              "eval_loss": round(float(loss), 4), "eval_patch_accuracy": {k: round(v, 4) for k, v in accuracy.items()}}
    (Path(out_dir) / "pretraining.json").write_text(json.dumps(report, indent=2))
    return report


def save_vision_encoder(tower: VisionTower, vision_config: SiglipVisionConfig, out_dir: str | Path) -> Path:
    """Save the tower's layers into a full `SiglipVisionModel` of `vision_config` (unused
    top layers and post-layernorm at their initial values), with SigLIP's preprocessor."""
    from crosslmm.checkpoints.scratch import siglip_preprocessor_config

    full = SiglipVisionModel(vision_config)
    missing, unexpected = full.load_state_dict(tower.vit.state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"vision tower tensors with no place in SiglipVisionModel: {unexpected}")
    out_dir = Path(out_dir)
    full.save_pretrained(out_dir)
    size = vision_config.image_size
    (out_dir / "preprocessor_config.json").write_text(json.dumps(siglip_preprocessor_config(size), indent=2))
    return out_dir
