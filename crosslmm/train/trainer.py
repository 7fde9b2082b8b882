"""The training loop for both stages, on one process or many (DDP through accelerate,
or FSDP2; `crosslmm.train.distributed`).

`train` reads top to bottom, one function per phase:
1. `setup`: load the model (with the recipe's config overrides), its processor and the
   data; freeze what the recipe does not train; shard (FSDP) or replicate (DDP); build
   AdamW groups (per-part learning rates, no weight decay on gates, norms and biases)
   and a warmup + cosine schedule;
2. `resume`: the saved weights, optimizer, schedule, random state and data position;
3. `rank_batches`: a fixed, seeded order of global batches, epoch after epoch; each rank
   takes its slice, split into gradient-accumulation micro-batches;
4. `train_step`: normalise the loss by the number of answer tokens in the whole global
   batch (all ranks, all micro-batches), so N processes x B samples give the same
   update as one process with N*B samples;
5. `checkpoint` atomically every `save_every` steps with everything an exact resume
   needs; `export_model` writes the final model with `save_pretrained`.

The data order is a pure function of (seed, epoch), never of the process layout or of
where a run was interrupted, which is what makes resuming exact and multi-process runs
equal to single-process ones.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from crosslmm import compat
from crosslmm.data.dataset import DataCollator, LengthGroupedSampler, LLaVADataset, load_mixture, load_records
from crosslmm.data.processor import CrossLMMProcessor
from crosslmm.model.configuration import CrossLMMConfig
from crosslmm.model.modeling import CrossLMMForCausalLM, parameter_part
from crosslmm.train.config import TrainConfig, dump_train_config
from crosslmm.train.distributed import ParallelModel, export_model, fully_shard_model
from crosslmm.train.feature_cache import FeatureCache, vision_fingerprint
from crosslmm.train.grounding import T2VAttentionMass, grounded_answer_tokens, grounded_queries, token_texts
from crosslmm.train.state import load_checkpoint, prune_checkpoints, resolve_resume, save_checkpoint

log = logging.getLogger("crosslmm.train")


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of `epoch` already consumed
    global_batch: int = 0  # the layout the position counts in; resuming must keep it
    world_size: int = 1
    stopped_at: float | None = None  # the probe headline that ended the run early (probe.stop_above)


def load_model(config: TrainConfig) -> CrossLMMForCausalLM:
    model_config = CrossLMMConfig.from_pretrained(config.model, local_files_only=True)
    if config.model_overrides:
        checkpoint_config = model_config
        try:
            model_config = CrossLMMConfig(**{**model_config.to_dict(), **config.model_overrides})
        except ValueError as err:  # say where the offending options came from: not the checkpoint
            raise ValueError(f"the recipe's model_overrides {dict(config.model_overrides)} make {config.model} "
                             f"an invalid model: {err}") from err
        for switch in ("use_v2v", "use_t2v"):
            if getattr(checkpoint_config, switch) and not getattr(model_config, switch):
                # Easy to miss: a text-only recipe switching DCALs off drops a trained
                # model's cross-attention weights, and the exported model has none.
                log.warning("model_overrides %s=false: %s's %s blocks are not loaded and the model this "
                            "run writes has none", switch, config.model, switch[4:].upper())
    if config.stage == 2 and not model_config.use_t2v and "use_t2v" not in config.model_overrides:
        log.info("stage 2: switching T2V on (new T2V blocks start closed, adding exactly zero)")
        model_config = CrossLMMConfig(**{**model_config.to_dict(), "use_t2v": True})
    # Always float32 weights: they are the optimizer's masters. A bf16 checkpoint trained
    # as bf16 would lose most AdamW updates at fine-tuning rates (1e-5 is below bf16's
    # resolution for weights near 0.02); `mixed_precision: bf16` still computes in bf16.
    model = CrossLMMForCausalLM.from_pretrained(config.model, config=model_config, local_files_only=True,
                                                dtype=torch.float32)
    stored = getattr(model_config, "dtype", None)
    if str(stored).replace("torch.", "") in ("bfloat16", "float16"):
        log.info("the checkpoint is stored in %s: training float32 master weights (mixed_precision=%s computes)",
                 stored, config.mixed_precision)
    return model


def load_data(config: TrainConfig, processor: CrossLMMProcessor, cache: FeatureCache | None = None,
              uint8_pixels: bool = False) -> LLaVADataset:
    """The training records; with a feature cache, items carry no pixels and their frame
    counts come from the cache, so no video is decoded at all. `uint8_pixels`: items
    carry resized uint8 frames, normalised on the device by `forward_backward`."""
    path = Path(config.data.train)
    if path.suffix in (".yaml", ".yml"):
        if config.data.media_root:
            raise ValueError("data.media_root is for record files; a YAML mixture sets media_root itself")
        pairs = load_mixture(path)
    else:
        media_root = Path(config.data.media_root) if config.data.media_root else path.parent
        pairs = [(record, media_root) for record in load_records(path)]
    if cache is None:
        return LLaVADataset(pairs, processor, uint8_pixels=uint8_pixels)
    return LLaVADataset(pairs, processor, load_pixels=False, frame_counts=cache.frame_counts())


def freeze_untrained(model: torch.nn.Module, config: TrainConfig) -> None:
    """Only the recipe's `optim.trainable` parts get gradients."""
    for name, param in model.named_parameters():
        param.requires_grad_(parameter_part(name) in config.optim.trainable)


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW groups of the trainable parameters by (part, decay)."""
    optim = config.optim
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        part = parameter_part(name)
        if param.requires_grad:
            decay = param.ndim >= 2  # gates, norms and biases are 0-/1-D: no weight decay
            groups.setdefault((part, decay), []).append(param)
    if not groups:
        raise ValueError(f"optim.trainable={optim.trainable} selects no parameters of this model")
    return [
        {"params": params, "lr": optim.learning_rates.get(part, optim.learning_rate),
         "weight_decay": optim.weight_decay if decay else 0.0, "name": f"{part}{'' if decay else '/no_decay'}"}
        for (part, decay), params in sorted(groups.items())
    ]


def global_batches(dataset: LLaVADataset, config: TrainConfig, epoch: int, global_batch: int) -> list[list[int]]:
    """The epoch's global batches: a pure function of (seed, epoch); the last partial batch is dropped."""
    if config.data.group_by_length:
        sampler = LengthGroupedSampler(dataset.lengths, global_batch, seed=config.seed)
        sampler.set_epoch(epoch)
        order = list(sampler)
    else:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(dataset), generator=generator).tolist()
    return [order[i:i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]


def micro_batches(batch: list[int], rank: int, world: int, per_device: int, accumulation: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: micro-step j of rank r takes slice (j*world + r)."""
    return [batch[(j * world + rank) * per_device:(j * world + rank + 1) * per_device] for j in range(accumulation)]


def answer_tokens(batch: dict | None) -> int:
    """Tokens the loss is taken on: labelled positions that have a previous token."""
    return 0 if batch is None else int((batch["labels"][:, 1:] != -100).sum())


@dataclass
class Run:
    """Everything a training run is made of, built once by `setup`."""

    config: TrainConfig
    accelerator: Accelerator
    parallel: ParallelModel
    processor: CrossLMMProcessor
    dataset: LLaVADataset
    collate: "CollateIndices"
    cache: FeatureCache | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable: dict[str, torch.Tensor]  # name -> parameter (DTensor shards under FSDP)
    global_batch: int
    total_steps: int
    recipe: str  # the resolved YAML, written beside every checkpoint

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """Each token id's text: where the grounding loss finds option lines (`grounding_options`)."""
        return token_texts(self.processor.tokenizer)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


def train(config: TrainConfig, stop_after: int | None = None) -> Path:
    """Run a recipe; returns the folder of the final model. `stop_after` ends the run
    early (after a checkpoint) without changing the schedule, e.g. for time-limited jobs."""
    run = setup(config)
    progress = resume(run)
    output_dir = Path(config.output_dir)
    if run.accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(run.recipe)
        truncate_logs(output_dir, progress.step)
    run.accelerator.init_trackers("tb")

    run.parallel.module.train()
    bar = tqdm(total=run.total_steps, initial=progress.step, disable=not run.accelerator.is_local_main_process,
               desc="train")
    meter = Meter(start_step=progress.step)
    # Resumed after an early stop that still holds (stop_above not raised): nothing to train.
    stopped_by_probe = (progress.stopped_at is not None and config.probe.stop_above is not None
                        and progress.stopped_at >= config.probe.stop_above)
    for epoch, batch_in_epoch, loaded in rank_batches(run, progress):
        if progress.step >= run.total_steps or stopped_by_probe:  # resumed with nothing left to train
            break
        progress.stopped_at = None
        loss = train_step(run, loaded, meter)
        progress.step, progress.epoch, progress.batch_in_epoch = progress.step + 1, epoch, batch_in_epoch
        bar.update(1)
        finishing = progress.step == run.total_steps or (
            stop_after is not None and progress.step - meter.start_step >= stop_after)
        if progress.step % max(config.log_every, 1) == 0 or progress.step == run.total_steps:
            log_metrics(run, progress.step, loss, meter)
            bar.set_postfix(loss=f"{loss:.4f}")
        if config.probe.every and (progress.step % config.probe.every == 0 or progress.step == run.total_steps):
            probed = run_probe(run, progress.step)
            reached = config.probe.stop_above is not None and probed >= config.probe.stop_above
            if reached and progress.step < run.total_steps:
                log.info("probe reached %.3f >= stop_above %.3f at step %d: stopping", probed,
                         config.probe.stop_above, progress.step)
                finishing = stopped_by_probe = True
                progress.stopped_at = probed
        if (config.save_every and progress.step % config.save_every == 0) or finishing:
            checkpoint(run, progress)
        if finishing:
            break
    bar.close()
    if not run.parallel.sharded:  # FSDP ranks hold different shards by design
        check_ranks_in_sync(run.trainable, run.accelerator, output_dir)

    final = output_dir / "model"
    if progress.step == run.total_steps or stopped_by_probe:
        export_model(run.parallel, run.processor, final, config.export_dtype)
    run.accelerator.end_training()  # also tears down the process group: last
    return final


def load_model_and_processor(config: TrainConfig) -> tuple[CrossLMMForCausalLM, CrossLMMProcessor]:
    model = load_model(config)
    processor = CrossLMMProcessor.from_pretrained(
        config.model, config=model.config, num_frames=config.data.num_frames, fps=config.data.fps,
        max_frames=config.data.max_frames, max_length=config.data.max_length,
    )
    return model, processor


def prepare_feature_cache(config: TrainConfig) -> None:
    """Fill `config.feature_cache` in this one process, before a multi-process run starts:
    under torchrun the main rank alone encodes while the others wait, with only its share
    of the cores (`crosslmm synth-default`'s `processes`)."""
    if not config.feature_cache:
        return
    model, processor = load_model_and_processor(config)
    fill_feature_cache(FeatureCache(config.feature_cache), model, config, processor,
                       Accelerator(cpu=not torch.cuda.is_available()))


def setup(config: TrainConfig) -> Run:
    """Model, processor, data, sharding, optimizer and schedule, in the order they depend
    on each other: parameters are frozen before sharding and the optimizer is built on
    the sharded parameters (FSDP replaces them by DTensors)."""
    strategy = config.distributed.strategy
    if strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        log.info("distributed.strategy=fsdp with one process: nothing to shard, training unsharded")
        strategy = "ddp"
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # torchrun on CPU-only machines: DDP/FSDP over gloo
        # FSDP's MixedPrecisionPolicy does the casting; DDP uses accelerate's autocast.
        mixed_precision=config.mixed_precision if strategy == "ddp" else "no",
        log_with="tensorboard",
        project_dir=str(config.output_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)],
    )
    set_seed(config.seed)
    torch.set_flush_denormal(config.flush_denormal)  # CPU only; a no-op on GPU kernels
    world = accelerator.num_processes

    model, processor = load_model_and_processor(config)
    cache = FeatureCache(config.feature_cache) if config.feature_cache else None
    if cache is not None:
        fill_feature_cache(cache, model, config, processor, accelerator)
    dataset = load_data(config, processor, cache, uint8_pixels=config.data.uint8_pixels)

    freeze_untrained(model, config)
    if config.gradient_checkpointing:
        compat.enable_activation_checkpointing(model, use_reentrant=False)
        model.vision_tower.checkpoint_chunks = "vision" in config.optim.trainable
    if strategy == "fsdp":
        model.to(accelerator.device)
        parallel = ParallelModel(fully_shard_model(model, config.mixed_precision,
                                                   config.distributed.reshard_after_forward), strategy, accelerator)
        optimizer = torch.optim.AdamW(parameter_groups(model, config), betas=tuple(config.optim.betas))
    else:
        optimizer = torch.optim.AdamW(parameter_groups(model, config), betas=tuple(config.optim.betas))
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        parallel = ParallelModel(wrapped, strategy, accelerator)

    global_batch = config.per_device_batch_size * world * config.gradient_accumulation
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} records cannot fill one global batch of {global_batch}")
    total_steps = config.max_steps if config.max_steps > 0 else config.epochs * steps_per_epoch
    warmup_steps = math.ceil(config.optim.warmup_ratio * total_steps)
    if config.optim.schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps)
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    trainable = {n: p for n, p in parallel.unwrap().named_parameters() if p.requires_grad}
    collate = CollateIndices(dataset, DataCollator(processor.pad_token_id))
    return Run(config, accelerator, parallel, processor, dataset, collate, cache, optimizer, scheduler, trainable,
               global_batch, total_steps, dump_train_config(config))


