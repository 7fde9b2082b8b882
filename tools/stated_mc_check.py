"""Multiple-choice accuracy with the answer stated before the question ("The answer is
<option text>."), as the stated-answer scaffold writes half of the training questions:
whether a model (or a training checkpoint) copies a stated option's letter on video
questions. docs/synthetic.md, "from scratch in one run".

    python tools/stated_mc_check.py MODEL_OR_CHECKPOINT WORLD [--base INIT] [--questions 60]

A training checkpoint (`checkpoints/step-N`, trainable tensors only) needs `--base`, the
model its run started from; a model folder is loaded as it is.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from crosslmm.synth.evaluate import evaluate
from probe_model import load_probed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("world", type=Path, help="a synthetic world: its test.json's multiple-choice questions")
    parser.add_argument("--base", type=Path, help="for a training checkpoint: the model its run started from")
    parser.add_argument("--questions", type=int, default=60)
    args = parser.parse_args()
    model, processor = load_probed(argparse.Namespace(model=args.base or args.model,
                                                      checkpoint=args.model if args.base else "-"))
    model.float()
    test = [dict(r) for r in json.loads((args.world / "test.json").read_text()) if r["form"] == "mc"][: args.questions]
    for record in test:
        question = record["conversations"][0]["value"]
        text = re.search(rf"^{record['answer']}\. (.+)$", question, re.MULTILINE)[1]
        stated = question.replace("<video>\n", f"<video>\nThe answer is {text}.\n", 1)
        record["conversations"] = [{"from": "human", "value": stated}, *record["conversations"][1:]]
    scores = evaluate(model, processor, test, args.world)
    print(json.dumps({"stated_mc": round(scores["accuracy"]["all"], 4), "questions": len(test),
                      "replies": [p.get("prediction", p) for p in scores["predictions"][:12]]}))


if __name__ == "__main__":
    main()
