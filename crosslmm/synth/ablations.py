"""`crosslmm synth-ablations`: the paper's ablations (Table 2a, 2b, V2V scope) in miniature.

One YAML file (`configs/synth/ablations.yaml`) says everything: the synthetic dataset,
the vision-encoder pretraining, the model preset, the training recipe and the variants,
each a set of CrossLMMConfig options. The runner

1. writes the dataset (`crosslmm synth`) and pretrains the shared vision encoder
   (`crosslmm.synth.vision_pretrain`), once, into the output folder;
2. encodes every training video once into a feature cache shared by all variants (the
   vision tower is frozen and identical for all of them; the cache's fingerprint
   guarantees it);
3. trains every variant from the same initial seed on the same data with the same
   recipe (`crosslmm train`'s own code path), `jobs` at a time, each on its share of
   the CPU cores, and scores it on the held-out test split (`crosslmm synth-eval`'s
   code path): question accuracy of the final model, and how much of held-out captions
   the stage-1 model reads from the video (`caption_grounding`), which moves long before
   question accuracy leaves chance;
4. writes `results.json`, a Markdown table (`results.md`) and a plot (`ablations.png`),
   and copies the table and plot to `docs_dir`.

A variant whose `result.json` exists with the same settings is not run again, and an
interrupted one resumes each stage from its last checkpoint, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from omegaconf import OmegaConf

from crosslmm.synth.world import FAMILIES
from crosslmm.train.config import load_yaml_config

if TYPE_CHECKING:
    from crosslmm.model.configuration import CrossLMMConfig


@dataclass
class SynthDataSpec:
    n: int = 3000
    seed: int = 0
    questions_per_video: int = 6
    frames: int = 8
    size: int = 64


@dataclass
class VisionSpec:
    scenes: int = 1000  # training videos whose rendered frames the encoder learns from
    steps: int = 800
    batch_frames: int = 64
    learning_rate: float = 2e-3


@dataclass
class TextBaseSpec:
    """Stage 0: one language model pretrained on text, the base every variant starts
    from, as every paper variant starts from the same pretrained Qwen2.5. Up to four
    text-only steps, in order: optionally the option-letter hop on a few families first (a
    curriculum: few answer words cross its plateau sooner), the option-letter hop over
    every family (`world.letter_hop_records`, the answer given before its options),
    optionally a learning-rate decay on the same records, then the world as text
    (captions as context, then questions; `world.text_world_records`)."""

    letter_hop_first_families: list[str] = field(default_factory=list)  # the curriculum's families
    letter_hop_first_scenes: int = 0  # scenes for that first step; 0: no curriculum
    letter_hop_first_overrides: list[str] = field(default_factory=list)
    letter_hop_first_stop_above: float | None = None  # its own early stop (the later steps use stop_above)
    letter_hop_scenes: int = 0  # letter-hop records to train on; 0: no letter-hop step
    letter_hop_overrides: list[str] = field(default_factory=list)  # key=value for that step (e.g. max_steps)
    # A learning-rate decay after the hop (e.g. [max_steps=4000, optim.schedule=cosine]):
    # from the hop's model, on its records, a fresh warmup and cosine decay to 0, the decay
    # branch of warmup-stable-decay (the constant-rate hop plateaus at 75-79 %; its decay
    # reaches ~90 %, docs/synthetic.md). It runs to its end (no early stop: stopping a
    # decay halfway leaves the rate high), and a changed max_steps is another decay.
    # Empty: no decay step.
    letter_hop_decay_overrides: list[str] = field(default_factory=list)
    scenes: int = 0  # text-world conversations to train on; 0: no text-world step
    # Letter-hop records mixed into the text-world step (rehearsal): without them 500
    # text-world steps took the hop from 78 % to 18 % (docs/synthetic.md, "forgetting").
    letter_hop_mix_scenes: int = 0
    caption_as_answer: bool = False  # the caption as the assistant's turn (trains caption writing too)
    recipe: str = "text.yaml"  # relative to the YAML's folder; both steps
    train_overrides: list[str] = field(default_factory=list)  # key=value for the text-world step
    probe_scenes: int = 150  # held-out scenes (never trained on) probed while each step trains
    probe_every: int = 250  # optimizer steps between probes; 0: none
    # A step ends early once its probe reaches this (None: runs to max_steps). Like
    # max_steps it only says how long: changing it continues a step, never restarts it.
    stop_above: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.letter_hop_first_scenes or self.letter_hop_scenes or self.scenes)


@dataclass
class VariantProbeSpec:
    """Learning curves of every variant while it trains (`probe.jsonl` beside each
    stage): caption grounding in stage 1, held-out answers in stage 2. A probe only
    reads, so it is not part of a variant's settings."""

    every: int = 0  # optimizer steps between probes; 0: none
    caption_videos: int = 20  # held-out videos whose captions are scored in stage 1
    questions: int = 120  # the first held-out questions answered in stage 2


