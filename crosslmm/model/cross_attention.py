"""The gated, GQA-shaped cross-attention used twice in every DCAL (V2V and T2V).

Queries come from the LLM's residual stream, keys and values from the projected
original (unpooled) visual tokens. The shape copies the LLM's own attention
(num_heads, num_key_value_heads, head_dim) without rotary embeddings: that is what
reproduces the paper's stage-1 trainable count (method.md, "Decisions").

Attention never materialises a (queries x keys) matrix: it always goes through
`scaled_dot_product_attention`, whatever attention implementation the LLM uses. Grouped
-query heads are handled by folding each key/value head's group of query heads into the
query length: cross-attention has no causal structure, so (G heads x Lq queries) against
one K/V head is the same computation as G separate heads, and K/V are read once per
key/value head instead of being repeated G times in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class CrossAttentionOptions:
    """How every cross-attention block is built: CrossLMMConfig's `cross_attention_init`,
    `cross_attention_sink` and `cross_attention_kv_heads` (documented there), in one object
    so the decoder layers pass them on without knowing them."""

    init: str = "zero_output"
    sink: bool = False
    kv_heads: int | None = None  # None: the LLM's own num_key_value_heads

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> CrossAttentionOptions:
        """The options a CrossLMMConfig holds."""
        return cls(config.cross_attention_init, config.cross_attention_sink, config.cross_attention_kv_heads)


class GatedCrossAttention(nn.Module):
    """`tanh(gate) * o_proj(Attn(q_proj(norm(h)), k_proj(O), v_proj(O)))`, built to add
    exactly zero, so a fresh block changes nothing and the pretrained LLM's behaviour is
    the starting point: either `o_proj` is zero with an open gate (`init="zero_output"`,
    the default) or the gate is zero (`"zero_gate"`, the paper's; see CrossLMMConfig)."""

    def __init__(
        self, text_config: PretrainedConfig, norm_class: type[nn.Module],
        options: CrossAttentionOptions = CrossAttentionOptions(),
    ) -> None:
        super().__init__()
        hidden_size = text_config.hidden_size
        self.num_heads = text_config.num_attention_heads
        self.num_key_value_heads = (options.kv_heads or getattr(text_config, "num_key_value_heads", None)
                                    or self.num_heads)
        self.head_dim = getattr(text_config, "head_dim", None) or hidden_size // self.num_heads
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_key_value_heads}"
            )
        self.heads_per_group = self.num_heads // self.num_key_value_heads

        self.norm = norm_class(hidden_size, eps=text_config.rms_norm_eps)
        self.q_proj = nn.Linear(hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden_size, bias=False)
        # A learnable scalar; tanh(gate) scales the update. For checkpoints that lack the
        # block, `CrossLMMPreTrainedModel.initialize_weights` applies `reset_to_closed` again.
        self.gate = nn.Parameter(torch.zeros(1))
        # `sink`: one learned key and value per K/V head (Hkv, hd) that every query may
        # attend to besides the originals, so a head can read little or nothing; without
        # it softmax hands each query a full unit of attention over the originals, and
        # attending to every matching token returns their mean, which says neither "none"
        # nor "how many" (CrossLMMConfig.cross_attention_sink).
        self.sink_key = nn.Parameter(torch.zeros(self.num_key_value_heads, self.head_dim)) if options.sink else None
        self.sink_value = nn.Parameter(torch.zeros(self.num_key_value_heads, self.head_dim)) if options.sink else None
        self.init_mode = options.init
        with torch.no_grad():
            self.reset_to_closed()

    def reset_to_closed(self, zeros_=nn.init.zeros_, constant_=nn.init.constant_) -> None:
        """Make the block add exactly zero. The init functions are parameters so that
        loading can pass transformers' versions, which skip tensors read from a checkpoint.
        A sink starts at zero: one more key, at logit 0, whose value adds nothing."""
        if self.sink_key is not None:
            zeros_(self.sink_key)
            zeros_(self.sink_value)
        if self.init_mode == "zero_gate":
            zeros_(self.gate)
        else:
            constant_(self.gate, 1.0)
            zeros_(self.o_proj.weight)

    def opening(self) -> float:
        """How far the block is from adding nothing: |tanh(gate)| x the RMS of `o_proj`'s
        weights. 0 at construction under either init; the training log follows it, so a
        block that never opens (the zero-gate deadlock) is seen within minutes."""
        weight = self.o_proj.weight.detach()
        return float(torch.tanh(self.gate.detach()).abs().mean() * weight.pow(2).mean().sqrt())

    def project_key_value(self, originals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, N, D) original tokens -> keys, values of shape (F, N, Hkv, hd)."""
        shape = (*originals.shape[:-1], self.num_key_value_heads, self.head_dim)
        return self.k_proj(originals).view(shape), self.v_proj(originals).view(shape)

    def probabilities(
        self,
        hidden: torch.Tensor,  # (G, Lq, D) the module's query input
        key: torch.Tensor,  # (G, Hkv, S, hd)
        key_mask: torch.Tensor | None = None,  # (G, Lq, S) bool, True = may attend
    ) -> torch.Tensor:
        """(G, H, Lq, S) float32 softmax probabilities of `forward` on the same inputs:
        query head h = j*rep + r reads K/V head j, scale 1/sqrt(head_dim), and a row whose
        mask allows nothing sees every key (as forward does before zeroing it).

        forward never materialises them (SDPA); this recomputation is for the rows one
        wants to look at (`crosslmm demo`) or to supervise (`crosslmm.train.grounding`),
        and it keeps the autograd graph. With a sink, a row sums to one minus the sink's
        share."""
        groups, num_queries, _ = hidden.shape
        hkv, rep, hd = self.num_key_value_heads, self.heads_per_group, self.head_dim
        query = self.q_proj(self.norm(hidden)).view(groups, num_queries, hkv, rep, hd).float()
        scores = torch.einsum("gqjrd,gjsd->gjrqs", query, key.float()) / math.sqrt(hd)  # (G, Hkv, rep, Lq, S)
        scores = scores.reshape(groups, hkv * rep, num_queries, key.shape[2])  # (G, H, Lq, S)
        if key_mask is not None:
            key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
            scores = scores.masked_fill(~key_mask[:, None], float("-inf"))
        if self.sink_key is None:
            return scores.softmax(dim=-1)
        sink = torch.einsum("gqjrd,jd->gjrq", query, self.sink_key.float()) / math.sqrt(hd)  # (G, Hkv, rep, Lq)
        sink = sink.reshape(groups, hkv * rep, num_queries, 1)
        return torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]  # the sink's share is left out

    def forward(
        self,
        hidden: torch.Tensor,  # (G, Lq, D) queries of G independent groups
        key: torch.Tensor,  # (G, Hkv, S, hd)
        value: torch.Tensor,  # (G, Hkv, S, hd)
        key_mask: torch.Tensor | None = None,  # (G, Lq, S) bool, True = may attend
        query_valid: torch.Tensor | None = None,  # (G, Lq) bool, False = zero update
    ) -> torch.Tensor:
        """Return the gated update (G, Lq, D) to add to the residual stream."""
        groups, num_queries, _ = hidden.shape
        num_keys = key.shape[2]
        hkv, rep, hd = self.num_key_value_heads, self.heads_per_group, self.head_dim

        # (G, Lq, H*hd) -> (G, Hkv, Lq*rep, hd): query head h = j*rep + r uses K/V head j.
        query = self.q_proj(self.norm(hidden)).view(groups, num_queries, hkv, rep, hd)
        query = query.permute(0, 2, 1, 3, 4).reshape(groups, hkv, num_queries * rep, hd)

        attn_mask = None
        if key_mask is not None:
            # A row that may see nothing would give NaN (softmax over no keys); let it see
            # everything and zero its update below (`query_valid` must be False there).
            key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
        if self.sink_key is not None:  # one more key and value, seen by every query
            key = torch.cat([key, self.sink_key.to(key.dtype)[None, :, None].expand(groups, -1, 1, -1)], dim=2)
            value = torch.cat([value, self.sink_value.to(value.dtype)[None, :, None].expand(groups, -1, 1, -1)], dim=2)
            if key_mask is not None:
                key_mask = F.pad(key_mask, (0, 1), value=True)
            num_keys += 1
        if key_mask is not None:
            attn_mask = key_mask[:, None, :, None, :].expand(groups, 1, num_queries, rep, num_keys)
            attn_mask = attn_mask.reshape(groups, 1, num_queries * rep, num_keys)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)  # (G, Hkv, Lq*rep, hd)
        out = out.view(groups, hkv, num_queries, rep, hd).permute(0, 2, 1, 3, 4).reshape(groups, num_queries, -1)
        update = torch.tanh(self.gate) * self.o_proj(out)
        if query_valid is not None:
            update = torch.where(query_valid[..., None], update, torch.zeros((), dtype=update.dtype, device=update.device))
        return update
