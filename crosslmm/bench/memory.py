"""`crosslmm memory`: per-GPU training memory before renting a cluster, and a check of
the estimate against a measured training step.

Two halves:

- `estimate`: arithmetic from the config's shapes. Model states (float32 master
  weights, float32 gradients, two float32 AdamW moments; divided by the GPU count under
  FSDP, plus the gathered weights of the units in flight) and activations by part (the
  ViT, the projector's originals, the LLM's checkpointed layer inputs, the recompute of
  one layer in backward, the DCAL cross-attentions, the LM head at label positions).
  The formulas assume what `crosslmm train` does: activation checkpointing of every
  decoder layer (and of the ViT's frame chunks when the ViT trains), the LM head only at
  labelled positions, SDPA attention that does not materialise scores (flash /
  memory-efficient kernels on GPU).
- `measure_training_step`: a real training step of the same model on this machine,
  with every tensor allocation counted (`TensorMemoryTracker`: a dispatch mode that
  adds each new storage's bytes and subtracts them when it is freed), so the peak is
  the live tensor bytes, as a GPU's `max_memory_allocated` would report them, without
  allocator caching or fragmentation. The 2-process FSDP measurement runs the same
  step under torchrun.

The estimate is checked against the measurement at small shapes (docs/training.md);
the 7B figures are then the same arithmetic at the 7B shapes.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from crosslmm.model.configuration import CrossLMMConfig

GB = 1e9


class TensorMemoryTracker(TorchDispatchMode):
    """Live bytes of tensor storages: those handed to `track` and every storage an op
    creates while the mode is active; `peak` is the maximum of `current`."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._refs: set = set()  # weak references to the live storages (their callbacks subtract the bytes)
        self._seen_ptrs: set[int] = set()  # data pointers of live storages: a shared storage counts once

    def track(self, tensors) -> None:
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)

    def _add(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        pointer, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or pointer in self._seen_ptrs:
            return

        def freed(ref, pointer=pointer, size=size) -> None:
            self._refs.discard(ref)
            self._seen_ptrs.discard(pointer)
            self.current -= size

        ref = weakref.ref(storage, freed)
        self._refs.add(ref)
        self._seen_ptrs.add(pointer)
        self.current += size
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)
        return out


# --------------------------------------------------------------------------- estimate


def parameter_sizes(config: CrossLMMConfig, stage: int) -> dict[str, int]:
    """Exact parameter counts from the model built on the meta device: all, trainable in
    this stage, the largest trainable part (AdamW's per-group temporaries), the largest
    FSDP unit and what stays in the root unit."""
    from crosslmm.model.modeling import CrossLMMForCausalLM, parameter_part
    from crosslmm.train.distributed import wrap_units

    with torch.device("meta"):
        model = CrossLMMForCausalLM(config)
    parts = trainable_parts(stage)
    unique = {id(p): (n, p) for n, p in model.named_parameters()}.values()  # tied embeddings once
    total = sum(p.numel() for _, p in unique)
    by_part: dict[str, int] = {}
    for name, param in unique:
        if parameter_part(name) in parts:
            by_part[parameter_part(name)] = by_part.get(parameter_part(name), 0) + param.numel()
    units = [sum(p.numel() for p in unit.parameters()) for unit in wrap_units(model)]
    return {"total": total, "trainable": sum(by_part.values()), "largest_part": max(by_part.values()),
            "trainable_llm": by_part.get("llm", 0) + by_part.get("v2v", 0) + by_part.get("t2v", 0),
            "largest_unit": max(units), "root": total - sum(units)}


