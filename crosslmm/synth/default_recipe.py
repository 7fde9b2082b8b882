"""`crosslmm synth-default`: a default model trained from scratch in one run.

One YAML file (`configs/synth/default.yaml`) says everything, and the run does, in order:

1. writes each stage's world (`crosslmm synth`) unless its folder already holds it;
2. pretrains the frozen vision encoder from random weights on the first world's
   training scenes (per-patch colour, shape and pattern; `crosslmm.synth.vision_pretrain`);
3. builds the model from scratch (`init_from_scratch`: a tokenizer trained on the first
   world's text, every weight random except the encoder just trained);
4. trains each stage with `crosslmm train`'s own code path on its world's question
   records as the bundled model's lineage learned to write them (docs/synthetic.md):
   the answer stated before half the multiple-choice questions (`state_mc_answers`),
   per answer the originals it is about (`add_grounding`, for the T2V grounding loss),
   and option-completion text records (`option_completion_records`), after optional
   text-only stages: the lookup drill (`lookup_drill_records`), the stated option-letter
   hop and the unstated copy (`letter_hop_records`);
5. writes `timings.json` (wall seconds of every step: the budget the recipe is held to)
   and, with `export.out`, the final model in `export.dtype` scored on a world's
   held-out split (`export_model`, as the ablation runner bundles a variant).

Every step is resumable: a finished step is skipped, an interrupted training stage
resumes exactly from its last checkpoint. A changed YAML refuses to continue an output
folder trained with another one (start a new `out_dir`), except for the length of a
text-hop stage (a constant rate: raised before the stage ends, it trains on).
`timings.json` adds up every step's wall time, written as it runs: a stage cut off by an
interruption keeps what it had spent, and the part after its last checkpoint, trained
again on resume, is counted twice.

Why a recipe of its own, and not the ablation runner's: the runner shares one text
base and one encoder among ten variants, a curriculum of tens of thousands of steps;
this is the shortest path found to a model that answers (docs/synthetic.md, "from
scratch in one run").
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crosslmm.train.config import load_yaml_config


@dataclass
class WorldSpec:
    """A world as `crosslmm synth DIR --n N --seed S --questions-per-video Q --mc-reply R` writes it."""

    n: int = 13500
    seed: int = 16
    questions_per_video: int = 6
    mc_reply: str = "option-letter"
    frames: int = 8
    size: int = 64
    dir: str | None = None  # where it is (or is written); None: {out_dir}/world-s{seed}


@dataclass
class VisionSpec:
    scenes: int = 3000  # the first world's first training scenes, whose frames it learns from
    heldout: int = 100  # the next ones, which score its per-patch accuracy in pretraining.json
    steps: int = 3000
    batch_frames: int = 64
    learning_rate: float = 2.0e-3


@dataclass
class StageSpec:
    """One training stage. `questions`: the world's video questions (scaffold, grounding,
    option completion). `lookup_drill`: the stated hop's lookup without a question, four
    per record on random options (`lookup_drill_records`), text only and unprobed: before
    the stated hop, 2,000 of its steps made the hop cross in 1,500 where a model from
    scratch sat at chance for 6,000 or more. `text_hop`: the stated option-letter hop as text only
    (`letter_hop_records`, in the world's reply style; the world gives only its seed),
    which a from-scratch language model crosses after a plateau: cheaper in text than
    inside video records (docs/synthetic.md, "from scratch in one run"). With `stated:
    false`, the unstated copy instead (the reply's option text given, its letter learned):
    the step from a reply's own words to their letter that a video question needs, which
    a model that has crossed the stated hop learns in a few thousand text steps. It has
    no probe (its held-out records are written for `tools/letter_copy_accuracy.py`):
    a generated reply cannot know the option text, so only the teacher-forced copy says
    whether it is learned."""

    kind: str = "questions"  # questions | text_hop | lookup_drill
    world: WorldSpec = field(default_factory=WorldSpec)
    recipe: str | None = None  # this stage's recipe (relative to the YAML's folder); None: the top-level one
    stated_fraction: float = 0.5  # multiple-choice questions with the answer stated first (the scaffold)
    completion_records: int = 6600  # scenes of option-completion text records (about 45 % become records)
    ground_counts: bool = False  # count questions get grounding targets too (world.grounding_targets' `counts`)
    hop_scenes: int = 0  # text_hop: training scenes (one record each)
    hop_probe: int = 150  # text_hop: held-out scenes after them, probed while it trains
    drill_records: int = 0  # lookup_drill: training records (`lookup_drill_records`, four lookups each)
    stated: bool = True  # text_hop: the answer stated before the options; false: the unstated copy
    # The unstated copy: this fraction of its records state the answer (the stated hop's
    # record of the same scene), so the reply's first word is learned somewhere. Without
    # any, the copy stage learns only " (B)" and its model predicts " (" at every reply
    # start with near certainty, which the video stage must first unlearn.
    copy_stated_fraction: float = 0.0
    stop_above: float | None = None  # end the stage once its probe reaches this
    overrides: list[str] = field(default_factory=list)  # key=value for `crosslmm train` (e.g. epochs=4)
    # Data-parallel processes (torchrun, DDP), the recipe's threads shared out among them
    # and the global batch kept: on 2 cores a video stage steps 1.24x faster as 2 x 1
    # thread than as 1 x 2 (docs/performance.md); text stages do not gain. How fast, not
    # what (the sum of the same gradients, in another order), so not part of the settings.
    processes: int = 1


@dataclass
class ProbeSpec:
    every: int = 500  # optimizer steps between held-out probes (probe.jsonl); 0: none
    questions: int = 120  # the stage world's first held-out questions


@dataclass
class ExportSpec:
    out: str | None = None  # e.g. crosslmm/assets/default_model; None: no export
    dtype: str = "bfloat16"
    data: str | None = None  # the world whose held-out split scores the export; None: the last stage's


@dataclass
class DefaultRecipeConfig:
    out_dir: str = "runs/default"
    preset: str = "small"
    vocab_size: int = 512
    seed: int = 0
    threads: int = 2
    model: dict[str, Any] = field(default_factory=dict)  # CrossLMMConfig options of the model built
    vision: VisionSpec = field(default_factory=VisionSpec)
    recipe: str = "llm.yaml"  # every stage's training recipe (relative to the YAML's folder)
    stages: list[StageSpec] = field(default_factory=list)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    export: ExportSpec = field(default_factory=ExportSpec)


def load_default_recipe(path: str | Path, overrides: list[str] | None = None) -> DefaultRecipeConfig:
    """The YAML merged over the schema and `key=value` overrides; the recipe path is
    resolved against the YAML's folder."""
    path = Path(path)
    config: DefaultRecipeConfig = load_yaml_config(DefaultRecipeConfig, path, overrides, "recipe")
    config.recipe = str((path.parent / config.recipe).resolve())
    if not config.stages:
        raise ValueError(f"{path} defines no stages")
    for stage in config.stages:
        if stage.kind not in ("questions", "text_hop", "lookup_drill"):
            raise ValueError(f"stage kind {stage.kind!r}: choose questions, text_hop or lookup_drill")
        if stage.kind == "lookup_drill" and (not stage.drill_records or stage.stop_above is not None):
            raise ValueError("a lookup_drill stage needs drill_records, and has no probe to stop on (stop_above)")
        if stage.kind == "text_hop" and not stage.hop_scenes:
            raise ValueError("a text_hop stage needs hop_scenes")
        if not stage.stated and (stage.kind != "text_hop" or stage.stop_above is not None):
            raise ValueError("stated: false is for a text_hop stage, without stop_above (the unstated copy has no probe)")
        if stage.copy_stated_fraction and (stage.stated or not 0 < stage.copy_stated_fraction < 1):
            raise ValueError("copy_stated_fraction is for a text_hop stage with stated: false, in (0, 1)")
        if stage.processes < 1 or config.threads % stage.processes:
            raise ValueError(f"processes: {stage.processes} must be at least 1 and share "
                             f"threads: {config.threads} evenly")
        stage.recipe = str((path.parent / stage.recipe).resolve()) if stage.recipe else config.recipe
    return config


def world_dir(config: DefaultRecipeConfig, spec: WorldSpec) -> Path:
    return Path(spec.dir) if spec.dir else Path(config.out_dir) / f"world-s{spec.seed}"


def prepare_world(folder: Path, spec: WorldSpec) -> Path:
    """The world in `folder`, written unless the folder already holds one of `spec`
    (a folder holding another world is refused, never overwritten)."""
    from crosslmm.synth.world import write_dataset

    wanted = {k: v for k, v in asdict(spec).items() if k != "dir"}
    meta = folder / "meta.json"
    if meta.exists():
        params = json.loads(meta.read_text())["params"]
        differs = {k: (params.get(k), v) for k, v in wanted.items() if params.get(k) != v}
        if differs:
            raise ValueError(f"{folder} holds another world (meta.json vs the recipe: {differs})")
        if (folder / "train_multiturn.json").exists():
            return folder
    write_dataset(folder, n=spec.n, seed=spec.seed, frames=spec.frames, size=spec.size,
                  questions_per_video=spec.questions_per_video, mc_reply=spec.mc_reply)
    return folder


def prepare_vision(config: DefaultRecipeConfig, world: Path, folder: Path) -> Path:
    """The vision encoder, pretrained from random weights on `world`'s training scenes."""
    from crosslmm.presets import preset_config
    from crosslmm.synth.evaluate import training_scenes
    from crosslmm.synth.vision_pretrain import pretrain_vision

    spec = config.vision
    if (folder / "pretraining.json").exists():
        return folder
    train_scenes, held_scenes = training_scenes(world, spec.scenes, spec.heldout)
    report = pretrain_vision(preset_config(config.preset), train_scenes, held_scenes, folder,
                             steps=spec.steps, batch_frames=spec.batch_frames, learning_rate=spec.learning_rate,
                             seed=config.seed, checkpoints=folder / "checkpoints")
    report["world"] = str(world)
    (folder / "pretraining.json").write_text(json.dumps(report, indent=2))  # last: marks the step done
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return folder


def stage_records(world: Path, spec: StageSpec, out: Path) -> Path:
    """The stage's training records (written whole or not at all); media paths stay
    relative to the world."""
    from crosslmm.synth.world import (
        add_grounding,
        letter_hop_records,
        lookup_drill_records,
        option_completion_records,
        state_mc_answers,
    )

    target = out / "train.json"
    if target.exists():
        return target
    w = spec.world
    if spec.kind == "lookup_drill":
        records = lookup_drill_records(w.seed, spec.drill_records, mc_reply=w.mc_reply)
    elif spec.kind == "text_hop":
        records = letter_hop_records(w.seed, spec.hop_scenes, w.frames, w.size, mc_reply=w.mc_reply,
                                     stated=spec.stated, stated_fraction=spec.copy_stated_fraction)
        heldout = letter_hop_records(w.seed, spec.hop_probe, w.frames, w.size, first=spec.hop_scenes,
                                     mc_reply=w.mc_reply, stated=spec.stated)
        _write(out / "heldout.json", heldout)
    else:
        videos = json.loads((world / "train_multiturn.json").read_text())
        records = add_grounding(state_mc_answers(videos, fraction=spec.stated_fraction), seed=w.seed,
                                frames=w.frames, size=w.size, counts=spec.ground_counts)
        if spec.completion_records:
            records += option_completion_records(w.seed, spec.completion_records, w.frames, w.size)
    return _write(target, records)


def _write(target: Path, records: list[dict]) -> Path:
    """Written whole or not at all: a cut-off file is never read."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(records) + "\n")
    partial.replace(target)
    return target


def _with_new_fields(stored: dict) -> dict:
    """Stored settings with the stage fields added since they were written, at their
    defaults: a new field's default is the behaviour the older run trained with, so a
    run resumed under newer code is not refused for it."""
    defaults = {k: v for k, v in asdict(StageSpec()).items() if k != "processes"}  # not a setting
    return {**stored, "stages": [{**{k: v for k, v in defaults.items() if k not in stage}, **stage}
                                 for stage in stored.get("stages", [])]}


def _timed(timings: dict, name: str, path: Path, work, every: float = 30.0):
    """Run `work()` and add its wall seconds to `timings[name]` (summed over resumes).

    The running total is written every `every` seconds while `work` runs, so a stage that
    an interruption cuts off keeps the time it had spent: its checkpointed steps are not
    trained again, and their time would otherwise be missing from the recipe's total. What
    it counts twice is the part after its last checkpoint (one `save_every` at most)."""
    from crosslmm.train.state import write_atomically

    base, started, finished = timings.get(name, 0.0), time.perf_counter(), threading.Event()

    def write() -> None:
        timings[name] = round(base + time.perf_counter() - started, 1)
        write_atomically(path, json.dumps(timings, indent=2))  # a kill while writing must not lose the file

    def tick() -> None:
        while not finished.wait(every):
            write()

    ticker = threading.Thread(target=tick, name=f"timings: {name}", daemon=True)
    ticker.start()
    try:
        return work()
    finally:
        finished.set()
        ticker.join()
        write()


def train_in_processes(recipe: str, overrides: list[str], processes: int, threads: int) -> Path:
    """`crosslmm train` under torchrun with `processes` ranks of `threads // processes`
    threads each, the per-rank batch divided so that the global batch is the recipe's;
    returns the final model folder. The feature cache is filled here first, with every
    thread (under torchrun the main rank would fill it alone, on its share of them)."""
    import os
    import subprocess
    import sys

    from crosslmm.train.config import load_train_config
    from crosslmm.train.trainer import prepare_feature_cache

    config = load_train_config(recipe, overrides)
    if config.per_device_batch_size % processes:
        raise ValueError(f"per_device_batch_size {config.per_device_batch_size} cannot be shared "
                         f"by {processes} processes")
    prepare_feature_cache(config)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "crosslmm", "train", recipe, *overrides,
               f"per_device_batch_size={config.per_device_batch_size // processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads // processes)}
    if subprocess.run(command, env=env).returncode != 0:
        raise RuntimeError(f"training under torchrun failed (its output is above): {' '.join(command)}")
    return Path(config.output_dir) / "model"


def run_default_recipe(config: DefaultRecipeConfig, command: str | None = None) -> Path:
    """Everything from worlds to the trained (and optionally exported) model; returns
    the final model folder. `command` (the command line that ran it) goes into the
    exported model's card."""
    import torch

    from crosslmm.checkpoints.scratch import corpus_from_records, init_from_scratch
    from crosslmm.synth.ablations import export_model
    from crosslmm.train.config import load_train_config
    from crosslmm.train.trainer import train

    torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = asdict(config)
    settings.pop("threads")  # how fast, not what: a resumed run may use another count
    for stage in settings["stages"]:
        stage.pop("processes")
        if stage["kind"] == "text_hop":  # a constant rate: its length may be raised and the stage trains on
            stage["overrides"] = [o for o in stage["overrides"] if not o.startswith("max_steps=")]
            stage["stop_above"] = None
    settings["export"] = None  # exporting again is allowed
    settings["recipe_texts"] = [Path(stage.recipe).read_text() for stage in config.stages]
    settings_file = out / "settings.json"
    if settings_file.exists() and _with_new_fields(json.loads(settings_file.read_text())) != settings:
        raise ValueError(f"{out} was trained with other settings ({settings_file}); use another out_dir")
    settings_file.write_text(json.dumps(settings, indent=2))
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}

    worlds = [_timed(timings, f"world {i}", timings_file,
                     lambda s=s: prepare_world(world_dir(config, s.world), s.world))
              for i, s in enumerate(config.stages)]
    vision = _timed(timings, "vision", timings_file, lambda: prepare_vision(config, worlds[0], out / "vision"))
    model = out / "init"
    if not (out / "stage0").exists():  # seeded, so rebuilt identical until training has started from it
        corpus = corpus_from_records([worlds[0] / "train.json", worlds[0] / "train_captions.json"])
        _timed(timings, "init", timings_file,
               lambda: init_from_scratch(config.preset, model, corpus, vocab_size=config.vocab_size,
                                         seed=config.seed, vision=vision, **config.model))
    for i, (stage, world) in enumerate(zip(config.stages, worlds)):
        stage_dir = out / f"stage{i}"
        done = stage_dir / "train" / "model"
        if (done / "model.safetensors").exists():
            model = done
            continue
        records = _timed(timings, f"records {i}", timings_file,
                         lambda s=stage, w=world, d=stage_dir: stage_records(w, s, d))
        if stage.kind == "text_hop":
            probe = [f"probe.every={config.probe.every}", "probe.kind=text", f"probe.data={stage_dir / 'heldout.json'}",
                     f"probe.limit={stage.hop_probe}"]
        else:
            probe = [f"probe.every={config.probe.every}", "probe.kind=questions", f"probe.data={world / 'test.json'}",
                     f"probe.limit={config.probe.questions}"]
        probe = probe + [f"probe.stop_above={stage.stop_above}"] * (stage.stop_above is not None)
        probe = probe if config.probe.every and stage.stated and stage.kind != "lookup_drill" else []
        resume = ["resume=latest"] if (stage_dir / "train" / "checkpoints" / "latest").exists() else []
        overrides = [
            f"model={model}", f"output_dir={stage_dir / 'train'}", f"data.train={records}",
            *([] if stage.kind in ("text_hop", "lookup_drill") else  # no media
              [f"data.media_root={world}", f"feature_cache={stage_dir.parent / 'feature_cache' / world.name}"]),
            f"seed={config.seed}", *probe, *stage.overrides, *resume,
        ]
        if stage.processes > 1:
            work = lambda s=stage, o=overrides: train_in_processes(s.recipe, o, s.processes, config.threads)
        else:
            work = lambda c=load_train_config(stage.recipe, overrides): train(c)
        model = Path(_timed(timings, f"stage {i}", timings_file, work))
    if config.export.out:
        data = Path(config.export.data) if config.export.data else worlds[-1]
        card = {"variant": "default-recipe", "options": config.model, "seed": config.seed,
                "training": [command] if command else [], "recipe": settings, "timings": timings}
        _timed(timings, "export", timings_file,
               lambda: export_model(model, Path(config.export.out), config.export.dtype, data, card))
    return model
