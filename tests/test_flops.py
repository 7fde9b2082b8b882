"""`crosslmm bench flops`: counts on the meta device equal a real forward's, and reproduce the paper."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from crosslmm import CrossLMMForCausalLM
from crosslmm.bench.flops import COMPONENTS, PAPER_TFLOPS, count_prefill, flop_counter, prompt_ids
from crosslmm.cli import app
from crosslmm.presets import preset_config


@pytest.mark.parametrize("layout", ["crosslmm-4", "crosslmm-1-video-scope", "llava-ov"])
def test_meta_count_equals_the_count_of_a_real_forward(layout):
    config = {
        "crosslmm-4": lambda: preset_config("tiny"),
        "crosslmm-1-video-scope": lambda: preset_config("tiny", tokens_per_frame=1, v2v_scope="video"),
        "llava-ov": lambda: preset_config("tiny", vision_feature_layer=-2).to_llava_ov_compatible(),
    }[layout]()
    frames = 3
    counted = count_prefill(config, frames)

    torch.manual_seed(0)
    model = CrossLMMForCausalLM(config).eval()
    ids = prompt_ids(config)
    pixels = torch.randn(frames, 3, config.image_size, config.image_size)
    with torch.no_grad(), flop_counter(depth=100) as real:
        model(ids, pixel_values=pixels, media_num_frames=torch.tensor([frames]), logits_to_keep=1, use_cache=True)

    assert counted["total"] == real.get_total_flops() > 0
    assert counted["total"] == sum(counted[c] for c in COMPONENTS)
    assert counted["vit"] > 0 and counted["llm_linear"] > 0 and counted["llm_attention"] > 0
    assert (counted["cross_attention_projections"] > 0) == config.use_dcal


def test_crosslmm_2b_at_32_frames_is_within_10_percent_of_the_paper_in_macs():
    macs = count_prefill(preset_config("crosslmm-2b", tokens_per_frame=9), 32)["total"] / 2
    paper = PAPER_TFLOPS[("crosslmm-2b", "crosslmm-9")][32] * 1e12
    assert abs(macs / paper - 1) < 0.10, macs / 1e12


def test_cli_rows_and_table():
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "flops", "--preset", "tiny", "--frames", "2,4", "--tokens-per-frame", "1,4", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["model"], r["frames"]) for r in rows] == [
        (m, f) for f in (2, 4) for m in ("crosslmm-1", "crosslmm-4", "llava-ov")
    ]
    for row in rows:
        assert set(row) == {"model", "frames", "tokens_per_frame", "flops", "macs"}
        assert set(row["flops"]) == set(COMPONENTS) | {"total"}
        assert all(row["macs"][k] * 2 == row["flops"][k] for k in row["flops"])
    by = {(r["model"], r["frames"]): r["flops"]["total"] for r in rows}
    assert by[("crosslmm-1", 4)] < by[("llava-ov", 4)] and by[("crosslmm-1", 2)] < by[("crosslmm-1", 4)]

    table = runner.invoke(app, ["bench", "flops", "--preset", "tiny", "--frames", "2"])
    assert table.exit_code == 0 and "| 2 | llava-ov |" in table.output
    bad = runner.invoke(app, ["bench", "flops", "--preset", "nope"])
    assert bad.exit_code != 0 and "unknown preset" in bad.output
