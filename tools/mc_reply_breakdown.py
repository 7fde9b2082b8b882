"""How a multiple-choice answer written as "<option text> (<letter>)" went wrong: the word
(perception), the letter given the word (the copy), or both.

For the reply styles of `crosslmm.synth.world.MC_REPLIES` that write the option's text
before its letter, reads a `crosslmm eval synthetic` predictions file and its world's
`test.json`, and counts per family: the word right (it names the correct option), the
letter consistent with the word (the letter of the option the word names), and the
scored letter right. A model whose words are right but letters inconsistent has not
learned the copy; one whose letters follow its words is limited by what it sees.

    python tools/mc_reply_breakdown.py PREDICTIONS.jsonl WORLD/test.json [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from crosslmm.synth.evaluate import extract
from crosslmm.synth.world import LETTERS

_REPLY = re.compile(r"^(?:The answer is )?(?P<word>.+?)\s*\((?P<letter>[A-D])\)\s*$")


def breakdown(predictions: list[dict], records: dict[str, dict]) -> dict[str, dict[str, float]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in predictions:
        record = records[row["id"]]
        if record["form"] != "mc":
            continue
        options, output = record["options"], row["output"].strip()
        match = _REPLY.match(output)
        word = match.group("word") if match else None
        for key in ("all", record["type"]):
            c = counts[key]
            c["questions"] += 1
            c["word_right"] += word == options[LETTERS.index(record["answer"])]
            c["word_is_an_option"] += word in options
            c["letter_follows_word"] += bool(match) and word in options and LETTERS[options.index(word)] == match.group("letter")
            c["letter_right"] += extract(output, "mc") == record["answer"]
    return {key: {"questions": c["questions"], **{k: round(v / c["questions"], 4) for k, v in c.items() if k != "questions"}}
            for key, c in sorted(counts.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    predictions = [json.loads(line) for line in args.predictions.read_text().splitlines() if line.strip()]
    records = {r["id"]: r for r in json.loads(args.test.read_text())}
    result = breakdown(predictions, records)
    for key, row in result.items():
        print(key, row)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
