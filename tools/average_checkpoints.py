"""A trained model whose trainable tensors are the mean of several training checkpoints'.

Weight averaging (checkpoint soups) is a cheap test of whether the last steps of a stage
still wander around a better point. A checkpoint keeps only the trainable tensors
(`trainable.safetensors`, `crosslmm.train.state`); the frozen ones come from MODEL, the
stage's exported model. One process or DDP (one `trainable.safetensors`); FSDP shards are
not merged.
Stages keep one checkpoint (`keep_checkpoints`), so copy them out while the stage runs,
or raise `keep_checkpoints`.

    python tools/average_checkpoints.py MODEL OUT CHECKPOINT [CHECKPOINT ...]
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="the stage's exported model folder (float32)")
    parser.add_argument("out", type=Path)
    parser.add_argument("checkpoints", type=Path, nargs="+", help="checkpoint folders holding trainable.safetensors")
    args = parser.parse_args()

    weights = load_file(args.model / "model.safetensors")
    sums: dict[str, torch.Tensor] = {}
    for folder in args.checkpoints:
        for name, tensor in load_file(folder / "trainable.safetensors").items():
            if name not in weights:
                raise ValueError(f"{folder}: {name} is not a tensor of {args.model}")
            sums[name] = sums.get(name, 0) + tensor.double()
    shutil.copytree(args.model, args.out, dirs_exist_ok=True)  # config, processor and tokenizer files
    for name, total in sums.items():
        weights[name] = (total / len(args.checkpoints)).to(weights[name].dtype)
    save_file(weights, args.out / "model.safetensors", metadata={"format": "pt"})
    print(f"{len(sums)} tensors averaged over {len(args.checkpoints)} checkpoints -> {args.out}")


if __name__ == "__main__":
    main()
