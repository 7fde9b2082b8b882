"""Asking a model a benchmark's questions: batched, one decode and one vision encode per
video, predictions appended as they come, resumable, and sharded over processes.

Greedy decoding as lmms-eval's tasks ask for it (`MAX_NEW_TOKENS`, stop at a blank
line). Questions are ordered by video (first appearance) so the questions of one video
(VideoMME and MLVU ask several) share its decoded frames and vision features. Under
`torchrun` or `accelerate launch` each process takes every WORLD_SIZE-th video, writes
its own predictions file, and rank 0 merges them in question order: the merged figures
are those of one process (the LongVideoBench fallback letter is seeded per question).
"""

from __future__ import annotations

import json
import os
from collections import Counter, OrderedDict
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from crosslmm.data.video import VideoDecodeError, load_media
from crosslmm.eval.benchmarks import MAX_NEW_TOKENS, Question
from crosslmm.infer import encode_clip, left_pad

STOP = "\n\n"


class PredictionsExistError(FileExistsError):
    """A predictions file is already there: resume it or choose another path."""


def distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size) from torchrun/accelerate's environment; a process group
    (gloo: it only carries barriers) is started when there are several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def read_predictions(path: Path) -> list[dict]:
    """Rows of a predictions file; a last line cut off by a crash is ignored (it is
    asked again on resume)."""
    if not path.is_file():
        return []
    rows, lines = [], path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise ValueError(f"{path}: line {number + 1} is not JSON (only a cut-off last line is tolerated)") from None
    return rows


