"""The option letter a benchmark's scorer reads from a raw model output.

"lmms-eval" scoring reproduces what lmms-eval v0.3.3 (April 2025, the paper's time) did,
quirks included, because that is what published numbers mean (../shared/docs/benchmarks.md
lists them). Reimplemented from that description and a reading of its task code, not
copied. The quirks, by benchmark:

- mvbench: lower-case letters count and so does the article "a" ("a man runs" -> A);
  a "X. text" answer is taken at its letter; otherwise punctuation is stripped the VQA way
  (at most 32 periods, an accident of passing `re.UNICODE` as `count`).
- longvideobench: answer phrases are deleted, then the first capital A-E *anywhere*,
  inside words too ("Answer: C" -> A); with none the scorer draws a random valid letter.
- videomme: the phrase list lacks two commas, so "The best option is", "The correct option
  is", "Best answer:" and "Best option:" survive ("Best answer: D" -> B).
- mlvu: the character just before the first ")" (the prompt ends in "Best option: (").
- perceptiontest: the first standalone capital A-D.

"strict" scoring fixes them, clearly labelled in every result: all answer phrases are
deleted, then the first capital letter that stands alone ("A", "(A)", "A.", "A:") among the
question's options; no random fallback. It is for diagnosis, not for comparison with
published numbers.
"""

from __future__ import annotations

import re

BENCHMARKS = ("mvbench", "perceptiontest", "longvideobench", "mlvu", "videomme", "videomme-sub", "synthetic")
SCORINGS = ("lmms-eval", "strict")

# VQA-style punctuation handling of MVBench's scorer (the VQAv2 evaluation script's).
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

_LONGVIDEOBENCH_PHRASES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                           "The best option is", "The correct option is", "Best answer:", "Best option:")
# lmms-eval v0.3.3's list for VideoMME, with Python's implicit concatenation of the two
# pairs that miss a comma: what it really deleted.
_VIDEOMME_PHRASES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                     "The best option isThe correct option is", "Best answer:Best option:")
_STRICT_PHRASES = _LONGVIDEOBENCH_PHRASES + ("Answer:", "Option:", "answer:")


def extract_answer(benchmark: str, text: str, *, scoring: str = "lmms-eval", num_options: int | None = None) -> str | None:
    """The option letter the benchmark's scorer extracts from `text`, or None where it
    extracts none (which scores as wrong). LongVideoBench's random fallback for None is
    the scorer's (seeded per question), not done here. `num_options` bounds the letters
    in strict scoring (default: A-E)."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if scoring == "strict":
        return _strict(text, num_options or 5)
    if benchmark == "mvbench":
        return _mvbench(text)
    if benchmark == "perceptiontest":
        return _first(r"\b([A-D])\b", text.strip())
    if benchmark == "longvideobench":
        return _first(r"([A-E])", _delete(text.strip(), _LONGVIDEOBENCH_PHRASES))
    if benchmark == "mlvu":
        return _mlvu(text)
    if benchmark in ("videomme", "videomme-sub"):
        return _first(r"([A-D])", _delete(text.strip(), _VIDEOMME_PHRASES))
    return _first(r"\b([A-D])\b", text.strip())  # synthetic: what its prompts ask for


def _first(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


def _delete(text: str, phrases: tuple[str, ...]) -> str:
    for phrase in phrases:
        text = text.replace(phrase, "")
    return text


def _mvbench(text: str) -> str | None:
    lettered = re.match(r"^([A-E])\.\s*(.+)$", text.strip(), re.IGNORECASE)
    if lettered:
        return lettered.group(1).upper()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _vqa_punctuation(text)
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([a-e])\b", text)
    return letter.group(1).upper() if letter else None


def _vqa_punctuation(text: str) -> str:
    out = text
    for mark in _VQA_PUNCTUATION:
        if mark + " " in text or " " + mark in text or _DIGIT_COMMA_DIGIT.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=32)


def _mlvu(text: str) -> str | None:
    text = text.strip()
    if ")" in text:
        at = text.index(")")
        text = text[at - 1:at]  # empty when ")" comes first: a slice from -1 to 0
    return text if re.fullmatch(r"[A-Z]", text) else None


def _strict(text: str, num_options: int) -> str | None:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:num_options]
    text = _delete(text.strip(), _STRICT_PHRASES)
    return _first(rf"(?<![A-Za-z])\(?([{letters}])(?:[).:]|(?![A-Za-z]))", text)
