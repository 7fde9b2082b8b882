"""The synthetic world's training path: captions and multi-turn records, the vision
encoder's per-patch pretraining and its loading into a from-scratch CrossLMM, and the
ablation runner end to end on a toy budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from crosslmm.checkpoints.scratch import corpus_from_records, init_from_scratch
from crosslmm.presets import preset_config
from crosslmm.synth import scene_for, write_dataset
from crosslmm.synth.vision_pretrain import object_map, patch_labels, pretrain_vision
from crosslmm.synth.world import CAPTION_PROMPT, COLORS, PATTERNS, REGIONS, SHAPES, append_caption_turns, caption

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-models")
    write_dataset(out, n=12, seed=3, questions_per_video=4)
    return out


def test_multiturn_records_hold_every_training_question_once(data):
    single = json.loads((data / "train.json").read_text())
    grouped = json.loads((data / "train_multiturn.json").read_text())
    assert len(grouped) == len({r["video"] for r in single})
    flattened = []
    for record in grouped:
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<video>\n")
        assert all("<video>" not in t["value"] for t in turns[1:])
        flattened += [(record["video"], turns[i]["value"].replace("<video>\n", ""), turns[i + 1]["value"])
                      for i in range(0, len(turns), 2)]
    expected = [(r["video"], r["conversations"][0]["value"].replace("<video>\n", ""), r["conversations"][1]["value"])
                for r in single]
    assert flattened == expected


def test_captions_list_exactly_the_visible_sprites_of_every_frame(data):
    captions = json.loads((data / "train_captions.json").read_text())
    assert captions and all(c["conversations"][0]["value"] == f"<video>\n{CAPTION_PROMPT}" for c in captions)
    scene = scene_for(3, int(captions[0]["id"][3:9]))
    text = captions[0]["conversations"][1]["value"]
    assert text == caption(scene)
    frames = text.split(" motion: ")[0].split("frame ")[1:]
    assert len(frames) == scene.frames
    for t, described in enumerate(frames):
        names = sorted(obj.name for obj in scene.visible_at(t))
        listed = sorted(" ".join(item.split()[:2]) for item in described.split(":", 1)[1].strip(" .").split(", ")
                        if item != "empty")
        assert listed == names, (t, described)


def test_region_first_captions_list_the_same_sprites_quadrant_by_quadrant(data):
    """The region-first caption is the default caption's items reordered, each frame's
    quadrants in REGIONS order; appended as the last turn of a multi-turn record it is
    asked after every question (so no answer can be read from it), media only once."""
    records = json.loads((data / "train_multiturn.json").read_text())
    with_captions = append_caption_turns(records, seed=3)
    for record, extended in zip(records, with_captions):
        scene = scene_for(3, int(Path(record["video"]).stem[3:]))
        assert extended["conversations"][:-2] == record["conversations"]
        assert extended["conversations"][-2:] == [{"from": "human", "value": CAPTION_PROMPT},
                                                  {"from": "gpt", "value": caption(scene, region_first=True)}]
        default, by_region = caption(scene), caption(scene, region_first=True)
        assert default.split(" motion: ")[1] == by_region.split(" motion: ")[1]
        for old, new in zip(default.split(" motion: ")[0].split("frame ")[1:], by_region.split(" motion: ")[0].split("frame ")[1:]):
            old_items = [i for i in old.split(":", 1)[1].strip(" .").split(", ") if i != "empty"]
            new_items = [i for i in new.split(":", 1)[1].strip(" .").split(", ") if i != "empty"]
            moved = sorted(f"{i.split()[-1]} {' '.join(i.split()[:-1])}" for i in old_items)
            assert sorted(new_items) == moved
            regions = [REGIONS.index(i.split()[0]) for i in new_items]
            assert regions == sorted(regions), new
    assert sum("<video>" in t["value"] for t in with_captions[0]["conversations"]) == 1


def test_patch_labels_follow_the_sprites_ground_truth():
    scene = scene_for(0, 5)
    grid = 8
    side = scene.size // grid
    for t in range(scene.frames):
        ids = object_map(scene, t)
        labels = patch_labels(scene, t, grid)
        for row in range(grid):
            for col in range(grid):
                patch = ids[row * side:(row + 1) * side, col * side:(col + 1) * side]
                label = labels[row * grid + col]
                if (patch < 0).all():
                    assert (label == 0).all()
                if (patch >= 0).all() and len(np.unique(patch)) == 1:  # fully inside one sprite
                    obj = scene.objects[int(patch[0, 0])]
                    assert tuple(label) == (1 + list(COLORS).index(obj.color), 1 + SHAPES.index(obj.shape),
                                            1 + PATTERNS.index(obj.pattern))


def test_vision_pretraining_learns_and_loads_into_a_crosslmm(tmp_path):
    config = preset_config("small")
    scenes = [scene_for(0, i) for i in range(24)]
    report = pretrain_vision(config, scenes, scenes[:4], tmp_path / "vision", steps=60, batch_frames=32, seed=0)
    # Colour is a per-pixel property: 60 steps on 24 videos are well above chance (1/6).
    assert report["eval_patch_accuracy"]["color"] > 0.4, report
    assert (tmp_path / "vision" / "model.safetensors").exists()

    corpus = corpus_from_records([]) + ["What colour is the red square?"]
    model_dir = init_from_scratch("small", tmp_path / "model", corpus, vocab_size=300, vision=tmp_path / "vision")
    pretrained = load_file(tmp_path / "vision" / "model.safetensors")
    crosslmm = load_file(model_dir / "model.safetensors")
    tower = {k.removeprefix("vision_tower.vit."): v for k, v in crosslmm.items() if k.startswith("vision_tower.vit.")}
    assert tower, "the CrossLMM checkpoint has no vision tower tensors"
    for name, tensor in tower.items():
        assert torch.equal(tensor, pretrained[name]), name


def test_vision_pretraining_stopped_midway_resumes_to_the_same_encoder(tmp_path, monkeypatch):
    # A run killed after its step-4 checkpoint, started again with the same arguments,
    # ends with the tensors of a run never stopped (the default recipe's first training).
    config, scenes = preset_config("tiny"), [scene_for(0, i, size=56) for i in range(4)]
    args = dict(steps=7, batch_frames=8, seed=0, save_every=2)
    pretrain_vision(config, scenes, scenes[:1], tmp_path / "whole", **args)

    step = torch.optim.AdamW.step
    calls = []

    def dies_at_the_sixth_step(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dies_at_the_sixth_step)
    with pytest.raises(KeyboardInterrupt):
        pretrain_vision(config, scenes, scenes[:1], tmp_path / "cut", checkpoints=tmp_path / "ckpt", **args)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-0000004"
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    calls.clear()
    calls.extend([1] * 100)  # past the sixth: every step counts from here
    resumed = pretrain_vision(config, scenes, scenes[:1], tmp_path / "cut", checkpoints=tmp_path / "ckpt", **args)
    assert len(calls) == 100 + 3  # steps 5 to 7 only
    whole, cut = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert whole.keys() == cut.keys()
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name
    assert resumed["steps"] == 7

    with pytest.raises(ValueError, match="other settings"):  # a checkpoint of another pretraining is refused
        pretrain_vision(config, scenes, scenes[:1], tmp_path / "other", checkpoints=tmp_path / "ckpt",
                        **{**args, "batch_frames": 4})


def test_a_models_encoder_trains_on_and_set_vision_puts_it_back(tmp_path, data):
    # `crosslmm synth-vision` continues a model's frozen encoder (heads fitted first,
    # then the tower), `crosslmm set-vision` writes the model with it; the anchor keeps
    # the features near where they started.
    from typer.testing import CliRunner

    from crosslmm.checkpoints.build import load_vision
    from crosslmm.cli import app
    from crosslmm.infer import load
    from crosslmm.synth.vision_pretrain import frames_and_labels

    model_dir = init_from_scratch("small", tmp_path / "model", ["What colour is the red square?"], vocab_size=300)
    runner = CliRunner()
    for name, anchor in (("free", "0"), ("anchored", "100")):
        result = runner.invoke(app, ["synth-vision", str(tmp_path / name), "--world", str(data), "--model", str(model_dir),
                                     "--scenes", "4", "--heldout", "2", "--steps", "15", "--learning-rate", "2e-3",
                                     "--anchor", anchor])
        assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "anchored" / "pretraining.json").read_text())
    assert report["init"] == str(model_dir) and report["anchor"] == 100.0 and report["world"] == str(data)

    pixels, _ = frames_and_labels([scene_for(3, 0)], 8)
    model, _ = load(model_dir)
    tower = model.vision_tower
    with torch.no_grad():
        start = tower(pixels)
        moved = {}
        for name in ("free", "anchored"):
            state = load_vision(tmp_path / name).state_dict()
            tower.vit.load_state_dict({k: state[k] for k in tower.vit.state_dict()})
            moved[name] = float((tower(pixels) - start).pow(2).mean())
    assert moved["anchored"] < 0.5 * moved["free"], moved

    result = runner.invoke(app, ["set-vision", str(model_dir), str(tmp_path / "anchored"), str(tmp_path / "swapped")])
    assert result.exit_code == 0, result.output
    swapped = load_file(tmp_path / "swapped" / "model.safetensors")
    original = load_file(model_dir / "model.safetensors")
    encoder = load_vision(tmp_path / "anchored").state_dict()
    for name, tensor in swapped.items():
        if name.startswith("vision_tower.vit."):
            assert torch.equal(tensor, encoder[name.removeprefix("vision_tower.vit.")]), name
        else:
            assert torch.equal(tensor, original[name]), name
    assert (tmp_path / "swapped" / "vision_pretraining.json").exists()

    model, processor = load(model_dir)  # a bf16 checkpoint, as the bundled model is stored, stays bf16
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    processor.save_pretrained(tmp_path / "bf16")
    result = runner.invoke(app, ["set-vision", str(tmp_path / "bf16"), str(tmp_path / "anchored"), str(tmp_path / "swapped16")])
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in load_file(tmp_path / "swapped16" / "model.safetensors").values()} == {torch.bfloat16}

    pretrain_vision(preset_config("tiny"), [scene_for(0, 0, size=56)], [scene_for(0, 1, size=56)], tmp_path / "v", steps=1)
    result = runner.invoke(app, ["set-vision", str(model_dir), str(tmp_path / "v"), str(tmp_path / "bad")])
    assert result.exit_code != 0 and "does not fit" in result.output


def test_init_rejects_a_vision_checkpoint_of_another_shape(tmp_path):
    pretrain_vision(preset_config("tiny"), [scene_for(0, 0, size=56)], [scene_for(0, 1, size=56)], tmp_path / "v", steps=1)
    with pytest.raises(ValueError, match="does not fit"):
        init_from_scratch("small", tmp_path / "m", ["a b c"], vocab_size=300, vision=tmp_path / "v")


def test_a_variant_whose_only_dcal_is_the_last_layer_has_a_valid_caption_stage():
    # K = 8 of 8 layers: with T2V off for captions, the last layer's V2V alone would be read
    # by nothing (refused by validation), so the caption stage is pooled-only.
    from crosslmm.model.configuration import CrossLMMConfig
    from crosslmm.presets import preset_config
    from crosslmm.synth.ablations import stage_switches

    def build(config, switches):
        return CrossLMMConfig(**{**config.to_dict(), **switches})

    k8 = preset_config("small", use_v2v=True, use_t2v=True, dcal_every_k=8)
    captions, questions = stage_switches(k8, caption_t2v=False)
    assert captions == {"use_v2v": False, "use_t2v": False} and not build(k8, captions).use_dcal
    assert questions == {"use_v2v": True, "use_t2v": True}
    assert build(k8, questions).dcal_layer_indices == [7] and build(k8, questions).v2v_layer_indices == []
    with pytest.raises(ValueError, match="read by nothing"):
        build(k8, {"use_t2v": False})  # what turning T2V off alone would ask for
    assert stage_switches(k8, caption_t2v=True)[0] == {"use_v2v": True, "use_t2v": True}
    k2 = preset_config("small", use_v2v=True, use_t2v=True, dcal_every_k=2)
    assert stage_switches(k2, caption_t2v=False)[0] == {"use_v2v": True, "use_t2v": False}
    t2v = preset_config("small", use_v2v=False, use_t2v=True, dcal_every_k=2)
    assert stage_switches(t2v, caption_t2v=False) == ({"use_v2v": False, "use_t2v": False},
                                                      {"use_v2v": False, "use_t2v": True})


@pytest.mark.slow
def test_ablation_runner_end_to_end_and_resumes(tmp_path):
    from crosslmm.synth.ablations import load_ablation_config, run_ablations

    yaml = tmp_path / "ablations.yaml"
    yaml.write_text(
        f"out_dir: {tmp_path / 'run'}\n"
        f"docs_dir: {tmp_path / 'docs'}\n"
        "data: {n: 20, seed: 1, questions_per_video: 2}\n"  # 2 held-out videos, 4 questions

        "vision: {scenes: 6, steps: 2, batch_frames: 16}\n"
        "text_base: {letter_hop_first_families: [motion_direction], letter_hop_first_scenes: 8, "
        "letter_hop_first_overrides: [max_steps=2, per_device_batch_size=2], "
        f"letter_hop_scenes: 8, letter_hop_overrides: [max_steps=2, save_every=1, per_device_batch_size=2], "
        "letter_hop_decay_overrides: [max_steps=2, per_device_batch_size=2, optim.schedule=cosine], "
        f"scenes: 8, letter_hop_mix_scenes: 4, recipe: {REPO / 'configs/synth/text.yaml'}, "
        "train_overrides: [max_steps=2, per_device_batch_size=2], "
        "probe_scenes: 2, probe_every: 2}\n"
        "caption_t2v: true\n"
        "caption_freeze_llm: true\n"
        "letter_hop_rehearsal: 3\n"
        f"caption_recipe: {REPO / 'configs/synth/captions.yaml'}\n"
        f"recipe: {REPO / 'configs/synth/llm.yaml'}\n"
        "train_overrides: [max_steps=2, per_device_batch_size=2]\n"
        "eval_questions: 3\n"
        "jobs: 2\n"
        "variants:\n"
        "  pooled: {tokens_per_frame: 1, use_v2v: false, use_t2v: false}\n"
        "  both: {tokens_per_frame: 1, use_v2v: true, use_t2v: true, dcal_every_k: 4}\n"
        f"default_model: {{variant: both, out: {tmp_path / 'default'}}}\n"
    )
    summary = run_ablations(load_ablation_config(yaml))
    names = [r["name"] for r in summary["variants"]]
    assert names == ["pooled", "both"]
    pooled, both = summary["variants"]
    assert pooled["dcal_layers"] == 0 and both["dcal_layers"] == 2 and both["use_t2v"]
    assert pooled["llm_visual_tokens"] == both["llm_visual_tokens"] == 8
    assert pooled["count"]["all"] == 3
    assert {"video/all", "other/all", "video/colour"} <= set(both["caption_grounding"])
    for name in ("results.md", "ablations.png", "results.json"):
        assert (tmp_path / "docs" / name).stat().st_size > 0
    table = (tmp_path / "docs" / "results.md").read_text()
    assert "| pooled |" in table and "| both |" in table and "caption words" in table
    card = json.loads((tmp_path / "default" / "training.json").read_text())
    assert card["variant"] == "both" and card["held_out_count"]["all"] == len(
        json.loads((tmp_path / "run" / "data" / "test.json").read_text()))
    weights = load_file(tmp_path / "default" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    saved = json.loads((tmp_path / "default" / "config.json").read_text())
    assert [saved["dtype"], saved["text_config"]["dtype"], saved["vision_config"]["dtype"]] == ["bfloat16"] * 3
    # Every variant starts from the one text-pretrained LLM (stage 0), and with caption_t2v
    # the caption stage of `both` already trains T2V.
    base = load_file(tmp_path / "run" / "text_base" / "text_world" / "train" / "model" / "model.safetensors")
    hop = tmp_path / "run" / "text_base" / "letter_hop"
    assert [json.loads(line)["step"] for line in (hop / "train" / "probe.jsonl").read_text().splitlines()] == [2]
    first = tmp_path / "run" / "text_base" / "letter_hop_first"  # the curriculum's step, before the hop over all families
    assert {r["questions"][0]["type"] for r in json.loads((first / "train.json").read_text())} == {"motion_direction"}
    assert json.loads((hop / "settings.json").read_text())["base"] == str(first / "train" / "model")
    # The decay step continues the hop's model on the hop's records; the text world follows it.
    decay = tmp_path / "run" / "text_base" / "letter_hop_decay"
    assert json.loads((decay / "settings.json").read_text())["base"] == str(hop / "train" / "model")
    assert not (decay / "train.json").exists()
    assert [json.loads(line)["step"] for line in (decay / "train" / "probe.jsonl").read_text().splitlines()] == [2]
    world = tmp_path / "run" / "text_base" / "text_world"
    assert json.loads((world / "settings.json").read_text())["base"] == str(decay / "train" / "model")
    rehearsed = [r["id"] for r in json.loads((world / "train.json").read_text()) if r["id"].startswith("hop")]
    assert len(rehearsed) == 4  # the hop's records mixed into the text world's
    for name in ("pooled", "both"):
        init = load_file(tmp_path / "run" / "variants" / name / "init" / "model.safetensors")
        assert all(torch.equal(init[k], base[k]) for k in base if k.startswith("language_model."))
    stage1 = load_file(tmp_path / "run" / "variants" / "both" / "stage1" / "model" / "model.safetensors")
    assert any(".t2v." in k for k in stage1)
    # caption_freeze_llm: stage 1 leaves the base LLM's own weights as they were and trains the rest.
    init = load_file(tmp_path / "run" / "variants" / "both" / "init" / "model.safetensors")
    llm = [k for k in base if k.startswith("language_model.")]
    assert llm and all(torch.equal(stage1[k], init[k]) for k in llm)
    assert not all(torch.equal(stage1[k], init[k]) for k in stage1 if k.startswith("projector.") or ".t2v." in k)
    # letter_hop_rehearsal: each pixel stage trains on its dataset's records plus 3 hop
    # records of its own (the first 3 scenes in stage 1, the next 3 in stage 2).
    stages = {}
    for stage, source in (("stage1", "train_captions"), ("train", "train_multiturn")):
        recipe = OmegaConf.load(tmp_path / "run" / "variants" / "both" / stage / "recipe.yaml")
        records = json.loads(Path(recipe["data"]["train"]).read_text())
        assert Path(recipe["data"]["media_root"]) == tmp_path / "run" / "data"
        own = json.loads((tmp_path / "run" / "data" / f"{source}.json").read_text())
        assert records[: len(own)] == own
        stages[stage] = [r["id"] for r in records[len(own):]]
    assert all(len(ids) == 3 and all(i.startswith("hop") for i in ids) for ids in stages.values())
    assert not set(stages["stage1"]) & set(stages["train"])

    # Finished variants are not trained again.
    result = tmp_path / "run" / "variants" / "pooled" / "result.json"
    before = result.stat().st_mtime_ns
    run_ablations(load_ablation_config(yaml), only=["pooled"])
    assert result.stat().st_mtime_ns == before
    # An interrupted variant (no result yet) resumes its stages: trained steps are not redone.
    metrics = tmp_path / "run" / "variants" / "pooled" / "train" / "metrics.jsonl"
    trained = metrics.read_text()
    result.unlink()
    run_ablations(load_ablation_config(yaml), only=["pooled"])
    assert json.loads(result.read_text())["resumed"] and metrics.read_text() == trained

    # Raising the letter hop's max_steps continues it from its last checkpoint, and the
    # text-world step after it is trained again from the new model.
    from crosslmm.synth.ablations import prepare_text_base

    text_world = tmp_path / "run" / "text_base" / "text_world" / "train" / "model" / "model.safetensors"
    config = load_ablation_config(yaml, ["text_base.letter_hop_overrides=[max_steps=3,save_every=1,per_device_batch_size=2]"])
    before = text_world.stat().st_mtime_ns
    prepare_text_base(config, tmp_path / "run" / "data", tmp_path / "run" / "text_base", threads=1)
    assert [json.loads(line)["step"] for line in (hop / "train" / "probe.jsonl").read_text().splitlines()] == [2, 3]
    assert text_world.stat().st_mtime_ns != before


def test_novel_caption_words_name_each_sprite_once_and_every_move(data):
    from crosslmm.synth.evaluate import novel_caption_words

    for index in range(6):
        scene = scene_for(3, index)
        text = caption(scene)
        words = novel_caption_words(text)
        by_category = {c: [text[a:b] for cat, a, b in words if cat == c] for c in ("colour", "shape", "pattern", "motion")}
        seen = [obj for obj in scene.objects if any(obj in scene.visible_at(t) for t in range(scene.frames))]
        assert sorted(by_category["colour"]) == sorted(obj.color for obj in seen)
        assert sorted(by_category["shape"]) == sorted(obj.shape for obj in seen)
        assert sorted(by_category["pattern"]) == sorted(obj.pattern for obj in seen if obj.pattern != "plain")
        assert by_category["motion"] == [obj.direction for obj in scene.objects]
        places = [text[a:b] for cat, a, b in words if cat == "place"]
        assert len(places) >= len(seen) and all(p in ("top-left", "top-right", "bottom-left", "bottom-right")
                                                 for p in places)


def test_caption_grounding_reads_the_answer_positions_the_loss_trains(data, tmp_path):
    from crosslmm.infer import load
    from crosslmm.synth.evaluate import caption_grounding, novel_caption_words, split_scenes
    from crosslmm.synth.world import caption_record

    corpus = corpus_from_records([data / "train.json", data / "train_captions.json"])
    model, processor = load(init_from_scratch("small", tmp_path / "m", corpus, vocab_size=300))
    scenes = split_scenes(data, "train", limit=3)
    assert len(scenes) == 3
    result = caption_grounding(model, processor, scenes, data)
    total = sum(len(novel_caption_words(caption(s))) for _, s in scenes)
    assert result["count"]["video/all"] == result["count"]["other/all"] == total
    assert all(0.0 <= v <= 1.0 for v in result["accuracy"].values())

    # The positions it scores are the ones the training loss uses: the same cross-entropy.
    index, scene = scenes[0]
    item = processor.encode_record(caption_record(scene, index), data)
    with torch.no_grad():
        out = model(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"],
                    media_num_frames=item["media_num_frames"], labels=item["labels"][None])
    positions = (item["labels"] != -100).nonzero().squeeze(1)
    shift = out.logits.shape[1] - item["input_ids"].shape[0]
    ours = torch.nn.functional.cross_entropy(out.logits[0, positions - 1 + shift], item["input_ids"][positions])
    assert torch.allclose(ours, out.loss, atol=1e-5)


def test_text_world_records_carry_the_scene_as_text_and_never_a_dataset_scene():
    from crosslmm.synth.world import TEXT_WORLD_FIRST_INDEX, TEXT_WORLD_PREFIX, text_world_records

    records = text_world_records(0, 5)
    for i, record in enumerate(records):
        scene = scene_for(0, TEXT_WORLD_FIRST_INDEX + i)
        first = record["conversations"][0]["value"]
        assert first.startswith(TEXT_WORLD_PREFIX + caption(scene) + "\n")
        assert "<video>" not in json.dumps(record) and "video" not in record
        answers = [turn["value"] for turn in record["conversations"][1::2]]
        assert answers == [q["answer"] for q in record["questions"]] and len(answers) >= 3
    assert text_world_records(0, 5) == records  # deterministic
    with_caption = text_world_records(0, 5, caption_as_answer=True)
    for plain, turned in zip(records, with_caption):
        assert turned["conversations"][0]["value"] == CAPTION_PROMPT
        assert turned["conversations"][1]["value"] == plain["conversations"][0]["value"].split("\n", 1)[0][len(TEXT_WORLD_PREFIX):]
        assert turned["conversations"][3:] == plain["conversations"][1:]
    later = text_world_records(0, 2, first=3)  # `first` names the scenes (the balancing starts afresh)
    assert [r["conversations"][0]["value"].split("\n")[0] for r in later] == [
        r["conversations"][0]["value"].split("\n")[0] for r in records[3:]]


def test_a_text_base_step_trains_on_when_asked_for_more_steps_or_a_higher_probe():
    from crosslmm.synth.ablations import _longer

    trained = {"max_steps": 1000, "stop_above": 0.9}
    assert _longer({"max_steps": 2000, "stop_above": 0.9}, trained)
    assert _longer({"max_steps": 1000, "stop_above": 0.95}, trained)
    assert _longer({"max_steps": 1000, "stop_above": None}, trained)
    assert not _longer({"max_steps": 1000, "stop_above": 0.9}, trained)
    assert not _longer({"max_steps": 500, "stop_above": 0.8}, trained)
    assert not _longer({"max_steps": 1000, "stop_above": 0.5}, {"max_steps": 1000, "stop_above": None})


def test_letter_hop_records_state_the_answer_and_reply_its_letter():
    from collections import Counter

    from crosslmm.synth.world import FAMILIES, LETTER_HOP_PREFIX, letter_hop_records

    records = letter_hop_records(0, 60)
    families, letters = Counter(), Counter()
    for record in records:
        (human, gpt), (meta,) = record["conversations"], record["questions"]
        stated, question = human["value"].split("\n", 1)
        assert stated.startswith(LETTER_HOP_PREFIX) and "<video>" not in human["value"]
        options = dict(line.split(". ", 1) for line in question.split("\n")[1:5])
        assert list(options) == ["A", "B", "C", "D"] and meta["form"] == "mc" and gpt["value"] == meta["answer"]
        assert options[gpt["value"]] == stated[len(LETTER_HOP_PREFIX):-1]  # the stated answer is the lettered option
        families[meta["type"]] += 1
        letters[gpt["value"]] += 1
    assert set(families) == set(FAMILIES) and max(families.values()) - min(families.values()) <= 1
    assert max(letters.values()) - min(letters.values()) <= 6
    probe = letter_hop_records(0, 20, first=60)  # held out: the scenes after the training ones
    assert not {r["id"] for r in probe} & {r["id"] for r in records} and len(probe) == 20
    motion = letter_hop_records(0, 40, families=["motion_direction"])  # a curriculum's first step
    assert motion and {r["questions"][0]["type"] for r in motion} == {"motion_direction"}


def test_unstated_letter_hop_leaves_only_the_copy_from_the_reply():
    from crosslmm.synth.world import LETTER_HOP_PREFIX, letter_hop_records

    stated = letter_hop_records(0, 30, mc_reply="option-letter")
    unstated = letter_hop_records(0, 30, mc_reply="option-letter", stated=False)
    for with_answer, without in zip(stated, unstated):
        assert with_answer["id"] == without["id"] and with_answer["questions"] == without["questions"]
        human, gpt = (turn["value"] for turn in without["conversations"])
        assert LETTER_HOP_PREFIX not in human  # nothing in the prompt says which option is right
        assert human == with_answer["conversations"][0]["value"].split("\n", 1)[1]
        options = dict(line.split(". ", 1) for line in human.split("\n")[1:5])
        word, letter = gpt.rsplit(" (", 1)
        assert options[letter[:-1]] == word and letter[:-1] == without["questions"][0]["answer"]
        assert without["conversations"][1]["given"] == word  # context: only " (D)" is learned
    with pytest.raises(ValueError, match="option's text"):
        letter_hop_records(0, 5, stated=False)  # a bare letter would be unknowable


def test_option_completion_gives_the_first_word_and_teaches_the_copy_of_the_rest():
    from crosslmm.synth.world import option_completion_records

    records = option_completion_records(0, 200)
    assert len(records) > 50 and {r["questions"][0]["type"] for r in records} == {"appearance_order", "pattern"}
    for record in records:
        human, gpt = record["conversations"]
        options = dict(line.split(". ", 1) for line in human["value"].split("\n")[1:5])
        text, letter = gpt["value"].rsplit(" (", 1)
        assert options[letter[:-1]] == text and letter[:-1] == record["questions"][0]["answer"]
        assert gpt["given"] == text.split()[0] and len(text.split()) == 2  # an object: colour, then shape
        # the given word names exactly one option: the rest of the reply follows from the prompt
        assert [o.split()[0] for o in options.values()].count(gpt["given"]) == 1


def test_lookup_drill_asks_each_record_its_options_four_times():
    from crosslmm.synth.world import LETTER_HOP_PREFIX, MC_OPTION_TEXTS, letter_hop_records, lookup_drill_records

    # its options are the world's: every option a hop record shows is one of them
    shown = {o for r in letter_hop_records(0, 300, mc_reply="option-letter") for o in r["questions"][0]["options"]}
    assert shown <= set(MC_OPTION_TEXTS) and len(set(MC_OPTION_TEXTS)) == len(MC_OPTION_TEXTS) == 49
    records = lookup_drill_records(0, 50)
    assert records == lookup_drill_records(0, 50) and len({r["id"] for r in records}) == 50
    letters = []
    for record in records:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 4 and "video" not in record
        first = turns[0]["value"].split("\n")
        options = dict(line.split(". ", 1) for line in first[1:5])
        assert list(options) == ["A", "B", "C", "D"] and len(set(options.values())) == 4
        for human, gpt in zip(turns[::2], turns[1::2]):
            stated = human["value"].split("\n")[0]
            assert stated.startswith(LETTER_HOP_PREFIX) and "given" not in gpt  # the whole reply is learned
            text, letter = gpt["value"].rsplit(" (", 1)
            assert text == stated[len(LETTER_HOP_PREFIX):-1] and options[letter[:-1]] == text
            letters.append(letter[:-1])
        assert all("\n" not in t["value"] for t in turns[2::2])  # later turns: the statement alone
    assert min(letters.count(x) for x in "ABCD") > 30  # 200 lookups, no letter favoured
    assert not {r["id"] for r in lookup_drill_records(0, 10, first=50)} & {r["id"] for r in records}


@pytest.mark.parametrize("caption_as_answer", [False, True])
def test_text_world_evaluation_asks_every_question_after_its_caption(tmp_path, caption_as_answer):
    from crosslmm.infer import load
    from crosslmm.synth.evaluate import evaluate_text_world
    from crosslmm.synth.world import text_world_records

    records = text_world_records(0, 2, caption_as_answer=caption_as_answer)
    corpus = [turn["value"] for r in records for turn in r["conversations"]]
    model, processor = load(init_from_scratch("small", tmp_path / "m", corpus, vocab_size=300))
    result = evaluate_text_world(model, processor, records, max_new_tokens=2)
    assert result["count"]["all"] == sum(len(r["questions"]) for r in records)
    assert 0.0 <= result["accuracy"]["all"] <= 1.0


def test_a_text_pretrained_language_model_is_the_base_of_a_new_variant(tmp_path):
    corpus = ["frame 1: red square top-left.", "What colour is the object?", "A B C D"]
    base = init_from_scratch("small", tmp_path / "base", corpus, vocab_size=300, seed=1,
                             use_v2v=False, use_t2v=False)
    variant = init_from_scratch("small", tmp_path / "variant", corpus, vocab_size=300, seed=2, language=base,
                                tokens_per_frame=4, use_v2v=True, use_t2v=True, dcal_every_k=2)
    base_state = load_file(base / "model.safetensors")
    variant_state = load_file(variant / "model.safetensors")
    llm = [k for k in base_state if k.startswith("language_model.")]
    assert llm and all(torch.equal(variant_state[k], base_state[k]) for k in llm)
    assert any(".t2v." in k for k in variant_state)  # the new blocks exist, and are the variant's own
    assert not torch.equal(variant_state["projector.linear_1.weight"], base_state["projector.linear_1.weight"])
    assert (variant / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match="does not fit"):
        init_from_scratch("tiny", tmp_path / "wrong", corpus, vocab_size=300, language=base)


@pytest.mark.parametrize("kind", ["questions", "text", "captions"])
def test_a_probe_is_written_while_training(data, tmp_path, kind):
    from crosslmm.synth.world import text_world_records
    from crosslmm.train.config import load_train_config
    from crosslmm.train.trainer import train

    corpus = corpus_from_records([data / "train.json", data / "train_captions.json"])
    init = init_from_scratch("small", tmp_path / "m", corpus, vocab_size=300)
    (tmp_path / "text.json").write_text(json.dumps(text_world_records(3, 2)))
    if kind == "captions":  # two held-out videos at least: each is the other's control
        write_dataset(tmp_path / "world", n=20, seed=3, questions_per_video=1)
    probe_data = {"questions": data / "test.json", "text": tmp_path / "text.json", "captions": tmp_path / "world"}[kind]
    train(load_train_config(REPO / "configs/synth/llm.yaml", [
        f"model={init}", f"output_dir={tmp_path / 'run'}", f"data.train={data / 'train_multiturn.json'}",
        "max_steps=4", "per_device_batch_size=2", "probe.every=2", f"probe.kind={kind}", f"probe.data={probe_data}",
        "probe.limit=2",
    ]))
    lines = [json.loads(line) for line in (tmp_path / "run" / "probe.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    key = "video/all" if kind == "captions" else "all"
    assert all(0.0 <= line[key] <= 1.0 and line["kind"] == kind for line in lines)


def test_a_probe_that_reaches_stop_above_ends_the_run_and_exports(data, tmp_path):
    from crosslmm.synth.world import text_world_records
    from crosslmm.train.config import load_train_config
    from crosslmm.train.trainer import train

    corpus = corpus_from_records([data / "train.json", data / "train_captions.json"])
    init = init_from_scratch("small", tmp_path / "m", corpus, vocab_size=300)
    (tmp_path / "text.json").write_text(json.dumps(text_world_records(3, 2)))
    final = train(load_train_config(REPO / "configs/synth/text.yaml", [
        f"model={init}", f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'text.json'}",
        "max_steps=6", "per_device_batch_size=1", "save_every=0", "probe.every=2", "probe.kind=text",
        f"probe.data={tmp_path / 'text.json'}", "probe.limit=1", "probe.stop_above=0.0",  # any score reaches 0
    ]))
    lines = [json.loads(line) for line in (tmp_path / "run" / "probe.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2]
    assert (final / "model.safetensors").exists()
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    progress = json.loads((tmp_path / "run" / "checkpoints" / latest / "progress.json").read_text())
    assert progress["step"] == 2 and progress["stopped_at"] >= 0.0

    def resumed(*overrides: str) -> list[int]:
        train(load_train_config(tmp_path / "run" / "recipe.yaml", ["resume=latest", *overrides]))
        return [json.loads(line)["step"] for line in (tmp_path / "run" / "probe.jsonl").read_text().splitlines()]

    assert resumed() == [2]  # the same threshold: still reached, nothing to train
    assert (final / "model.safetensors").exists()
    assert resumed("probe.stop_above=null") == [2, 4, 6]  # no threshold: on to max_steps


def test_a_resumed_run_drops_the_log_rows_written_after_its_checkpoint(tmp_path):
    from crosslmm.train.trainer import truncate_logs

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (20, 40, 60)))
    (tmp_path / "probe.jsonl").write_text(json.dumps({"step": 50, "all": 0.5}) + "\n")
    truncate_logs(tmp_path, 40)
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [20, 40]
    assert (tmp_path / "probe.jsonl").read_text() == ""


def test_a_probe_without_data_is_refused():
    from crosslmm.train.config import load_train_config

    with pytest.raises(ValueError, match="probe needs"):
        load_train_config(REPO / "configs/synth/llm.yaml", ["model=m", "output_dir=o", "data.train=t", "probe.every=5"])
