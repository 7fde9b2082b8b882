"""How the model is spread over processes: PyTorch DDP or FSDP2 (`fully_shard`).

DDP keeps a full copy of the weights, gradients and AdamW state on every GPU: fine for
stage 1 (only the projector and V2V train) and for small models, impossible for stage 2
at 7B (8.44 B parameters x 16 bytes of training state is ~135 GB before one activation).
FSDP2 shards all of that across the processes (ZeRO-3 semantics): each process keeps
1/N of every parameter, gradient and optimizer moment, and gathers one wrap unit's
weights just before it runs.

Wrap units are the model's repeated blocks: every ViT encoder layer, every LLM decoder
layer (the DCAL ones included, cross-attentions inside their layer). The embeddings,
the LM head (tied to them in Qwen2) and the projector stay in the root unit.

Precision: parameters are float32 masters (`load_model`); with `mixed_precision: bf16`
FSDP gathers them as bf16 for compute and reduces gradients in float32
(`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`), so no update is lost
to bf16 rounding and the gradient average is exact to fp32.

The trainer talks to either strategy through `ParallelModel`, so its loop does not
branch on the strategy.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

STRATEGIES = ("ddp", "fsdp")


def wrap_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards as units, innermost first: each element of every
    `layers` ModuleList (the ViT's encoder layers and the LLM's decoder layers)."""
    units = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            units.extend(module)
    if not units:
        raise ValueError(f"{type(model).__name__} has no `layers` lists to shard")
    return units


def fully_shard_model(model: nn.Module, mixed_precision: str, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 to every wrap unit, then to the root; returns the (same) module."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision == "fp16":
        raise ValueError("distributed.strategy=fsdp computes in bf16 or fp32; fp16 needs a loss scaler: use bf16")
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None, reduce_dtype=torch.float32
    )
    for unit in wrap_units(model):
        fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


class ParallelModel:
    """One interface over DDP (through accelerate) and FSDP2 for what the loop needs:
    the module to call, the bare model, gradient-sync control, clipping and the final
    full weights."""

    def __init__(self, model: nn.Module, strategy: str, accelerator) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy, self.accelerator = strategy, accelerator
        self.module = model  # what forward is called on (DDP wrapper or the sharded model)

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def unwrap(self) -> nn.Module:
        """The CrossLMMForCausalLM (FSDP2 shards in place, so it is the module itself)."""
        return self.module if self.sharded else self.accelerator.unwrap_model(self.module)

    def sync_context(self, last_micro_batch: bool):
        """Gradients are reduced across processes only after the last micro-batch."""
        if self.sharded:
            self.module.set_requires_gradient_sync(last_micro_batch)
            return nullcontext()
        return nullcontext() if last_micro_batch else self.accelerator.no_sync(self.module)

    def clip_grad_norm_(self, parameters: list[torch.Tensor], max_norm: float) -> float:
        if self.sharded:  # DTensor gradients: the norm is reduced over every shard
            norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        return float(self.accelerator.clip_grad_norm_(parameters, max_norm))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight, unsharded, on the CPU of the main process (empty elsewhere).
        Collective under FSDP: every process must call it."""
        if not self.sharded:
            return self.unwrap().state_dict() if self.accelerator.is_main_process else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @contextmanager
    def evaluating(self):
        """Eval mode for a probe, then back to training."""
        model = self.unwrap()
        model.eval()
        try:
            yield model
        finally:
            model.train()


def export_model(parallel: ParallelModel, processor, folder: Path, dtype: str) -> None:
    """Write the trained model as one ordinary `save_pretrained` folder (any strategy),
    its weights in `dtype` (bfloat16 by default: what inference loads; float32 for a
    model that is the start of another training stage)."""
    state = parallel.full_state_dict()
    if parallel.accelerator.is_main_process:
        target = getattr(torch, dtype)
        state = {k: v.detach().to("cpu", target if v.is_floating_point() else v.dtype) for k, v in state.items()}
        model = parallel.unwrap()
        model.save_pretrained(folder, state_dict=state)
        model.config.set_dtype(dtype)  # save_pretrained wrote the float32 masters' dtype: record the saved weights'
        model.config.save_pretrained(folder)
        processor.save_pretrained(folder)
    parallel.accelerator.wait_for_everyone()
