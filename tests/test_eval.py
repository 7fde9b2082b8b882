"""`crosslmm eval`: lmms-eval v0.3.3's answer extraction and aggregation, each benchmark's
real file format end to end with the bundled model, resume, re-scoring, data-parallel
merging, and the lmms-eval plugin's request handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import benchmark_fixtures
from crosslmm.cli import app
from crosslmm.eval import aggregate, evaluate_benchmark, extract_answer, load_questions, score_predictions
from crosslmm.eval.benchmarks import MLVU_TASK_TYPES
from crosslmm.eval.harness import predictions_path
from crosslmm.eval.runner import PredictionsExistError, read_predictions
from crosslmm.eval.subtitles import parse_srt, sampled_subtitles
from crosslmm.infer import answer, default_model_dir, generate_answer, load

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- extraction

EXTRACTION_CASES = [
    # mvbench: lower case and the article "a" count; "X. text" is taken at its letter
    ("mvbench", "(B) Opened a door.", "B"),
    ("mvbench", "b", "B"),
    ("mvbench", "a man opens the door", "A"),
    ("mvbench", "C. the cup", "C"),
    ("mvbench", "I do not know", None),
    ("mvbench", "", None),
    # perceptiontest: standalone capitals only
    ("perceptiontest", "B", "B"),
    ("perceptiontest", "b", None),
    ("perceptiontest", "The answer is C.", "C"),
    ("perceptiontest", "Both", None),
    # longvideobench: phrases deleted, then the first capital anywhere, inside words too
    ("longvideobench", "The best answer is D", "D"),
    ("longvideobench", "Answer: C", "A"),
    ("longvideobench", "(E)", "E"),
    ("longvideobench", "none of them", None),
    # mlvu: the character before the first ")"; else the whole text
    ("mlvu", "B) sport", "B"),
    ("mlvu", "B", "B"),
    ("mlvu", "b) sport", None),
    ("mlvu", "sport", None),
    ("mlvu", ") B", None),
    # videomme: two phrases survive the missing commas
    ("videomme", "The answer is C", "C"),
    ("videomme", "Best answer: D", "B"),
    ("videomme", "The best option is D", "D"),
    ("videomme-sub", "D. four", "D"),
    ("videomme", "four", None),
    ("synthetic", "C", "C"),
]


@pytest.mark.parametrize("benchmark, text, expected", EXTRACTION_CASES)
def test_extract_answer_matches_lmms_eval_v033(benchmark, text, expected):
    assert extract_answer(benchmark, text) == expected


# Outputs real models give, per benchmark, with what lmms-eval v0.3.3 extracts from them
# (derived by hand from its scorers, ../shared/docs/benchmarks.md).
REAL_OUTPUTS = ["The best answer is B.", "(C) a man opens the door", "B. a man", "Answer: C", "c",
                "The video shows a person walking slowly through a park on a sunny afternoon near trees"]
LMMS_EVAL_LETTERS = {
    "mvbench": ["B", "C", "B", "C", "C", "A"],  # lower case counts; the article "a" is an answer
    "perceptiontest": ["B", "C", "B", "C", None, None],  # standalone capitals only
    "longvideobench": ["B", "C", "B", "A", None, None],  # "Answer: C" -> A; None -> the scorer's random letter
    "mlvu": [None, "C", None, None, None, None],  # only "X)" or a bare letter
    "videomme": ["B", "C", "B", "A", None, None],
}


@pytest.mark.parametrize("benchmark", list(LMMS_EVAL_LETTERS))
def test_real_model_outputs_are_read_as_lmms_eval_read_them(benchmark):
    assert [extract_answer(benchmark, text) for text in REAL_OUTPUTS] == LMMS_EVAL_LETTERS[benchmark]


@pytest.mark.parametrize("benchmark, text, expected", [
    ("mvbench", "a man opens the door", None),
    ("longvideobench", "Answer: C", "C"),
    ("videomme", "Best answer: D", "D"),
    ("mlvu", "(B)", "B"),
    ("perceptiontest", "D", None),  # only three options
])
def test_strict_scoring_fixes_the_quirks(benchmark, text, expected):
    num_options = 3 if benchmark == "perceptiontest" else None
    assert extract_answer(benchmark, text, scoring="strict", num_options=num_options) == expected


def test_extract_answer_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown benchmark"):
        extract_answer("mmbench", "A")
    with pytest.raises(ValueError, match="unknown scoring"):
        extract_answer("mvbench", "A", scoring="loose")


# ----------------------------------------------------------------------------- aggregation


def _row(qid, output, answer, groups, status="answered", num_options=4):
    return {"id": qid, "output": output, "answer": answer, "groups": groups, "status": status,
            "num_options": num_options, "form": "mc"}


def test_mvbench_overall_is_the_mean_of_task_accuracies_without_empty_outputs():
    rows = [_row("a/0", "A", "A", {"task": "a"}), _row("a/1", "", "B", {"task": "a"}),  # empty: not counted
            _row("b/0", "A", "B", {"task": "b"}), _row("b/1", "B", "B", {"task": "b"}),
            _row("b/2", "C", "C", {"task": "b"}), _row("b/3", "", "C", {"task": "b"}, status="failed")]
    result = aggregate("mvbench", rows)
    assert result["breakdown"]["task"]["a"] == {"accuracy": 100.0, "count": 1}
    assert result["breakdown"]["task"]["b"]["accuracy"] == pytest.approx(50.0)  # the failed one counts as wrong
    assert result["overall"] == pytest.approx(75.0)
    assert (result["empty_outputs"], result["failed"]) == (1, 1)


def test_mlvu_m_avg_counts_a_missing_task_type_as_zero():
    rows = [_row("0", "B)", "B", {"task_type": "count"}), _row("1", "A)", "A", {"task_type": "order"})]
    result = aggregate("mlvu", rows)
    assert result["overall"] == pytest.approx(200.0 / len(MLVU_TASK_TYPES))


def test_longvideobench_fallback_letter_is_seeded_per_question_not_by_order():
    rows = [_row(f"q{i}", "no idea", "A", {"duration_group": "15"}, num_options=5) for i in range(40)]
    first = aggregate("longvideobench", rows, seed=0)
    again = aggregate("longvideobench", list(reversed(rows)), seed=0)
    other = aggregate("longvideobench", rows, seed=1)
    assert first["overall"] == again["overall"]
    assert 0 < first["overall"] < 100  # random letters, some right
    assert first["overall"] != other["overall"] or first["overall"] == pytest.approx(20.0, abs=20)
    assert aggregate("longvideobench", rows, scoring="strict")["overall"] == 0.0  # no fallback when strict


# ----------------------------------------------------------------------------- subtitles


def test_videomme_subtitles_keep_sampled_cues_with_the_font_tag_in_time_order(tmp_path):
    video = tmp_path / "v.mp4"
    benchmark_fixtures.write_video(video, num_frames=10, fps=5)  # 2 s
    srt = tmp_path / "v.srt"
    srt.write_text(benchmark_fixtures.SRT.replace("\n", "\r\n"))  # Windows line ends too
    assert [cue[2] for cue in parse_srt(srt.read_text())][2] == "a cue without the font tag"
    assert sampled_subtitles(video, srt) == "Hello there\nthe second line"
    assert sampled_subtitles(video, tmp_path / "none.srt") == "No subtitles available"


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def bundled():
    return load(default_model_dir())


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("benchmarks")
    made = {}
    for name, writer in benchmark_fixtures.WRITERS.items():
        folder = base / ("videomme" if name == "videomme-sub" else name)
        if not folder.exists():
            writer(folder)
        made[name] = folder
    return made


EXPECTED_COUNTS = {  # questions, answered, failed, skipped
    "mvbench": (5, 3, 1, 1),
    "perceptiontest": (4, 3, 1, 0),
    "longvideobench": (3, 3, 0, 0),
    "mlvu": (3, 3, 0, 0),
    "videomme": (4, 4, 0, 0),
    "videomme-sub": (4, 4, 0, 0),
}
EXPECTED_BREAKDOWNS = {
    "mvbench": {"task"}, "perceptiontest": {"area", "reasoning"}, "longvideobench": {"duration_group", "question_category"},
    "mlvu": {"task_type"}, "videomme": {"duration", "domain", "sub_category", "task_type"},
    "videomme-sub": {"duration", "domain", "sub_category", "task_type"},
}


@pytest.mark.parametrize("benchmark", list(EXPECTED_COUNTS))
def test_each_benchmark_runs_end_to_end_from_its_released_format(benchmark, roots, tmp_path):
    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, ["eval", benchmark, "--data-root", str(roots[benchmark]), "--out", str(out),
                                      "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert (saved["questions"], saved["answered"], saved["failed"], saved["skipped"]) == EXPECTED_COUNTS[benchmark]
    assert set(saved["breakdown"]) == EXPECTED_BREAKDOWNS[benchmark]
    assert 0.0 <= saved["overall"] <= 100.0 and saved["scoring"] == "lmms-eval"
    assert out.with_suffix(".md").read_text().startswith(f"**{benchmark}**")
    assert f"**{benchmark}**" in result.output
    rows = read_predictions(predictions_path(out))
    assert len(rows) == saved["questions"]
    for row in rows:
        assert {"id", "prompt", "output", "answer", "status"} <= set(row)
        assert row["status"] != "failed" or "FileNotFoundError" in row["error"]
        assert row["status"] != "skipped" or "options" in row["error"]
    # Scoring the file again without a model gives the same figures.
    again = score_predictions(benchmark, predictions_path(out))
    assert again["overall"] == saved["overall"] and again["breakdown"] == saved["breakdown"]


def test_prompts_are_lmms_evals(roots):
    mv = load_questions("mvbench", roots["mvbench"])[0]
    assert mv.prompt == ("Question:What did the person do first?\nOption:\n(A) Sat down.\n(B) Opened a door.\n(C) Ran.\n"
                         "Only give the best option.\n") and mv.answer == "B"
    pt = load_questions("perceptiontest", roots["perceptiontest"])[0]
    assert pt.prompt == ("What is on the table?\nA. a cup\nB. a plate\nC. a spoon\n"
                         "Answer with the option's letter from the given choices directly.") and pt.answer == "B"
    lvb = load_questions("longvideobench", roots["longvideobench"])[0]
    assert lvb.prompt == ("Question 0 about the video?\nA. red\nB. green\nC. blue\n"
                          "Answer with the option's letter from the given choices directly.\n") and lvb.num_options == 3
    ml = load_questions("mlvu", roots["mlvu"])[0]
    assert ml.prompt.endswith("(D) travel\nOnly give the best option.\nBest option: (") and ml.num_options == 4
    vm = load_questions("videomme", roots["videomme"])[0]
    assert vm.prompt.startswith("Select the best answer") and vm.prompt.endswith(
        "D. four\n\nAnswer with the option's letter from the given choices directly.")
    sub = load_questions("videomme-sub", roots["videomme"])[0]
    assert sub.prompt.startswith("This video's subtitles are listed below: \nHello there\nthe second line\nSelect")
    assert sub.prompt.endswith("D. four\nThe best answer is:")


def test_batched_answers_with_one_encode_per_video_equal_asking_alone(roots, bundled, tmp_path):
    model, processor = bundled
    questions = load_questions("videomme", roots["videomme"])
    evaluate_benchmark("videomme", roots["videomme"], default_model_dir(), tmp_path / "r.json", batch_size=4, progress=False)
    rows = {row["id"]: row for row in read_predictions(predictions_path(tmp_path / "r.json"))}
    for question in questions:
        alone = answer(model, processor, question.prompt, [question.video], max_new_tokens=16)
        assert rows[question.id]["output"] == alone.split("\n\n")[0].strip()


def test_an_interrupted_run_resumes_without_asking_again(roots, tmp_path):
    out = tmp_path / "r.json"
    full = evaluate_benchmark("mvbench", roots["mvbench"], default_model_dir(), out, progress=False)
    lines = predictions_path(out).read_text().splitlines()
    first = json.loads(lines[0])
    first["output"] = "A"  # a marker: a resumed run must keep it, not ask again
    predictions_path(out).write_text(json.dumps(first) + "\n" + lines[1][: len(lines[1]) // 2])  # cut mid-line
    with pytest.raises(PredictionsExistError):
        evaluate_benchmark("mvbench", roots["mvbench"], default_model_dir(), out, progress=False)
    resumed = evaluate_benchmark("mvbench", roots["mvbench"], default_model_dir(), out, resume=True, progress=False)
    rows = read_predictions(predictions_path(out))
    assert [row["id"] for row in rows] == [json.loads(line)["id"] for line in lines]
    assert rows[0]["output"] == "A"
    assert rows[1:] == [json.loads(line) for line in lines[1:]]
    assert resumed["questions"] == full["questions"]


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_same_results(tmp_path):
    import signal

    data = tmp_path / "world"
    subprocess.run([sys.executable, "-m", "crosslmm", "synth", str(data), "--n", "60", "--seed", "9",
                    "--questions-per-video", "6"], check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "crosslmm", "eval", "synthetic", "--data-root", str(data), "--batch-size", "1"]
    whole = tmp_path / "whole.json"
    subprocess.run(command + ["--out", str(whole)], check=True, capture_output=True, env=env)
    killed = tmp_path / "killed.json"
    process = subprocess.Popen(command + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = predictions_path(killed)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not predictions.exists() or predictions.read_text().count("\n") < 5):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    answered = predictions.read_text().count("\n")
    assert 5 <= answered < len(json.loads((data / "test.json").read_text())), "the run was not killed midway"
    subprocess.run(command + ["--out", str(killed), "--resume"], check=True, capture_output=True, env=env)
    first, second = json.loads(whole.read_text()), json.loads(killed.read_text())
    for result in (first, second):
        result.pop("predictions")
    assert first == second
    assert [r["id"] for r in read_predictions(predictions)] == [r["id"] for r in read_predictions(predictions_path(whole))]


def test_limit_takes_the_first_questions_of_each_mvbench_task(roots, tmp_path):
    result = evaluate_benchmark("mvbench", roots["mvbench"], default_model_dir(), tmp_path / "r.json", limit=1,
                                progress=False)
    assert result["questions"] == 2 and set(result["breakdown"]["task"]) == {"action_sequence", "moving_count"}


def test_paper_figures_are_shown_for_paper_shaped_checkpoints():
    from crosslmm.eval.report import markdown, paper_model
    from crosslmm.presets import preset_config

    assert paper_model(preset_config("crosslmm-2b")) == "crosslmm-2b"
    assert paper_model(preset_config("crosslmm-7b")) == "crosslmm-7b"
    assert paper_model(preset_config("small")) is None
    result = aggregate("videomme", [_row("0", "A", "A", {"duration": "short"})])
    result["paper"] = {"model": "crosslmm-2b", "overall": 59.1}
    assert "(paper, crosslmm-2b: 59.1)" in markdown(result)


def test_clear_errors_for_a_missing_data_root_or_annotation_file(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "videomme", "--data-root", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a folder" in result.output
    result = runner.invoke(app, ["eval", "videomme", "--data-root", str(tmp_path)])
    assert result.exit_code == 2 and "no videomme annotation file" in result.output
    result = runner.invoke(app, ["eval", "mmbench", "--data-root", str(tmp_path)])
    assert result.exit_code == 2 and "unknown benchmark" in result.output


def test_synthetic_world_heldout_split(tmp_path):
    data = tmp_path / "world"
    subprocess.run([sys.executable, "-m", "crosslmm", "synth", str(data), "--n", "10", "--seed", "5",
                    "--questions-per-video", "2"], check=True, capture_output=True)
    result = evaluate_benchmark("synthetic", data, default_model_dir(), tmp_path / "s.json", batch_size=4, progress=False)
    assert result["questions"] == len(json.loads((data / "test.json").read_text())) > 0
    assert set(result["breakdown"]) == {"type", "form", "type/form"}
    assert result["overall"] == result["breakdown"]["form"]["mc"]["accuracy"]


@pytest.mark.slow
def test_data_parallel_run_merges_to_the_single_process_figures(roots, tmp_path):
    single = evaluate_benchmark("videomme", roots["videomme"], default_model_dir(), tmp_path / "one.json", batch_size=1,
                                progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                    "-m", "crosslmm", "eval", "videomme", "--data-root", str(roots["videomme"]),
                    "--out", str(tmp_path / "two.json"), "--batch-size", "1", "--device", "cpu"],
                   check=True, capture_output=True, env=env, cwd=REPO, timeout=300)
    merged = json.loads((tmp_path / "two.json").read_text())
    assert merged["overall"] == single["overall"] and merged["breakdown"] == single["breakdown"]
    one = read_predictions(predictions_path(tmp_path / "one.json"))
    two = read_predictions(predictions_path(tmp_path / "two.json"))
    assert two == one  # same rows, same order
    assert not list(tmp_path.glob("two.predictions.jsonl.rank*"))


# ----------------------------------------------------------------------------- generate's arguments


def test_generate_accepts_what_harnesses_pass(bundled):
    from transformers import GenerationConfig

    model, processor = bundled
    inputs = processor([{"role": "user", "content": "What pattern does the red square have?"}])
    plain = model.generate(**inputs, max_new_tokens=6)
    same = model.generate(**inputs, num_beams=1, use_cache=True, generation_config=GenerationConfig(max_new_tokens=6),
                          do_sample=False)
    assert torch.equal(plain, same)
    text = processor.tokenizer.decode(plain[0, inputs["input_ids"].shape[1]:])
    stop = text[1:3] if len(text) > 3 else text[:1]
    stopped = model.generate(**inputs, max_new_tokens=6, stop_strings=[stop], tokenizer=processor.tokenizer)
    stopped_text = processor.tokenizer.decode(stopped[0, inputs["input_ids"].shape[1]:])
    assert stop in stopped_text and len(stopped[0]) <= len(plain[0])
    with pytest.raises(ValueError, match="beam search"):
        model.generate(**inputs, num_beams=2)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**inputs, stop_strings="\n")
    with pytest.raises(TypeError, match="max_new_token"):
        model.generate(**inputs, max_new_token=3)


# ----------------------------------------------------------------------------- lmms-eval plugin


class _Model:
    """The plugin's request handling on its own (lmms-eval itself is an optional extra)."""

    @staticmethod
    def make():
        from crosslmm.eval.lmms_plugin import CrossLMMHarnessModel

        harness = CrossLMMHarnessModel()
        harness._setup(pretrained=str(default_model_dir()), max_frames_num="8", device="cpu", batch_size="1")
        return harness


