"""Dual Cross-Attention Layer (DCAL) inside a Llama-family decoder layer.

A DCAL is an ordinary decoder layer of the pretrained LLM with two gated
cross-attentions between its self-attention residual and its feed-forward (paper
Fig. 2, Eq. 4):

    h = h + SelfAttn(norm1(h))
    h[visual] += tanh(a_v) * CrossAttn_v2v(norm(h[visual]), O)   # V2V
    h[text]   += tanh(a_t) * CrossAttn_t2v(norm(h[text]),   O)   # T2V
    h = h + MLP(norm2(h))

`DCALDecoderLayer` takes over the pretrained layer's own submodules under their own
names (`self_attn`, `mlp`, `input_layernorm`, `post_attention_layernorm`), so the LLM's
weight names are unchanged and a stock checkpoint loads into it as is; only `v2v.*` and
`t2v.*` are new. Everything the cross-attentions need about the visual inputs arrives as
one `DCALContext` keyword argument that transformers' decoder passes to every layer,
so it survives gradient checkpointing (the recomputation receives the same argument).

Both cross-attentions are the same operation on different groups: gather queries from
the residual stream, attend to the keys of some frames, scatter the update back. A
`CrossAttentionGroups` describes the groups:
    V2V, frame scope: one group per frame (its g*g pooled tokens, its N originals);
    V2V, video scope: one group per media item (all its pooled tokens and originals);
    T2V:              one group per sample (its text tokens, the originals of all its
                      media), each query seeing only the frames of media before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from crosslmm.model.cross_attention import CrossAttentionOptions, GatedCrossAttention

_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


@dataclass
class CrossAttentionGroups:
    """Index tensors that map the residual stream (flattened to (B*L, D)) and the frames
    (F, N, D) onto G independent cross-attention problems. -1 marks padding."""

    query_index: torch.Tensor  # (G, Lq) long: flat positions b*L + t of the queries
    key_frames: torch.Tensor  # (G, Fk) long: frames whose originals are this group's keys
    visible_frames: torch.Tensor  # (G, Lq) long: each query sees key frames [0, visible)

    def __post_init__(self) -> None:
        num_key_frames = self.key_frames.shape[1]
        # With every query seeing either all of its group's frames or none (the usual case:
        # one video per sample, system prompt before it), no mask is needed at all.
        self.needs_mask = bool(((self.visible_frames != 0) & (self.visible_frames != num_key_frames)).any())
        self.query_valid = self.visible_frames > 0
        self._key_mask: torch.Tensor | None = None
        # Groups that take consecutive frames in order (frame scope, one sample, one video)
        # read the keys as a view instead of a gathered copy.
        in_order = torch.arange(self.key_frames.numel(), device=self.key_frames.device)
        self.frames_in_order = bool((self.key_frames.reshape(-1) == in_order).all())
        self._parts = self._split_by_key_count()

    def by_key_count(self) -> list[CrossAttentionGroups]:
        """The groups split by how many key frames they have, each part without padded
        keys or padded query columns. A batch that mixes images (1 frame) and videos (64)
        would otherwise attend every image's text over 64 frames of padded keys, behind a
        mask copied per query head; per part there is usually no mask at all. Groups
        without keys (text-only samples) add nothing and are dropped. One part, `self`,
        when every group has the same number of frames."""
        return self._parts if self._parts is not None else [self]

    def _split_by_key_count(self) -> list[CrossAttentionGroups] | None:
        """The parts, computed once where the layout is built (None: one part, `self`)."""
        counts = (self.key_frames >= 0).sum(dim=1)
        distinct = counts.unique().tolist()
        if len(distinct) == 1:
            return None
        parts = []
        for count in distinct:
            if count == 0:
                continue
            rows = (counts == count).nonzero().squeeze(1)
            query_index = self.query_index[rows]
            columns = (query_index >= 0).any(dim=0)
            parts.append(CrossAttentionGroups(query_index[:, columns], self.key_frames[rows, :count],
                                              self.visible_frames[rows][:, columns].clamp(max=count)))
        return parts

    def to(self, device: torch.device | str) -> "CrossAttentionGroups":
        """The same groups on another device, flags kept as computed here (so a layout
        built from real ids on the CPU can drive a model on the meta device)."""
        moved = object.__new__(CrossAttentionGroups)
        moved.__dict__.update({k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()})
        moved._parts = None if self._parts is None else [part.to(device) for part in self._parts]
        return moved

    def key_mask(self, original_tokens_per_frame: int) -> torch.Tensor | None:
        """(G, Lq, Fk*N) bool, or None when every query sees all or none of its keys.
        Built once and reused by every DCAL layer of the forward pass."""
        if not self.needs_mask:
            return None
        if self._key_mask is None:
            key_frame = torch.arange(self.key_frames.shape[1] * original_tokens_per_frame, device=self.key_frames.device)
            key_frame = key_frame // original_tokens_per_frame
            self._key_mask = key_frame[None, None, :] < self.visible_frames[..., None]
        return self._key_mask

    def gather_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """(F, N, Hkv, hd) per-frame keys -> (G, Hkv, Fk*N, hd) per-group keys."""
        num_frames, n, hkv, hd = keys.shape
        groups = self.key_frames.shape[0]
        if self.frames_in_order and self.key_frames.numel() == num_frames:
            grouped = keys.reshape(groups, -1, hkv, hd)  # a view, no copy
        else:
            grouped = keys[self.key_frames.clamp(min=0)].reshape(groups, -1, hkv, hd)
        return grouped.transpose(1, 2)


@dataclass
class CrossAttentionCache:
    """The T2V side cache of one generation request: per DCAL layer, the keys and values
    over the original tokens, computed once at prefill and read by every decoded token.
    `sequences_per_group` > 1 when several samples of one request share its media: their
    queries are folded into one attention call over the shared keys, never copied."""

    frames_per_group: torch.Tensor  # (G,) frames of each request's media
    original_tokens_per_frame: int  # N, original (unpooled) tokens per frame
    sequences_per_group: int = 1
    key_value: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _decode_groups: dict[tuple[int, int], CrossAttentionGroups] = field(default_factory=dict, repr=False)

    @property
    def has_media(self) -> bool:
        return bool(self.frames_per_group.numel()) and bool((self.frames_per_group > 0).any())

    def decode_groups(self, batch_size: int, step_length: int) -> CrossAttentionGroups:
        """Groups for a decode step: all `step_length` new tokens of the
        `sequences_per_group` sequences of a request query that request's keys.
        Identical for every step of a generation, so built once."""
        if (batch_size, step_length) in self._decode_groups:
            return self._decode_groups[(batch_size, step_length)]
        groups, device = self.frames_per_group.shape[0], self.frames_per_group.device
        if groups * self.sequences_per_group != batch_size:
            raise ValueError(
                f"decode batch of {batch_size} rows does not match the cross-attention cache "
                f"({groups} requests x {self.sequences_per_group} sequences)"
            )
        per_group = self.sequences_per_group * step_length
        query_index = torch.arange(batch_size * step_length, device=device).view(groups, per_group)
        visible = self.frames_per_group[:, None].expand(groups, per_group)
        max_frames = int(self.frames_per_group.max())
        key_frames = torch.arange(max_frames, device=device)[None].expand(groups, max_frames)
        self._decode_groups[(batch_size, step_length)] = CrossAttentionGroups(query_index, key_frames, visible)
        return self._decode_groups[(batch_size, step_length)]


@dataclass
class DCALContext:
    """What the DCAL layers of one forward call read. Built by the model, never by users."""

    originals: torch.Tensor | None  # (F, N, D) projected original tokens, None when decoding
    original_tokens_per_frame: int  # N, original (unpooled) tokens per frame
    v2v: CrossAttentionGroups | None  # None when decoding or without media
    t2v: CrossAttentionGroups | None
    cross_attention_cache: CrossAttentionCache | None = None  # filled at prefill, read when decoding


class DCALDecoderLayer(GradientCheckpointingLayer):
    """A pretrained decoder layer with V2V and T2V cross-attention inserted after its
    self-attention. Supports decoders whose layer is exactly (input_layernorm,
    self_attn, post_attention_layernorm, mlp) in pre-norm order: Llama, Qwen2/2.5,
    Qwen3, Mistral."""

    def __init__(
        self, decoder_layer: nn.Module, text_config: PretrainedConfig, layer_idx: int, use_v2v: bool, use_t2v: bool,
        options: CrossAttentionOptions = CrossAttentionOptions(),
    ) -> None:
        super().__init__()
        parts = {name for name, _ in decoder_layer.named_children()}
        if parts != set(_LAYER_PARTS):
            raise ValueError(
                f"{type(decoder_layer).__name__} has parts {sorted(parts)}; DCAL supports Llama-family "
                f"decoder layers made of exactly {sorted(_LAYER_PARTS)}"
            )
        self.input_layernorm = decoder_layer.input_layernorm
        self.self_attn = decoder_layer.self_attn
        self.post_attention_layernorm = decoder_layer.post_attention_layernorm
        self.mlp = decoder_layer.mlp
        self.attention_type = getattr(decoder_layer, "attention_type", "full_attention")
        self.layer_idx = layer_idx
        norm_class = type(decoder_layer.input_layernorm)
        self.v2v = GatedCrossAttention(text_config, norm_class, options) if use_v2v else None
        self.t2v = GatedCrossAttention(text_config, norm_class, options) if use_t2v else None

    def forward(self, hidden_states: torch.Tensor, dcal_context: DCALContext | None = None, **kwargs) -> torch.Tensor:
        residual = hidden_states
        attn_output, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual + attn_output

        if dcal_context is not None:
            hidden_states = self.cross_attend(hidden_states, dcal_context)

        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states

    def cross_attend(self, hidden_states: torch.Tensor, ctx: DCALContext) -> torch.Tensor:
        batch, length, dim = hidden_states.shape
        flat = hidden_states.reshape(batch * length, dim)

        if self.v2v is not None and ctx.v2v is not None:
            key, value = self.v2v.project_key_value(ctx.originals)
            for part in ctx.v2v.by_key_count():
                flat = _scatter_update(flat, self.v2v, part, part.gather_keys(key), part.gather_keys(value), ctx)

        if self.t2v is not None and ctx.t2v is not None:
            cache = ctx.cross_attention_cache
            cached = cache.key_value.get(self.layer_idx) if cache is not None else None
            if cached is None and ctx.originals is None:
                raise ValueError("a decode step needs the cross-attention cache filled at prefill")
            if cache is None:  # training or a plain forward: nothing to keep, split by key count
                key, value = self.t2v.project_key_value(ctx.originals)
                for part in ctx.t2v.by_key_count():
                    flat = _scatter_update(flat, self.t2v, part, part.gather_keys(key), part.gather_keys(value), ctx)
            else:  # generation: keys and values computed at prefill, read by every decode step
                if cached is None:
                    key, value = self.t2v.project_key_value(ctx.originals)
                    cached = cache.key_value[self.layer_idx] = (ctx.t2v.gather_keys(key), ctx.t2v.gather_keys(value))
                flat = _scatter_update(flat, self.t2v, ctx.t2v, *cached, ctx)

        return flat.view(batch, length, dim)


def _scatter_update(
    flat: torch.Tensor,  # (B*L, D) residual stream
    attention: GatedCrossAttention,
    groups: CrossAttentionGroups,
    key: torch.Tensor,  # (G, Hkv, S, hd)
    value: torch.Tensor,
    ctx: DCALContext,
) -> torch.Tensor:
    """Gather the groups' queries, cross-attend, add the gated update back in place of
    the queries. Padding queries (index -1) read row 0 and add an exact zero to it."""
    index = groups.query_index.clamp(min=0)
    update = attention(flat[index], key, value, groups.key_mask(ctx.original_tokens_per_frame), groups.query_valid)
    return flat.index_add(0, index.reshape(-1), update.reshape(-1, flat.shape[-1]).to(flat.dtype))


def install_dcal(
    decoder_layers: nn.ModuleList, text_config: PretrainedConfig, layer_indices: list[int], v2v_layers: list[int],
    use_t2v: bool, options: CrossAttentionOptions = CrossAttentionOptions(),
) -> None:
    """Replace the chosen decoder layers, in place, by DCAL layers around their own parts;
    those in `v2v_layers` get a V2V block, all of them a T2V block when `use_t2v`."""
    for idx in layer_indices:
        decoder_layers[idx] = DCALDecoderLayer(
            decoder_layers[idx], text_config, idx, idx in v2v_layers, use_t2v, options)