def rank_file(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.rank{rank}")


def run_questions(
    model,
    processor,
    questions: list[Question],
    benchmark: str,
    predictions: str | Path,
    *,
    batch_size: int = 1,
    resume: bool = False,
    progress: bool = True,
) -> list[dict] | None:
    """Answer `questions`, appending one row per question to `predictions` (JSONL) as
    it is produced; return every row in question order (on rank 0; None on the others).
    A video that cannot be read fails its questions, a question with `problem` is
    skipped: both are rows with a reason, and the run goes on."""
    predictions = Path(predictions)
    rank, world = distributed_rank_and_size()
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
        raise ValueError(f"question ids are not unique (e.g. {duplicates}); the annotation files disagree with the loader")
    earlier = [predictions, *sorted(predictions.parent.glob(predictions.name + ".rank*"))]
    if not resume and any(path.exists() for path in earlier):  # every rank sees the same files and stops
        raise PredictionsExistError(f"{predictions} exists: pass --resume to continue it, or choose another --out")
    if resume and rank == 0:
        for path in earlier:
            _drop_cut_off_line(path)
    _barrier(world)
    done = {row["id"] for row in _all_rows(predictions, world)} if resume else set()
    _barrier(world)  # nobody appends before everyone has read what was done
    todo = [q for q in _by_video(questions) if q.id not in done]
    video_order = {video: i for i, video in enumerate(OrderedDict.fromkeys(q.video for q in todo))}
    mine = [q for q in todo if video_order[q.video] % world == rank]
    target = predictions if world == 1 else rank_file(predictions, rank)
    target.parent.mkdir(parents=True, exist_ok=True)
    answerer = _Answerer(model, processor, MAX_NEW_TOKENS[benchmark])
    bar = tqdm(total=len(mine), unit="q", desc=f"{benchmark} (rank {rank})" if world > 1 else benchmark,
               disable=not progress, dynamic_ncols=True)
    with target.open("a", encoding="utf-8") as out:
        for start in range(0, len(mine), batch_size):
            for row in answerer(mine[start:start + batch_size]):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                bar.update(1)
    bar.close()
    _barrier(world)
    rows = _merge(predictions, world, ids) if rank == 0 else None
    _barrier(world)  # the others wait until the merged file is complete
    return rows


def _drop_cut_off_line(path: Path) -> None:
    """Truncate a file that a crash left mid-line back to its last whole line, so the
    appended rows start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _by_video(questions: list[Question]) -> list[Question]:
    groups: OrderedDict[str, list[Question]] = OrderedDict()
    for question in questions:
        groups.setdefault(question.video, []).append(question)
    return [q for group in groups.values() for q in group]


def _all_rows(predictions: Path, world: int) -> list[dict]:
    rows = read_predictions(predictions)
    for path in sorted(predictions.parent.glob(predictions.name + ".rank*")):
        rows += read_predictions(path)
    return rows


def _merge(predictions: Path, world: int, ids: list[str]) -> list[dict]:
    """All rows (main file and rank files) in question order, written back atomically
    as the one predictions file."""
    by_id = {row["id"]: row for row in _all_rows(predictions, world)}
    rows = [by_id[i] for i in ids if i in by_id]
    temporary = predictions.with_name(predictions.name + ".tmp")
    temporary.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(temporary, predictions)
    for path in predictions.parent.glob(predictions.name + ".rank*"):
        path.unlink()
    return rows


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


class _Answerer:
    """Turns a batch of questions into prediction rows. Keeps the last videos' vision
    features, so consecutive questions about one video encode it once."""

    def __init__(self, model, processor, max_new_tokens: int, cached_videos: int = 4) -> None:
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.device = next(model.parameters()).device
        self.features: OrderedDict[str, torch.Tensor | Exception] = OrderedDict()
        self.cached_videos = cached_videos

    def __call__(self, batch: list[Question]) -> list[dict]:
        rows: dict[str, dict] = {}
        ready: list[tuple[Question, list[int], torch.Tensor]] = []
        for question in batch:
            if question.problem:
                rows[question.id] = _row(question, "skipped", error=question.problem)
                continue
            features = self._encode(question.video)
            if isinstance(features, Exception):
                rows[question.id] = _row(question, "failed", error=f"{type(features).__name__}: {features}")
                continue
            try:
                ids = self._prompt_ids(question, features.shape[0])
            except ValueError as err:  # e.g. the prompt does not fit the context
                rows[question.id] = _row(question, "failed", error=f"ValueError: {err}")
                continue
            ready.append((question, ids, features))
        if ready:
            for (question, _, _), output in zip(ready, self._generate(ready)):
                rows[question.id] = _row(question, "answered", output=output)
        return [rows[q.id] for q in batch]

    def _encode(self, video: str) -> torch.Tensor | Exception:
        if video in self.features:
            self.features.move_to_end(video)
            return self.features[video]
        try:
            features: torch.Tensor | Exception = encode_clip(self.model, self.processor,
                                                             load_media(video, **self.processor.sampling))
        except (FileNotFoundError, PermissionError, IsADirectoryError, VideoDecodeError) as err:
            features = err
        self.features[video] = features
        if len(self.features) > self.cached_videos:
            self.features.popitem(last=False)
        return features

    def _prompt_ids(self, question: Question, num_frames: int) -> list[int]:
        messages = [{"role": "user", "content": "<video>\n" + question.prompt}]
        return self.processor.prompt_ids(messages, [num_frames])

    def _generate(self, ready: list[tuple[Question, list[int], torch.Tensor]]) -> list[str]:
        input_ids, attention_mask = left_pad([ids for _, ids, _ in ready], self.processor.pad_token_id)
        width = input_ids.shape[1]
        features = torch.cat([f for _, _, f in ready])
        frames = torch.tensor([f.shape[0] for _, _, f in ready], dtype=torch.long)
        tokenizer = self.processor.tokenizer
        with torch.inference_mode():
            output = self.model.generate(
                input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                vision_features=features, media_num_frames=frames.to(self.device),
                max_new_tokens=self.max_new_tokens, do_sample=False, stop_strings=[STOP], tokenizer=tokenizer,
                pad_token_id=self.processor.pad_token_id,
            )
        texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        return [text.split(STOP)[0].strip() for text in texts]


def _row(question: Question, status: str, output: str = "", error: str | None = None) -> dict:
    row = {key: value for key, value in asdict(question).items() if key != "problem"}
    row.update(status=status, output=output)
    if error:
        row["error"] = error
    return row

