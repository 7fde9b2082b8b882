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
`CHECKPOINT` (a `checkpoints/step-*` folder of a run from MODEL) loads that step's
trained weights over MODEL; `-` uses MODEL as it is.

`--by-option` instead asks every option of each question in turn and prints the copy
rate per question family and option kind (one word, or several: docs/synthetic.md
found the two copied very differently).

    python tools/letter_copy_accuracy.py MODEL CHECKPOINT|- RECORDS.json N [--by-option]
"""
from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from crosslmm.infer import load

LETTERS = "ABCD"


def _question(record: dict) -> tuple[str, dict[str, str], str, str]:
    """(prompt, {letter: option text}, right letter, reply prefix) of a pixel or text MC
    record; the prefix is what its reply writes before the option text ("The answer is "
    in the sentence style). Options are listed "A. up", or "up (A)" (a diagnostic
    listing, docs/synthetic.md)."""
    prompt = record["conversations"][0]["value"]
    options = {}
    for line in prompt.split("\n"):
        if line[:3] in {f"{x}. " for x in LETTERS}:
            options[line[0]] = line[3:]
        elif match := re.fullmatch(r"(.+) \(([A-D])\)", line):
            options[match[2]] = match[1]
    answer = record["answer"] if "answer" in record else record["questions"][0]["answer"]
    reply = record["conversations"][1]["value"]
    return prompt, options, answer, reply[: reply.rindex(f"{options[answer]} ({answer})")]


@torch.no_grad()
def _next_letter(model, processor, record: dict, prompt: str, reply: str, letter: str, media_root: Path) -> str:
    """The letter the model puts after `reply (`, the reply given up to there."""
    probe = {k: v for k, v in record.items() if k != "conversations"}
    probe["conversations"] = [{"from": "human", "value": prompt},
                              {"from": "gpt", "value": f"{reply} ({letter})", "given": reply}]
    example = processor.encode_record(probe, media_root)
    ids, labels = example["input_ids"], example["labels"]
    letter_ids = {processor.tokenizer.convert_tokens_to_ids(x): x for x in LETTERS}
    # the first learned position whose label is a letter token: the letter after " ("
    position = next(i for i in range(len(labels)) if int(labels[i]) in letter_ids)
    pixels = example["pixel_values"]
    logits = model(input_ids=ids[None], pixel_values=None if pixels is None else pixels.to(model.dtype),
                   media_num_frames=example["media_num_frames"] if pixels is not None else None).logits
    # The logits run over the sequence with each media placeholder expanded into its
    # pooled tokens; every placeholder sits in the prompt, before the reply.
    shift = logits.shape[1] - len(ids)
    scores = logits[0, position - 1 + shift, list(letter_ids)]  # the logits that predict that label
    return list(letter_ids.values())[int(scores.argmax())]


def _by_option(model, processor, records: list[dict], media_root: Path) -> dict[str, str]:
    """Copied / asked per "family/one word" and "family/several words"."""
    copied, asked = Counter(), Counter()
    for record in records:
        family = record["questions"][0]["type"] if "questions" in record else record["type"]
        prompt, options, _, prefix = _question(record)
        for letter, text in options.items():
            key = f"{family}/{'several words' if ' ' in text else 'one word'}"
            copied[key] += _next_letter(model, processor, record, prompt, prefix + text, letter, media_root) == letter
            asked[key] += 1
    return {key: f"{copied[key]}/{asked[key]}" for key in sorted(asked)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("checkpoint")
    parser.add_argument("records", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("--by-option", action="store_true", help="every option in turn, per family and option kind")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = load(args.model)
    model.eval()
    if args.checkpoint != "-":
        model.load_state_dict(load_file(Path(args.checkpoint) / "trainable.safetensors"), strict=False)
    records = json.loads(args.records.read_text())
    records = [r for r in records if r.get("form", "mc") == "mc"][: args.n]
    if args.by_option:
        print(json.dumps({"model": str(args.model), "checkpoint": args.checkpoint, "records": str(args.records),
                          "questions": len(records), **_by_option(model, processor, records, args.records.parent)}))
        return
    rng = random.Random(0)
    right = distractor = distractor_named_right = 0
    for record in records:
        prompt, options, answer, prefix = _question(record)
        right += _next_letter(model, processor, record, prompt, prefix + options[answer], answer,
                              args.records.parent) == answer
        other = rng.choice([x for x in options if x != answer])
        named = _next_letter(model, processor, record, prompt, prefix + options[other], other, args.records.parent)
        distractor += named == other
        distractor_named_right += named == answer
    n = len(records)
    print(json.dumps({"model": str(args.model), "checkpoint": args.checkpoint, "records": str(args.records),
                      "questions": n, "copy_right_rate": right / n, "copy_distractor_rate": distractor / n,
                      "distractor_names_right_rate": distractor_named_right / n}))


if __name__ == "__main__":
    main()