def truncate_logs(output_dir: Path, step: int) -> None:
    """Drop the rows of metrics.jsonl and probe.jsonl written after `step`: a run resumed
    from a checkpoint redoes those steps, and its logs should read as one run."""
    for name in ("metrics.jsonl", "probe.jsonl"):
        path = output_dir / name
        if not path.exists():
            continue
        rows = path.read_text().splitlines(keepends=True)
        kept = [row for row in rows if row.strip() and json.loads(row).get("step", 0) <= step]
        if len(kept) != len(rows):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)


def resume(run: Run) -> Progress:
    """The saved position (and weights, optimizer, schedule, random state), or step 0."""
    progress = Progress(global_batch=run.global_batch, world_size=run.world)
    if not run.config.resume:
        return progress
    folder = resolve_resume(Path(run.config.output_dir), run.config.resume)
    saved = Progress(**load_checkpoint(folder, run.parallel.unwrap(), run.optimizer, run.scheduler, run.rank,
                                       world_size=run.world, sharded=run.parallel.sharded))
    if (saved.global_batch, saved.world_size) != (run.global_batch, run.world):
        raise ValueError(
            f"{folder} was written with {saved.world_size} process(es) and global batch {saved.global_batch}; "
            f"resuming with {run.world} and {run.global_batch} would not continue the same run"
        )
    run.accelerator.print(f"resumed from {folder} at step {saved.step}")
    return saved


