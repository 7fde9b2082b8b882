"""From prediction rows to a benchmark's figures, the way lmms-eval v0.3.3 aggregated
them (../shared/docs/benchmarks.md):

- mvbench: per task, correct / answered, where an *empty* output is left out of the
  denominator; the overall is the mean of the task accuracies (the paper's "MVBench").
- mlvu: M-Avg, the plain mean over its 7 task types (a type with no question counts 0).
- synthetic: the overall is multiple-choice accuracy; short answers (first word) and each
  question family are breakdowns.
- the others: accuracy over questions, with their breakdowns.

A question whose video failed, or that was skipped (more options than letters), counts as
wrong: every figure is over all the benchmark's questions, and the counts say how many
were failed or skipped.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterable

from crosslmm.eval.benchmarks import LETTERS, MLVU_TASK_TYPES
from crosslmm.eval.extract import extract_answer

# The paper's Table 1 (method.md section 3), CrossLMM at 9 tokens per frame.
PAPER_RESULTS = {
    "crosslmm-2b": {"mvbench": 63.5, "perceptiontest": 63.5, "longvideobench": 51.8, "mlvu": 61.0,
                    "videomme": 59.1, "videomme-sub": 61.3},
    "crosslmm-7b": {"mvbench": 68.2, "perceptiontest": 68.4, "longvideobench": 56.0, "mlvu": 67.2,
                    "videomme": 62.6, "videomme-sub": 64.7},
}


def scored_letter(benchmark: str, row: dict, scoring: str = "lmms-eval", seed: int = 0) -> str | None:
    """What the scorer compares with the gold answer for one answered row: the extracted
    letter, LongVideoBench's seeded random letter where none is found (lmms-eval's
    fallback; seeded per question id, so it does not depend on order or sharding), or
    the first word of a synthetic short answer."""
    if row.get("status") != "answered":
        return None
    if row.get("form") == "short":
        words = re.findall(r"[a-z0-9]+", row["output"].lower())
        return words[0] if words else None
    letter = extract_answer(benchmark, row["output"], scoring=scoring, num_options=row.get("num_options") or None)
    if letter is None and benchmark == "longvideobench" and scoring == "lmms-eval":
        letter = random.Random(f"{seed}:{row['id']}").choice(LETTERS[: max(row["num_options"], 1)])
    return letter


def rescore(benchmark: str, rows: Iterable[dict], scoring: str = "lmms-eval", seed: int = 0) -> list[dict]:
    """Rows with `extracted` and `correct` recomputed under `scoring` (a predictions file
    scored again, perhaps in another mode)."""
    out = []
    for row in rows:
        extracted = scored_letter(benchmark, row, scoring, seed)
        gold = str(row["answer"]).lower() if row.get("form") == "short" else row["answer"]
        out.append({**row, "extracted": extracted, "correct": extracted is not None and extracted == gold})
    return out


def aggregate(benchmark: str, rows: list[dict], scoring: str = "lmms-eval", seed: int = 0) -> dict:
    """The results of one benchmark: `overall` in percent, breakdowns, and the counts."""
    rows = rescore(benchmark, rows, scoring, seed)
    status = defaultdict(int)
    for row in rows:
        status[row["status"]] += 1
    breakdown: dict[str, dict[str, dict]] = {}
    keys = sorted({key for row in rows for key in row.get("groups", {})})
    for key in keys:
        breakdown[key] = _accuracy_by(rows, lambda row, key=key: row.get("groups", {}).get(key), benchmark)
    result = {
        "benchmark": benchmark,
        "scoring": scoring,
        "questions": len(rows),
        "answered": status["answered"],
        "failed": status["failed"],
        "skipped": status["skipped"],
    }
    if benchmark == "mvbench":
        tasks = breakdown.get("task", {})
        result["overall"] = _mean([cell["accuracy"] for cell in tasks.values()])
        result["empty_outputs"] = sum(1 for row in rows if row["status"] == "answered" and not row["output"])
        result["overall_definition"] = "mean of the task accuracies (empty outputs left out of each task's denominator)"
    elif benchmark == "mlvu":
        types = breakdown.get("task_type", {})
        result["overall"] = sum(types.get(name, {"accuracy": 0.0})["accuracy"] for name in MLVU_TASK_TYPES) / len(MLVU_TASK_TYPES)
        result["overall_definition"] = "M-Avg: mean over the 7 task types (a missing type counts 0)"
    elif benchmark == "synthetic":
        breakdown["form"] = _accuracy_by(rows, lambda row: row.get("form"), benchmark)
        breakdown["type/form"] = _accuracy_by(rows, lambda row: f"{row['groups'].get('type')}/{row.get('form')}", benchmark)
        result["overall"] = breakdown["form"].get("mc", {"accuracy": 0.0})["accuracy"]
        result["overall_definition"] = "multiple-choice accuracy (short answers: breakdown form/short)"
    else:
        result["overall"] = _percent(sum(row["correct"] for row in rows), len(rows))
        result["overall_definition"] = "accuracy over all questions"
    result["breakdown"] = breakdown
    return result


def _accuracy_by(rows: list[dict], key, benchmark: str) -> dict[str, dict]:
    cells: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        value = key(row)
        if value is not None:
            cells[str(value)].append(row)
    out = {}
    for value, members in sorted(cells.items()):
        if benchmark == "mvbench":  # lmms-eval leaves empty outputs out of the denominator
            members = [row for row in members if not (row["status"] == "answered" and not row["output"])]
        out[value] = {"accuracy": _percent(sum(row["correct"] for row in members), len(members)), "count": len(members)}
    return out


def _percent(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
