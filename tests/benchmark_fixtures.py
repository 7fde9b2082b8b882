"""Tiny copies of the five benchmarks in their released formats (annotation files as the
Hugging Face datasets ship them: JSON, parquet; videos as real H.264 files; a VideoMME
.srt with the font tags lmms-eval reads), for end-to-end tests of `crosslmm eval`.

Each has a few ordinary questions plus, where the format allows, one whose video is
missing (it must fail alone) and one with more options than the benchmark's letters (it
must be skipped)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_video(path: Path, num_frames: int = 10, fps: int = 5, size: int = 64, seed: int = 0) -> None:
    """An H.264 clip of coloured noise blocks: frames differ, videos differ by seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"threads": "1"}
        for i in range(num_frames):
            blocks = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
            image = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _parquet(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)


def mvbench(root: Path) -> Path:
    (root / "json").mkdir(parents=True)
    sequence = [
        {"video": "a1.mp4", "question": "What did the person do first?", "candidates": ["Sat down.", "Opened a door.", "Ran."],
         "answer": "Opened a door."},
        {"video": "a2.mp4", "question": "What happened next?", "candidates": ["Nothing.", "Took a cup."], "answer": "Took a cup."},
        {"video": "gone.mp4", "question": "Which object?", "candidates": ["cup", "door"], "answer": "cup"},
    ]
    counting = [
        {"video": "c1.mp4", "question": "How many cubes move?", "candidates": ["0", "1", "2", "3"], "answer": "2"},
        {"video": "c1.mp4", "question": "How many spheres?", "candidates": list("123456"), "answer": "4"},
    ]
    (root / "json" / "action_sequence.json").write_text(json.dumps(sequence))
    (root / "json" / "moving_count.json").write_text(json.dumps(counting))
    write_video(root / "video" / "star" / "Charades_segment" / "a1.mp4", seed=1)
    write_video(root / "video" / "star" / "Charades_segment" / "a2.mp4", seed=2)
    write_video(root / "video" / "clevrer" / "video_validation" / "c1.mp4", seed=3)
    return root


def perceptiontest(root: Path) -> Path:
    records = [
        {"video_name": f"video_{i}", "question": question, "options": options, "answer_id": str(answer),
         "question_id": f"video_{i}_{j}", "area": area, "reasoning": "descriptive", "tag": ["t"]}
        for i, j, question, options, answer, area in [
            (1, 0, "What is on the table?", ["a cup", "a plate", "a spoon"], 1, "memory"),
            (1, 1, "How many objects?", ["1", "2", "3"], 2, "abstraction"),
            (2, 0, "What moved?", ["the cup", "the box", "nothing"], 0, "physics"),
            (9, 0, "Where is it?", ["left", "right", "middle"], 0, "memory"),  # no video
        ]
    ]
    _parquet(root / "mc_question_val" / "validation-00000-of-00001.parquet", records)
    write_video(root / "videos" / "video_1.mp4", seed=4)
    write_video(root / "videos" / "video_2.mp4", seed=5)
    return root


def longvideobench(root: Path) -> Path:
    records = []
    for i, (video, options, correct, group, category) in enumerate([
        ("l1.mp4", ["red", "green", "blue", "N/A", "N/A"], 2, 15, "S2E"),
        ("l1.mp4", ["one", "two", "three", "four", "five"], 0, 15, "E2O"),
        ("l2.mp4", ["yes", "no", "N/A", "N/A", "N/A"], 1, 60, "S2E"),
    ]):
        record = {"id": f"lvb_{i}", "video_path": video, "question": f"Question {i} about the video?",
                  "correct_choice": correct, "duration_group": group, "question_category": category,
                  "duration": 2.0, "subtitle_path": video.replace(".mp4", "_en.json"), "starting_timestamp_for_subtitles": 0}
        record.update({f"option{j}": option for j, option in enumerate(options)})
        records.append(record)
    (root).mkdir(parents=True, exist_ok=True)
    (root / "lvb_val.json").write_text(json.dumps(records))
    write_video(root / "videos" / "l1.mp4", seed=6)
    write_video(root / "videos" / "l2.mp4", seed=7)
    return root


def mlvu(root: Path) -> Path:
    records = [
        {"video_name": "m1.mp4", "question": "What is the topic?\n(A) cooking\n(B) sport\n(C) music\n(D) travel",
         "answer": "B", "task_type": "topic_reasoning", "question_id": "m1_0"},
        {"video_name": "m1.mp4", "question": "How many times does it appear?\n(A) 1\n(B) 2\n(C) 3\n(D) 4",
         "answer": "C", "task_type": "count", "question_id": "m1_1"},
        {"video_name": "m2.mp4", "question": "What comes first?\n(A) x\n(B) y\n(C) z\n(D) w", "answer": "A",
         "task_type": "order", "question_id": "m2_0"},
    ]
    _parquet(root / "test-00000-of-00001.parquet", records)
    write_video(root / "m1.mp4", seed=8)
    write_video(root / "m2.mp4", seed=9)
    return root


SRT = """1
00:00:00,000 --> 00:00:00,800
<font color="white" size=".72c">Hello there</font>

2
00:00:00,800 --> 00:00:01,400
<font color="white" size=".72c">the second line</font>

3
00:00:01,400 --> 00:00:01,600
a cue without the font tag

"""


def videomme(root: Path) -> Path:
    records = []
    for video, duration, domain in (("v001", "short", "Knowledge"), ("v002", "medium", "Sports")):
        for k in range(2):
            records.append({"video_id": video[1:], "duration": duration, "domain": domain, "sub_category": "Humanity",
                            "url": "", "videoID": video, "question_id": f"{video}-{k + 1}", "task_type": "Counting Problem",
                            "question": f"What happens in part {k}?",
                            "options": ["A. one", "B. two", "C. three", "D. four"], "answer": "ABCD"[k]})
    _parquet(root / "videomme" / "test-00000-of-00001.parquet", records)
    write_video(root / "data" / "v001.mp4", seed=10)
    write_video(root / "data" / "v002.mp4", seed=11)
    (root / "subtitle").mkdir(parents=True)
    (root / "subtitle" / "v001.srt").write_text(SRT)
    return root


WRITERS = {"mvbench": mvbench, "perceptiontest": perceptiontest, "longvideobench": longvideobench, "mlvu": mlvu,
           "videomme": videomme, "videomme-sub": videomme}
