"""T2V's attention probabilities for chosen text queries, recomputed during a forward pass.

The forward pass never materialises attention probabilities (the cross-attentions run
SDPA). Two callers need them for a few query rows: `crosslmm demo` draws where an answer
looked, and the grounding loss (`crosslmm.train.grounding`) supervises it, with
gradients. Both record through `T2VAttentionRecorder`, so what the demo shows is what the
loss trains.

How: hooks catch each DCAL layer's `DCALContext` (which holds, per sample, where its text
tokens went in the batch the LLM runs on) and each T2V module's inputs; the softmax is
then redone for the requested rows only (`GatedCrossAttention.probabilities`: same
projections, scale and mask). The forward pass itself is unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from crosslmm.model.dcal import DCALContext, DCALDecoderLayer

TextQuery = tuple[int, int]  # (sample, rank among its text tokens): the order T2V's queries take


@dataclass
class T2VRows:
    """What one T2V call gave the recorder's queries that it served."""

    layer_idx: int
    queries: list[int]  # indices into the recorder's queries, one per row
    probabilities: torch.Tensor  # (R, H, S) float32, S = frame slots x originals per frame
    visible_frames: torch.Tensor  # (R,) frames each query may see (0: it comes before any media)
    frame_slots: int  # frames in each group's keys (padded to the longest sample in the part)
    originals_per_frame: int
    updates: torch.Tensor | None = None  # (R, D) the gated update T2V adds to the residual stream there


def t2v_layers(model: nn.Module) -> list[DCALDecoderLayer]:
    """The DCAL layers that have a T2V cross-attention (empty without T2V)."""
    return [layer for layer in model.modules() if isinstance(layer, DCALDecoderLayer) and layer.t2v is not None]


class T2VAttentionRecorder:
    """While a forward pass runs inside this context, keep T2V's attention probabilities
    for `queries`: one `T2VRows` per T2V call that serves any of them, in call order
    (autograd graph kept). Decoding with a cross-attention cache records nothing."""

    def __init__(self, model: nn.Module, queries: Sequence[TextQuery]) -> None:
        self.layers = t2v_layers(model)
        self.queries = list(queries)
        self.rows: list[T2VRows] = []
        self._context: dict[int, DCALContext | None] = {}
        self._calls: dict[int, int] = {}
        self._handles: list = []

    def __enter__(self) -> T2VAttentionRecorder:
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._grab_context, with_kwargs=True))
            self._handles.append(layer.t2v.register_forward_hook(
                lambda module, args, kwargs, output, layer=layer: self._record(layer, module, args, kwargs, output),
                with_kwargs=True,
            ))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _grab_context(self, layer: DCALDecoderLayer, args: tuple, kwargs: dict) -> None:
        self._context[layer.layer_idx] = kwargs.get("dcal_context")
        self._calls[layer.layer_idx] = 0

    def _record(self, layer: DCALDecoderLayer, module: nn.Module, args: tuple, kwargs: dict,
                output: torch.Tensor) -> None:
        context = self._context.get(layer.layer_idx)
        if context is None or context.t2v is None or context.cross_attention_cache is not None:
            return  # decoding, or no media
        # The layer calls T2V once per part of its groups (split by key count), in order.
        part = context.t2v.by_key_count()[self._calls[layer.layer_idx]]
        self._calls[layer.layer_idx] += 1
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        hidden, key, key_mask = bound.arguments["hidden"], bound.arguments["key"], bound.arguments["key_mask"]
        if not self.queries:
            return
        samples, ranks = torch.tensor(self.queries, device=hidden.device).T  # (Q,) each
        flat = context.t2v.query_index[samples, ranks]  # (Q,) each query's position in the expanded batch
        if bool((flat < 0).any()):
            sample, rank = self.queries[int((flat < 0).nonzero()[0, 0])]
            raise ValueError(f"sample {sample} has no text token of rank {rank}")
        hits = part.query_index.reshape(1, -1) == flat[:, None]  # (Q, G * Lq): at most one hit per row
        found_t = hits.any(dim=1).nonzero().flatten()  # (R,) the queries this part serves
        if not len(found_t):
            return
        slot = hits[found_t].float().argmax(dim=1)  # (R,) flat index into part.query_index
        groups_t, columns_t = slot // part.query_index.shape[1], slot % part.query_index.shape[1]
        found = found_t.tolist()
        mask = None if key_mask is None else key_mask[groups_t, columns_t][:, None]  # (R, 1, S)
        probabilities = module.probabilities(hidden[groups_t, columns_t][:, None], key[groups_t], mask)[:, :, 0]
        self.rows.append(T2VRows(layer.layer_idx, found, probabilities, part.visible_frames[groups_t, columns_t],
                                 part.key_frames.shape[1], context.original_tokens_per_frame,
                                 output[groups_t, columns_t]))
