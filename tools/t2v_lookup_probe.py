"""Where does T2V look when a question points somewhere? Attention mass on the answer's sprite.

For the first N held-out questions of a synthetic world that name a place and time
("the object in the top-left quadrant in frame 3") or a sprite ("the white triangle"),
the attention that T2V's query predicting the answer puts (averaged over heads) on: the
sprite's original tokens (`crosslmm.synth.world.grounding_targets`), and for place-and-
time questions the named frame, the named quadrant of that frame and its three other
quadrants (mirrored left-right, top-bottom, opposite: an axis a query has not learned)
(for motion, whose targets are two head groups, the first and the last frame's sprite,
each group's heads on their own frame, and "sprite, all heads" on both); with the same
softmax as the grounding loss and `crosslmm demo` (`crosslmm.train.grounding`). For a
multiple-choice question, "options: sprite" is the same mass from the last token of each
option line (where `grounding_options` supervises it), averaged over the options. Chance is
what uniform attention would give. Teacher-forced: the record's own answer follows.

    python tools/t2v_lookup_probe.py MODEL CHECKPOINT|- DATA_ROOT N
"""
from __future__ import annotations

import json
from collections import defaultdict

import torch

from crosslmm.synth.evaluate import split_scenes
from crosslmm.synth.world import AT_REGION_TIME, grounding_targets, region_box, video_index
from crosslmm.train.grounding import T2VAttentionMass, grounded_queries, token_texts
from probe_model import load_probed, parser


@torch.no_grad()
def main() -> None:
    args = parser(__doc__).parse_args()
    model, processor = load_probed(args)
    scenes = dict(split_scenes(args.records, "test"))
    records = json.loads((args.records / "test.json").read_text())
    grid = model.config.vision_grid_size
    per_frame = grid * grid
    cell = next(iter(scenes.values())).size // grid
    masses: dict[str, list[float]] = defaultdict(list)
    layers: dict[str, list[torch.Tensor]] = defaultdict(list)
    asked = 0
    texts = token_texts(processor.tokenizer)
    for record in records:
        if asked == args.n:
            break
        scene = scenes[video_index(record["video"])]
        question = record["conversations"][0]["value"]
        sprite = grounding_targets(scene, question, grid)
        if sprite is None:
            continue
        asked += 1
        targets = {"sprite": sprite}
        if isinstance(sprite[0], list):  # head groups
            targets["sprite, all heads"] = sorted({t for group in sprite for t in group})
        place = match[1] if (match := AT_REGION_TIME.search(question)) else None
        if place is not None:
            t = sprite[0] // per_frame

            def quadrant(region: str, t: int = t) -> list[int]:
                x0, y0, x1, y1 = region_box(region, scene.size)
                return [t * per_frame + r * grid + c for r in range(y0 // cell, y1 // cell) for c in range(x0 // cell, x1 // cell)]

            targets["frame"] = list(range(t * per_frame, (t + 1) * per_frame))
            targets["quadrant"] = quadrant(place)
            # Where the rest of the frame's mass goes: a query that has learned one axis
            # of "top-left" and not the other splits between the quadrant and its mirror.
            vertical, horizontal = place.split("-")
            other = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
            targets["quadrant mirrored left-right"] = quadrant(f"{vertical}-{other[horizontal]}")
            targets["quadrant mirrored top-bottom"] = quadrant(f"{other[vertical]}-{horizontal}")
            targets["quadrant opposite"] = quadrant(f"{other[vertical]}-{other[horizontal]}")
        item = processor.encode_record(record, args.records)
        features = model.vision_tower(item["pixel_values"])
        batch = {"input_ids": item["input_ids"][None], "labels": item["labels"][None], "grounding": [[sprite]]}
        query, *options = grounded_queries(batch, model.config.media_token_id, texts)
        names = list(targets)
        groups = {name: t if isinstance(t[0], list) else [t] for name, t in targets.items()}
        asks = [(0, query[1], groups[name]) for name in names] + [(0, rank, groups["sprite"]) for _, rank, _ in options]
        with T2VAttentionMass(model, asks) as attention:
            model(input_ids=batch["input_ids"], vision_features=features, media_num_frames=item["media_num_frames"])
        by_layer = torch.stack(attention.masses)  # (T2V layers, targets + options)
        if options:
            names.append("options: sprite")
            groups["options: sprite"] = groups["sprite"]
            by_layer = torch.cat([by_layer[:, :len(targets)], by_layer[:, len(targets):].mean(1, keepdim=True)], 1)
        keys = features.shape[0] * per_frame
        family = record["type"]
        for j, name in enumerate(names):
            masses[f"{family}/{name}"].append(float(by_layer[:, j].mean()))
            masses[f"{family}/{name} chance"].append(sum(len(g) for g in groups[name]) / len(groups[name]) / keys)
            layers[f"{family}/{name}"].append(by_layer[:, j])
    print(json.dumps({
        "model": str(args.model), "checkpoint": args.checkpoint, "questions": asked,
        "mean mass": {k: round(sum(v) / len(v), 3) for k, v in sorted(masses.items())},
        # Whether a mean of ~0.5 is every query half right or half the queries right.
        "share of questions with mass >= 0.8": {k: round(sum(x >= 0.8 for x in v) / len(v), 3)
                                                for k, v in sorted(masses.items()) if "chance" not in k},
        "share of questions with mass < 0.2": {k: round(sum(x < 0.2 for x in v) / len(v), 3)
                                               for k, v in sorted(masses.items()) if "chance" not in k},
        "per T2V layer": {k: [round(float(x), 3) for x in torch.stack(v).mean(0)] for k, v in sorted(layers.items())},
        "count": {k: len(v) for k, v in sorted(masses.items()) if "chance" not in k},
    }, indent=1))


if __name__ == "__main__":
    main()
