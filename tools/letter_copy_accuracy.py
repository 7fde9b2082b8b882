"""Does the model write the letter of the option text it has just written?

The option-letter reply ("left (D)") splits a multiple-choice answer into perception
(write the right option's text) and a copy (write the letter in front of that text in
the prompt). Generation mixes the two; this measures the copy alone, teacher-forced: the
reply's option text is given (as a prefilled reply would be) and the model's most likely
next letter is compared with that option's letter. It is asked twice per question: with
the right option's text, and with a distractor's, where only a copy can name the
distractor's letter (a model that answers from the video instead names the right one).
`copy_right_rate` and `copy_distractor_rate` are 0.25 without a copy.

Works on pixel questions (a world's option-letter held-out file, videos beside it) and
on text hop records (`letter_hop_records`), whose replies have the same form.
`CHECKPOINT|-`: a step of a run from MODEL, or MODEL itself (`tools/probe_model.py`).

`--by-option` instead asks every option of each question in turn and prints the copy
rate per question family and option kind (one word, or several: docs/synthetic.md
found the two copied very differently).

    python tools/letter_copy_accuracy.py MODEL CHECKPOINT|- RECORDS.json N [--by-option]
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import torch

from crosslmm.synth.world import LETTERS, copy_drill
from probe_model import load_probed, parser


def _question(record: dict) -> tuple[dict, str]:
    """(the record with its `options` and `form`, right letter) of a video or text
    multiple-choice record. Text hop records carry their options only in the prompt,
    listed "A. up" or, in a diagnostic listing (docs/synthetic.md), "up (A)"."""
    if "options" in record:
        return record, record["answer"]
    options = {}
    for line in record["conversations"][0]["value"].split("\n"):
        if line[:3] in {f"{x}. " for x in LETTERS}:
            options[line[0]] = line[3:]
        elif match := re.fullmatch(r"(.+) \(([A-D])\)", line):
            options[match[2]] = match[1]
    question = record["questions"][0]
    return {**record, "form": question["form"], "type": question["type"],
            "options": [options[x] for x in LETTERS]}, question["answer"]


@torch.no_grad()
def _copied_letters(model, processor, record: dict, letters: list[str], media_root: Path) -> list[str]:
    """For each letter L, the letter the model writes after `copy_drill(record, L)`'s given
    option text. The video is decoded and encoded by the vision tower once per question."""
    letter_ids = [processor.tokenizer.convert_tokens_to_ids(x) for x in LETTERS]
    media, frame_counts, named = {}, None, []
    for letter in letters:
        example = processor.encode_record(copy_drill(record, letter), media_root,
                                          load_pixels=frame_counts is None, frame_counts=frame_counts)
        if example["pixel_values"] is not None:
            media = {"vision_features": model.vision_tower(example["pixel_values"].to(model.dtype)),
                     "media_num_frames": example["media_num_frames"]}
            frame_counts = dict(zip(example["media_keys"], example["media_num_frames"].tolist()))
        ids, labels = example["input_ids"], example["labels"]
        # the first learned position whose label is a letter token: the letter after " ("
        position = next(i for i in range(len(labels)) if int(labels[i]) in letter_ids)
        logits = model(input_ids=ids[None], **media).logits
        # The logits run over the sequence with each media placeholder expanded into its
        # pooled tokens; every placeholder sits in the prompt, before the reply.
        shift = logits.shape[1] - len(ids)
        scores = logits[0, position - 1 + shift, letter_ids]  # the logits that predict that label
        named.append(LETTERS[int(scores.argmax())])
    return named


def _by_option(model, processor, records: list[dict], media_root: Path) -> dict[str, str]:
    """Copied / asked per "family/one word" and "family/several words"."""
    copied, asked = Counter(), Counter()
    for record in records:
        record, _ = _question(record)
        for letter, named, text in zip(LETTERS, _copied_letters(model, processor, record, list(LETTERS), media_root),
                                       record["options"]):
            key = f"{record['type']}/{'several words' if ' ' in text else 'one word'}"
            copied[key] += named == letter
            asked[key] += 1
    return {key: f"{copied[key]}/{asked[key]}" for key in sorted(asked)}


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--by-option", action="store_true", help="every option in turn, per family and option kind")
    args = arguments.parse_args()
    model, processor = load_probed(args)
    records = json.loads(args.records.read_text())
    records = [r for r in records if r.get("form", "mc") == "mc"][: args.n]
    if args.by_option:
        print(json.dumps({"model": str(args.model), "checkpoint": args.checkpoint, "records": str(args.records),
                          "questions": len(records), **_by_option(model, processor, records, args.records.parent)}))
        return
    rng = random.Random(0)
    right = distractor = distractor_named_right = 0
    for record in records:
        record, answer = _question(record)
        other = rng.choice([x for x in LETTERS if x != answer])
        named_right, named = _copied_letters(model, processor, record, [answer, other], args.records.parent)
        right += named_right == answer
        distractor += named == other
        distractor_named_right += named == answer
    n = len(records)
    print(json.dumps({"model": str(args.model), "checkpoint": args.checkpoint, "records": str(args.records),
                      "questions": n, "copy_right_rate": right / n, "copy_distractor_rate": distractor / n,
                      "distractor_names_right_rate": distractor_named_right / n}))


if __name__ == "__main__":
    main()
