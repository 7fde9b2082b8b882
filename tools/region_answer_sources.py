"""Where do wrong place-and-time answers come from? The frame, the video, or nowhere.

For the short-answer questions "what colour/shape is the object in the <quadrant> quadrant
in frame k" of a `crosslmm eval synthetic` predictions file, counts the answers that are
right, wrong but true of a sprite visible in frame k, wrong but true of a sprite elsewhere
in the video, and wrong and absent; and what guessing uniformly among the video's distinct
values would score. A model that looks the place up is right; one that answers "a colour
from this video" is near the guessing figure.

    python tools/region_answer_sources.py PREDICTIONS.jsonl WORLD
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from crosslmm.synth.world import scene_for, video_index

FRAME = re.compile(r"quadrant in frame (\d+)\?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("world", type=Path)
    args = parser.parse_args()
    params = json.loads((args.world / "meta.json").read_text())["params"]
    counts: dict[str, Counter] = {"colour": Counter(), "shape": Counter()}
    guess: dict[str, float] = {"colour": 0.0, "shape": 0.0}
    for line in args.predictions.read_text().splitlines():
        row = json.loads(line)
        match = FRAME.search(row["prompt"])
        if row["form"] != "short" or match is None:
            continue
        kind = "colour" if row["prompt"].startswith("What colour") else "shape"
        attribute = "color" if kind == "colour" else "shape"
        scene = scene_for(params["seed"], video_index(row["video"]), params["frames"], params["size"])
        words = row["output"].strip().split()
        said = words[0].strip(".").lower() if words else ""
        in_frame = {getattr(o, attribute) for o in scene.visible_at(int(match[1]) - 1)}
        in_video = {getattr(o, attribute) for o in scene.objects}
        source = ("right" if said == row["answer"] else "wrong, in that frame" if said in in_frame
                  else "wrong, elsewhere in the video" if said in in_video else "wrong, not in the video")
        counts[kind][source] += 1
        guess[kind] += 1 / len(in_video)
    for kind, counter in counts.items():
        total = sum(counter.values())
        print(kind, dict(counter), f"questions {total}, guessing among the video's {kind}s: "
              f"{guess[kind] / max(total, 1):.1%}")


if __name__ == "__main__":
    main()
