"""`crosslmm eval`: one benchmark, one checkpoint, one results file.

Loads the questions (crosslmm.eval.benchmarks), asks them (crosslmm.eval.runner),
scores them (crosslmm.eval.scoring) and writes the results (crosslmm.eval.report). The
predictions file is the record of the run: `--resume` continues it, `score_predictions`
scores it again without a model.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch

from crosslmm.eval.benchmarks import Question, load_questions
from crosslmm.eval.report import paper_model, write_results
from crosslmm.eval.runner import read_predictions, run_questions
from crosslmm.eval.scoring import PAPER_RESULTS, aggregate


def predictions_path(out: str | Path) -> Path:
    """Where the predictions of results file `out` go: beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".predictions.jsonl")


def limit_questions(benchmark: str, questions: list[Question], limit: int) -> list[Question]:
    """The first `limit` questions; for MVBench the first `limit` of each task, as
    lmms-eval's --limit applies per task and MVBench is 20 tasks."""
    if not limit:
        return questions
    if benchmark != "mvbench":
        return questions[:limit]
    taken: dict[str, int] = defaultdict(int)
    kept = []
    for question in questions:
        task = question.groups["task"]
        if taken[task] < limit:
            taken[task] += 1
            kept.append(question)
    return kept


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def evaluate_benchmark(
    benchmark: str,
    data_root: str | Path,
    model_dir: str | Path,
    out: str | Path,
    *,
    frames: int | None = None,
    limit: int = 0,
    resume: bool = False,
    batch_size: int = 1,
    scoring: str = "lmms-eval",
    seed: int = 0,
    device: str | None = None,
    annotations: str | Path | None = None,
    progress: bool = True,
) -> dict | None:
    """Run `benchmark` on the checkpoint `model_dir` and write `out` (JSON), its
    Markdown twin and the predictions beside it; return the results (None on ranks
    other than 0 of a multi-process run)."""
    from crosslmm.infer import load

    questions = limit_questions(benchmark, load_questions(benchmark, data_root, annotations), limit)
    model, processor = load(model_dir, device=device or default_device())
    if frames is not None:
        if frames < 1:
            raise ValueError(f"--frames must be >= 1, got {frames}")
        processor.num_frames, processor.fps = frames, None
    rows = run_questions(model, processor, questions, benchmark, predictions_path(out), batch_size=batch_size,
                         resume=resume, progress=progress)
    if rows is None:
        return None
    result = aggregate(benchmark, rows, scoring, seed)
    result["model"] = {"path": str(model_dir), "frames": processor.num_frames if processor.fps is None else f"{processor.fps} fps",
                       "tokens_per_frame": model.config.tokens_per_frame}
    name = paper_model(model.config)
    if name and benchmark in PAPER_RESULTS[name]:
        result["paper"] = {"model": name, "overall": PAPER_RESULTS[name][benchmark]}
    result["predictions"] = str(predictions_path(out))
    write_results(result, out)
    return result


def score_predictions(benchmark: str, predictions: str | Path, out: str | Path | None = None, *,
                      scoring: str = "lmms-eval", seed: int = 0) -> dict:
    """Score a predictions file again (another scoring mode, or after a fix) without a
    model; write `out` when given."""
    predictions = Path(predictions)
    rows = read_predictions(predictions)
    if not rows:
        raise FileNotFoundError(2, "no predictions to score", str(predictions))
    result = aggregate(benchmark, rows, scoring, seed)
    result["predictions"] = str(predictions)
    if out is not None:
        write_results(result, out)
    return result
