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

With `grounding_options` the last token of every option line ("B. red") of a grounded
multiple-choice question gets the same targets as its answer. Why: a model may answer
multiple choice by marking each option as true or false from what the option's own
tokens see, then writing the marked line's letter (docs/synthetic.md, "the scaffold on
video questions"); the answer's query is after the options, so its grounding teaches no
option to look, and without it option lines put 0.03-0.25 of their T2V attention on the
sprite. With it they put 0.44-0.72 there (docs/synthetic.md, sixth session), though the
letters of the models measured so far come from copying the reply's own words instead.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from crosslmm.data.processor import IGNORE_INDEX
from crosslmm.model.t2v_probe import T2VAttentionRecorder, T2VRows

GroundedQuery = tuple[int, int, list[list[int]]]  # (sample, rank among its text tokens, target originals per head group)

_OPTION_LINE = re.compile(r"(?m)^[A-Z]\. \S[^\n]*$")  # "B. red striped circle", as the benchmarks list options


def option_line_ends(token_texts: Sequence[str]) -> list[int]:
    """Indices into `token_texts` (the text of each token of a prompt span, in order) of
    the token that ends each option line ("B. red"): the token holding its last character."""
    ends, total = [], 0
    for text in token_texts:
        total += len(text)
        ends.append(total)  # ends[i]: characters up to and including token i
    return [bisect.bisect_right(ends, match.end() - 1) for match in _OPTION_LINE.finditer("".join(token_texts))]


def token_texts(tokenizer) -> list[str]:
    """Each token id's text, the table `grounded_queries` finds option lines with."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def _grounded_answers(batch: dict, media_token_id: int
                      ) -> Iterator[tuple[int, int, int, list[list[int]], torch.Tensor, list[int]]]:
    """Per grounded answer of a right-padded batch: (sample, k, position of the answer's
    first token, target head groups, placeholders up to each position (L,), the first
    position after each of the sample's answers)."""
    labels, input_ids = batch["labels"], batch["input_ids"]
    for b, grounding in enumerate(batch.get("grounding") or []):
        if not grounding:
            continue
        answered = labels[b] != IGNORE_INDEX  # (L,)
        before = torch.cat([answered.new_zeros(1), answered[:-1]])
        starts = (answered & ~before).nonzero().flatten().tolist()
        ends = (~answered & before).nonzero().flatten().tolist()  # first position after each answer
        media_before = torch.cumsum(input_ids[b] == media_token_id, dim=0)  # (L,) placeholders up to each position
        for k, (start, targets) in enumerate(zip(starts, grounding)):
            if not targets or start == 0:
                continue
            groups = targets if isinstance(targets[0], list) else [targets]
            yield b, k, start, [[int(t) for t in group] for group in groups], media_before, ends


def grounded_queries(batch: dict, media_token_id: int, token_texts: Sequence[str] | None = None) -> list[GroundedQuery]:
    """The T2V queries of a right-padded batch that have a grounding target: for the k-th
    answer (the k-th run of labelled tokens) of a sample whose k-th `grounding` entry is
    not null, the text token just before the answer, given as its rank among the sample's
    text tokens: the order T2V's queries take (model/splice.py, `_t2v_groups`). Targets
    come as head groups: a plain list is one group. With `token_texts` (each token id's
    text), also the last token of each option line between the previous answer and this
    one, with the same targets (`grounding_options`)."""
    input_ids, queries = batch["input_ids"], []
    for b, k, start, groups, media_before, ends in _grounded_answers(batch, media_token_id):
        positions = [start - 1]
        if token_texts is not None:
            prompt_start = ends[k - 1] if k > 0 else 0
            span = input_ids[b, prompt_start:start].tolist()
            positions += [prompt_start + i for i in option_line_ends([token_texts[t] for t in span])]
        queries += [(b, p - int(media_before[p]), groups) for p in positions if input_ids[b, p] != media_token_id]
    return queries


def grounded_answer_tokens(batch: dict, media_token_id: int) -> dict[tuple[int, int], int]:
    """(sample, rank) of each grounded answer's query (as `grounded_queries` gives it; no
    option lines) -> the answer's first token: what `T2VAttentionMass.readout_loss` asks
    T2V's update there to say."""
    input_ids = batch["input_ids"]
    return {(b, start - 1 - int(media_before[start - 1])): int(input_ids[b, start])
            for b, _, start, _, media_before, _ in _grounded_answers(batch, media_token_id)
            if input_ids[b, start - 1] != media_token_id}


class T2VAttentionMass(T2VAttentionRecorder):
    """While a forward pass runs inside this context, record T2V's attention for each
    grounded query (`crosslmm.model.t2v_probe`, as `crosslmm demo` draws it); afterwards
    `masses` and `loss` read its mass on the targets, with gradients."""

    def __init__(self, model: nn.Module, queries: Sequence[GroundedQuery],
                 answers: Mapping[tuple[int, int], int] | None = None) -> None:
        super().__init__(model, [(sample, rank) for sample, rank, _ in queries])
        self.targets = [groups for _, _, groups in queries]
        self.answers = dict(answers or {})  # (sample, rank) -> the answer's first token (`grounded_answer_tokens`)

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

    def readout_loss(self, final_norm: nn.Module, lm_head_weight: torch.Tensor) -> torch.Tensor | None:
        """Mean over grounded answers (`answers`) and T2V layers of the cross entropy of the
        answer's first token from T2V's update at its query alone, read as the language
        model reads its last hidden state (its final RMS norm and LM head, both held
        fixed: no gradient reaches them). None when no answer was recorded.

        Why: a from-scratch model's T2V finds a named sprite (0.79 of its attention) but
        its values keep that sprite's pattern in 64 % of questions, where the originals
        they are computed from keep it in 95 %; the bundled model's values keep it in 96 %
        (docs/synthetic.md, fourteenth session). The answer loss reaches the values only
        through a language model that does not yet use them; this asks each read to say
        the answer by itself."""
        updates, tokens = [], []
        for rows in self.rows:
            for i, query in enumerate(rows.queries):
                token = self.answers.get(self.queries[query])
                if token is not None:
                    updates.append(rows.updates[i])
                    tokens.append(token)
        if not updates:
            return None
        hidden = torch.stack(updates).float()  # (A, D)
        eps = getattr(final_norm, "variance_epsilon", None) or getattr(final_norm, "eps", 1e-6)
        normed = nn.functional.rms_norm(hidden, hidden.shape[-1:], final_norm.weight.detach().float(), eps)
        logits = normed @ lm_head_weight.detach().float().T  # (A, V)
        return nn.functional.cross_entropy(logits, torch.tensor(tokens, device=logits.device))