def estimate(config: CrossLMMConfig, stage: int, frames: int, gpus: int = 8, strategy: str = "fsdp", batch: int = 1,
             text_tokens: int = 128, answer_tokens: int = 32, mixed_precision: str = "bf16",
             gradient_checkpointing: bool = True, device: str = "cuda") -> dict:
    """Per-GPU bytes of one training step, by part (see the module docstring for what is
    assumed). `batch` is the per-GPU micro-batch; every sample is one video of `frames`
    frames with `text_tokens` text tokens, `answer_tokens` of them labelled."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    if not gradient_checkpointing:
        raise ValueError("the estimate assumes activation checkpointing (every recipe of crosslmm train uses it)")
    if stage == 2 and not config.use_t2v:
        config = CrossLMMConfig(**{**config.to_dict(), "use_t2v": True})
    sizes = parameter_sizes(config, stage)
    text, vision = config.text_config, config.vision_config
    d, inter, kv = text.hidden_size, text.intermediate_size, text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    dv, inter_v, layers_v = vision.hidden_size, vision.intermediate_size, config.num_vision_layers_used
    n, vocab, image = config.vision_grid_size ** 2, text.vocab_size, config.image_size
    bf16 = mixed_precision == "bf16"
    sharded = strategy == "fsdp" and gpus > 1
    compute = 2 if bf16 else 4  # matmul outputs
    residual = 2 if (bf16 and sharded) else 4  # DDP autocast keeps the residual stream in fp32; FSDP-bf16 does not
    shard = gpus if sharded else 1
    vit_trains = "vision" in trainable_parts(stage)

    # ---- model states
    p, pt = sizes["total"], sizes["trainable"]
    states = {"weights_fp32": 4 * p / shard, "adamw_fp32": 8 * pt / shard}
    grads = 4 * pt / shard
    temporaries = 4 * sizes["largest_part"] / shard if device == "cuda" else 0  # foreach AdamW
    if sharded:  # gathered compute copies: the root unit throughout, two units in flight (+ one unit's grads)
        gathered = compute if bf16 else 4
        states["fsdp_gathered"] = gathered * (sizes["root"] + 2 * sizes["largest_unit"]) + (gathered + 4) * sizes["largest_unit"]
    else:
        if bf16:
            states["autocast_weight_cache"] = 2 * pt
        if strategy == "ddp" and gpus > 1:
            states["ddp_buckets"] = 4 * pt

    # ---- activations
    frames_total = batch * frames
    sequence = text_tokens - 1 + frames * (config.tokens_per_frame) + config.tokens_after_media
    tokens = batch * sequence
    labels = batch * answer_tokens
    queries_t2v = batch * (text_tokens - 1)
    queries_v2v = frames_total * config.tokens_per_frame
    acts = {"pixels": frames_total * 3 * image * image * 4}  # the float32 batch (uint8 until the device: x4 less)
    acts["llm_layer_inputs"] = text.num_hidden_layers * tokens * d * residual
    acts["lm_head_at_labels"] = 3 * labels * vocab * 4  # fp32 logits, log-softmax, their gradient
    if config.use_dcal:
        acts["originals"] = frames_total * n * d * compute  # the projector's output, read by every DCAL
    if vit_trains:  # chunk inputs and the ViT's output features, kept until the ViT's backward
        acts["vit_saved"] = frames_total * (3 * image * image * 4 + n * dv * compute)
    else:  # frozen ViT; the projector over the originals keeps its input and hidden activations
        acts["projector"] = frames_total * n * (dv + 2 * d) * compute if "projector" in trainable_parts(stage) else 0
    # One decoder layer recomputed in backward: attention and MLP activations, norms in fp32.
    layer = tokens * ((5 * d + 2 * kv + 4 * inter) * compute + 4 * d * 4)
    backward_temp = tokens * 2 * inter * compute
    cross = 0
    if config.use_dcal:
        blocks = [queries_v2v] if config.use_v2v else []
        blocks += [queries_t2v] if config.use_t2v else []
        # The cross-attentions' own K/V width (CrossLMMConfig.cross_attention_kv_heads, default the LLM's).
        cross_kv = (config.cross_attention_kv_heads or text.num_key_value_heads) * (d // text.num_attention_heads)
        cross = sum(2 * frames_total * n * cross_kv * compute + q * (5 * d * compute + 2 * d * 4) for q in blocks)
    acts["one_layer_recompute"] = layer + backward_temp + cross
    if config.use_dcal:  # the originals' gradient, summed over the DCAL layers, and one layer's share of it
        acts["originals_gradient"] = 2 * frames_total * n * d * compute
    # The ViT's backward (after the LLM's): one chunk recomputed, per-layer checkpoints inside it.
    chunk = min(config.vision_chunk_size, frames_total)
    vit_backward = chunk * n * (layers_v * dv * 4 + (7 * dv + 2 * inter_v) * compute) if vit_trains else 0

    # ---- the step's peak: start of the LLM's backward, the ViT's backward, or the optimizer step
    llm_grads = 4 * sizes["trainable_llm"] / shard
    kept = acts["pixels"] + acts.get("originals", 0) + acts.get("vit_saved", 0) + acts.get("projector", 0)
    phases = {
        "llm_backward": kept + acts["llm_layer_inputs"] + acts["lm_head_at_labels"] + acts["one_layer_recompute"]
        + acts.get("originals_gradient", 0),
        "vit_backward": acts["pixels"] + acts.get("vit_saved", 0) + llm_grads + vit_backward,
        "optimizer_step": grads + temporaries,
    }
    phase = max(phases, key=phases.get)
    total = sum(states.values()) + phases[phase]
    return {
        "per_gpu_gb": total / GB, "peak_phase": phase, "model_states_gb": {k: v / GB for k, v in states.items()},
        "activations_gb": {k: v / GB for k, v in acts.items()}, "phases_gb": {k: v / GB for k, v in phases.items()},
        "gradients_gb": grads / GB, "parameters": sizes,
        "setting": {"stage": stage, "frames": frames, "gpus": gpus, "strategy": strategy, "batch": batch,
                    "text_tokens": text_tokens, "answer_tokens": answer_tokens, "mixed_precision": mixed_precision,
                    "sequence_length": sequence, "device": device},
    }


def describe_estimate(result: dict, model: str) -> str:
    """The estimate as a short table for the terminal."""
    setting = result["setting"]
    lines = [f"{model}, stage {setting['stage']}, {setting['frames']} frames x batch {setting['batch']} "
             f"(sequence {setting['sequence_length']} tokens), {setting['gpus']} GPU(s), {setting['strategy']}, "
             f"{setting['mixed_precision']}:"]
    lines += [f"  model state  {name:<28} {gb:8.2f} GB" for name, gb in result["model_states_gb"].items()]
    lines += [f"  gradients    {'fp32' + (' (sharded)' if setting['strategy'] == 'fsdp' else ''):<28} "
              f"{result['gradients_gb']:8.2f} GB (at the optimizer step)"]
    lines += [f"  activations  {name:<28} {gb:8.2f} GB" for name, gb in result["activations_gb"].items()]
    lines += [f"  phase        {name:<28} {gb:8.2f} GB{'  <- peak' if name == result['peak_phase'] else ''}"
              for name, gb in result["phases_gb"].items()]
    lines.append(f"per GPU: {result['per_gpu_gb']:.2f} GB (model states + the peak phase)")
    if "measured_peak_gb" in result:
        lines.append(f"measured on this CPU: {result['measured_peak_gb']:.4f} GB (estimate {result['estimate_error']:+.1%})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- measurement


def training_batch(config: CrossLMMConfig, frames: int, batch: int, text_tokens: int, answer_tokens: int) -> dict:
    """A batch of `batch` samples, each one video of `frames` frames and `text_tokens`
    text tokens (the last `answer_tokens` of them labelled), with random pixels."""
    generator = torch.Generator().manual_seed(0)
    vocab = config.text_config.vocab_size
    ids = torch.randint(3, vocab - 1, (batch, text_tokens), generator=generator)
    ids[:, 1] = config.media_token_id
    ids[ids == config.media_token_id] = 3
    ids[:, 1] = config.media_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -answer_tokens:] = ids[:, -answer_tokens:]
    size = config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(batch * frames, 3, size, size, generator=generator),
            "media_num_frames": torch.full((batch,), frames, dtype=torch.long)}


def trainable_parts(stage: int) -> set[str]:
    """What each stage trains (configs/stage1.yaml, configs/stage2.yaml)."""
    return {"projector", "v2v"} if stage == 1 else {"vision", "projector", "llm", "v2v", "t2v"}


def measure_training_step(config: CrossLMMConfig, stage: int, frames: int, batch: int = 1, text_tokens: int = 128,
                          answer_tokens: int = 32, gradient_checkpointing: bool = True,
                          mixed_precision: str = "no") -> dict[str, float]:
    """Peak live tensor bytes of the second training step (the optimizer moments exist
    from the first) of a randomly initialised model, on this process's CPU."""
    from crosslmm import compat
    from crosslmm.model.modeling import CrossLMMForCausalLM, parameter_part

    if stage == 2 and not config.use_t2v:
        config = CrossLMMConfig(**{**config.to_dict(), "use_t2v": True})
    torch.manual_seed(0)
    model = CrossLMMForCausalLM(config).float().train()
    parts = trainable_parts(stage)
    for name, param in model.named_parameters():
        param.requires_grad_(parameter_part(name) in parts)
    if gradient_checkpointing:
        compat.enable_activation_checkpointing(model, use_reentrant=False)
        model.vision_tower.checkpoint_chunks = "vision" in parts
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    inputs = training_batch(config, frames, batch, text_tokens, answer_tokens)
    tracker = TensorMemoryTracker()
    tracker.track(model.parameters())
    tracker.track(inputs.values())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    with tracker:
        for step in range(2):
            if step == 1:
                tracker.reset_peak()
                states = tracker.current
            with autocast:
                loss = model(**inputs, logits_to_keep="labels").loss
            after_forward = tracker.current
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {"peak_gb": tracker.peak / GB, "states_gb": states / GB, "saved_after_forward_gb": (after_forward - states) / GB}
