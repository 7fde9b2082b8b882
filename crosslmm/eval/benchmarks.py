"""The paper's five video benchmarks (and the synthetic world's held-out split) as
questions: each benchmark's released annotation files and video layout, read from a
local folder, turned into the prompts lmms-eval v0.3.3 gave a model.

A benchmark is a loader (`load_questions`) and a scorer (`crosslmm.eval.scoring`); the
layouts are documented in docs/evaluation.md. Nothing here downloads: the folders are
what `huggingface-cli download <dataset> --repo-type dataset --local-dir DIR` (plus the
videos' archives unpacked in place) leaves.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av

from crosslmm.eval.subtitles import NO_SUBTITLES, sampled_subtitles

LETTERS = string.ascii_uppercase

# MVBench's 20 tasks and the folder of the dataset's `video` branch that holds each one's
# videos (the branch's own names, as lmms-eval v0.3.4 on; v0.3.1-v0.3.3 used older ones).
MVBENCH_VIDEO_FOLDERS = {
    "action_antonym": "ssv2_video_mp4",
    "action_count": "perception/videos",
    "action_localization": "sta/sta_video_segment",
    "action_prediction": "star/Charades_segment",
    "action_sequence": "star/Charades_segment",
    "character_order": "perception/videos",
    "counterfactual_inference": "clevrer/video_validation",
    "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "fine_grained_pose": "nturgbd_convert",
    "moving_attribute": "clevrer/video_validation",
    "moving_count": "clevrer/video_validation",
    "moving_direction": "clevrer/video_validation",
    "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_segment",
    "object_shuffle": "perception/videos",
    "scene_transition": "scene_qa/video",
    "state_change": "perception/videos",
    "unexpected_action": "FunQA_test/test",
}
MLVU_TASK_TYPES = ("anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning")

VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video and the "
                        "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# Where each benchmark's annotation files are looked for under --data-root, first match
# wins (`--annotations FILE` overrides), and its greedy answer budget in lmms-eval.
ANNOTATION_PATTERNS = {
    "mvbench": ("json/*.json",),
    "perceptiontest": ("mc_question_val/*.parquet", "mc_question_val/*.jsonl", "mc_question_val/*.json",
                       "mc_question_val.json", "mc_question_val.jsonl"),
    "longvideobench": ("lvb_val.json", "validation*.parquet", "data/validation*.parquet"),
    "mlvu": ("test*.parquet", "data/test*.parquet", "mlvu_dev.json", "dev.json", "test.json"),
    "videomme": ("videomme/test*.parquet", "test*.parquet", "data/test*.parquet", "videomme.json"),
    "synthetic": ("test.json",),
}
ANNOTATION_PATTERNS["videomme-sub"] = ANNOTATION_PATTERNS["videomme"]
MAX_NEW_TOKENS = {"mvbench": 16, "perceptiontest": 32, "longvideobench": 32, "mlvu": 16, "videomme": 16,
                  "videomme-sub": 16, "synthetic": 16}  # synthetic: crosslmm.synth.evaluate.ANSWER_TOKENS
# How many options each benchmark's letters can name (its prompt or its extraction).
MAX_OPTIONS = {"mvbench": 5, "perceptiontest": 3, "longvideobench": 5, "mlvu": 26, "videomme": 4, "videomme-sub": 4,
               "synthetic": 4}


@dataclass
class Question:
    """One benchmark question as the model sees it. `groups` are its breakdown keys
    (task, duration, category, ...); `problem` says why it cannot be asked (it is then
    reported and skipped, not sent to the model)."""

    id: str
    video: str  # absolute path of the video file
    prompt: str  # the user turn after the video
    answer: str  # the gold option letter (the word, for synthetic short answers)
    num_options: int
    groups: dict[str, str] = field(default_factory=dict)
    form: str = "mc"  # mc | short (synthetic only)
    problem: str | None = None


def load_questions(benchmark: str, data_root: str | Path, annotations: str | Path | None = None) -> list[Question]:
    """Every question of `benchmark` under `data_root`, in the annotation files' order."""
    if benchmark not in LOADERS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(LOADERS)}")
    root = Path(data_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(2, f"--data-root for {benchmark} is not a folder", str(root))
    files = [Path(annotations)] if annotations else _annotation_files(benchmark, root)
    return LOADERS[benchmark](root, files)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of one annotation file: JSON (a list, or an object holding one list),
    JSONL, or parquet (needs pyarrow: `pip install crosslmm[eval]`)."""
    if not path.is_file():
        raise FileNotFoundError(2, "annotation file not found", str(path))
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError as err:
            raise ImportError(f"reading {path} needs pyarrow: pip install 'crosslmm[eval]'") from err
        return parquet.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise ValueError(f"{path}: expected a list of records or an object holding one list")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(record, dict) for record in data):
        raise ValueError(f"{path}: expected a list of records (objects)")
    return data


def _annotation_files(benchmark: str, root: Path) -> list[Path]:
    for pattern in ANNOTATION_PATTERNS[benchmark]:
        found = sorted(root.glob(pattern))
        if found:
            return found
    looked = ", ".join(ANNOTATION_PATTERNS[benchmark])
    raise FileNotFoundError(2, f"no {benchmark} annotation file under the data root (looked for {looked}; "
                               f"see docs/evaluation.md or pass --annotations)", str(root))


def _first_existing(candidates: list[Path]) -> Path:
    """The first candidate that exists, else the first (its absence is reported when
    the question is asked)."""
    return next((path for path in candidates if path.exists()), candidates[0])


def _options_block(options: list[str], separator: str) -> str:
    return "\n".join(f"{LETTERS[i]}{separator}{option}" for i, option in enumerate(options))


def _too_many(benchmark: str, count: int) -> str | None:
    limit = MAX_OPTIONS[benchmark]
    return f"{count} options, more than the {limit} letters {benchmark} can name" if count > limit else None


# ---------------------------------------------------------------------------- loaders


def _mvbench(root: Path, files: list[Path]) -> list[Question]:
    questions = []
    for path in files:
        task = path.stem
        folder = MVBENCH_VIDEO_FOLDERS.get(task)
        if folder is None:
            raise ValueError(f"{path}: {task!r} is not one of MVBench's 20 tasks ({', '.join(MVBENCH_VIDEO_FOLDERS)})")
        for i, record in enumerate(read_records(path)):
            candidates = [str(c) for c in record["candidates"]]
            options = "".join(f"({LETTERS[j]}) {c}\n" for j, c in enumerate(candidates))
            prompt = "Question:" + record["question"] + "\nOption:\n" + options + "Only give the best option.\n"
            gold = next((LETTERS[j] for j, c in enumerate(candidates) if c == str(record["answer"])), "")
            problem = _too_many("mvbench", len(candidates)) or (None if gold else "no candidate equals the answer")
            video = _first_existing([root / "video" / folder / record["video"], root / folder / record["video"]])
            questions.append(Question(f"{task}/{i}", str(video), prompt, gold, len(candidates), {"task": task},
                                      problem=problem))
    return questions


def _perceptiontest(root: Path, files: list[Path]) -> list[Question]:
    questions = []
    for record in (r for path in files for r in read_records(path)):
        options = [str(o) for o in record["options"]]
        # (lmms-eval labels a fourth option "C" again: such a question is skipped here.)
        prompt = record["question"] + "".join(f"\n{LETTERS[j]}. {o}" for j, o in enumerate(options)) + "\n" + LETTER_INSTRUCTION
        answer_id = int(record["answer_id"])
        name = record["video_name"]
        video = _first_existing([root / "videos" / f"{name}.mp4", root / "videos" / f"{name}.MP4"])
        groups = {key: str(record[key]) for key in ("area", "reasoning") if record.get(key) is not None}
        questions.append(Question(str(record["question_id"]), str(video), prompt, LETTERS[answer_id], len(options), groups,
                                  problem=_too_many("perceptiontest", len(options))))
    return questions


def _longvideobench(root: Path, files: list[Path]) -> list[Question]:
    questions = []
    for record in (r for path in files for r in read_records(path)):
        options = [record[f"option{j}"] for j in range(5) if record.get(f"option{j}", "N/A") != "N/A"]
        prompt = record["question"] + "\n" + _options_block(options, ". ") + "\n" + LETTER_INSTRUCTION + "\n"
        gold = LETTERS[int(record["correct_choice"])]
        groups = {"duration_group": str(record["duration_group"]), "question_category": str(record["question_category"])}
        questions.append(Question(str(record["id"]), str(root / "videos" / record["video_path"]), prompt, gold,
                                  len(options), groups, problem=_too_many("longvideobench", len(options))))
    return questions


def _mlvu(root: Path, files: list[Path]) -> list[Question]:
    questions = []
    for i, record in enumerate(r for path in files for r in read_records(path)):
        prompt = record["question"] + "\nOnly give the best option.\nBest option: ("
        name = record["video_name"]
        video = _first_existing([root / name, root / "video" / name, root / "videos" / name])
        count = record["question"].count("\n(") + record["question"].startswith("(")
        gold = str(record["answer"]).strip()
        problem = None if gold in LETTERS[:26] and gold else f"the answer {gold!r} is not an option letter"
        questions.append(Question(str(record.get("question_id", i)), str(video), prompt, gold, max(count, 1),
                                  {"task_type": str(record["task_type"])}, problem=problem))
    return questions


def _videomme(root: Path, files: list[Path], subtitles: bool = False) -> list[Question]:
    questions, subtitle_cache = [], {}
    for record in (r for path in files for r in read_records(path)):
        video_id = record["videoID"]
        video = _first_existing([root / "data" / f"{video_id}{ext}" for ext in (".mp4", ".MP4", ".mkv")])
        options = [str(o) for o in record["options"]]  # already "A. ..."
        body = VIDEOMME_INSTRUCTION + "\n" + record["question"] + "\n" + "\n".join(options) + "\n"
        if subtitles:
            if video_id not in subtitle_cache:
                try:
                    subtitle_cache[video_id] = sampled_subtitles(video, root / "subtitle" / f"{video_id}.srt")
                except (OSError, av.FFmpegError, IndexError):  # the video fails when it is asked, and is counted
                    subtitle_cache[video_id] = NO_SUBTITLES
            prompt = "This video's subtitles are listed below: \n" + subtitle_cache[video_id] + "\n" + body + "The best answer is:"
        else:
            prompt = body + "\n" + LETTER_INSTRUCTION
        groups = {"duration": str(record["duration"]), "domain": str(record["domain"]),
                  "sub_category": str(record["sub_category"]), "task_type": str(record["task_type"])}
        questions.append(Question(str(record["question_id"]), str(video), prompt, str(record["answer"]), len(options), groups,
                                  problem=_too_many("videomme", len(options))))
    return questions


def _synthetic(root: Path, files: list[Path]) -> list[Question]:
    """The synthetic world's held-out split (`crosslmm synth DIR`): its prompts as
    written, multiple choice scored on the letter, short answers on the first word."""
    questions = []
    for record in (r for path in files for r in read_records(path)):
        prompt = record["conversations"][0]["value"].replace("<video>\n", "", 1)
        count = len(record.get("options") or [])
        questions.append(Question(record["id"], str(root / record["video"]), prompt, str(record["answer"]), count,
                                  {"type": record["type"]}, form=record["form"]))
    return questions


LOADERS = {
    "mvbench": _mvbench,
    "perceptiontest": _perceptiontest,
    "longvideobench": _longvideobench,
    "mlvu": _mlvu,
    "videomme": _videomme,
    "videomme-sub": lambda root, files: _videomme(root, files, subtitles=True),
    "synthetic": _synthetic,
}
