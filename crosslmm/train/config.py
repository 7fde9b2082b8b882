"""Training recipes: a typed schema, filled from a YAML file and `key=value` overrides.

OmegaConf merges the schema's defaults, the recipe file and the command line, and
rejects unknown keys and wrong types, so a typo in a recipe fails before any data is
read. The resolved recipe is written next to every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

PARTS = ("vision", "projector", "llm", "v2v", "t2v")


PROBE_KINDS = ("questions", "text", "captions")


@dataclass
class DataConfig:
    train: str = "???"  # a .json/.jsonl record file or a .yaml mixture
    media_root: str | None = None  # default: the record file's folder
    num_frames: int = 8
    fps: float | None = None
    max_frames: int = 32
    max_length: int | None = None  # default: the LLM's context
    num_workers: int | None = None  # decoding processes; None: up to 8 per GPU (cores / local GPUs), 0 on CPU
    uint8_pixels: bool = True  # workers ship resized uint8 frames (4x less to copy); normalised on the device
    group_by_length: bool = True
    max_skipped_fraction: float = 0.5  # stop when more of the records seen so far were unreadable


@dataclass
class OptimConfig:
    trainable: list[str] = field(default_factory=lambda: ["projector", "v2v"])
    learning_rate: float = 1e-3
    learning_rates: dict[str, float] = field(default_factory=dict)  # per part, e.g. {vision: 2e-6}
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # after warmup: cosine (decays to 0 at the last step) | constant
    max_grad_norm: float = 1.0


@dataclass
class ProbeConfig:
    """A small held-out measurement written while training (`probe.jsonl`), so a run that
    stalls is seen within minutes instead of after its last step."""

    every: int = 0  # optimizer steps between probes (and after the last); 0: none
    kind: str = "questions"  # questions | text | captions (crosslmm.synth.evaluate.probe)
    data: str | None = None  # questions/text: a record file; captions: a synthetic dataset folder
    limit: int = 40  # records (questions, text) or videos (captions) per probe
    # End the run once the probe's `all` (captions: `video/all`) reaches this (a plateau
    # crossed: docs/synthetic.md, "the option-letter hop"); the model is exported as after
    # the last step. None: never.
    stop_above: float | None = None


@dataclass
class DistributedConfig:
    """How the model is spread over processes (crosslmm.train.distributed)."""

    strategy: str = "ddp"  # ddp: a full copy per process | fsdp: FSDP2, weights/gradients/AdamW sharded (ZeRO-3)
    reshard_after_forward: bool = True  # fsdp: free gathered weights after each unit's forward (false: ZeRO-2-like)


@dataclass
class TrainConfig:
    model: str = "???"  # a CrossLMM checkpoint directory (crosslmm build / import-llava-ov / a previous stage)
    output_dir: str = "???"
    stage: int = 1
    model_overrides: dict[str, Any] = field(default_factory=dict)  # CrossLMMConfig options, e.g. use_t2v: true
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 1
    max_steps: int = -1  # optimizer steps; -1: as many as the epochs give
    per_device_batch_size: int = 1
    gradient_accumulation: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    feature_cache: str | None = None  # stage 1 with a frozen ViT: precomputed vision features
    seed: int = 0
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: str | None = None  # "latest" or a checkpoint folder
    find_unused_parameters: bool = True  # text-only batches skip the cross-attentions
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # Weight of the T2V grounding loss on records with a `grounding` field (crosslmm.train.grounding);
    # 0: off, the paper's recipe (answer tokens only).
    grounding_weight: float = 0.0
    # Also ground each option line's last token of a grounded multiple-choice question, toward its
    # answer's targets: teaches options to look before the reply marks one (crosslmm.train.grounding).
    grounding_options: bool = False
    # Weight of the read-out loss at grounded answers: T2V's update at the answer's query, read through
    # the final norm and LM head (held fixed), should say the answer's first token
    # (crosslmm.train.grounding, T2VAttentionMass.readout_loss); 0: off. Needs grounding_weight above 0.
    grounding_readout_weight: float = 0.0
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # CPU math flushes subnormal floats (below 1.2e-38) to zero. x86 cores compute on them 10-100
    # times slower, and a softmax that has learned to look at a few of 512 originals makes many:
    # off, a trained synthetic-world video step ran 1.66x slower on two threads (docs/performance.md).
    flush_denormal: bool = True
    export_dtype: str = "bfloat16"  # the final model's weights: bfloat16 (inference) | float32 (a next stage's start)


def load_yaml_config(schema: type, path: Path, overrides: list[str] | None, what: str) -> Any:
    """`schema` (a dataclass) filled from the YAML at `path`, then `key=value` overrides;
    a value that does not fit the schema is a ValueError naming the file. The loader of
    the synthetic world's recipes (`synth-ablations`, `synth-default`), beside the
    training recipe's own."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides or [])))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"bad {what} config {path}: {err}") from err


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    layers = [OmegaConf.structured(TrainConfig)]
    try:
        if path is not None:
            layers.append(OmegaConf.load(path))
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ValueError(f"the training recipe does not set {', '.join(missing)}")
        config: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"bad training recipe {path}: {err}") from err
    unknown = [part for part in config.optim.trainable + list(config.optim.learning_rates) if part not in PARTS]
    if unknown:
        raise ValueError(f"unknown model part(s) {unknown}; parts are {PARTS}")
    # YAML reads a bare `no` as false: accept it for "no mixed precision".
    config.mixed_precision = {"false": "no", "none": "no"}.get(str(config.mixed_precision).lower(), config.mixed_precision)
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {config.mixed_precision!r}")
    if config.optim.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be cosine or constant, got {config.optim.schedule!r}")
    if config.probe.every and (config.probe.kind not in PROBE_KINDS or not config.probe.data):
        raise ValueError(f"probe needs kind in {PROBE_KINDS} and data, got kind={config.probe.kind!r}, data={config.probe.data!r}")
    if config.distributed.strategy not in ("ddp", "fsdp"):
        hint = " (FSDP2's strategy fsdp shards the same states as ZeRO-3)" if config.distributed.strategy == "zero3" else ""
        raise ValueError(f"distributed.strategy must be ddp or fsdp, got {config.distributed.strategy!r}{hint}")
    if config.distributed.strategy == "fsdp" and config.mixed_precision == "fp16":
        raise ValueError("distributed.strategy=fsdp trains in bf16 or fp32: set mixed_precision to bf16 or no")
    if config.export_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"export_dtype must be bfloat16 or float32, got {config.export_dtype!r}")
    if config.grounding_weight < 0:
        raise ValueError(f"grounding_weight must be at least 0, got {config.grounding_weight}")
    if config.grounding_readout_weight < 0 or (config.grounding_readout_weight > 0 and config.grounding_weight == 0):
        raise ValueError("grounding_readout_weight must be at least 0, and needs grounding_weight above 0")
    if config.grounding_options and config.grounding_weight == 0:
        raise ValueError("grounding_options needs grounding_weight above 0")
    if config.grounding_weight > 0 and (config.gradient_checkpointing or config.distributed.strategy == "fsdp"):
        # The loss recomputes T2V's softmax in a hook inside each decoder layer's forward: a
        # checkpointed layer re-runs its forward without the hook, and FSDP frees the layer's
        # gathered weights that this extra branch of the graph still needs for its backward.
        raise ValueError("grounding_weight needs gradient_checkpointing: false and distributed.strategy: ddp "
                         "(the grounding loss is not supported with activation checkpointing or FSDP)")
    if config.stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {config.stage}")
    if config.feature_cache and "vision" in config.optim.trainable:
        raise ValueError("a feature cache needs a frozen vision tower: remove 'vision' from optim.trainable")
    return config


def dump_train_config(config: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
