"""Variants of the option-letter hop records (`crosslmm.synth.world.letter_hop_records`),
to test what shortens its plateau at chance (docs/synthetic.md, "the letter hop over all
families"):

    python3 tools/letter_hop_variants.py reverse runs/abl-hop/text_base/letter_hop/train.json runs/diag/hop_rev.json
    python3 tools/letter_hop_variants.py answer-last IN OUT
    python3 tools/letter_hop_variants.py minimal IN OUT

`reverse`: every record, plus the opposite hop on the same options ("What is option C?
Answer with the option's text." -> "white"), shuffled together. `answer-last`: the stated
answer after the options instead of before the question. `minimal`: only the answer word
and the four option lines (34 tokens with the chat template instead of 72).
"""

from __future__ import annotations

import argparse
import json
import random

from crosslmm.synth.world import LETTER_HOP_PREFIX, LETTERS


def _parts(record: dict) -> tuple[str, list[str]]:
    stated, question = record["conversations"][0]["value"].split("\n", 1)
    return stated, question.split("\n")  # question, four option lines, the instruction


def reverse(records: list[dict], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for record in records:
        _, lines = _parts(record)
        options = dict(line.split(". ", 1) for line in lines[1:5])
        letter = rng.choice(LETTERS)
        prompt = "\n".join(lines[:5]) + f"\nWhat is option {letter}? Answer with the option's text."
        meta = {"type": record["questions"][0]["type"], "form": "short", "answer": options[letter]}
        out += [record, {"id": record["id"] + "_rev", "type": record["type"], "questions": [meta],
                         "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": options[letter]}]}]
    rng.shuffle(out)
    return out


def answer_last(records: list[dict]) -> list[dict]:
    out = []
    for record in records:
        stated, lines = _parts(record)
        human = {"from": "human", "value": "\n".join(lines) + "\n" + stated}
        out.append({**record, "conversations": [human, record["conversations"][1]]})
    return out


def minimal(records: list[dict]) -> list[dict]:
    out = []
    for record in records:
        stated, lines = _parts(record)
        human = {"from": "human", "value": stated[len(LETTER_HOP_PREFIX):-1] + "\n" + "\n".join(lines[1:5])}
        out.append({**record, "conversations": [human, record["conversations"][1]]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=["reverse", "answer-last", "minimal"])
    parser.add_argument("records", help="a letter-hop record file (the ablation runner's text_base/letter_hop/train.json)")
    parser.add_argument("out")
    args = parser.parse_args()
    records = json.load(open(args.records))
    made = {"reverse": reverse, "answer-last": answer_last, "minimal": minimal}[args.variant](records)
    with open(args.out, "w") as f:
        json.dump(made, f)
    print(f"{len(made)} records -> {args.out}")


if __name__ == "__main__":
    main()
