"""Teacher-forced loss of a model on training records, split by where each learned token
sits in its reply: the reply's first token, the tokens after it, and the end-of-turn token.

A text stage hands the video stage a model that has only ever met its own records; this
says what that model expects at each place of the video stage's replies before the video
stage has trained a step. docs/synthetic.md ("eleventh session") found the unstated copy
stage leaves the reply's first token at about 27 nats: its reply start was never learned
(the option text is given there), and the model came to predict " (" at it.

    python tools/reply_token_loss.py MODEL CHECKPOINT|- RECORDS N --media-root WORLD

RECORDS: a stage's train.json (its first N records; with --media-root, those with a
video are decoded from there).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from probe_model import load_probed, parser

IGNORE = -100


def reply_token_losses(model, processor, record: dict, media_root: Path | None) -> dict[str, list[float]]:
    """Per place in the reply ("first", "rest", "end"), the loss of each learned token."""
    encoded = processor.encode_record(record, media_root or ".", load_pixels=True)
    pixels = encoded["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=encoded["input_ids"][None], labels=encoded["labels"][None],
                    pixel_values=None if pixels is None else pixels.float(),
                    media_num_frames=encoded["media_num_frames"] if pixels is not None else None)
    labels = out.labels[0, 1:]  # placeholders expanded: aligned with the logits
    losses = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), labels, ignore_index=IGNORE,
                                               reduction="none")
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    places: dict[str, list[float]] = defaultdict(list)
    previous = IGNORE
    for label, loss in zip(labels.tolist(), losses.tolist()):
        if label != IGNORE:
            place = "end" if label == end else ("first" if previous == IGNORE else "rest")
            places[place].append(loss)
        previous = label
    return places


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--media-root", type=Path, help="the world the records' videos are in")
    args = args_parser.parse_args()
    model, processor = load_probed(args)
    model.float()
    records = json.loads(args.records.read_text())
    if args.media_root is not None:
        records = [r for r in records if "video" in r]
    places: dict[str, list[float]] = defaultdict(list)
    for record in records[: args.n]:
        for place, losses in reply_token_losses(model, processor, record, args.media_root).items():
            places[place] += losses
    every = [loss for losses in places.values() for loss in losses]
    print(json.dumps({"model": str(args.model), "checkpoint": args.checkpoint, "records": str(args.records),
                      "n": min(args.n, len(records)), "mean_loss": round(sum(every) / len(every), 3),
                      **{f"{place}_loss": round(sum(v) / len(v), 3) for place, v in sorted(places.items())},
                      **{f"{place}_tokens": len(v) for place, v in sorted(places.items())}}))


if __name__ == "__main__":
    main()
