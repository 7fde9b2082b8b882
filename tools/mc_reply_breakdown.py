"""How a multiple-choice answer written as "<option text> (<letter>)" went wrong: the
option named (perception), the letter given the option (the copy), or both.

Reads a `crosslmm eval synthetic` predictions file and its world's `test.json` and prints
`crosslmm.synth.evaluate.option_reply_breakdown` overall and per family. A model that
names the right option but whose letters do not follow it has not learned the copy; one
whose letters follow its options is limited by what it sees.

    python tools/mc_reply_breakdown.py PREDICTIONS.jsonl WORLD/test.json [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from crosslmm.synth.evaluate import option_reply_breakdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    records = {r["id"]: r for r in json.loads(args.test.read_text())}
    rows = [json.loads(line) for line in args.predictions.read_text().splitlines() if line.strip()]
    result = option_reply_breakdown((records[row["id"]], row["output"]) for row in rows)
    for key, row in result.items():
        print(key, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
