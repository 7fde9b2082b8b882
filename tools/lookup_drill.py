"""The lookup drill (`crosslmm.synth.world.lookup_drill_records`): write its records, or
measure a model's teacher-forced letters on held-out ones, apart for lookups whose
answer was not asked before in the record ("new": only the options hold the letter) and
repeats (an earlier reply holds it too).

    python tools/lookup_drill.py OUT.json COUNT [--seed S] [--queries Q] [--first F]
    python tools/lookup_drill.py --measure MODEL CHECKPOINT|- N   # teacher-forced, N held-out records of seed 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from crosslmm.synth.world import LETTERS, lookup_drill_records


@torch.no_grad()
def letter_accuracy(model, processor, records: list[dict]) -> dict[str, float]:
    """The share of the records' letters the model's most likely token names, teacher-forced:
    on turns whose answer was not asked before in the record (only the options hold its
    letter) and on repeats (an earlier reply holds it: a plain induction copies it)."""
    letter_ids = [processor.tokenizer.convert_tokens_to_ids(x) for x in LETTERS]
    right, total = {"new": 0, "repeat": 0}, {"new": 0, "repeat": 0}
    for record in records:
        example = processor.encode_record(record, ".")  # text only: no media is read
        ids, labels = example["input_ids"], example["labels"]
        logits = model(input_ids=ids[None]).logits[0]
        replies = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
        kinds = ["repeat" if reply in replies[:k] else "new" for k, reply in enumerate(replies)]
        positions = [i for i in range(1, len(labels)) if int(labels[i]) in letter_ids]
        for kind, i in zip(kinds, positions, strict=True):
            right[kind] += letter_ids[int(logits[i - 1, letter_ids].argmax())] == int(labels[i])
            total[kind] += 1
    return {kind: right[kind] / total[kind] for kind in total}


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        sys.path.insert(0, str(Path(__file__).parent))
        from probe_model import load_probed
        args = argparse.Namespace(model=Path(sys.argv[2]), checkpoint=sys.argv[3])
        model, processor = load_probed(args)
        held = lookup_drill_records(16, int(sys.argv[4]), first=10_000_000)
        print(json.dumps({"model": str(args.model), "checkpoint": args.checkpoint, "records": len(held),
                          "letter_accuracy": letter_accuracy(model, processor, held)}))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("count", type=int)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--first", type=int, default=0)
    args = parser.parse_args()
    records = lookup_drill_records(args.seed, args.count, args.queries, args.first)
    with open(args.out, "w") as f:
        json.dump(records, f)
    print(f"{len(records)} records -> {args.out}")
    print(json.dumps(records[0]["conversations"], indent=1))


if __name__ == "__main__":
    main()
