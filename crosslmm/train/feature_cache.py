"""Stage-1 feature cache: with the vision tower frozen, encode every clip once.

Stage 1 trains only the projector and V2V; the ViT is the expensive part of every step
and gives the same output for the same clip each epoch. The cache stores each media
item's (frames, N, Dv) features under the item's key (resolved file path + sampling
options, so changing `num_frames` cannot silently reuse stale features) in safetensors
shards, and training reads them instead of decoding and encoding video.

A cache is tied to what produced it: `fingerprint` hashes the vision tower's weights, the
config options that shape its output and the frame preprocessing (resize, mean, std), and
a cache built by anything else is refused. Replacing a video file in place under the same
name is not detected: delete the cache when the data changes.

On many processes only the main process fills the cache while the others wait; for a
large dataset fill it first with one process (the same recipe with `max_steps=1`), so
the wait cannot outlast the process group's timeout.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "index.json"
SHARD_BYTES = 256 * 2**20


def vision_fingerprint(model, processor) -> str:
    digest = hashlib.sha256()
    config = model.config
    options = [config.vision_config.to_dict(), config.vision_feature_layer, repr(processor.frame_processor)]
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureCache:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.reload()

    def reload(self) -> None:
        index_path = self.folder / INDEX
        self.index = json.loads(index_path.read_text()) if index_path.exists() else {"fingerprint": None, "items": {}}

    def __contains__(self, key: str) -> bool:
        return key in self.index["items"]

    def check(self, fingerprint: str) -> None:
        stored = self.index["fingerprint"]
        if stored is not None and stored != fingerprint:
            raise ValueError(
                f"feature cache {self.folder} was built by another vision tower (fingerprint {stored}, "
                f"this model {fingerprint}); delete it or point feature_cache elsewhere"
            )

    def frame_counts(self) -> dict[str, int]:
        """Frames of every cached media item: lets the dataset skip decoding entirely."""
        return {key: entry[2] for key, entry in self.index["items"].items()}

    def get(self, keys: list[str]) -> torch.Tensor:
        """Features of several media items, concatenated along frames: (sum F, N, Dv)."""
        missing = [k for k in keys if k not in self]
        if missing:
            raise KeyError(f"feature cache {self.folder} has no features for {missing[:3]}")
        tensors = []
        for key in keys:
            shard, name, _ = self.index["items"][key]
            with safe_open(self.folder / shard, "pt") as f:
                tensors.append(f.get_tensor(name))
        return torch.cat(tensors)

    @torch.no_grad()
    def fill(self, model, items, fingerprint: str, progress=None) -> int:
        """Encode and store the media of `items` (dicts with `media_keys`, `pixel_values`,
        `media_num_frames`) that the cache does not hold yet. Returns how many were added."""
        self.check(fingerprint)
        self.folder.mkdir(parents=True, exist_ok=True)
        pending: dict[str, torch.Tensor] = {}
        pending_bytes, added = 0, 0
        shard_id = len({entry[0] for entry in self.index["items"].values()})
        for item in items:
            if item is None or item["pixel_values"] is None:
                continue
            todo = [k for k in item["media_keys"] if k not in self and k not in pending]
            if not todo:
                continue
            features = model.vision_tower(item["pixel_values"].to(next(model.parameters()).device))
            for key, chunk in zip(item["media_keys"], features.split(item["media_num_frames"].tolist())):
                if key in todo:
                    pending[key] = chunk.contiguous().cpu()
                    pending_bytes += chunk.numel() * chunk.element_size()
                    added += 1
            if progress is not None:
                progress.update(1)
            if pending_bytes >= SHARD_BYTES:
                self._write_shard(pending, shard_id, fingerprint)
                shard_id, pending, pending_bytes = shard_id + 1, {}, 0
        if pending:
            self._write_shard(pending, shard_id, fingerprint)
        return added

    def _write_shard(self, tensors: dict[str, torch.Tensor], shard_id: int, fingerprint: str) -> None:
        shard = f"features-{shard_id:05d}.safetensors"
        names = {key: f"t{i}" for i, key in enumerate(tensors)}
        tmp = self.folder / (shard + ".tmp")
        save_file({names[k]: v for k, v in tensors.items()}, tmp)
        tmp.replace(self.folder / shard)
        self.index["fingerprint"] = fingerprint
        self.index["items"].update({key: [shard, names[key], tensors[key].shape[0]] for key in tensors})
        index_tmp = self.folder / (INDEX + ".tmp")
        index_tmp.write_text(json.dumps(self.index))
        index_tmp.replace(self.folder / INDEX)
