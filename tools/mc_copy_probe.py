"""Does a model's letter follow the option text it wrote, on pixel questions?

A text-only stage can teach the option-letter copy ("The answer is up (B)": write the
letter in front of the option just named) in a way that leans on the answer stated in
its text prompt; such a copy does not carry over to a video question, where nothing is
stated. This answers the first `N` multiple-choice questions of a world's held-out file
(videos beside it) greedily and counts the replies whose text is one of the options and,
of those, the ones whose letter is that option's: about 25 % when there is no copy.
`CHECKPOINT` (a `checkpoints/step-*` folder of a run from MODEL) loads that step's
trained weights over MODEL; `-` uses MODEL as it is.

    python tools/mc_copy_probe.py MODEL CHECKPOINT|- WORLD/test.json N
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from crosslmm.infer import answer, load
from crosslmm.synth.world import LETTERS

_REPLY = re.compile(r"^(?:The answer is )?(?P<word>.+?)\s*\((?P<letter>[A-D])\)")


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
    named = follows = right = 0
    for record in records:
        reply = answer(model, processor, record["conversations"][0]["value"], [args.test.parent / record["video"]],
                       max_new_tokens=16)
        match = _REPLY.match(reply.strip())
        if match and match["word"] in record["options"]:
            named += 1
            follows += LETTERS[record["options"].index(match["word"])] == match["letter"]
            right += match["word"] == record["options"][LETTERS.index(record["answer"])]
    print(json.dumps({"model": str(args.model), "checkpoint": args.checkpoint, "questions": len(records),
                      "reply_names_an_option": named, "letter_follows_the_option": follows, "option_right": right}))


if __name__ == "__main__":
    main()
