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

from collections.abc import Sequence

import torch
from torch import nn

from crosslmm.data.processor import IGNORE_INDEX
from crosslmm.model.t2v_probe import T2VAttentionRecorder, T2VRows

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


class T2VAttentionMass(T2VAttentionRecorder):
    """While a forward pass runs inside this context, record T2V's attention for each
    grounded query (`crosslmm.model.t2v_probe`, as `crosslmm demo` draws it); afterwards
    `masses` and `loss` read its mass on the targets, with gradients."""

    def __init__(self, model: nn.Module, queries: Sequence[GroundedQuery]) -> None:
        super().__init__(model, [(sample, rank) for sample, rank, _ in queries])
        self.targets = [groups for _, _, groups in queries]

    def _head_masses(self, rows: T2VRows) -> torch.Tensor:
        """(R, H): each head's mass on its own head group's targets."""
        _, heads, originals = rows.probabilities.shape
        on_target = torch.zeros_like(rows.probabilities, dtype=torch.bool)  # (R, H, S)
        for i, query in enumerate(rows.queries):
            groups = self.targets[query]
            if heads % len(groups):
                raise ValueError(f"{len(groups)} grounding head groups do not split T2V's {heads} heads evenly")
            per_group = heads // len(groups)
            for g, group in enumerate(groups):
                if not group:
                    raise ValueError("an empty grounding head group: its heads would have nothing to look at")
                if max(group) >= originals:
                    raise ValueError(f"grounding targets {max(group)} beyond the sample's {originals} original tokens")
                on_target[i, g * per_group:(g + 1) * per_group, group] = True
        return (rows.probabilities * on_target).sum(-1)

    @property
    def masses(self) -> list[torch.Tensor]:
        """Per T2V call that served grounded queries, (R,): the mean over heads of each
        head's mass on its group's targets."""
        return [self._head_masses(rows).mean(-1) for rows in self.rows]

    def loss(self) -> torch.Tensor | None:
        """Mean over answers, T2V layers and head groups of -log(mass); None when nothing
        was grounded."""
        terms = []
        for rows in self.rows:
            head_mass = self._head_masses(rows)
            for i, query in enumerate(rows.queries):
                terms.append(head_mass[i].view(len(self.targets[query]), -1).mean(-1))  # (G,)
        if not terms:
            return None
        return -torch.cat(terms).clamp_min(1e-6).log().mean()
