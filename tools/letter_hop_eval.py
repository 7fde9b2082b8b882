"""Held-out option-letter hop accuracy of saved models, on scenes no training step saw.

The runner's probe scores 150 scenes per step (about ±3.5 points); this scores 1,200
fresh ones (`letter_hop_records(seed, 1200, first=200000)`: the training steps use the
first 48,000 and their probes the 150 after), so two models' figures can be told apart,
and it scores any saved model, e.g. a text base after a later step, to see whether that
step kept the hop (docs/synthetic.md, "forgetting").

    python tools/letter_hop_eval.py MODEL [MODEL ...] [--mc-reply option-letter] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from crosslmm.infer import load
from crosslmm.synth.evaluate import evaluate_text_world
from crosslmm.synth.world import letter_hop_records

FIRST, COUNT = 200_000, 1200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the world's seed (the ablation YAML's data.seed)")
    parser.add_argument("--mc-reply", default="letter", help="the reply style the models were trained on "
                                                             "(crosslmm.synth.world.MC_REPLIES)")
    parser.add_argument("--out", type=Path, help="write the accuracies here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = letter_hop_records(args.seed, COUNT, first=FIRST, mc_reply=args.mc_reply)
    results = {}
    for folder in args.models:
        model, processor = load(folder)  # the path every evaluation takes: float32, local files only
        started = time.perf_counter()
        accuracy = evaluate_text_world(model, processor, records)["accuracy"]
        results[str(folder)] = accuracy
        families = {k.split("/")[1]: round(v, 3) for k, v in accuracy.items() if k.startswith("type/") and k.count("/") == 1}
        print(f"{folder}: {accuracy['all']:.3f} {families} ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"records": f"letter_hop_records({args.seed}, {COUNT}, first={FIRST}, "
                                                   f"mc_reply={args.mc_reply!r})",
                                        "accuracy": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
