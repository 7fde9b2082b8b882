"""The bundled default model: `crosslmm ask` and `crosslmm demo` work offline without
`--model`, on a video the model never saw, through the same loading path as any
checkpoint."""

from __future__ import annotations

import json

import numpy as np
from safetensors.torch import load_file
from typer.testing import CliRunner

from crosslmm.cli import app
from crosslmm.infer import default_model_dir, load
from crosslmm.synth.world import Balancer, encode_video, make_questions, render, scene_for


def test_bundled_model_is_small_safetensors_and_documents_its_training():
    folder = default_model_dir()
    weights = folder / "model.safetensors"
    assert weights.stat().st_size < 8 * 2**20
    assert load_file(weights)  # safetensors, nothing unpickled
    card = json.loads((folder / "training.json").read_text())
    assert card["variant"] and card["held_out_count"]["all"] > 0
    model, _ = load(folder)
    assert model.config.tokens_per_frame == 1 and model.config.use_v2v and model.config.use_t2v


def test_ask_without_model_answers_a_fresh_video(tmp_path):
    scene = scene_for(seed=12345, index=7)
    video = tmp_path / "fresh.mp4"
    encode_video(render(scene), video)
    record = make_questions(scene, np.random.default_rng(0), 1, Balancer())[0]
    question = record["conversations"][0]["value"].replace("<video>\n", "")
    result = CliRunner().invoke(app, ["ask", str(video), question, "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_demo_without_model_writes_video_and_picture(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--questions", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo.mp4").stat().st_size > 0
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
