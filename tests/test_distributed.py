"""FSDP2 training over gloo: 2 sharded processes equal 1 process, a sharded checkpoint
resumes exactly, and the export is one ordinary checkpoint that loads and generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import _args, _run, workspace  # noqa: F401  (the fixture is shared)

STAGE2 = {"optim.learning_rate": 1e-3, "optim.learning_rates": "{vision: 1e-3}", "export_dtype": "float32"}


def _torchrun(args: list[str], port: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "crosslmm"] + args
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _fsdp_args(workspace: Path, out: Path, **overrides) -> list[str]:
    # 2 processes x 1 sample x 2 micro-batches: the same global batch of 4 as the single process.
    settings = {"max_steps": 4, "epochs": 2, "per_device_batch_size": 1, "distributed.strategy": "fsdp", **STAGE2}
    return _args(workspace, "stage2.yaml", out, **{**settings, **overrides})


@pytest.fixture(scope="module")
def fsdp_run(workspace, tmp_path_factory):  # noqa: F811
    """4 uninterrupted steps of stage 2 (everything trains, ViT included) on 2 FSDP processes,
    with activation checkpointing (the ViT's frame chunks and every decoder layer)."""
    out = tmp_path_factory.mktemp("fsdp") / "whole"
    _torchrun(_fsdp_args(workspace, out, gradient_checkpointing=True), port=29541)
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model" / "model.safetensors")


def test_two_fsdp_processes_train_the_same_weights_as_one_process(workspace, fsdp_run, tmp_path):  # noqa: F811
    single = tmp_path / "single"
    _run(_args(workspace, "stage2.yaml", single, max_steps=4, epochs=2, per_device_batch_size=2, **STAGE2))
    a, b = _weights(single), _weights(fsdp_run)
    init = load_file(workspace / "init" / "model.safetensors")
    assert a.keys() == b.keys()
    moved = max(float((a[k] - init[k].float()).abs().max()) for k in init if k in a)
    assert moved > 1e-3  # the runs trained: the comparison below is not between two copies of the start
    # Equal up to the order of float additions in the reduce-scatter: Adam turns ~1e-9 gradient
    # differences into weight differences of up to 2.3e-5 after 4 steps at lr 1e-3 (measured on
    # 2026-12-04: an element whose gradient is near zero moves by a large fraction of lr on
    # either side). A real fault (one rank's gradients left out of the reduction, a shard
    # not updated) changes the updates themselves, by the order of lr = 1e-3 per step.
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=key)
    # The checkpoint is sharded: each process wrote its own part, nothing was gathered.
    latest = fsdp_run / "checkpoints" / (fsdp_run / "checkpoints" / "latest").read_text().strip()
    assert json.loads((latest / "sharding.json").read_text()) == {"sharded": True, "world_size": 2}
    shards = [load_file(latest / f"trainable-rank{r}.safetensors") for r in (0, 1)]
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    assert shards[0][name].shape[0] + shards[1][name].shape[0] == a[name].shape[0]


def test_a_resumed_fsdp_run_ends_with_the_same_weights_and_exports_a_loadable_model(workspace, fsdp_run, tmp_path):  # noqa: F811
    split = tmp_path / "split"
    _torchrun(_fsdp_args(workspace, split, gradient_checkpointing=True) + ["--stop-after", "2"], port=29542)
    assert (split / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    # Default export dtype (bfloat16) this time: the file inference loads.
    overrides = {"gradient_checkpointing": True, "resume": "latest", "export_dtype": "bfloat16"}
    _torchrun(_fsdp_args(workspace, split, **overrides), port=29543)
    whole, resumed = _weights(fsdp_run), _weights(split)
    assert {v.dtype for v in resumed.values()} == {torch.bfloat16}
    saved = json.loads((split / "model" / "config.json").read_text())
    assert [saved["dtype"], saved["text_config"]["dtype"], saved["vision_config"]["dtype"]] == ["bfloat16"] * 3
    for key in whole:
        assert torch.equal(whole[key].to(torch.bfloat16), resumed[key]), key  # exact: same layout, same order

    from crosslmm import CrossLMMForCausalLM
    from crosslmm.data.processor import CrossLMMProcessor
    from crosslmm.data.video import load_video

    model = CrossLMMForCausalLM.from_pretrained(split / "model").eval()
    processor = CrossLMMProcessor.from_pretrained(split / "model", num_frames=2)
    clip = load_video(workspace / "data" / "videos" / "0.mp4", num_frames=2)
    inputs = processor([{"role": "user", "content": "<video>\nwhat colour is the video?"}], media=[clip])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3)
    prompt_length = inputs["input_ids"].shape[1]
    assert out.shape[0] == 1 and prompt_length < out.shape[1] <= prompt_length + 3  # it may stop at EOS

    # The sharded checkpoint cannot be resumed by another layout: refused with a reason.
    result = _run_failing(_args(workspace, "stage2.yaml", split, max_steps=6, epochs=2, per_device_batch_size=2,
                                resume="latest", **STAGE2))
    assert "sharded over 2 processes" in result


def _run_failing(args: list[str]) -> str:
    from typer.testing import CliRunner

    from crosslmm.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    return str(result.exception)


def test_fsdp_units_are_every_vit_and_decoder_layer_and_none_is_split(workspace):  # noqa: F811
    from crosslmm import CrossLMMForCausalLM
    from crosslmm.train.distributed import wrap_units

    model = CrossLMMForCausalLM.from_pretrained(workspace / "init")
    units = wrap_units(model)
    layers = model.config.num_vision_layers_used + model.config.text_config.num_hidden_layers
    assert len(units) == layers and {type(u).__name__ for u in units} == {
        "SiglipEncoderLayer", "Qwen2DecoderLayer", "DCALDecoderLayer"}
    assert {type(u).__name__ for u in units} <= set(model._no_split_modules)


def test_workers_ship_uint8_frames_that_normalise_to_the_same_pixels(workspace):  # noqa: F811
    from crosslmm.data.processor import CrossLMMProcessor

    processor = CrossLMMProcessor.from_pretrained(workspace / "init", num_frames=2)
    record = json.loads((workspace / "data" / "train.json").read_text())[0]
    floats = processor.encode_record(record, workspace / "data")["pixel_values"]
    raw = processor.encode_record(record, workspace / "data", uint8_pixels=True)["pixel_values"]
    assert raw.dtype == torch.uint8 and raw.numel() * 4 == floats.numel() * floats.element_size()
    assert torch.equal(processor.frame_processor.normalize(raw), floats)


def test_fsdp_in_bf16_computes_in_bf16_and_keeps_float32_masters(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "bf16"
    _torchrun(_fsdp_args(workspace, out, mixed_precision="bf16", max_steps=3, **{"optim.learning_rate": 1e-3}),
              port=29544)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    shard = load_file(out / "checkpoints" / "step-0000003" / "trainable-rank1.safetensors")
    assert {v.dtype for v in shard.values()} == {torch.float32}  # the optimizer's masters, never bf16