@dataclass
class DefaultModelSpec:
    variant: str | None = None  # the variant exported as the bundled default model
    out: str = "crosslmm/assets/default_model"
    dtype: str = "bfloat16"  # storage only; CPU inference upcasts to float32


@dataclass
class AblationConfig:
    out_dir: str = "runs/ablations"
    data: SynthDataSpec = field(default_factory=SynthDataSpec)
    vision: VisionSpec = field(default_factory=VisionSpec)
    preset: str = "small"
    vocab_size: int = 512
    seed: int = 0  # initial weights of every variant
    text_base: TextBaseSpec = field(default_factory=TextBaseSpec)
    caption_recipe: str | None = "captions.yaml"  # stage 1 on dense captions (relative to the YAML's folder); null: none
    caption_t2v: bool = False  # T2V on in the caption stage too (the paper: off, Table 2c)
    # Stage 1 trains the projector and V2V only, the LLM frozen as in the paper's stage 1:
    # for a text base that already knows the option-letter hop, which caption training of
    # the LLM would overwrite (docs/synthetic.md, "forgetting"). False: the LLM trains too.
    caption_freeze_llm: bool = False
    # Letter-hop records (`world.letter_hop_records`, text only) mixed into each pixel
    # stage: this many in stage 1, as many others in stage 2 (rehearsal). A hop learned in
    # the text base is overwritten by a few hundred steps of other training unless it is
    # kept in use (docs/synthetic.md, "forgetting"). 0: the stages train on their own data.
    letter_hop_rehearsal: int = 0
    probe: VariantProbeSpec = field(default_factory=VariantProbeSpec)
    recipe: str = "llm.yaml"  # stage 2 on the questions (relative to the YAML's folder)
    train_overrides: list[str] = field(default_factory=list)  # key=value for every variant
    eval_questions: int = 0  # held-out questions scored per variant; 0: all
    grounding_videos: int = 60  # held-out videos whose captions score the stage-1 model's reading; 0: none
    jobs: int = 2  # variants trained at once; the CPU cores are shared between them
    docs_dir: str | None = None  # where results.md and ablations.png are copied
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> CrossLMMConfig options
    default_model: DefaultModelSpec = field(default_factory=DefaultModelSpec)


def load_ablation_config(path: str | Path, overrides: list[str] | None = None) -> AblationConfig:
    """The ablation YAML merged over the schema and `key=value` overrides; relative
    paths in it are resolved against the YAML's folder."""
    path = Path(path)
    config: AblationConfig = load_yaml_config(AblationConfig, path, overrides, "ablation")
    config.recipe = str((path.parent / config.recipe).resolve())
    config.text_base.recipe = str((path.parent / config.text_base.recipe).resolve())
    if config.caption_recipe:
        config.caption_recipe = str((path.parent / config.caption_recipe).resolve())
    if not config.variants:
        raise ValueError(f"{path} defines no variants")
    if config.default_model.variant is not None and config.default_model.variant not in config.variants:
        raise ValueError(f"default_model.variant {config.default_model.variant!r} is not one of the variants")
    return config


# --------------------------------------------------------------------------- shared steps


def prepare_data(spec: SynthDataSpec, folder: Path) -> Path:
    """The synthetic dataset, written unless `folder` already holds one with `spec`."""
    from crosslmm.synth.world import write_dataset

    meta = folder / "meta.json"
    wanted = {**asdict(spec), "fps": 4}
    if meta.exists():
        params = json.loads(meta.read_text())["params"]
        if all(params.get(k) == v for k, v in wanted.items()) and (folder / "train_multiturn.json").exists():
            return folder
    write_dataset(folder, n=spec.n, seed=spec.seed, frames=spec.frames, size=spec.size,
                  questions_per_video=spec.questions_per_video)
    return folder


