"""How a model's short count answers miss: too low, too high, or the per-frame count.

For each short "How many ... appear in the video?" question of an evaluation's
predictions file, the scene is regenerated from its world's seed and the reply is compared
with the answer (distinct sprites) and with the most matching sprites visible in one frame.

    python tools/count_misses.py DATA_ROOT PREDICTIONS.jsonl [DATA_ROOT PREDICTIONS.jsonl ...]
"""
from __future__ import annotations

import json
import sys
from collections import Counter

from crosslmm.synth.evaluate import split_scenes
from crosslmm.synth.world import COUNT_QUESTION, counted_objects, video_index


def main(pairs: list[str]) -> None:
    tally = Counter()
    for data_root, predictions in zip(pairs[::2], pairs[1::2]):
        scenes = dict(split_scenes(data_root, "test"))
        for line in open(predictions):
            row = json.loads(line)
            if row["groups"]["type"] != "count" or row["form"] != "short":
                continue
            scene = scenes[video_index(row["video"])]
            objs = counted_objects(scene, COUNT_QUESTION.search(row["prompt"])[1])
            truth = len(objs)
            assert str(truth) == row["answer"], row["id"]
            per_frame = max(sum(o.start <= t < o.end for o in objs) for t in range(scene.frames))
            reply = row["output"].strip().rstrip(".")
            tally["questions"] += 1
            tally["right"] += reply == str(truth)
            tally["too low"] += reply.isdigit() and int(reply) < truth
            tally["too high"] += reply.isdigit() and int(reply) > truth
            tally["per-frame maximum differs from the answer"] += per_frame != truth
            tally["reply is that maximum"] += per_frame != truth and reply == str(per_frame)
    print(json.dumps(tally, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
