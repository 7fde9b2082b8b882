"""Two-stage training from the CLI: loss goes down, resume is exact, 2 processes == 1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from checkpoint_factory import make_llm, make_vision
from crosslmm.checkpoints.build import build
from crosslmm.cli import app
from crosslmm.train.config import load_train_config

ROOT = Path(__file__).parents[1]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (235, 235, 235)}


def _write_video(path: Path, rgb: tuple[int, int, int], frames: int = 3, size: int = 28) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.zeros((size, size, 3), dtype=np.uint8)
            image[:] = rgb
            image[i * 4:(i * 4) + 6, 2:8] = 128  # something moves
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A CrossLMM built from tiny SigLIP + Qwen2 checkpoints and a colour-naming dataset."""
    root = tmp_path_factory.mktemp("train")
    build(make_vision("siglip", root / "vision"), make_llm("qwen2", root / "llm"), root / "init",
          tokens_per_frame=1, dcal_every_k=2)
    (root / "data" / "videos").mkdir(parents=True)
    records = []
    for i in range(16):
        name = list(COLOURS)[i % 4]
        _write_video(root / "data" / "videos" / f"{i}.mp4", COLOURS[name])
        records.append({"id": f"r{i}", "video": f"videos/{i}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nwhat colour is the video?"}, {"from": "gpt", "value": name}]})
    records.append({"id": "broken", "video": "videos/missing.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhat colour?"}, {"from": "gpt", "value": "red"}]})
    (root / "data" / "train.json").write_text(json.dumps(records))
    return root


def _args(workspace: Path, recipe: str, out: Path, **overrides) -> list[str]:
    base = dict(model=workspace / "init", output_dir=out, **{"data.train": workspace / "data" / "train.json"},
                **{"data.num_frames": 2, "data.max_frames": 2, "data.num_workers": 0, "per_device_batch_size": 2,
                   "gradient_accumulation": 2, "mixed_precision": "no", "gradient_checkpointing": False,
                   "log_every": 1, "save_every": 2, "optim.warmup_ratio": 0.0})
    base.update(overrides)
    return ["train", str(ROOT / "configs" / recipe)] + [f"{k}={v}" for k, v in base.items()]


def _run(args: list[str]):
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _trainable(out: Path) -> dict[str, torch.Tensor]:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return load_file(out / "checkpoints" / latest / "trainable.safetensors")


@pytest.mark.lowest_bound  # the training step CI also runs on the lowest supported transformers
def test_stage1_then_stage2_loss_goes_down(workspace, tmp_path):
    stage1 = tmp_path / "stage1"
    # A frozen, random tiny LLM can only be steered through the visual tokens: a modest but steady drop.
    _run(_args(workspace, "stage1.yaml", stage1, max_steps=16, **{"optim.learning_rate": 0.1,
                                                                 "model_overrides.tokens_per_frame": 4}))
    losses = _losses(stage1)
    assert len(losses) == 16 and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1
    assert (stage1 / "model" / "model.safetensors").exists() and (stage1 / "model" / "processor_config.json").exists()
    trained = _trainable(stage1)
    assert trained and all(".v2v." in k or k.startswith("projector.") for k in trained)  # stage 1 trains only these
    assert not any(".t2v." in k for k in trained)

    stage2 = tmp_path / "stage2"
    _run(_args(workspace, "stage2.yaml", stage2, model=stage1 / "model", max_steps=6, **{"optim.learning_rate": 1e-3,
              "optim.learning_rates": "{vision: 1e-4}"}))
    losses = _losses(stage2)
    assert np.isfinite(losses).all() and np.mean(losses[-2:]) < np.mean(losses[:2])
    trained = _trainable(stage2)
    assert any(".t2v." in k for k in trained) and any(k.startswith("vision_tower.") for k in trained)
    config = json.loads((stage2 / "model" / "config.json").read_text())
    assert config["use_t2v"] is True


