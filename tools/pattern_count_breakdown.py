"""The two weakest families of the from-scratch models, pattern and count, taken apart.

Pattern questions are of three kinds with different lookups: the pattern of a sprite
named by colour and shape (T2V must find it, then read its texture), the colour of the
sprite with a named pattern, and which sprite has a named pattern (T2V must find the
texture itself). Counts are split by the true count, and wrong counts by how far off they
are. Reads every `*.predictions.jsonl` that `crosslmm eval synthetic --out DIR/W.json`
wrote into DIR; scored as the evaluation scores (`crosslmm.synth.evaluate.is_correct`).

    python tools/pattern_count_breakdown.py DIR
"""
from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from crosslmm.synth.evaluate import is_correct

PATTERN_KINDS = [("What pattern", "the pattern of a named sprite"),
                 ("What colour is the object with", "the colour of the sprite with a pattern"),
                 ("Which object has", "the sprite with a pattern")]


def pattern_kind(prompt: str) -> str:
    return next((name for start, name in PATTERN_KINDS if prompt.startswith(start)), "other")


def main() -> None:
    rows = [json.loads(line) for path in sorted(Path(sys.argv[1]).glob("*.predictions.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]
    patterns = [r for r in rows if r["groups"]["type"] == "pattern"]
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in patterns:
        right_total = tally[(pattern_kind(r["prompt"]), r["form"])]
        right_total[0] += is_correct(r["output"], r)
        right_total[1] += 1
    print(f"pattern questions ({len(patterns)}):")
    for (kind, form), (right, total) in sorted(tally.items()):
        print(f"  {kind:42s} {form:5s} {right:4d}/{total:4d} = {100 * right / total:.0f} %")
    misreads = Counter((r["answer"], r["output"].strip()) for r in patterns if r["form"] == "short"
                       and pattern_kind(r["prompt"]) == PATTERN_KINDS[0][1] and not is_correct(r["output"], r))
    print("  short misreads of a named sprite's pattern (true, said):", dict(misreads.most_common(8)))

    counts = [r for r in rows if r["groups"]["type"] == "count" and r["form"] == "short"]
    by_truth: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    off = Counter()
    for r in counts:
        right = is_correct(r["output"], r)
        by_truth[r["answer"]][0] += right
        by_truth[r["answer"]][1] += 1
        said = r["output"].strip()
        if not right and said.isdigit():
            off[int(said) - int(r["answer"])] += 1
    print(f"short count answers by true count ({len(counts)}):", {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_truth.items())})
    print("wrong counts, said minus true:", dict(sorted(off.items())))


if __name__ == "__main__":
    main()
