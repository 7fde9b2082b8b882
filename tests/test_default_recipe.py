"""`crosslmm synth-default`: the default model's from-scratch recipe, end to end on a toy
budget (the same code path as the 2-hour run, with a world of 40 videos)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crosslmm.model.modeling import sincos_2d_table
from crosslmm.synth.default_recipe import _timed, load_default_recipe, run_default_recipe, stage_records

REPO = Path(__file__).resolve().parents[1]
TOY = ["vision.scenes=16", "vision.heldout=4", "vision.steps=8", "probe.every=2", "probe.questions=6",
       "stages=[{kind: text_hop, world: {n: 40, seed: 5, questions_per_video: 4}, recipe: text.yaml, hop_scenes: 40,"
       " hop_probe: 8, overrides: [model_overrides.use_v2v=true, model_overrides.use_t2v=true, max_steps=3]},"
       " {kind: text_hop, world: {n: 40, seed: 5, questions_per_video: 4}, recipe: text.yaml, hop_scenes: 40,"
       " hop_probe: 8, stated: false, overrides: [model_overrides.use_v2v=true, model_overrides.use_t2v=true, max_steps=2]},"
       " {world: {n: 40, seed: 5, questions_per_video: 4}, completion_records: 30, processes: 2,"
       " overrides: [max_steps=4, grounding_weight=0.3, grounding_options=true, log_every=2]}]"]


@pytest.mark.slow
def test_default_recipe_builds_trains_exports_and_resumes(tmp_path):
    out = tmp_path / "run"
    config = load_default_recipe(REPO / "configs/synth/default.yaml",
                                 [f"out_dir={out}", f"export.out={tmp_path / 'bundled'}", *TOY])
    model = run_default_recipe(config)

    timings = json.loads((out / "timings.json").read_text())
    assert list(timings) == ["world 0", "world 1", "world 2", "vision", "init", "records 0", "stage 0",
                             "records 1", "stage 1", "records 2", "stage 2", "export"]
    # The trained model reads its videos through the encoder pretrained in this run,
    # with the YAML's architecture.
    vision = load_file(out / "vision" / "model.safetensors")
    trained = load_file(model / "model.safetensors")
    tower = {k.removeprefix("vision_tower.vit."): v for k, v in trained.items() if k.startswith("vision_tower.vit.")}
    assert tower and all(torch.equal(v, vision[k]) for k, v in tower.items())
    written = json.loads((model / "config.json").read_text())
    assert {k: written[k] for k in config.model} == config.model
    # The YAML's spatial table starts as the sine-cosine table, and the two text stages
    # leave it as it started (no video, so no gradient and no weight decay reaches it):
    # a video stage from another copy-stage model with that table swapped in trains as
    # this recipe does (docs/synthetic.md, eighth session).
    init_table = load_file(out / "init" / "model.safetensors")["spatial_embedding"]
    grid = round(init_table.shape[0] ** 0.5)  # one code per patch of the encoder's square grid
    assert torch.allclose(init_table, sincos_2d_table(grid, init_table.shape[1]) * config.model["identity_embedding_std"])
    copy_stage = load_file(out / "stage1" / "train" / "model" / "model.safetensors")["spatial_embedding"]
    assert torch.equal(copy_stage, init_table) and not torch.equal(trained["spatial_embedding"], init_table)
    # The text stage trained on stated hops (its probe on held-out ones), the video stage
    # on the scaffolded, grounded records, each probed while it trained.
    hops = json.loads((out / "stage0" / "train.json").read_text())
    assert hops and all("video" not in r and r["conversations"][0]["value"].startswith("The answer is ") for r in hops)
    assert json.loads((out / "stage0" / "train" / "probe.jsonl").read_text().splitlines()[0])["kind"] == "text"
    # The copy stage: no answer stated, the reply's option text given, no probe.
    copies = json.loads((out / "stage1" / "train.json").read_text())
    assert copies and all(not r["conversations"][0]["value"].startswith("The answer is ") for r in copies)
    assert all(r["conversations"][1]["given"] for r in copies)
    assert not (out / "stage1" / "train" / "probe.jsonl").exists() and (out / "stage1" / "heldout.json").exists()
    records = json.loads((out / "stage2" / "train.json").read_text())
    assert any("grounding" in r for r in records) and any("video" not in r for r in records)
    assert (out / "stage2" / "train" / "probe.jsonl").read_text().count("\n") >= 2
    # The video stage ran as two data-parallel processes sharing the recipe's batch of 8,
    # which ended with the same weights.
    sums = json.loads((out / "stage2" / "train" / "rank_checksums.json").read_text())
    assert len(sums) == 2 and sums[0] == sums[1]
    assert "per_device_batch_size: 4" in (out / "stage2" / "train" / "recipe.yaml").read_text()
    # The text stage kept the DCAL blocks (the text recipe's own default has none).
    assert json.loads((out / "stage0" / "train" / "model" / "config.json").read_text())["use_t2v"] is True
    card = json.loads((tmp_path / "bundled" / "training.json").read_text())
    assert card["dtype"] == "bfloat16" and "form/mc" in card["held_out_accuracy"] and card["timings"]["stage 0"] > 0

    # Run again: every step is found done, nothing is trained twice.
    before = (model / "model.safetensors").stat().st_mtime_ns
    assert run_default_recipe(config) == model and (model / "model.safetensors").stat().st_mtime_ns == before
    # A text_hop stage's length (constant rate) is not part of the settings; another
    # recipe in the same folder is refused, not mixed in.
    longer = load_default_recipe(REPO / "configs/synth/default.yaml",
                                 [f"out_dir={out}", *[t.replace("max_steps=3]", "max_steps=9]") for t in TOY]])
    assert run_default_recipe(longer) == model
    # A settings file written before a stage field existed resumes: the field's default
    # is what that run trained with.
    stored = json.loads((out / "settings.json").read_text())
    for stage in stored["stages"]:
        del stage["ground_counts"]
    (out / "settings.json").write_text(json.dumps(stored))
    assert run_default_recipe(config) == model
    other = load_default_recipe(REPO / "configs/synth/default.yaml", [f"out_dir={out}", *TOY, "seed=1"])
    with pytest.raises(ValueError, match="other settings"):
        run_default_recipe(other)


def test_a_world_folder_holding_another_world_is_refused(tmp_path):
    from crosslmm.synth import write_dataset
    from crosslmm.synth.default_recipe import WorldSpec, prepare_world

    write_dataset(tmp_path, n=6, seed=1, questions_per_video=2)
    with pytest.raises(ValueError, match="another world"):
        prepare_world(tmp_path, WorldSpec(n=6, seed=2, questions_per_video=2, mc_reply="letter"))
    assert prepare_world(tmp_path, WorldSpec(n=6, seed=1, questions_per_video=2, mc_reply="letter")) == tmp_path


def test_a_bad_recipe_config_is_refused_with_its_reason():
    yaml = REPO / "configs/synth/default.yaml"
    with pytest.raises(ValueError, match="bad recipe config"):
        load_default_recipe(yaml, ["vision.steps=many"])
    with pytest.raises(ValueError, match="stage kind 'video'"):
        load_default_recipe(yaml, ["stages=[{kind: video}]"])
    with pytest.raises(ValueError, match="needs hop_scenes"):
        load_default_recipe(yaml, ["stages=[{kind: text_hop}]"])
    with pytest.raises(ValueError, match="stated: false is for a text_hop stage"):
        load_default_recipe(yaml, ["stages=[{kind: text_hop, hop_scenes: 8, stated: false, stop_above: 0.9}]"])
    with pytest.raises(ValueError, match="needs drill_records"):
        load_default_recipe(yaml, ["stages=[{kind: lookup_drill}]"])
    with pytest.raises(ValueError, match="no probe to stop on"):
        load_default_recipe(yaml, ["stages=[{kind: lookup_drill, drill_records: 8, stop_above: 0.9}]"])
    with pytest.raises(ValueError, match="copy_stated_fraction is for a text_hop stage with stated: false"):
        load_default_recipe(yaml, ["stages=[{kind: text_hop, hop_scenes: 8, copy_stated_fraction: 0.25}]"])
    with pytest.raises(ValueError, match="copy_stated_fraction is for a text_hop stage with stated: false"):
        load_default_recipe(yaml, ["stages=[{kind: text_hop, hop_scenes: 8, stated: false, copy_stated_fraction: 1.5}]"])
    with pytest.raises(ValueError, match="processes: 3 must be at least 1 and share threads: 2 evenly"):
        load_default_recipe(yaml, ["stages=[{processes: 3}]"])


def test_the_unstated_copy_keeps_a_fraction_of_stated_records(tmp_path):
    """copy_stated_fraction swaps that share of the copy's records for the stated hop's
    record of the same scene: the reply's first word is then learned in those, and every
    other record is the unstated copy, its option text given."""
    config = load_default_recipe(REPO / "configs/synth/default.yaml", [
        "stages=[{kind: text_hop, world: {seed: 5}, hop_scenes: 400, stated: false, copy_stated_fraction: 0.25}]"])
    records = json.loads(stage_records(tmp_path, config.stages[0], tmp_path / "stage").read_text())
    stated = [r for r in records if r["conversations"][0]["value"].startswith("The answer is ")]
    unstated = [r for r in records if r not in stated]
    assert len(records) == 400 and 0.18 < len(stated) / 400 < 0.32
    assert all("given" not in r["conversations"][1] for r in stated)
    assert all(r["conversations"][1]["given"] for r in unstated)
    for r in stated:  # the stated record of the same scene: the same question and reply
        answer = r["conversations"][0]["value"].split("\n", 1)[0].removeprefix("The answer is ").rstrip(".")
        assert r["conversations"][1]["value"].startswith(answer + " (")
    ids = [r["id"] for r in records]
    assert len(set(ids)) == 400  # one record per scene


@pytest.mark.slow
def test_a_lookup_drill_stage_trains_on_text_before_the_next_stage(tmp_path):
    out = tmp_path / "run"
    world = "world: {n: 40, seed: 5, questions_per_video: 4}"
    config = load_default_recipe(REPO / "configs/synth/default.yaml", [
        f"out_dir={out}", *TOY[:5],
        f"stages=[{{kind: lookup_drill, {world}, recipe: text.yaml, drill_records: 48,"
        f" overrides: [model_overrides.use_v2v=true, model_overrides.use_t2v=true, max_steps=3]}},"
        f" {{{world}, completion_records: 0, overrides: [max_steps=2]}}]"])
    model = run_default_recipe(config)
    drills = json.loads((out / "stage0" / "train.json").read_text())
    assert len(drills) == 48 and all("video" not in r and len(r["conversations"]) == 8 for r in drills)
    assert not (out / "stage0" / "train" / "probe.jsonl").exists()  # unprobed
    # it trained (its language model moved from the init), and the next stage started from it
    init, drilled = (load_file(out / p / "model.safetensors") for p in ("init", "stage0/train/model"))
    assert any(not torch.equal(init[k], drilled[k]) for k in init if k.startswith("language_model."))
    assert f"model: {out / 'stage0' / 'train' / 'model'}" in (out / "stage1" / "train" / "recipe.yaml").read_text()
    assert (model / "model.safetensors").exists()


def test_timings_keep_the_time_of_a_step_cut_off_by_an_interruption(tmp_path):
    """A stage killed mid-way resumes from its last checkpoint, so the time it had spent
    must already be on disk: the total is written while the step runs, and a resumed step
    adds to it."""
    path, timings = tmp_path / "timings.json", {"world 0": 1.0}

    def killed_after_a_while():
        time.sleep(0.35)
        seen = json.loads(path.read_text())  # what a kill at this moment would leave
        assert seen["world 0"] == 1.0 and 0.1 <= seen["stage 0"] <= 0.5
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _timed(timings, "stage 0", path, killed_after_a_while, every=0.1)
    spent = json.loads(path.read_text())["stage 0"]
    assert spent >= 0.3
    resumed = json.loads(path.read_text())
    assert _timed(resumed, "stage 0", path, lambda: "model", every=0.1) == "model"
    assert spent <= json.loads(path.read_text())["stage 0"] < spent + 0.5
