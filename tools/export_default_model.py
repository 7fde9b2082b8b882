"""Bundle a hand-trained synthetic-world model as the default model.

The ablation runner exports its `default_model:` variant itself; a model trained by hand
with `crosslmm train` (e.g. a longer question stage continued from the bundled model) is
exported the same way here: stored in bf16, the stored copy scored on a world's held-out
split, and the commands that trained it written into its `training.json`, so the card
says how to reproduce it.

    python tools/export_default_model.py MODEL --data WORLD --variant both-k2 \
        --command "crosslmm train ..." [--command ...] [--note "..."] [--out crosslmm/assets/default_model]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from crosslmm.model.configuration import CrossLMMConfig
from crosslmm.synth.ablations import export_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the trained checkpoint directory (float32)")
    parser.add_argument("--data", type=Path, required=True, help="a synthetic world: its test.json is scored")
    parser.add_argument("--variant", required=True, help="the ablation variant the model is, e.g. both-k2")
    parser.add_argument("--command", action="append", default=[], help="a command that trained it, in order")
    parser.add_argument("--note", default="", help="where it comes from, in a sentence")
    parser.add_argument("--seed", type=int, default=0, help="the training seed")
    parser.add_argument("--out", type=Path, default=Path("crosslmm/assets/default_model"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = CrossLMMConfig.from_pretrained(args.model, local_files_only=True)
    options = {"tokens_per_frame": config.tokens_per_frame, "use_v2v": config.use_v2v, "use_t2v": config.use_t2v,
               "dcal_every_k": config.dcal_every_k}
    if config.temporal_embedding_frames:
        options["temporal_embedding_frames"] = config.temporal_embedding_frames
    if config.spatial_embedding:
        options["spatial_embedding"] = True
    if config.temporal_embedding_frames or config.spatial_embedding:
        options["identity_embedding_std"] = config.identity_embedding_std
    card = {"variant": args.variant, "options": options, "seed": args.seed, "training": args.command, "note": args.note}
    out = export_model(args.model, args.out, "bfloat16", args.data, card)
    card = json.loads((out / "training.json").read_text())
    print(json.dumps({k: card[k] for k in ("variant", "bytes")} | {
        k: round(v, 4) for k, v in card["held_out_accuracy"].items() if k in ("all", "form/mc", "form/short")}))


if __name__ == "__main__":
    main()
