"""`crosslmm.synth.demo`: the recomputed T2V attention is the module's own, and the demo
writes its video, table and picture for a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from crosslmm.checkpoints.scratch import init_from_scratch
from crosslmm.data.video import load_media
from crosslmm.infer import load
from crosslmm.model.cross_attention import CrossAttentionOptions, GatedCrossAttention
from crosslmm.synth.demo import (
    DEMO_INDEX,
    demo_questions,
    model_mc_reply,
    run_demo,
    t2v_attention,
    t2v_layers,
)
from crosslmm.synth.world import MC_SUFFIXES, Balancer, encode_video, make_questions, render, scene_for


def _corpus() -> list[str]:
    texts = ["system", "user", "assistant"]
    for index in range(6):
        for record in make_questions(scene_for(0, index), np.random.default_rng(index), 6, Balancer()):
            texts += [turn["value"].replace("<video>", "").strip() for turn in record["conversations"]]
    return texts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_from_scratch("tiny", tmp_path_factory.mktemp("demo") / "model", _corpus(), vocab_size=300,
                             tokens_per_frame=1, use_v2v=True, use_t2v=True)


@pytest.mark.parametrize("sink", [False, True])
def test_recomputed_probabilities_reproduce_the_modules_output(sink):
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    attention = GatedCrossAttention(config, Qwen2RMSNorm, CrossAttentionOptions(sink=sink)).eval()
    with torch.no_grad():
        attention.gate.fill_(0.5)
        torch.nn.init.normal_(attention.o_proj.weight, std=0.1)  # an open block: a fresh o_proj is zero
        if sink:  # a trained sink: its key draws attention, its value is read in that share
            torch.nn.init.normal_(attention.sink_key, std=2.0)
            torch.nn.init.normal_(attention.sink_value)
    groups, queries, keys = 2, 5, 12
    hidden = torch.randn(groups, queries, 64)
    key, value = (torch.randn(groups, 2, keys, 16) for _ in range(2))
    key_mask = torch.rand(groups, queries, keys) < 0.6
    key_mask[0, 1] = False  # a row that may see nothing: forward lets it see everything

    probs = attention.probabilities(hidden, key, key_mask)  # (G, H, Lq, S)
    assert probs.shape == (groups, 4, queries, keys) and bool((probs >= 0).all())
    sink_share = 1 - probs.sum(-1)  # (G, H, Lq)
    if sink:
        assert bool((sink_share > 1e-4).all()) and float(sink_share.detach().mean()) > 0.05
    else:
        torch.testing.assert_close(sink_share, torch.zeros(groups, 4, queries), atol=1e-6, rtol=0)
    assert bool((probs[1, :, 2][:, ~key_mask[1, 2]] == 0).all())
    # probs @ V, query head h reading K/V head h // 2 (and the sink's value in the sink's
    # share), then o_proj and the gate: forward's output.
    out = probs @ value.repeat_interleave(2, dim=1)  # (G, H, Lq, hd)
    if sink:
        out = out + sink_share[..., None] * attention.sink_value.detach().repeat_interleave(2, dim=0)[None, :, None]
    out = out.permute(0, 2, 1, 3).reshape(groups, queries, 64)
    with torch.no_grad():
        expected = attention(hidden, key, value, key_mask)
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(torch.tanh(attention.gate) * attention.o_proj(out), expected)


def test_t2v_attention_is_a_distribution_over_frames_and_patches(model_dir, tmp_path):
    model, processor = load(model_dir)
    video = tmp_path / "v.mp4"
    encode_video(render(scene_for(0, DEMO_INDEX)), video)
    inputs = processor([{"role": "user", "content": "<video>\nWhat colour is the object?"}],
                       media=[load_media(video, **processor.sampling)])
    length = inputs["input_ids"].shape[1]
    heat = t2v_attention(model, inputs, [length - 3, length - 1])
    grid = model.config.vision_grid_size
    assert heat.shape == (8, grid, grid) == (8, 14, 14)
    assert bool((heat >= 0).all()) and abs(float(heat.sum()) - 1) < 1e-4
    assert all(not layer._forward_pre_hooks and not layer.t2v._forward_hooks for layer in t2v_layers(model))
    with pytest.raises(ValueError, match="not a text token after the media"):
        t2v_attention(model, inputs, [0])  # the chat header comes before the video


def test_run_demo_writes_video_table_and_picture(model_dir, tmp_path, capsys):
    summary = run_demo(model_dir, tmp_path / "out", seed=3, num_questions=3)
    records = demo_questions(scene_for(3, DEMO_INDEX), 3, 3)
    assert (tmp_path / "out" / "demo.mp4").stat().st_size > 0
    assert (tmp_path / "out" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["answer"] for r in summary["results"]] == [r["answer"] for r in records]
    assert len({r["type"] for r in records}) == 3 and {r["form"] for r in records} == {"mc", "short"}
    assert all(heat.shape == (8, 14, 14) for heat in summary["attention"])
    table = capsys.readouterr().out
    assert "truth" in table and f"/{len(records)} correct" in table


def test_run_demo_without_t2v_answers_but_skips_the_picture(tmp_path):
    plain = init_from_scratch("tiny", tmp_path / "model", _corpus(), vocab_size=300, tokens_per_frame=1, use_t2v=False)
    summary = run_demo(plain, tmp_path / "out", num_questions=1, echo=False)
    assert len(summary["results"]) == 1 and summary["figure"] is None and "T2V" in summary["note"]
    assert not (tmp_path / "out" / "demo.png").exists()


def test_demo_asks_multiple_choice_the_way_the_model_was_scored(model_dir, tmp_path):
    assert model_mc_reply(model_dir) == "letter"  # no card: the benchmarks' style
    card = tmp_path / "card"
    card.mkdir()
    (card / "training.json").write_text(json.dumps({"held_out_data": {"world": {"mc_reply": "option-letter"}}}))
    assert model_mc_reply(card) == "option-letter"
    (card / "training.json").write_text(json.dumps({"held_out_data": {"world": {"mc_reply": "word"}}}))
    with pytest.raises(ValueError, match="mc_reply"):
        model_mc_reply(card)

    records = demo_questions(scene_for(3, DEMO_INDEX), 3, 2, "option-letter")
    mc = [r for r in records if r["form"] == "mc"]
    assert mc and all(r["conversations"][0]["value"].endswith(MC_SUFFIXES["option-letter"]) for r in mc)
    summary = run_demo(model_dir, tmp_path / "out", seed=3, num_questions=2, echo=False, mc_reply="option-letter")
    assert [r["answer"] for r in summary["results"]] == [r["answer"] for r in records]
    assert all(MC_SUFFIXES["option-letter"] not in r["question"] for r in summary["results"])
