"""Evaluation on the paper's five video benchmarks with lmms-eval v0.3.3's prompts,
answer extraction and aggregation (docs/evaluation.md), and on the synthetic world."""

from crosslmm.eval.benchmarks import Question, load_questions
from crosslmm.eval.extract import BENCHMARKS, SCORINGS, extract_answer
from crosslmm.eval.harness import evaluate_benchmark, score_predictions
from crosslmm.eval.scoring import aggregate

__all__ = ["BENCHMARKS", "SCORINGS", "Question", "aggregate", "evaluate_benchmark", "extract_answer", "load_questions",
           "score_predictions"]