def prepare_vision(config: AblationConfig, data: Path, folder: Path) -> Path:
    """The shared pretrained vision encoder, trained on the training split's scenes only
    (the held-out scenes of the test split are never seen by any part of any model)."""
    from crosslmm.presets import preset_config
    from crosslmm.synth.vision_pretrain import pretrain_vision
    from crosslmm.synth.world import scene_for, split_indices

    spec = config.vision
    if (folder / "pretraining.json").exists() and json.loads((folder / "pretraining.json").read_text()).get("spec") == asdict(spec):
        return folder
    d = config.data
    split = split_indices(d.n, d.seed, {"train": 0.9, "test": 0.1})
    train_ids = split["train"]
    scenes = [scene_for(d.seed, i, d.frames, d.size) for i in train_ids[: spec.scenes]]
    held = [scene_for(d.seed, i, d.frames, d.size) for i in train_ids[spec.scenes: spec.scenes + 100]]
    # Features encoded by an earlier encoder are stale: the cache is derived from this folder;
    # so are the checkpoints of an encoder pretrained under another spec.
    shutil.rmtree(Path(config.out_dir) / "feature_cache", ignore_errors=True)
    if (folder / "pretraining.json").exists():
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    report = pretrain_vision(preset_config(config.preset), scenes, held, folder, steps=spec.steps,
                             batch_frames=spec.batch_frames, learning_rate=spec.learning_rate, seed=config.seed,
                             checkpoints=folder / "checkpoints")
    report["spec"] = asdict(spec)
    (folder / "pretraining.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return folder


class _TextStep(NamedTuple):
    """One text-only step of stage 0: its folder name, how many scenes of records it
    trains on (0: skipped), how they are made, its recipe overrides and early stop."""

    name: str
    scenes: int
    make: Callable[[int, int], list[dict]]  # (count, first scene) -> records
    overrides: list[str]
    stop_above: float | None
    settings: dict[str, Any] = {}  # what else decides its model, beside the common keys
    length_is_schedule: bool = False  # max_steps is part of its settings (a decay)
    records_of: str | None = None  # trains on another step's records and probe (None: its own)
    mixed_hop_scenes: int = 0  # letter-hop records mixed into its own (rehearsal)


def prepare_text_base(config: AblationConfig, data: Path, folder: Path, threads: int) -> Path | None:
    """Stage 0, once for every variant: a pooled-only model of the preset whose LLM learns
    from text alone. Returns its model folder (None without a text base). It needs no
    pixels, so it runs beside the vision pretraining. An interrupted step resumes from
    its last checkpoint; finished steps are reused while the spec is unchanged."""
    import torch

    from crosslmm.checkpoints.scratch import init_from_scratch
    from crosslmm.synth.world import letter_hop_records, text_world_records
    from crosslmm.train.config import load_train_config
    from crosslmm.train.trainer import train

    spec = config.text_base
    if not spec.enabled:
        return None
    wanted = {"recipe": Path(spec.recipe).read_text(), "seed": config.seed, "data": asdict(config.data),
              "preset": config.preset, "vocab_size": config.vocab_size}
    settings_file = folder / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != wanted:
        shutil.rmtree(folder)  # another model or recipe: start over
    folder.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(wanted, indent=2))
    torch.set_num_threads(threads)
    d = config.data

    def letter_hop_first(count: int, first: int) -> list[dict]:
        return letter_hop_records(d.seed, count, d.frames, d.size, first=first, families=spec.letter_hop_first_families)

    def letter_hop(count: int, first: int) -> list[dict]:
        return letter_hop_records(d.seed, count, d.frames, d.size, first=first)

    def text_world(count: int, first: int) -> list[dict]:
        return text_world_records(d.seed, count, d.frames, d.size, d.questions_per_video,
                                  caption_as_answer=spec.caption_as_answer, first=first)

    model = folder / "init"
    if not (model / "config.json").exists():
        init_from_scratch(config.preset, model, _corpus(data), vocab_size=config.vocab_size, seed=config.seed,
                          use_v2v=False, use_t2v=False)
    redo = False  # a changed step is trained again, and so is every step after it
    decay_scenes = spec.letter_hop_scenes if spec.letter_hop_decay_overrides else 0
    # The text world records how its captions are written, and any rehearsed hop records.
    world_settings = {"caption_as_answer": spec.caption_as_answer,
                      **({"letter_hop_mix_scenes": spec.letter_hop_mix_scenes} if spec.letter_hop_mix_scenes else {})}
    steps = (
        _TextStep("letter_hop_first", spec.letter_hop_first_scenes, letter_hop_first, spec.letter_hop_first_overrides,
                  spec.letter_hop_first_stop_above, {"families": list(spec.letter_hop_first_families)}),
        _TextStep("letter_hop", spec.letter_hop_scenes, letter_hop, spec.letter_hop_overrides, spec.stop_above),
        # The decay trains on the hop's own records and probes on its held-out scenes; its
        # length is its schedule, so its max_steps is part of its settings.
        _TextStep("letter_hop_decay", decay_scenes, letter_hop, spec.letter_hop_decay_overrides, None,
                  length_is_schedule=True, records_of="letter_hop"),
        _TextStep("text_world", spec.scenes, text_world, spec.train_overrides, spec.stop_above, world_settings,
                  mixed_hop_scenes=spec.letter_hop_mix_scenes),
    )
    for step in steps:
        name, scenes, overrides, stop_above = step.name, step.scenes, step.overrides, step.stop_above
        step_dir, done = folder / name, folder / name / "train" / "model"
        # max_steps is left out: raising it continues the step from its last checkpoint
        # (the recipe's schedule is constant), so a plateau can be trained through later.
        kept = [o for o in overrides if step.length_is_schedule or not o.startswith("max_steps=")]
        step_settings = {"scenes": scenes, "overrides": kept, "probe": [spec.probe_scenes, spec.probe_every],
                         "base": str(model), "caption_as_answer": None, **step.settings}
        step_file = step_dir / "settings.json"
        if redo or (step_file.exists() and json.loads(step_file.read_text()) != step_settings):
            shutil.rmtree(step_dir, ignore_errors=True)
            redo = True
        if not scenes:
            continue
        step_dir.mkdir(exist_ok=True)
        step_file.write_text(json.dumps(step_settings, indent=2))
        data_dir = folder / step.records_of if step.records_of else step_dir
        records, heldout = data_dir / "train.json", data_dir / "heldout.json"
        if not records.exists():
            heldout.write_text(json.dumps(step.make(spec.probe_scenes, scenes)) + "\n")  # the scenes after training's
            mixed = letter_hop(step.mixed_hop_scenes, 0) if step.mixed_hop_scenes else []
            records.write_text(json.dumps(step.make(scenes, 0) + mixed) + "\n")
        latest = step_dir / "train" / "checkpoints" / "latest"
        max_steps = ([int(o.split("=", 1)[1]) for o in overrides if o.startswith("max_steps=")] or [0])[-1]
        length = {"max_steps": max_steps, "stop_above": stop_above}
        finished = step_dir / "finished.json"  # how long the exported model was trained
        if done.exists() and latest.exists() and finished.exists() and _longer(length, json.loads(finished.read_text())):
            shutil.rmtree(done)  # asked to train longer: continue from the last checkpoint
        if all((done / f).exists() for f in ("config.json", "model.safetensors")):
            model = done
            continue
        threshold = "null" if stop_above is None else stop_above
        probe = [f"probe.every={spec.probe_every}", "probe.kind=text", f"probe.data={heldout}",
                 f"probe.limit={spec.probe_scenes}", f"probe.stop_above={threshold}"] if spec.probe_every else []
        model = Path(train(load_train_config(spec.recipe, [
            f"model={model}", f"output_dir={step_dir / 'train'}", f"data.train={records}", f"seed={config.seed}",
            *probe, *overrides, *(["resume=latest"] if latest.exists() else []),
        ])))
        finished.write_text(json.dumps(length))
        redo = True  # this step's model is new: the steps after it start from it again
    return model


