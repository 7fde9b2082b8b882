"""Does a model's letter follow the option text it wrote, on pixel questions?

A text-only stage can teach the option-letter copy ("The answer is up (B)": write the
letter in front of the option just named) in a way that leans on the answer stated in
its text prompt; such a copy does not carry over to a video question, where nothing is
stated. This answers the first `N` multiple-choice questions of a world's held-out file
(videos beside it) the way `crosslmm.synth.evaluate.evaluate` does and prints its accuracy
and the overall `option_reply_breakdown`: `letter_follows_rate` is about 0.25 without a
copy.
`CHECKPOINT` (a `checkpoints/step-*` folder of a run from MODEL) loads that step's
trained weights over MODEL; `-` uses MODEL as it is.

    python tools/mc_copy_probe.py MODEL CHECKPOINT|- WORLD/test.json N
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from crosslmm.infer import load
from crosslmm.synth.evaluate import evaluate, option_reply_breakdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("checkpoint")
    parser.add_argument("test", type=Path)
    parser.add_argument("n", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = load(args.model)
    if args.checkpoint != "-":
        model.load_state_dict(load_file(Path(args.checkpoint) / "trainable.safetensors"), strict=False)
    records = [r for r in json.loads(args.test.read_text()) if r["form"] == "mc"][: args.n]
    result = evaluate(model, processor, records, args.test.parent)
    overall = option_reply_breakdown(zip(records, (p["prediction"] for p in result["predictions"])))["all"]
    print(json.dumps({"model": str(args.model), "checkpoint": args.checkpoint, "test": str(args.test),
                      "accuracy": result["accuracy"], **overall}))


if __name__ == "__main__":
    main()
