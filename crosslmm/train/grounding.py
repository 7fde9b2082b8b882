"""Grounding supervision: an auxiliary loss that puts T2V's attention, at the position
that predicts an answer, on the original tokens the answer is about.

Why it exists: on the synthetic world, a model trained only on its answers' tokens put
11 % of its T2V attention on the frame a question names (1 in 8: chance) and answered
"the colour in the top-left quadrant in frame 3" with a colour seen anywhere in the video
(docs/synthetic.md, "T2V does not look where the question points"). While attention is
spread over hundreds of originals, the token loss's gradient toward a lookup is tiny. A
renderer knows which originals each answer is about, as it knows the per-patch labels the
vision encoder was pretrained on, so a recipe can say so directly (`grounding_weight`).

The data: a record's optional `grounding` holds one entry per assistant turn, null or the
indices of the originals its answer is about, counted over the record's frames in order
(frame * originals_per_frame + patch; `crosslmm.synth.world.add_grounding`). The loss of
one answer is -log of the attention mass the query predicting its first token puts on
those originals, averaged over heads; the loss of a batch is its mean over answers and
T2V layers. Records without the field, and `grounding_weight: 0` (the default), train as
before.

An entry may instead be a list of G target lists: the heads are then split into G equal
consecutive groups, group g is supervised toward list g, and each group's -log mass is
one term of the mean. Why: an answer about change ("which direction does it move") needs
two looks, at its first and its last frame; one target over every frame teaches heads to
read the average position, which says nothing about direction (docs/synthetic.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from crosslmm.data.processor import IGNORE_INDEX
from crosslmm.model.dcal import DCALContext, DCALDecoderLayer

GroundedQuery = tuple[int, int, list[list[int]]]  # (sample, rank among its text tokens, target originals per head group)


def grounded_queries(batch: dict, media_token_id: int) -> list[GroundedQuery]:
    """The T2V queries of a right-padded batch that have a grounding target: for the k-th
    answer (the k-th run of labelled tokens) of a sample whose k-th `grounding` entry is
    not null, the text token just before the answer, given as its rank among the sample's
    text tokens: the order T2V's queries take (model/splice.py, `_t2v_groups`). Targets
    come as head groups: a plain list is one group."""
    groundings = batch.get("grounding") or []
    labels, input_ids = batch["labels"], batch["input_ids"]
    queries = []
    for b, grounding in enumerate(groundings):
        if not grounding:
            continue
        answered = labels[b] != IGNORE_INDEX  # (L,)
        starts = (answered & ~torch.cat([answered.new_zeros(1), answered[:-1]])).nonzero().flatten().tolist()
        media_before = torch.cumsum(input_ids[b] == media_token_id, dim=0)  # (L,) placeholders up to each position
        for start, targets in zip(starts, grounding):
            if not targets or start == 0:
                continue
            query = start - 1
            groups = targets if isinstance(targets[0], list) else [targets]
            queries.append((b, query - int(media_before[query]), [[int(t) for t in group] for group in groups]))
    return queries


class T2VAttentionMass:
    """While a forward pass runs inside this context, record for each grounded query and
    each T2V layer the attention mass (mean over heads, each head on its group's
    targets) on its targets, with gradients.

    Hooks catch each DCAL layer's context and each T2V module's inputs; the softmax is
    recomputed for the grounded queries only (`GatedCrossAttention.probabilities`), so
    the forward pass itself is unchanged."""

    def __init__(self, model: nn.Module, queries: Sequence[GroundedQuery]) -> None:
        self.layers = [layer for layer in model.modules() if isinstance(layer, DCALDecoderLayer) and layer.t2v is not None]
        self.queries = list(queries)
        self.masses: list[torch.Tensor] = []  # one (R,) per T2V call with grounded queries in it
        self._group_masses: list[torch.Tensor] = []  # per query and call, (G,): what the loss reads
        self._context: dict[int, DCALContext | None] = {}
        self._calls: dict[int, int] = {}
        self._handles: list = []

    def __enter__(self) -> T2VAttentionMass:
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._grab_context, with_kwargs=True))
            self._handles.append(layer.t2v.register_forward_hook(
                lambda module, args, kwargs, output, layer=layer: self._measure(layer, module, args, kwargs),
                with_kwargs=True,
            ))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def loss(self) -> torch.Tensor | None:
        """Mean over answers, T2V layers and head groups of -log(mass); None when nothing
        was grounded."""
        if not self._group_masses:
            return None
        return -torch.cat(self._group_masses).clamp_min(1e-6).log().mean()

    def _grab_context(self, layer: DCALDecoderLayer, args: tuple, kwargs: dict) -> None:
        self._context[layer.layer_idx] = kwargs.get("dcal_context")
        self._calls[layer.layer_idx] = 0

    def _measure(self, layer: DCALDecoderLayer, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = self._context.get(layer.layer_idx)
        if context is None or context.t2v is None or context.cross_attention_cache is not None:
            return  # decoding, or no media: nothing to supervise
        # The layer calls T2V once per part of its groups (split by key count), in order.
        part = context.t2v.by_key_count()[self._calls[layer.layer_idx]]
        self._calls[layer.layer_idx] += 1
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        hidden, key, key_mask = bound.arguments["hidden"], bound.arguments["key"], bound.arguments["key_mask"]
        rows, columns, targets = [], [], []
        for sample, rank, target in self.queries:
            flat = context.t2v.query_index[sample, rank]  # the query's position in the expanded batch
            hits = (part.query_index == flat).nonzero()
            if len(hits):
                rows.append(int(hits[0, 0]))
                columns.append(int(hits[0, 1]))
                targets.append(target)
        if not rows:
            return
        rows_t, columns_t = torch.tensor(rows, device=hidden.device), torch.tensor(columns, device=hidden.device)
        mask = None if key_mask is None else key_mask[rows_t, columns_t][:, None]  # (R, 1, S)
        probs = module.probabilities(hidden[rows_t, columns_t][:, None], key[rows_t], mask)[:, :, 0]  # (R, H, S)
        heads, originals = probs.shape[1], probs.shape[2]
        on_target = torch.zeros(len(rows), heads, originals, dtype=torch.bool, device=probs.device)
        for i, groups in enumerate(targets):
            if heads % len(groups):
                raise ValueError(f"{len(groups)} grounding head groups do not split T2V's {heads} heads evenly")
            per_group = heads // len(groups)
            for g, group in enumerate(groups):
                if not group:
                    raise ValueError("an empty grounding head group: its heads would have nothing to look at")
                if max(group) >= originals:
                    raise ValueError(f"grounding targets {max(group)} beyond the sample's {originals} original tokens")
                on_target[i, g * per_group:(g + 1) * per_group, group] = True
        head_mass = (probs * on_target).sum(-1)  # (R, H): each head's mass on its group's targets
        self.masses.append(head_mass.mean(-1))  # (R,)
        for i, groups in enumerate(targets):
            self._group_masses.append(head_mass[i].view(len(groups), -1).mean(-1))  # (G,)
