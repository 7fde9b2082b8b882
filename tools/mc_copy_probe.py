"""Does a model's letter follow the option text it wrote, on pixel questions?

A text-only stage can teach the option-letter copy ("The answer is up (B)": write the
letter in front of the option just named) in a way that leans on the answer stated in
its text prompt; such a copy does not carry over to a video question, where nothing is
stated. This answers the first `N` multiple-choice questions of a world's held-out file
(videos beside it) the way `crosslmm.synth.evaluate.evaluate` does and prints its accuracy
and the overall `option_reply_breakdown`: `letter_follows_rate` is about 0.25 without a
copy.
`CHECKPOINT|-`: a step of a run from MODEL, or MODEL itself (`tools/probe_model.py`).

    python tools/mc_copy_probe.py MODEL CHECKPOINT|- WORLD/test.json N
"""
from __future__ import annotations

import json

from crosslmm.synth.evaluate import evaluate, option_reply_breakdown
from probe_model import load_probed, parser


def main() -> None:
    args = parser(__doc__).parse_args()  # RECORDS: a world's held-out file, videos beside it
    model, processor = load_probed(args)
    records = [r for r in json.loads(args.records.read_text()) if r["form"] == "mc"][: args.n]
    result = evaluate(model, processor, records, args.records.parent)
    overall = option_reply_breakdown(zip(records, (p["prediction"] for p in result["predictions"])))["all"]
    print(json.dumps({"model": str(args.model), "checkpoint": args.checkpoint, "test": str(args.records),
                      "accuracy": result["accuracy"], **overall}))


if __name__ == "__main__":
    main()
