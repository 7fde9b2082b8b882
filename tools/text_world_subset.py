"""One question family of the text world, with a chosen context: a diagnostic of whether
the language model can learn a lookup at all (docs/synthetic.md, "the learning rate").

    python3 tools/text_world_subset.py motion 12000 runs/diag/motion.json      # training: scenes 0..11999
    python3 tools/text_world_subset.py motion 12500 runs/diag/all.json --last 300 --out-last runs/diag/heldout.json
    python3 tools/text_world_subset.py motion 12000 runs/diag/motion_mc.json --form mc   # the option-letter hop

`motion`: only the caption's motion sentence as context; `full`: the whole caption;
`given`: the answer itself ("The answer is left."), which with `--form mc` leaves only
the option-letter hop. One
`motion_direction` short-answer question per scene (the families' single-hop lookup:
find "<colour> <shape>" in the motion sentence, answer the next word). Records are the
text world's (`crosslmm.synth.world.text_world_records`). `--form mc` asks the same
question with four options: a second hop (find the option that matches the answer, answer
its letter), the one every multiple-choice question of the world needs. Records are the
text world's (`crosslmm.synth.world.text_world_records`), so `crosslmm train
configs/synth/text.yaml` and `probe.kind=text` read them.
"""

from __future__ import annotations

import argparse
import json

from crosslmm.synth.world import text_world_records


def subset(context: str, scenes: int, seed: int = 0, form: str = "short") -> list[dict]:
    rows = []
    for record in text_world_records(seed, scenes, questions_per_video=12):
        turns = record["conversations"]
        caption = turns[0]["value"].split("\n", 1)[0]
        for j, (human, gpt, meta) in enumerate(zip(turns[0::2], turns[1::2], record["questions"])):
            if (meta["type"], meta["form"]) != ("motion_direction", form):
                continue
            question = human["value"].split("\n", 1)[1] if j == 0 else human["value"]
            if context == "given":  # the answer itself as the context: only the option-letter hop is left
                options = dict(line.split(". ", 1) for line in question.split("\n") if line[:3] in ("A. ", "B. ", "C. ", "D. "))
                text = f"The answer is {options.get(gpt['value'], gpt['value'])}."
            else:
                text = caption if context == "full" else "Video description: motion:" + caption.split("motion:")[1]
            rows.append({"id": f"{record['id']}_{j}", "type": "text_world", "questions": [meta], "conversations": [
                {"from": "human", "value": text + "\n" + question}, {"from": "gpt", "value": gpt["value"]}]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("context", choices=["motion", "full", "given"])
    parser.add_argument("scenes", type=int)
    parser.add_argument("out")
    parser.add_argument("--form", choices=["short", "mc", "both"], default="short",
                        help="Which form of the question to keep (both: each scene's either form).")
    parser.add_argument("--last", type=int, default=0, help="Also write the last N records to --out-last.")
    parser.add_argument("--out-last")
    args = parser.parse_args()
    forms = ["short", "mc"] if args.form == "both" else [args.form]
    rows = [row for form in forms for row in subset(args.context, args.scenes, form=form)]
    with open(args.out, "w") as f:
        json.dump(rows, f)
    if args.last:
        with open(args.out_last, "w") as f:
            json.dump(rows[-args.last:], f)
    print(f"{len(rows)} records -> {args.out}")


if __name__ == "__main__":
    main()
