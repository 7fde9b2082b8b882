"""What do the originals tell a cross-attention about *where*, *when* and *what* a patch is?

A T2V query answers "what is in the top-left quadrant in frame 3" only if the keys it
reads carry the patch's place and the frame's index, and the values it reads carry what
is there. This fits linear probes (softmax regression, full batch, Adam) on a world's
held-out videos, training on the first 80 % of the videos and scoring on the rest, for
six targets: the patch's index in the grid, its quadrant, the frame's index within the
video (every patch; chance 1/64, 1/4, 1/8), and the colour, shape and pattern of the
sprite covering the patch (only patches a sprite covers, labelled by the renderer as in
the vision pretraining; the scenes are regenerated from the world's seed); and a
seventh, a sprite's shape from the mean of the patches it covers most (per visible
sprite and frame): what a read spread over the whole sprite could tell. It probes two
feature sets: the frozen ViT's patch features, and the originals the cross-attentions
read (after the projector and, where the model has them, the temporal and spatial
embeddings). A gap between the two says what the projector drops.

    python tools/originals_probe.py MODEL DATA_ROOT [--videos 120] [--steps 300]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from crosslmm.data.video import load_video
from crosslmm.infer import encode_clip, load
from crosslmm.synth.vision_pretrain import TARGETS, patch_labels, patch_owners
from crosslmm.synth.evaluate import split_scenes
from crosslmm.synth.world import SHAPES, video_id


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, classes: int, train_rows: int, steps: int) -> float:
    """Held-out accuracy of a softmax regression on standardised features."""
    x = (features - features[:train_rows].mean(0)) / (features[:train_rows].std(0) + 1e-6)
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x[:train_rows] @ weight + bias, labels[:train_rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((x[train_rows:] @ weight + bias).argmax(1) == labels[train_rows:]).float().mean())


def covered_accuracy(features: torch.Tensor, labels: torch.Tensor, classes: int, train_rows: int, steps: int) -> float:
    """probe_accuracy on the rows whose label is a sprite's (label > 0), background left out."""
    covered = labels > 0
    return probe_accuracy(features[covered], labels[covered] - 1, classes, int(covered[:train_rows].sum()), steps)


def sprite_shapes(features: list[torch.Tensor], scenes: list, grid: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Per visible sprite and frame: the mean of the features (F, N, D per video) of the
    patches it covers most (`patch_owners`, the patches its labels are on), its shape
    label, and its video's position in `scenes` (to hold whole videos out)."""
    rows, labels, videos = [], [], []
    for v, ((_, scene), video) in enumerate(zip(scenes, features)):
        for t in range(video.shape[0]):
            owners = torch.from_numpy(patch_owners(scene, t, grid))
            for o in owners[owners >= 0].unique().tolist():
                rows.append(video[t, owners == o].float().mean(0))
                labels.append(SHAPES.index(scene.objects[o].shape))
                videos.append(v)
    return torch.stack(rows), torch.tensor(labels), videos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--videos", type=int, default=120)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, processor = load(args.model)
    num_frames = processor.sampling.get("num_frames") or 8
    scenes = split_scenes(args.data_root, "test", args.videos)  # (index, scene), regenerated from the world's seed
    videos = [f"videos/{video_id(index)}.mp4" for index, _ in scenes]
    vit, originals = [], []
    with torch.no_grad():
        for video in videos:
            features = encode_clip(model, processor, load_video(args.data_root / video, num_frames=num_frames))
            vit.append(features)
            projected = model.project_frames(features)
            originals.append(model.mark_originals(projected, torch.tensor([features.shape[0]])))
    frames, tokens = vit[0].shape[:2]
    grid = int(tokens ** 0.5)
    patch = torch.arange(tokens)
    quadrant = (patch // grid >= grid // 2).long() * 2 + (patch % grid >= grid // 2).long()
    rows = len(videos) * frames * tokens
    train_rows = int(0.8 * len(videos)) * frames * tokens  # whole videos held out
    targets = {
        "patch index": (patch.repeat(len(videos) * frames), tokens),
        "quadrant": (quadrant.repeat(len(videos) * frames), 4),
        "frame index": (torch.arange(frames).repeat_interleave(tokens).repeat(len(videos)), frames),
    }
    grid_labels = torch.from_numpy(np.concatenate([  # (rows, 3): colour, shape, pattern; 0 = background
        patch_labels(scene, t, grid) for _, scene in scenes for t in range(frames)]))
    for column, (target, names) in enumerate(TARGETS.items()):
        targets[target] = (grid_labels[:, column], len(names))
    result = {"model": str(args.model), "videos": len(videos), "frames": frames, "tokens_per_frame": tokens}
    for name, stack in (("vit", vit), ("originals", originals)):
        features = torch.cat(stack).reshape(rows, -1).float()
        result[name] = {
            target: round((covered_accuracy if target in TARGETS else probe_accuracy)(
                features, labels, classes, train_rows, args.steps), 3)
            for target, (labels, classes) in targets.items()}
        sprite_rows, sprite_labels, sprite_videos = sprite_shapes(stack, scenes, grid)
        train_sprites = sum(v < int(0.8 * len(videos)) for v in sprite_videos)  # whole videos held out, as above
        result[name]["shape, mean of the sprite's patches"] = round(probe_accuracy(
            sprite_rows, sprite_labels, len(SHAPES), train_sprites, args.steps), 3)
        result[name]["rms"] = round(float(features.pow(2).mean().sqrt()), 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