def _longer(wanted: dict, trained: dict) -> bool:
    """Whether a step asked for `wanted` (max_steps, stop_above) trains on past `trained`."""
    later_stop = trained["stop_above"] is not None and (wanted["stop_above"] is None
                                                         or wanted["stop_above"] > trained["stop_above"])
    return wanted["max_steps"] > trained["max_steps"] or later_stop


def _train_config(recipe: str, config: AblationConfig, records: Path, model_dir: Path, output_dir: Path, cache: Path,
                  extra: list[str], media_root: Path | None = None):
    from crosslmm.train.config import load_train_config

    root = media_root or records.parent
    return load_train_config(recipe, [
        f"model={model_dir}", f"output_dir={output_dir}", f"data.train={records}", f"data.media_root={root}",
        f"feature_cache={cache}", f"seed={config.seed}", *config.train_overrides, *extra,
    ])


def _stage_records(config: AblationConfig, data: Path, out: Path) -> tuple[Path, Path]:
    """The record files of the caption and question stages: the dataset's own, or with
    `letter_hop_rehearsal` those plus that many letter-hop records each (the first n of
    the hop's scenes in stage 1, the next n in stage 2), written into the variant's folder
    (their media paths stay relative to the dataset)."""
    captions, questions = data / "train_captions.json", data / "train_multiturn.json"
    n = config.letter_hop_rehearsal
    if not n:
        return captions, questions
    from crosslmm.synth.world import letter_hop_records

    d = config.data
    hop = letter_hop_records(d.seed, 2 * n, d.frames, d.size)
    mixed = []
    for source, extra in ((captions, hop[:n]), (questions, hop[n:])):
        target = out / f"{source.stem}+letter_hop.json"
        if not target.exists():  # written whole or not at all: a cut-off file is never read
            partial = target.with_suffix(".partial")
            partial.write_text(json.dumps(json.loads(source.read_text()) + extra) + "\n")
            partial.replace(target)
        mixed.append(target)
    return mixed[0], mixed[1]