def test_interrupted_and_resumed_run_ends_with_the_same_weights(workspace, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    _run(_args(workspace, "stage1.yaml", whole, max_steps=6, epochs=2))
    _run(_args(workspace, "stage1.yaml", split, max_steps=6, epochs=2) + ["--stop-after", "3"])
    assert (split / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert not (split / "model").exists()
    _run(_args(workspace, "stage1.yaml", split, max_steps=6, epochs=2, resume="latest"))
    a, b = _trainable(whole), _trainable(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # Resuming with another batch layout would not continue the same run: refused.
    args = _args(workspace, "stage1.yaml", split, max_steps=8, epochs=2, resume="latest", per_device_batch_size=1)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "global batch" in str(result.exception)


def test_training_flushes_subnormal_floats_unless_told_not_to(workspace, tmp_path):
    """Subnormals cost x86 cores 10-100x per operation, and trained cross-attention makes
    many (docs/performance.md): training flushes them by default; the recipe can keep them."""
    def subnormal() -> float:
        return float(torch.tensor([1e-39]) * 1.0)

    try:
        _run(_args(workspace, "stage1.yaml", tmp_path / "flushed", max_steps=1))
        assert subnormal() == 0.0
        _run(_args(workspace, "stage1.yaml", tmp_path / "kept", max_steps=1, flush_denormal=False))
        assert subnormal() > 0.0
    finally:
        torch.set_flush_denormal(False)


def test_constant_schedule_holds_the_peak_learning_rate_after_warmup(workspace, tmp_path):
    out = tmp_path / "constant"
    _run(_args(workspace, "stage1.yaml", out, max_steps=4, epochs=4, **{"optim.schedule": "constant",
                                                                          "optim.warmup_ratio": 0.25}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = load_train_config(ROOT / "configs" / "stage1.yaml", [f"model={workspace}", "output_dir=x",
                                                                 "data.train=x"]).optim.learning_rate
    rates = [value for row in rows for key, value in row.items() if key.startswith("lr/") and row["step"] > 1]
    assert rates and all(rate == pytest.approx(peak) for rate in rates)
    with pytest.raises(ValueError, match="optim.schedule"):
        load_train_config(None, ["model=m", "output_dir=o", "data.train=d", "optim.schedule=linear"])


def test_an_empty_micro_batch_still_runs_forward_and_backward_with_zero_loss(workspace):
    from accelerate import Accelerator

    from crosslmm import CrossLMMForCausalLM
    from crosslmm.train.trainer import forward_backward

    model = CrossLMMForCausalLM.from_pretrained(workspace / "init").train()
    loss, auxiliary = forward_backward(model, None, global_tokens=10, world=1, accelerator=Accelerator(cpu=True),
                                      pad_token_id=0)
    assert loss.item() == 0.0 and auxiliary is None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)  # a real backward, contributing nothing


def test_two_processes_equal_one_process_with_the_same_global_batch(workspace, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    _run(_args(workspace, "stage1.yaml", single, max_steps=3, per_device_batch_size=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "crosslmm"] + _args(workspace, "stage1.yaml", double, max_steps=3, per_device_batch_size=1)
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checksums = json.loads((double / "rank_checksums.json").read_text())
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # both ranks hold the same weights
    # Equal up to the order of float additions in the gradient all-reduce (Adam turns those
    # ~1e-9 gradient differences into <= ~2e-6 weight differences after 3 steps at lr 1e-3).
    a, b = _trainable(single), _trainable(double)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    assert _losses(single)[0] == pytest.approx(_losses(double)[0], rel=1e-5)


def test_feature_cache_trains_like_pixels_and_is_reused(workspace, tmp_path, monkeypatch):
    pixels, cached = tmp_path / "pixels", tmp_path / "cached"
    cache = tmp_path / "features"
    _run(_args(workspace, "stage1.yaml", pixels, max_steps=3))
    _run(_args(workspace, "stage1.yaml", cached, max_steps=3, feature_cache=cache))
    index = json.loads((cache / "index.json").read_text())
    assert len(index["items"]) == 16  # every clip once; the broken record is skipped, not cached
    assert _losses(cached) == pytest.approx(_losses(pixels), rel=1e-5)
    for key, value in _trainable(pixels).items():
        torch.testing.assert_close(_trainable(cached)[key], value, atol=1e-6, rtol=1e-5)

    # A second run reads the cache without decoding a single video.
    import crosslmm.data.processor as processor_module

    load_media = processor_module.load_media

    def no_decoding(path, **kwargs):  # the missing file of the broken record may be looked for, nothing else
        if Path(path).exists():
            raise AssertionError(f"{path} was decoded although its features are cached")
        return load_media(path, **kwargs)

    monkeypatch.setattr(processor_module, "load_media", no_decoding)
    shards = sorted(cache.glob("*.safetensors"))
    _run(_args(workspace, "stage1.yaml", tmp_path / "again", max_steps=3, feature_cache=cache))
    assert sorted(cache.glob("*.safetensors")) == shards
    assert _losses(tmp_path / "again") == pytest.approx(_losses(cached), rel=1e-6)


def test_a_bf16_checkpoint_trains_float32_master_weights(workspace, tmp_path):
    from crosslmm.model.modeling import CrossLMMForCausalLM
    from crosslmm.train.trainer import load_model

    bf16 = tmp_path / "bf16"
    model = CrossLMMForCausalLM.from_pretrained(workspace / "init", local_files_only=True)
    model.to(torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                 "chat_template.jinja", "special_tokens_map.json"):
        if (workspace / "init" / name).exists():
            (bf16 / name).write_bytes((workspace / "init" / name).read_bytes())
    config = load_train_config(ROOT / "configs" / "stage1.yaml", [f"model={bf16}", f"output_dir={tmp_path / 'o'}",
                                                                  f"data.train={workspace / 'data' / 'train.json'}"])
    loaded = load_model(config)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    # An update far below bf16's resolution must still reach the weights.
    out = tmp_path / "tiny-lr"
    _run(_args(workspace, "stage1.yaml", out, model=bf16, max_steps=2, **{"optim.learning_rate": 1e-7,
                                                                         "optim.max_grad_norm": 0}))
    start = CrossLMMForCausalLM.from_pretrained(bf16, local_files_only=True, dtype=torch.float32).state_dict()
    trained = _trainable(out)
    changed = [k for k, v in trained.items() if v.dtype == torch.float32 and not torch.equal(v, start[k])]
    assert changed, "no trainable weight moved: updates were rounded away"


def test_overrides_that_make_an_invalid_model_are_named_as_the_cause(workspace, tmp_path):
    """The model's own validation message says what to switch; the user must also learn
    that the recipe's overrides, not their checkpoint, asked for it."""
    from crosslmm.train.trainer import load_model

    config = load_train_config(ROOT / "configs" / "stage1.yaml", [
        f"model={workspace / 'init'}", f"output_dir={tmp_path / 'o'}", f"data.train={workspace / 'data' / 'train.json'}",
        "model_overrides.use_t2v=false", "model_overrides.use_v2v=true", "model_overrides.dcal_every_k=64"])
    with pytest.raises(ValueError, match=r"recipe's model_overrides .*dcal_every_k.*: dcal_every_k=64"):
        load_model(config)


def test_overrides_that_drop_trained_cross_attention_say_so(workspace, tmp_path, caplog):
    """A text-only recipe (use_v2v: false) run from a trained model silently used to write
    a model without its V2V blocks; the next stage then started them again from zero."""
    from crosslmm.train.trainer import load_model

    init = json.loads((workspace / "init" / "config.json").read_text())
    assert init["use_v2v"]
    config = load_train_config(ROOT / "configs" / "stage1.yaml", [
        f"model={workspace / 'init'}", f"output_dir={tmp_path / 'o'}", f"data.train={workspace / 'data' / 'train.json'}",
        "model_overrides.use_v2v=false", "model_overrides.use_t2v=true"])
    with caplog.at_level("WARNING", logger="crosslmm.train"):
        model = load_model(config)
    assert not model.config.use_v2v and "use_v2v=false" in caplog.text and "V2V blocks are not loaded" in caplog.text
    assert "use_t2v" not in caplog.text  # switched on, nothing dropped


def test_a_run_whose_records_are_mostly_unreadable_stops_with_the_reasons(workspace, tmp_path):
    records = json.loads((workspace / "data" / "train.json").read_text())
    elsewhere = tmp_path / "records.json"
    elsewhere.write_text(json.dumps(records))  # beside no videos: every media path is wrong
    result = CliRunner().invoke(app, _args(workspace, "stage1.yaml", tmp_path / "out", max_steps=8,
                                           **{"data.train": elsewhere}))
    assert result.exit_code == 2
    assert "training records were skipped" in result.output and "media_root" in result.output
    assert "missing" in result.output.lower() or "no such" in result.output.lower() or "not found" in result.output.lower()


def test_grounding_weight_adds_the_t2v_grounding_loss_on_grounded_records(workspace, tmp_path):
    records = json.loads((workspace / "data" / "train.json").read_text())[:16]
    for record in records:  # the colour fills every frame: any originals are "about" the answer
        record["grounding"] = [[0, 1, 7, 8, 49, 50]]
    grounded = tmp_path / "grounded.json"
    grounded.write_text(json.dumps(records))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="grounding_weight needs"):  # stage2.yaml shards with FSDP
        load_train_config(ROOT / "configs" / "stage2.yaml", ["model=m", "output_dir=o", "data.train=d", "grounding_weight=1"])
    _run(_args(workspace, "stage2.yaml", out, max_steps=3, grounding_weight=1.0,
               **{"data.train": grounded, "data.media_root": workspace / "data", "distributed.strategy": "ddp"}))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and all(math.isfinite(row["grounding_loss"]) for row in logged)
    # -log of the mean mass on 6 of 98 originals: near -log(6/98) = 2.8 while T2V is untrained
    assert 1.0 < logged[0]["grounding_loss"] < 6.0
    plain = tmp_path / "plain"
    _run(_args(workspace, "stage2.yaml", plain, max_steps=1))
    assert "grounding_loss" not in json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])