def test_plugin_generate_until_and_loglikelihood(roots):
    harness = _Model.make()
    video = str(roots["videomme"] / "data" / "v001.mp4")
    docs = [{"video": video}, {"video": video}]
    harness.task_dict = {"videomme": {"test": docs}}

    def to_visual(doc):
        return [doc["video"]]

    question = load_questions("videomme", roots["videomme"])[0].prompt
    requests = [SimpleNamespace(args=(question, {"max_new_tokens": 16, "temperature": 0, "do_sample": False,
                                                 "num_beams": 1, "until": ["\n\n"]}, to_visual, 0, "videomme", "test")),
                SimpleNamespace(args=(question, {"max_new_tokens": 2, "until": "\n"}, to_visual, 1, "videomme", "test"))]
    outputs = harness.generate_until(requests)
    model, processor = harness.model, harness.processor
    alone = answer(model, processor, question, [video], max_new_tokens=16)
    assert outputs[0] == alone.split("\n\n")[0].strip()
    assert len(processor.tokenizer(outputs[1], add_special_tokens=False)["input_ids"]) <= 2 and "\n" not in outputs[1]

    # The greedy continuation as its tokens spell it: `answer` strips the text, and a stripped
    # leading space re-tokenizes differently (" move" is one token, "move" two).
    _, _, generated = generate_answer(model, processor, question, [video], max_new_tokens=3)
    greedy = processor.tokenizer.decode(generated, skip_special_tokens=True)
    assert processor.tokenizer(greedy, add_special_tokens=False)["input_ids"] == [
        t for t in generated.tolist() if t not in processor.tokenizer.all_special_ids]
    scores = harness.loglikelihood([
        SimpleNamespace(args=(question, greedy, to_visual, 0, "videomme", "test")),
        SimpleNamespace(args=(question, "zebra zebra", to_visual, 0, "videomme", "test")),
    ])
    (nll_greedy, is_greedy), (nll_other, other_greedy) = scores
    assert is_greedy and not other_greedy and nll_greedy < nll_other
    with pytest.raises(NotImplementedError, match="multi_round"):
        harness.generate_until_multi_round(requests)


def test_plugin_registers_both_ways_in_lmms_eval():
    import crosslmm.models as plugin

    assert plugin.AVAILABLE_MODELS == {"crosslmm": "CrossLMM"}
    text = (REPO / "pyproject.toml").read_text()
    assert '[project.entry-points."lmms_eval.models"]' in text and 'crosslmm = "crosslmm.models:lmms_eval_manifest"' in text
    lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (pip install crosslmm[lmms-eval])")
    from crosslmm.models.crosslmm import CrossLMM

    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model

    assert issubclass(CrossLMM, lmms)
    assert plugin.lmms_eval_manifest().simple_class_path == "crosslmm.models.crosslmm.CrossLMM"
    assert get_model("crosslmm") is CrossLMM  # the entry point of an installed crosslmm
    model = CrossLMM.create_from_arg_string("max_frames_num=8,device=cpu", {"batch_size": "1"})
    model.task_dict = {"t": {"test": [{}]}}  # a text-only request: doc_to_visual gives no media
    request = Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1},
                       arguments=("Which colour?", {"max_new_tokens": 4}, lambda doc: [], 0, "t", "test"))
    assert isinstance(model.generate_until([request])[0], str)
    del lmms_eval
