"""The command line the probe tools share: MODEL CHECKPOINT|- RECORDS N.

`CHECKPOINT` (a `checkpoints/step-*` folder of a run started from MODEL) loads that
step's trained weights over MODEL, so any step of a run can be probed without exporting
it; `-` uses MODEL as it is.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from crosslmm.infer import load


def parser(doc: str) -> argparse.ArgumentParser:
    """MODEL, CHECKPOINT, RECORDS and N; a tool adds its own options."""
    result = argparse.ArgumentParser(description=doc.splitlines()[0])
    result.add_argument("model", type=Path)
    result.add_argument("checkpoint")
    result.add_argument("records", type=Path)
    result.add_argument("n", type=int)
    return result


def load_probed(args: argparse.Namespace):
    """(model in eval mode, processor) on one CPU thread, the checkpoint's weights applied."""
    torch.set_num_threads(1)
    model, processor = load(args.model)
    model.eval()
    if args.checkpoint != "-":
        model.load_state_dict(load_file(Path(args.checkpoint) / "trainable.safetensors"), strict=False)
    return model, processor