def _corpus(data: Path) -> list[str]:
    from crosslmm.checkpoints.scratch import corpus_from_records

    return corpus_from_records([data / "train.json", data / "train_captions.json"])


def _cache_complete(folder: Path, data: Path) -> bool:
    """Whether the cache holds one entry per training video (each record of the
    multi-turn file is one video; a changed encoder removed the cache, see prepare_vision)."""
    index = folder / "index.json"
    if not index.exists():
        return False
    videos = len(json.loads((data / "train_multiturn.json").read_text()))
    return len(json.loads(index.read_text())["items"]) == videos


def _fill_cache(config: AblationConfig, data: Path, vision: Path, folder: Path, threads: int) -> None:
    """Encode every training video into the shared feature cache (one process, before
    the variants start, so they never write it concurrently)."""
    import torch

    from crosslmm.checkpoints.scratch import init_from_scratch
    from crosslmm.train.trainer import train

    torch.set_num_threads(threads)
    init = init_from_scratch(config.preset, folder / "cache-model", _corpus(data), vocab_size=config.vocab_size,
                             seed=config.seed, vision=vision)
    # One optimizer step of a throwaway run fills the cache through the trainer's own path.
    train(_train_config(config.recipe, config, data / "train_multiturn.json", init, folder / "cache-run",
                        folder / "feature_cache", ["max_steps=1"]))
    shutil.rmtree(folder / "cache-run")
    shutil.rmtree(folder / "cache-model")


# --------------------------------------------------------------------------- one variant


