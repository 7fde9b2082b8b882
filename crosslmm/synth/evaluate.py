"""Accuracy on the synthetic world's held-out questions, per question family and form.

Multiple choice is scored on the first option letter of the answer (A-D), short answers
on the first word, case- and punctuation-insensitive: what the questions ask for ("Answer
with the option's letter", "using a single word"). This is the project's check until the
evaluation harness's `crosslmm eval synthetic` exists.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from crosslmm.infer import answer
from crosslmm.synth.world import LETTERS


def extract(prediction: str, form: str) -> str:
    """The scored part of a prediction: an option letter or the first word."""
    if form == "mc":
        match = re.search(rf"\b([{''.join(LETTERS)}])\b", prediction.strip())
        return match.group(1) if match else ""
    words = re.findall(r"[a-z0-9]+", prediction.lower())
    return words[0] if words else ""


def is_correct(prediction: str, record: dict) -> bool:
    """The option letter (multiple choice) or the first word, lower-cased (short answer)."""
    expected = record["answer"] if record["form"] == "mc" else str(record["answer"]).lower()
    return extract(prediction, record["form"]) == expected


def evaluate(model, processor, records: list[dict], media_root: str | Path, max_new_tokens: int = 8) -> dict:
    """Greedy answers for `records`; returns overall and per (type, form) accuracy and the
    predictions themselves."""
    hits: dict[str, list[int]] = defaultdict(list)
    predictions = []
    for record in records:
        question = record["conversations"][0]["value"]
        raw = answer(model, processor, question, [Path(media_root) / record["video"]], max_new_tokens=max_new_tokens)
        correct = int(is_correct(raw, record))
        for key in ("all", f"form/{record['form']}", f"type/{record['type']}", f"type/{record['type']}/{record['form']}"):
            hits[key].append(correct)
        predictions.append({"id": record["id"], "prediction": raw, "answer": record["answer"], "correct": bool(correct)})
    accuracy = {key: sum(v) / len(v) for key, v in sorted(hits.items())}
    counts = {key: len(v) for key, v in sorted(hits.items())}
    return {"accuracy": accuracy, "count": counts, "predictions": predictions}