def rank_batches(run: Run, progress: Progress) -> Iterator[tuple[int, int, list[tuple[dict | None, int, list[str]]]]]:
    """From the saved position on, forever: (epoch, global batches of that epoch consumed
    after this one, this rank's loaded micro-batches). Epochs follow each other; the
    caller stops at the last step."""
    config = run.config
    epoch, start = progress.epoch, progress.batch_in_epoch
    while True:
        batches = global_batches(run.dataset, config, epoch, run.global_batch)[start:]
        mine = [m for b in batches
                for m in micro_batches(b, run.rank, run.world, config.per_device_batch_size, config.gradient_accumulation)]
        loader = iter(DataLoader(mine, batch_size=None, shuffle=False, num_workers=data_workers(config),
                                 collate_fn=run.collate))
        for i in range(len(batches)):
            yield epoch, start + i + 1, [next(loader) for _ in range(config.gradient_accumulation)]
        epoch, start = epoch + 1, 0


def data_workers(config: TrainConfig) -> int:
    """`data.num_workers`, or by default enough decoding processes to keep a GPU fed
    (the CPU cores shared out between this machine's ranks, at most 8), none on CPU."""
    if config.data.num_workers is not None:
        return config.data.num_workers
    if not torch.cuda.is_available():
        return 0
    local_ranks = max(torch.cuda.device_count(), 1)
    return max(1, min(8, (os.cpu_count() or 1) // local_ranks - 1))


@dataclass
class Meter:
    """Running counts for throughput and the skipped-records guard."""

    start_step: int = 0
    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    samples: int = 0
    requested: int = 0
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)  # this rank's, for the message
    # this rank's auxiliary losses (grounding, readout) since the last log, by name
    auxiliary: dict[str, list[float]] = field(default_factory=dict)


def train_step(run: Run, loaded: list[tuple[dict | None, int, list[str]]], meter: Meter) -> float:
    """One optimizer step over this rank's micro-batches; returns the global mean token loss."""
    accelerator = run.accelerator
    micro = [batch for batch, _, _ in loaded]
    meter.skipped_reasons += [reason for _, _, reasons in loaded for reason in reasons]
    if run.cache is not None:
        micro = [attach_features(b, run.cache) for b in micro]
    counted = torch.tensor([sum(answer_tokens(b) for b in micro), sum(n for _, n, _ in loaded),
                            sum(len(reasons) for _, _, reasons in loaded)], device=accelerator.device)
    global_tokens, requested, skipped = (int(x) for x in accelerator.reduce(counted, reduction="sum"))
    meter.requested, meter.skipped = meter.requested + requested, meter.skipped + skipped
    check_skipped(meter.requested, meter.skipped, meter.skipped_reasons, run.config.data.max_skipped_fraction,
                  run.global_batch)

    loss_sum = torch.zeros((), device=accelerator.device)
    grounding = None
    if run.config.grounding_weight > 0:  # summed over micro-batches: a mean over them, like the token loss
        grounding = (run.config.grounding_weight / len(micro), run.parallel.unwrap().config.media_token_id,
                     run.token_texts if run.config.grounding_options else None,
                     run.config.grounding_readout_weight / len(micro))
    for j, batch in enumerate(micro):
        with run.parallel.sync_context(last_micro_batch=j == len(micro) - 1):
            token_loss, auxiliary = forward_backward(
                run.parallel.module, batch, global_tokens, run.world, accelerator, run.processor.pad_token_id,
                run.processor.frame_processor.normalize, grounding)
            loss_sum += token_loss
            for name, value in (auxiliary or {}).items():
                meter.auxiliary.setdefault(name, []).append(float(value))
    if run.config.optim.max_grad_norm > 0:
        run.parallel.clip_grad_norm_(list(run.trainable.values()), run.config.optim.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    meter.tokens += sum(int(b["attention_mask"].sum()) for b in micro if b is not None)
    meter.samples += sum(len(b["ids"]) for b in micro if b is not None)
    return float(accelerator.reduce(loss_sum.detach(), reduction="sum")) / max(global_tokens, 1)


def log_metrics(run: Run, step: int, loss: float, meter: Meter) -> None:
    """Loss, throughput, learning rates and gate openings to TensorBoard and metrics.jsonl."""
    elapsed = time.perf_counter() - meter.started
    metrics = {"loss": loss, "samples_per_s": meter.samples * run.world / elapsed,
               "tokens_per_s": meter.tokens * run.world / elapsed}
    for name, values in meter.auxiliary.items():  # this rank's mean since the last log
        if values:
            metrics[f"{name}_loss"] = sum(values) / len(values)
            values.clear()
    metrics.update({f"lr/{g['name']}": g["lr"] for g in run.optimizer.param_groups})
    metrics.update(gate_values(run.parallel.unwrap()))
    run.accelerator.log(metrics, step=step)
    if run.accelerator.is_main_process:
        with open(Path(run.config.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
    log.info("step %d loss %.4f", step, loss)


def checkpoint(run: Run, progress: Progress) -> None:
    checkpoints = Path(run.config.output_dir) / "checkpoints"
    save_checkpoint(checkpoints / f"step-{progress.step:07d}", run.trainable, run.optimizer, run.scheduler,
                    progress.__dict__, run.recipe, run.rank, run.accelerator.is_main_process,
                    run.accelerator.wait_for_everyone, world_size=run.world, sharded=run.parallel.sharded)
    if run.accelerator.is_main_process:
        prune_checkpoints(checkpoints, run.config.keep_checkpoints)


def run_probe(run: Run, step: int) -> float:
    """The recipe's probe, appended to `probe.jsonl` by the main process; returns its
    headline (`all`; captions: `video/all`) on every process. Under FSDP every process
    runs it (each forward gathers weights from all of them); under DDP the main process
    runs it alone and the others wait."""
    from accelerate.utils import broadcast_object_list

    from crosslmm.synth.evaluate import probe

    config, accelerator = run.config, run.accelerator
    scores = {"all": 0.0}
    if accelerator.is_main_process or run.parallel.sharded:
        with run.parallel.evaluating() as model:
            started = time.perf_counter()
            scores = probe(config.probe.kind, model, run.processor, config.probe.data, config.probe.limit)
        if accelerator.is_main_process:
            line = {"step": step, "kind": config.probe.kind, "seconds": round(time.perf_counter() - started, 1), **scores}
            with open(Path(config.output_dir) / "probe.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            log.info("probe at step %d: %s", step, {k: round(v, 3) for k, v in scores.items() if "/" not in k})
    accelerator.wait_for_everyone()
    headline = float(scores["all"] if "all" in scores else scores["video/all"])  # captions: read with the right video
    return float(broadcast_object_list([headline])[0]) if run.world > 1 else headline


class CollateIndices:
    """DataLoader collate function for a batch given as dataset indices (picklable for workers)."""

    def __init__(self, dataset: LLaVADataset, collator: DataCollator) -> None:
        self.dataset, self.collator = dataset, collator

    def __call__(self, indices: list[int]) -> tuple[dict | None, int, list[str]]:
        """(batch, records asked for, why each skipped one was skipped)."""
        encoded = [self.dataset.encode(i) for i in indices]
        return self.collator([example for example, _ in encoded]), len(indices), [why for _, why in encoded if why]


class TrainingDataError(ValueError):
    """The data cannot train this run (e.g. almost every record is unreadable)."""


def check_skipped(requested: int, skipped: int, reasons: list[str], max_fraction: float, global_batch: int) -> None:
    """Stop a run whose records are mostly skipped (a wrong media root, a chat template
    that drops the placeholder) instead of letting it train on nothing at loss 0.
    Decided on counts summed over ranks, so every rank stops together."""
    if requested < max(global_batch, 16) or skipped <= max_fraction * requested:
        return
    first = "; ".join(list(dict.fromkeys(reasons))[:3])
    raise TrainingDataError(
        f"{skipped} of the first {requested} training records were skipped (more than {max_fraction:.0%}, "
        f"data.max_skipped_fraction): the run would train on almost nothing. First reasons: {first or 'unknown'}. "
        f"Check data.media_root (default: the record file's folder) and that the chat template keeps the "
        f"<image>/<video> placeholders."
    )


def forward_backward(model, batch: dict | None, global_tokens: int, world: int, accelerator: Accelerator,
                     pad_token_id: int, normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     grounding: tuple[float, int, list[str] | None, float] | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """One micro-batch; returns its summed token loss and its auxiliary losses (detached,
    by name: `grounding`, `readout`; None without grounded answers). The token loss is
    divided by the global answer-token count times 1/world, since DDP and FSDP both
    average gradients over ranks. A rank
    whose micro-batch is empty (every record skipped) runs a real forward and backward on
    a one-token batch without labels (loss exactly 0), so the gradient reduction happens
    on every rank and nothing hangs or is trained on. uint8 frames are normalised here, on
    the device, by `normalize`. `grounding`: (weight, media token id, each token's text or
    None, read-out weight) adds weight x the T2V grounding loss of the batch's grounded
    answers, and with the texts of their options' lines too, and read-out weight x the
    read-out loss of T2V's update at those answers (crosslmm.train.grounding)."""
    device = accelerator.device
    empty = batch is None
    if empty:
        batch = {"input_ids": torch.tensor([[pad_token_id]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
                 "labels": torch.tensor([[-100]])}
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
              if k in ("input_ids", "attention_mask", "labels", "pixel_values", "media_num_frames", "vision_features")}
    if inputs.get("pixel_values") is not None and inputs["pixel_values"].dtype == torch.uint8:
        inputs["pixel_values"] = normalize(inputs["pixel_values"])
    num_items = max(global_tokens, 1) / world
    queries = grounded_queries(batch, grounding[1], grounding[2]) if grounding is not None and not empty else []
    answers = grounded_answer_tokens(batch, grounding[1]) if queries and grounding[3] > 0 else None
    attention_mass = T2VAttentionMass(model, queries, answers) if queries else None
    with attention_mass or contextlib.nullcontext():
        out = model(**inputs, num_items_in_batch=torch.tensor(num_items, device=device), logits_to_keep="labels")
    loss = out.loss
    grounding_loss = attention_mass.loss() if attention_mass is not None else None
    if grounding_loss is not None:
        loss = loss + grounding[0] * grounding_loss
    auxiliary = {} if grounding_loss is None else {"grounding": grounding_loss.detach()}
    if answers:
        language_model = getattr(model, "module", model).language_model  # DDP wraps the model
        readout = attention_mass.readout_loss(language_model.model.norm, language_model.get_output_embeddings().weight)
        if readout is not None:
            loss = loss + grounding[3] * readout
            auxiliary["readout"] = readout.detach()
    if empty:  # a text-only token may not reach the trained parts (stage 1): give every one a zero gradient
        loss = loss + sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
    accelerator.backward(loss)
    return out.loss.detach() * num_items, auxiliary or None


def attach_features(batch: dict | None, cache: FeatureCache) -> dict | None:
    if batch is None or not batch["media_keys"]:
        return batch
    batch = dict(batch)
    batch["vision_features"] = cache.get(batch["media_keys"])
    batch["pixel_values"] = None
    return batch


def fill_feature_cache(cache: FeatureCache, model, config: TrainConfig, processor, accelerator: Accelerator) -> None:
    """Encode every clip of the dataset not yet in the cache (main process), then wait."""
    fingerprint = vision_fingerprint(model, processor)
    cache.check(fingerprint)
    if accelerator.is_main_process:
        decoding = load_data(config, processor)
        missing = [i for i, (record, root) in enumerate(decoding.pairs) if not _all_cached(processor, record, root, cache)]
        with tqdm(total=len(missing), desc="feature cache", disable=not accelerator.is_local_main_process) as bar:
            added = cache.fill(model.to(accelerator.device).eval(), (decoding[i] for i in missing), fingerprint, bar)
        log.info("feature cache %s: %d media items added, %d records already cached", cache.folder, added,
                 len(decoding) - len(missing))
    accelerator.wait_for_everyone()
    cache.reload()  # every rank reads the index the main process wrote


def check_ranks_in_sync(trainable: dict[str, torch.Tensor], accelerator: Accelerator, output_dir: Path) -> None:
    """DDP keeps every rank's weights identical; verify it (a float64 checksum per rank)
    rather than assume it, and record the checksums next to the metrics."""
    checksum = torch.stack([p.detach().double().sum() for p in trainable.values()]).sum().reshape(1)
    sums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    if accelerator.is_main_process:
        (output_dir / "rank_checksums.json").write_text(json.dumps(sums))
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"ranks ended with different weights: checksums {sums}")


def _all_cached(processor: CrossLMMProcessor, record: dict, media_root, cache: FeatureCache) -> bool:
    try:
        return all(key in cache for key in processor.record_media_keys(record, media_root))
    except ValueError:
        return True  # a malformed record: nothing to encode, the dataset reports it when read


def gate_values(model) -> dict[str, float]:
    """Mean |tanh(gate)| and mean opening (|tanh(gate)| x RMS of o_proj) per kind of block."""
    from crosslmm.model.cross_attention import GatedCrossAttention

    gates: dict[str, list[float]] = {"v2v": [], "t2v": []}
    openings: dict[str, list[float]] = {"v2v": [], "t2v": []}
    for name, module in model.named_modules():
        if isinstance(module, GatedCrossAttention):
            kind = "v2v" if name.endswith("v2v") else "t2v"
            gates[kind].append(float(torch.tanh(module.gate.detach()).abs().mean()))
            openings[kind].append(module.opening())
    metrics = {f"gate/{k}_mean_abs_tanh": sum(v) / len(v) for k, v in gates.items() if v}
    metrics.update({f"gate/{k}_mean_opening": sum(v) / len(v) for k, v in openings.items() if v})
    return metrics