def run_variant(config: AblationConfig, name: str, data: Path, vision: Path, threads: int,
                text_base: Path | None = None) -> dict:
    """Initialise, train and score one variant; returns (and saves) its result."""
    import torch

    from crosslmm.checkpoints.scratch import init_from_scratch
    from crosslmm.data.dataset import load_records
    from crosslmm.infer import load
    from crosslmm.model.configuration import CrossLMMConfig
    from crosslmm.synth.evaluate import evaluate
    from crosslmm.train.trainer import train

    torch.set_num_threads(threads)
    out = Path(config.out_dir) / "variants" / name
    options = dict(config.variants[name])
    settings = {"options": options, "seed": config.seed, "recipe": Path(config.recipe).read_text(),
                "caption_recipe": Path(config.caption_recipe).read_text() if config.caption_recipe else None,
                "train_overrides": config.train_overrides, "eval_questions": config.eval_questions,
                "text_base": asdict(config.text_base) if text_base else None, "caption_t2v": config.caption_t2v,
                "data": asdict(config.data), "vision": asdict(config.vision), "preset": config.preset}
    if config.caption_freeze_llm:  # recorded only when set: earlier variants' settings stay valid
        settings["caption_freeze_llm"] = True
    if config.letter_hop_rehearsal:
        settings["letter_hop_rehearsal"] = config.letter_hop_rehearsal
    result_file = out / "result.json"
    if result_file.exists():
        previous = json.loads(result_file.read_text())
        if previous.get("settings") == settings:
            if previous.get("grounding_videos") != _grounding_videos(config):  # scored later than trained
                previous.update(_grounding(config, out, data))
                result_file.write_text(json.dumps(previous, indent=2))
            return previous
    # An interrupted variant with the same settings resumes each stage from its last
    # checkpoint (a finished stage only re-exports); other settings start it over.
    settings_file = out / "settings.json"
    if out.exists() and not (settings_file.exists() and json.loads(settings_file.read_text()) == settings):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=2))

    shutil.rmtree(out / "init", ignore_errors=True)  # seeded, so rebuilt identical (a cut-off write is never read)
    init = init_from_scratch(config.preset, out / "init", _corpus(data), vocab_size=config.vocab_size,
                             seed=config.seed, vision=vision, language=text_base, **options)
    cache = Path(config.out_dir) / "feature_cache"
    captions, questions = _stage_records(config, data, out)
    caption_switches, question_switches = stage_switches(CrossLMMConfig.from_pretrained(init), config.caption_t2v)
    resumed = bool(_resume(out / "stage1") or _resume(out / "train"))  # then train_seconds counts this part only
    started = time.perf_counter()
    model_dir = init
    if config.caption_recipe:  # stage 1: dense captions, T2V off (paper Table 2c) unless caption_t2v
        caption_t2v = caption_switches["use_t2v"]
        extra = [f"model_overrides.{k}={str(v).lower()}" for k, v in caption_switches.items()]
        if caption_t2v or config.caption_freeze_llm:
            parts = ["projector", "v2v"] + ([] if config.caption_freeze_llm else ["llm"]) + (["t2v"] if caption_t2v else [])
            extra.append(f"optim.trainable=[{','.join(parts)}]")
        if config.probe.every:
            extra += [f"probe.every={config.probe.every}", "probe.kind=captions", f"probe.data={data}",
                      f"probe.limit={config.probe.caption_videos}"]
        model_dir = train(_train_config(config.caption_recipe, config, captions, init, out / "stage1", cache,
                                        extra + _resume(out / "stage1"), media_root=data))
    extra = [f"model_overrides.{k}={str(v).lower()}" for k, v in question_switches.items()]
    if config.probe.every:
        extra += [f"probe.every={config.probe.every}", "probe.kind=questions", f"probe.data={data / 'test.json'}",
                  f"probe.limit={config.probe.questions}"]
    final = train(_train_config(config.recipe, config, questions, model_dir, out / "train", cache,
                                extra + _resume(out / "train"), media_root=data))
    train_seconds = time.perf_counter() - started

    model, processor = load(final)
    test = load_records(data / "test.json")
    if config.eval_questions:
        test = test[: config.eval_questions]
    started = time.perf_counter()
    scores = evaluate(model, processor, test, data)
    eval_seconds = time.perf_counter() - started
    (out / "predictions.json").write_text(json.dumps(scores["predictions"], indent=1))

    cfg = model.config
    result = {
        "name": name,
        "settings": settings,
        "tokens_per_frame": cfg.tokens_per_frame,
        "llm_visual_tokens": cfg.tokens_per_frame * config.data.frames + cfg.tokens_after_media,
        "original_tokens_per_frame": cfg.vision_grid_size ** 2,
        "use_v2v": cfg.use_v2v, "use_t2v": cfg.use_t2v,
        "dcal_every_k": cfg.dcal_every_k if cfg.use_dcal else None,
        "dcal_layers": len(cfg.dcal_layer_indices),
        "v2v_layers": len(cfg.v2v_layer_indices),  # the final decoder layer's DCAL has none unless v2v_at_last_layer
        "v2v_scope": cfg.v2v_scope if cfg.use_v2v else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1), "threads": threads,
        "resumed": resumed,
        "accuracy": scores["accuracy"], "count": scores["count"],
        "final_loss": _final_loss(out / "train" / "metrics.jsonl"),
        "model": str(final),
        **_grounding(config, out, data),
    }
    result_file.write_text(json.dumps(result, indent=2))
    return result


def _resume(output_dir: Path) -> list[str]:
    return ["resume=latest"] if (output_dir / "checkpoints" / "latest").exists() else []


def stage_switches(variant: CrossLMMConfig, caption_t2v: bool) -> tuple[dict[str, bool], dict[str, bool]]:
    """The cross-attention switches of the caption stage and of the question stage.

    The caption stage keeps T2V off (paper Table 2c) unless `caption_t2v`. Without T2V, a
    variant whose only DCAL is the final decoder layer (K = 8 of 8 layers) has no V2V
    block either (nothing reads the last layer's V2V), so its caption stage is
    pooled-only; the question stage then adds the closed T2V blocks."""
    t2v = caption_t2v and variant.use_t2v
    v2v = variant.use_v2v and (t2v or bool(variant.v2v_layer_indices))
    return {"use_v2v": v2v, "use_t2v": t2v}, {"use_v2v": variant.use_v2v, "use_t2v": variant.use_t2v}


def _grounding_videos(config: AblationConfig) -> int:
    return config.grounding_videos if config.caption_recipe else 0


def _grounding(config: AblationConfig, out: Path, data: Path) -> dict:
    """Caption grounding of the variant's stage-1 model on the first held-out videos."""
    from crosslmm.infer import load
    from crosslmm.synth.evaluate import caption_grounding, split_scenes

    videos = _grounding_videos(config)
    if not videos:
        return {"grounding_videos": 0, "caption_grounding": None}
    scenes = split_scenes(data, "test", videos)
    if len(scenes) < 2:  # each video is another's control
        return {"grounding_videos": videos, "caption_grounding": None}
    model, processor = load(out / "stage1" / "model")
    return {"grounding_videos": videos, "caption_grounding": caption_grounding(model, processor, scenes, data)["accuracy"]}


