"""Does the model look up a given frame and quadrant? Teacher-forced region-first captions.

In a region-first caption ("frame 3: top-left magenta circle with stripes, top-right ...",
`crosslmm.synth.world.caption(scene, region_first=True)`) every colour, shape and pattern
word follows the frame and the quadrant it is about, so predicting it is the lookup the
"colour in the top-left quadrant in frame 3" questions need; predicting the quadrant word
is knowing which places are occupied. This scores those words, teacher-forced (a word is
right when every one of its tokens is the argmax), on the first N held-out videos of a
world, with each caption's own video and, as the control, with the next video's.

    python tools/region_caption_probe.py MODEL CHECKPOINT|- DATA_ROOT N
"""
from __future__ import annotations

import json
import re
from collections import defaultdict

import torch

from crosslmm.synth.evaluate import split_scenes
from crosslmm.synth.world import CAPTION_PROMPT, caption, video_id
from probe_model import load_probed, parser

ITEM = re.compile(r"(?P<place>(?:top|bottom)-(?:left|right)) (?P<colour>[a-z]+) (?P<shape>[a-z]+)"
                  r"(?: with (?P<pattern>[a-z]+))?")


@torch.no_grad()
def main() -> None:
    args = parser(__doc__).parse_args()
    model, processor = load_probed(args)
    scenes = split_scenes(args.records, "test", args.n)
    encoded, texts = [], []
    for index, scene in scenes:
        text = caption(scene, region_first=True)
        record = {"id": video_id(index), "video": f"videos/{video_id(index)}.mp4", "conversations": [
            {"from": "human", "value": f"<video>\n{CAPTION_PROMPT}"}, {"from": "gpt", "value": text}]}
        encoded.append(processor.encode_record(record, args.records))
        texts.append(text)
    features = [model.vision_tower(item["pixel_values"]) for item in encoded]
    hits: dict[str, list[int]] = defaultdict(list)
    for i, (item, text) in enumerate(zip(encoded, texts)):
        spans = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        positions = (item["labels"] != -100).nonzero().squeeze(1)[: len(spans["input_ids"])]
        if item["input_ids"][positions].tolist() != spans["input_ids"]:
            raise ValueError(f"{item['id']}: the caption tokenizes differently inside the chat template")
        frames_part = text.split(" motion: ")[0]
        for source, frames in (("video", features[i]), ("other", features[(i + 1) % len(features)])):
            logits = model(input_ids=item["input_ids"][None], vision_features=frames,
                           media_num_frames=item["media_num_frames"]).logits[0]
            shift = logits.shape[0] - item["input_ids"].shape[0]  # the visual tokens spliced in
            right = logits[positions - 1 + shift].argmax(-1) == item["input_ids"][positions]
            for match in ITEM.finditer(frames_part):
                for category in ("place", "colour", "shape", "pattern"):
                    if match[category] is None:
                        continue
                    start, end = match.span(category)
                    tokens = [t for t, (a, b) in enumerate(spans["offset_mapping"]) if a < end and b > start]
                    hits[f"{source}/{category}"].append(int(bool(right[tokens].all())))
    print(json.dumps({"model": str(args.model), "checkpoint": args.checkpoint, "videos": len(scenes),
                      "accuracy": {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())},
                      "count": {k: len(v) for k, v in sorted(hits.items())}}, indent=1))


if __name__ == "__main__":
    main()
