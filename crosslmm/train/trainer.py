"""The training loop for both stages, on one process or many (accelerate / PyTorch DDP).

One recipe, read top to bottom:
1. load the model (with the recipe's config overrides), its processor and the data;
2. choose the trainable parts, build AdamW groups (per-part learning rates, no weight
   decay on gates, norms and biases) and a warmup + cosine schedule;
3. walk a fixed, seeded order of global batches; each rank takes its slice, split into
   gradient-accumulation micro-batches;
4. normalise the loss by the number of answer tokens in the whole global batch (all
   ranks, all micro-batches), so N processes x B samples give the same update as one
   process with N*B samples;
5. checkpoint atomically every `save_every` steps with everything an exact resume
   needs; write the final model with `save_pretrained`.

The data order is a pure function of (seed, epoch), never of the process layout or of
where a run was interrupted, which is what makes resuming exact and multi-process runs
equal to single-process ones.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
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
from crosslmm.train.feature_cache import FeatureCache, vision_fingerprint
from crosslmm.train.state import load_checkpoint, prune_checkpoints, resolve_resume, save_checkpoint

log = logging.getLogger("crosslmm.train")


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of `epoch` already consumed
    global_batch: int = 0  # the layout the position counts in; resuming must keep it
    world_size: int = 1


def load_model(config: TrainConfig) -> CrossLMMForCausalLM:
    model_config = CrossLMMConfig.from_pretrained(config.model, local_files_only=True)
    if config.model_overrides:
        model_config = CrossLMMConfig(**{**model_config.to_dict(), **config.model_overrides})
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


def load_data(config: TrainConfig, processor: CrossLMMProcessor, cache: FeatureCache | None = None) -> LLaVADataset:
    """The training records; with a feature cache, items carry no pixels and their frame
    counts come from the cache, so no video is decoded at all."""
    path = Path(config.data.train)
    if path.suffix in (".yaml", ".yml"):
        if config.data.media_root:
            raise ValueError("data.media_root is for record files; a YAML mixture sets media_root itself")
        pairs = load_mixture(path)
    else:
        media_root = Path(config.data.media_root) if config.data.media_root else path.parent
        pairs = [(record, media_root) for record in load_records(path)]
    if cache is None:
        return LLaVADataset(pairs, processor)
    return LLaVADataset(pairs, processor, load_pixels=False, frame_counts=cache.frame_counts())


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """Freeze what the recipe does not train; group the rest by (part, decay)."""
    optim = config.optim
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        part = parameter_part(name)
        param.requires_grad_(part in optim.trainable)
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


def train(config: TrainConfig, stop_after: int | None = None) -> Path:
    """Run a recipe; returns the folder of the final model. `stop_after` ends the run
    early (after a checkpoint) without changing the schedule, e.g. for time-limited jobs."""
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # torchrun on CPU-only machines: DDP over gloo
        mixed_precision=config.mixed_precision,
        log_with="tensorboard",
        project_dir=str(output_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)],
    )
    set_seed(config.seed)
    world, rank = accelerator.num_processes, accelerator.process_index

    model = load_model(config)
    processor = CrossLMMProcessor.from_pretrained(
        config.model, config=model.config, num_frames=config.data.num_frames, fps=config.data.fps,
        max_frames=config.data.max_frames, max_length=config.data.max_length,
    )
    cache = FeatureCache(config.feature_cache) if config.feature_cache else None
    if cache is not None:
        fill_feature_cache(cache, model, config, processor, accelerator)
    dataset = load_data(config, processor, cache)
    collator = DataCollator(processor.pad_token_id)

    groups = parameter_groups(model, config)
    if config.gradient_checkpointing:
        compat.enable_activation_checkpointing(model, use_reentrant=False)
    optimizer = torch.optim.AdamW(groups, betas=tuple(config.optim.betas))

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
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    progress = Progress(global_batch=global_batch, world_size=world)
    checkpoints = output_dir / "checkpoints"
    if config.resume:
        folder = resolve_resume(output_dir, config.resume)
        saved = Progress(**load_checkpoint(folder, accelerator.unwrap_model(model), optimizer, scheduler, rank))
        if (saved.global_batch, saved.world_size) != (global_batch, world):
            raise ValueError(
                f"{folder} was written with {saved.world_size} process(es) and global batch {saved.global_batch}; "
                f"resuming with {world} and {global_batch} would not continue the same run"
            )
        progress = saved
        accelerator.print(f"resumed from {folder} at step {progress.step}")
    recipe = dump_train_config(config)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(recipe)
    accelerator.init_trackers("tb")

    model.train()
    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train")
    start_step, started = progress.step, time.perf_counter()
    tokens_seen = samples_seen = 0
    records_requested = records_skipped = 0
    skipped_reasons: list[str] = []  # this rank's, for the message
    while progress.step < total_steps:
        batches = global_batches(dataset, config, progress.epoch, global_batch)
        mine = [micro_batches(b, rank, world, config.per_device_batch_size, config.gradient_accumulation)
                for b in batches[progress.batch_in_epoch:]]
        loader = DataLoader([m for step in mine for m in step], batch_size=None, shuffle=False,
                            num_workers=config.data.num_workers, collate_fn=CollateIndices(dataset, collator))
        loader_iter = iter(loader)
        for _ in mine:
            loaded = [next(loader_iter) for _ in range(config.gradient_accumulation)]
            micro = [batch for batch, _, _ in loaded]
            skipped_reasons += [reason for _, _, reasons in loaded for reason in reasons]
            if cache is not None:
                micro = [attach_features(b, cache) for b in micro]
            counted = torch.tensor([sum(answer_tokens(b) for b in micro), sum(n for _, n, _ in loaded),
                                    sum(len(reasons) for _, _, reasons in loaded)], device=accelerator.device)
            global_tokens, requested, skipped = (int(x) for x in accelerator.reduce(counted, reduction="sum"))
            records_requested, records_skipped = records_requested + requested, records_skipped + skipped
            check_skipped(records_requested, records_skipped, skipped_reasons, config.data.max_skipped_fraction,
                          global_batch)
            loss_sum = torch.zeros((), device=accelerator.device)
            for j, batch in enumerate(micro):
                last = j == len(micro) - 1
                with accelerator.no_sync(model) if not last else nullcontext():
                    loss_sum += forward_backward(model, batch, global_tokens, world, accelerator, processor.pad_token_id)
            if config.optim.max_grad_norm > 0:
                accelerator.clip_grad_norm_([p for p in trainable.values()], config.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.batch_in_epoch += 1
            tokens_seen += sum(int(b["attention_mask"].sum()) for b in micro if b is not None)
            samples_seen += sum(len(b["ids"]) for b in micro if b is not None)
            bar.update(1)

            loss_value = float(accelerator.reduce(loss_sum.detach(), reduction="sum")) / max(global_tokens, 1)
            if progress.step % max(config.log_every, 1) == 0 or progress.step == total_steps:
                elapsed = time.perf_counter() - started
                metrics = {"loss": loss_value, "samples_per_s": samples_seen * world / elapsed,
                           "tokens_per_s": tokens_seen * world / elapsed}
                metrics.update({f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups})
                metrics.update(gate_values(accelerator.unwrap_model(model)))
                accelerator.log(metrics, step=progress.step)
                if accelerator.is_main_process:
                    with open(output_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"step": progress.step, **metrics}) + "\n")
                bar.set_postfix(loss=f"{loss_value:.4f}")
                log.info("step %d loss %.4f", progress.step, loss_value)

            finishing = progress.step == total_steps or (stop_after is not None and progress.step - start_step >= stop_after)
            if config.probe.every and (progress.step % config.probe.every == 0 or progress.step == total_steps):
                run_probe(accelerator, model, processor, config, output_dir, progress.step)
            if (config.save_every and progress.step % config.save_every == 0) or finishing:
                save_checkpoint(checkpoints / f"step-{progress.step:07d}", trainable, optimizer, scheduler,
                                progress.__dict__, recipe, rank, accelerator.is_main_process, accelerator.wait_for_everyone)
                if accelerator.is_main_process:
                    prune_checkpoints(checkpoints, config.keep_checkpoints)
            if finishing:
                break
        else:  # the epoch's batches ran out: start the next epoch
            progress.epoch += 1
            progress.batch_in_epoch = 0
            continue
        break  # finished, or stopped early by `stop_after`
    bar.close()
    check_ranks_in_sync(trainable, accelerator, output_dir)

    final = output_dir / "model"
    if progress.step == total_steps:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(final)
            processor.save_pretrained(final)
        accelerator.wait_for_everyone()
    accelerator.end_training()  # also tears down the process group: last
    return final


def run_probe(accelerator: Accelerator, model, processor, config: TrainConfig, output_dir: Path, step: int) -> None:
    """The recipe's probe on the main process, appended to `probe.jsonl`; the others wait."""
    if accelerator.is_main_process:
        from crosslmm.synth.evaluate import probe

        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        started = time.perf_counter()
        scores = probe(config.probe.kind, unwrapped, processor, config.probe.data, config.probe.limit)
        unwrapped.train()
        line = {"step": step, "kind": config.probe.kind, "seconds": round(time.perf_counter() - started, 1), **scores}
        with open(output_dir / "probe.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        log.info("probe at step %d: %s", step, {k: round(v, 3) for k, v in scores.items() if "/" not in k})
    accelerator.wait_for_everyone()


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


def forward_backward(
    model, batch: dict | None, global_tokens: int, world: int, accelerator: Accelerator, pad_token_id: int
) -> torch.Tensor:
    """One micro-batch; returns its summed token loss (detached). The loss is divided by
    the global answer-token count times 1/world, since DDP averages gradients over ranks.
    A rank whose micro-batch is empty (every record skipped) runs a real forward and
    backward on a one-token batch without labels (loss exactly 0), so DDP's gradient
    synchronisation happens on every rank and nothing hangs or is trained on."""
    empty = batch is None
    if empty:
        batch = {"input_ids": torch.tensor([[pad_token_id]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
                 "labels": torch.tensor([[-100]])}
    inputs = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()
              if k in ("input_ids", "attention_mask", "labels", "pixel_values", "media_num_frames", "vision_features")}
    num_items = max(global_tokens, 1) / world
    out = model(**inputs, num_items_in_batch=torch.tensor(num_items, device=accelerator.device), logits_to_keep="labels")
    loss = out.loss
    if empty:  # a text-only token may not reach the trained parts (stage 1): give every one a zero gradient
        loss = loss + sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
    accelerator.backward(loss)
    return out.loss.detach() * num_items


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