def _final_loss(metrics: Path) -> float | None:
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    tail = [m["loss"] for m in lines[-5:]]
    return round(sum(tail) / len(tail), 4) if tail else None


# --------------------------------------------------------------------------- the run


def run_ablations(config: AblationConfig, only: list[str] | None = None) -> dict:
    """Run (or resume) every variant, or those in `only`; returns the summary written to
    `out_dir/results.json`."""
    names = list(config.variants) if not only else only
    unknown = [n for n in names if n not in config.variants]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; the config defines {list(config.variants)}")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
    cores = os.cpu_count() or 1
    jobs = max(1, min(config.jobs, len(names), cores))
    threads = max(1, cores // jobs)

    data = prepare_data(config.data, out / "data")
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no torch/accelerate state shared
    # Stage 0 reads text only: it trains beside the vision pretraining and the cache fill.
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as text_pool:
        pending_base = text_pool.submit(prepare_text_base, config, data, out / "text_base",
                                        max(1, cores // 2)) if config.text_base.enabled else None
        vision = prepare_vision(config, data, out / "vision")
        if not _cache_complete(out / "feature_cache", data):
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                pool.submit(_fill_cache, config, data, vision, out, max(1, cores - 1 if pending_base else cores)).result()
        text_base = pending_base.result() if pending_base else None
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {name: pool.submit(run_variant, config, name, data, vision, threads, text_base) for name in names}
        for name in names:  # re-raises a variant's error here
            futures[name].result()

    if config.default_model.variant in names:
        export_default_model(config, data, futures[config.default_model.variant].result())
    all_results = _collect(out, config)  # every variant finished so far, also from earlier runs
    summary = {"config": OmegaConf.to_container(OmegaConf.structured(config)),
               "vision_pretraining": json.loads((vision / "pretraining.json").read_text()),
               "machine": _machine(), "variants": all_results}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(results_table(summary))
    plot_results(summary, out / "ablations.png")
    if config.docs_dir:
        docs = Path(config.docs_dir)
        docs.mkdir(parents=True, exist_ok=True)
        for name in ("results.md", "ablations.png", "results.json"):
            shutil.copy(out / name, docs / name)
    return summary


def export_default_model(config: AblationConfig, data: Path, result: dict) -> Path:
    """Save a variant's trained model as the bundled default (weights in `dtype`), score
    the saved copy itself on the held-out split, and write its model card."""
    spec = config.default_model
    card = {"variant": result["name"], "options": result["settings"]["options"], "seed": config.seed,
            "parameters": result["parameters"]}
    return export_model(Path(result["model"]), Path(spec.out), spec.dtype, data, card)


def export_model(model_dir: Path, out: Path, dtype: str, data: Path, card: dict) -> Path:
    """Write `model_dir` to `out` in `dtype` (storage only) with its processor, score the
    written copy itself, not the model in memory, on `data`'s held-out split, and write
    `card` with those figures as `training.json`. Also what a hand-trained model is
    bundled with (`tools/export_default_model.py`)."""
    import torch
    from transformers.utils import logging as hf_logging

    from crosslmm.data.dataset import load_records
    from crosslmm.infer import load
    from crosslmm.model.modeling import CrossLMMForCausalLM
    from crosslmm.synth.evaluate import evaluate

    hf_logging.disable_progress_bar()
    if out.exists():
        shutil.rmtree(out)
    model, processor = load(model_dir)
    model.to(getattr(torch, dtype))
    model.config.set_dtype(dtype)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    exported, exported_processor = load(out)
    assert isinstance(exported, CrossLMMForCausalLM)
    test = load_records(data / "test.json")
    scores = evaluate(exported, exported_processor, test, data)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    meta = json.loads((data / "meta.json").read_text()) if (data / "meta.json").exists() else {}
    card = {"parameters": sum(p.numel() for p in exported.parameters()), **card, "dtype": dtype, "bytes": size,
            "held_out_data": {"root": str(data), "world": meta.get("params", {})},
            "held_out_accuracy": scores["accuracy"], "held_out_count": scores["count"]}
    (out / "training.json").write_text(json.dumps(card, indent=2))
    return out


def _collect(out: Path, config: AblationConfig) -> list[dict]:
    collected = []
    for name in config.variants:
        path = out / "variants" / name / "result.json"
        if path.exists():
            collected.append(json.loads(path.read_text()))
    return collected


def _machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


# --------------------------------------------------------------------------- reporting


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _describe(result: dict) -> str:
    if not (result["use_v2v"] or result["use_t2v"]):
        return "none"
    parts = [p for p, on in (("V2V", result["use_v2v"]), ("T2V", result["use_t2v"])) if on]
    scope = f", {result['v2v_scope']}" if result["use_v2v"] else ""
    if result["use_v2v"] and result.get("v2v_layers") == result["dcal_layers"]:
        scope += ", V2V in every DCAL"  # the last decoder layer's too (v2v_at_last_layer)
    return f"{'+'.join(parts)} (K={result['dcal_every_k']}{scope})"


def _grounding_cell(result: dict) -> str:
    scores = result.get("caption_grounding")
    if not scores:
        return "-"
    return f"{_pct(scores.get('video/all'))} / {_pct(scores.get('other/all'))}"


def results_table(summary: dict) -> str:
    """Markdown: one row per variant, accuracy (%) on held-out multiple-choice and short
    answers, per question family (both forms), tokens fed to the LLM, training time."""
    families = list(FAMILIES)
    head = ["variant", "LLM visual tokens / video", "DCAL", "MC", "short", *families,
            "caption words: video / other", "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["variants"]:
        acc = r["accuracy"]
        row = [r["name"], str(r["llm_visual_tokens"]), _describe(r), _pct(acc.get("form/mc")), _pct(acc.get("form/short")),
               *[_pct(acc.get(f"type/{f}")) for f in families], _grounding_cell(r), f"{r['train_seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    counts = summary["variants"][0]["count"] if summary["variants"] else {}
    lines.append("")
    lines.append(f"Held-out questions per variant: {counts.get('all', 0)} ({counts.get('form/mc', 0)} multiple choice, "
                 f"{counts.get('form/short', 0)} short answer); chance on multiple choice is 25 %.")
    videos = {r.get("grounding_videos") for r in summary["variants"]} - {None, 0}
    if videos:
        lines.append(f"Caption words: teacher-forced accuracy of the stage-1 model on the words of {max(videos)} held-out "
                     "videos' captions that cannot be copied from the caption so far (colour, shape, pattern at a "
                     "sprite's first mention, quadrant when it changes, motion), with the right video / with another "
                     "video; the difference is what the model reads from the pixels.")
    lines.append(f"Machine: {summary['machine']}.")
    return "\n".join(lines) + "\n"


def plot_results(summary: dict, path: str | Path) -> None:
    """Three panels: per-family accuracy of every variant (grouped bars), caption words
    read with the right and with another video (stage-1 models), and overall
    multiple-choice / short-answer accuracy against the LLM's visual tokens per video."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = summary["variants"]
    families = list(FAMILIES)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(19, 5), gridspec_kw={"width_ratios": [2.2, 1.2, 1]})
    width = 0.8 / max(len(variants), 1)
    for i, r in enumerate(variants):
        values = [100 * r["accuracy"].get(f"type/{f}", 0.0) for f in families]
        left.bar([x + i * width for x in range(len(families))], values, width, label=r["name"])
    left.set_xticks([x + 0.4 - width / 2 for x in range(len(families))])
    left.set_xticklabels([f.replace("_", "\n") for f in families], fontsize=8)
    left.set_ylabel("held-out accuracy (%), both forms")
    left.set_ylim(0, 100)
    left.legend(fontsize=7, ncol=2)
    left.set_title("Accuracy per question family")

    names = [r["name"] for r in variants]
    for offset, source, label in ((-0.2, "video", "right video"), (0.2, "other", "another video (control)")):
        values = [100 * (r.get("caption_grounding") or {}).get(f"{source}/all", 0.0) for r in variants]
        middle.bar([i + offset for i in range(len(variants))], values, 0.4, label=label)
    middle.set_xticks(range(len(variants)))
    middle.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    middle.set_ylabel("novel caption words right (%), teacher-forced")
    middle.set_ylim(0, 100)
    middle.legend(fontsize=7)
    middle.set_title("What the stage-1 model reads from the video")

    for r in variants:
        x = r["llm_visual_tokens"]
        mc, short = 100 * r["accuracy"].get("form/mc", 0.0), 100 * r["accuracy"].get("form/short", 0.0)
        right.scatter([x], [mc], marker="o")
        right.annotate(r["name"], (x, mc), fontsize=7, xytext=(4, 2), textcoords="offset points")
        right.scatter([x], [short], marker="x", color="grey")
    right.axhline(25, color="grey", linestyle=":", linewidth=1)
    right.set_xscale("log", base=2)
    right.set_xlabel("visual tokens fed to the LLM per video (log)")
    right.set_ylabel("accuracy (%): o multiple choice, x short answer")
    right.set_ylim(0, 100)
    right.set_title("Accuracy vs LLM tokens (dotted: MC chance)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
