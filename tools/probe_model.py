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

from crosslmm.data.processor import IGNORE_INDEX
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


def answer_query_states(model, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """For an encoded record (`processor.encode_record`), the residual stream of the token
    that predicts the answer after each decoder layer, (layers, D), and that token's logits."""
    query = int((item["labels"] != IGNORE_INDEX).nonzero()[0]) - 1
    outputs = []  # each decoder layer's output, (1, L_llm, D): the text with the visual tokens spliced in
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.decoder_layers]
    try:
        logits = model(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"],
                       media_num_frames=item["media_num_frames"]).logits
    finally:
        for hook in hooks:
            hook.remove()
    at = query + outputs[0].shape[1] - item["input_ids"].shape[0]  # visual tokens minus their placeholders come first
    return torch.stack([h[0, at] for h in outputs]), logits[0, at]
