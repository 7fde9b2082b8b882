"""CrossLMMForCausalLM: frame encoder -> pooling -> projector -> LLM with DCAL layers.

Read top to bottom: `__init__` assembles the parts, `encode_media` turns frames into
pooled tokens (the LLM's input) and projected original tokens (the cross-attentions'
keys and values), `forward` splices the pooled tokens into the text and runs the LLM
with a `DCALContext`, `generate` (in generation.py) decodes with the LLM's KV cache
plus the cross-attention side cache.

Weight names: `vision_tower.vit.*` (the transformers vision model), `projector.*`,
`language_model.*` (the transformers causal LM, its own names unchanged), and
`language_model.model.layers.{i}.v2v.*` / `.t2v.*` for the cross-attentions, and, where
the config asks for them, `media_newline` (D,), `temporal_embedding` (T, D) and `spatial_embedding` (N, D).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from crosslmm import compat
from crosslmm.model.configuration import CrossLMMConfig
from crosslmm.model.cross_attention import CrossAttentionOptions, GatedCrossAttention
from crosslmm.model.dcal import CrossAttentionCache, DCALContext, install_dcal
from crosslmm.model.pooling import pool_frames
from crosslmm.model.projector import Projector
from crosslmm.model.splice import IGNORE_INDEX, build_layout, infer_padding_side
from crosslmm.model.vision import VisionTower


def parameter_part(name: str) -> str:
    """Which part of CrossLMM a parameter belongs to: vision, projector, llm, v2v or t2v.
    Training recipes choose trainable parts and learning rates by these names."""
    if ".v2v." in name:
        return "v2v"
    if ".t2v." in name:
        return "t2v"
    if name.startswith("vision_tower."):
        return "vision"
    if name.startswith("projector.") or name in ("media_newline", "temporal_embedding", "spatial_embedding"):
        return "projector"
    return "llm"


def sincos_2d_table(grid: int, width: int) -> torch.Tensor:
    """(grid², width): MAE's fixed 2-D sine-cosine position table for a grid x grid patch
    grid, row-major, rescaled to unit root mean square. The first half of the width
    encodes the row, the second the column, each as sin/cos pairs at frequencies
    1 / 10000^(k / (width / 4))."""
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (width/4,)
    angles = torch.arange(grid, dtype=torch.float64)[:, None] * frequencies  # (grid, width/4)
    per_axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, width/2)
    rows = per_axis.repeat_interleave(grid, dim=0)  # (grid², width/2): patch p = r * grid + c has row r
    cols = per_axis.repeat(grid, 1)  # (grid², width/2): ... and column c
    table = torch.cat([rows, cols], dim=1)
    return (table / table.pow(2).mean().sqrt()).float()


def frame_index_in_media(media_num_frames: torch.Tensor) -> torch.Tensor:
    """(M,) frames per media item -> (F,) each frame's index within its own item:
    [3, 2] -> [0, 1, 2, 0, 1]."""
    starts = media_num_frames.cumsum(0) - media_num_frames
    positions = torch.arange(int(media_num_frames.sum()), device=media_num_frames.device)
    return positions - starts.repeat_interleave(media_num_frames)


class LLMInputs(NamedTuple):
    """What the language model is called with, after media expansion (prefill) or for one decode step."""

    embeds: torch.Tensor  # (B, L', D)
    attention_mask: torch.Tensor  # (B, L'); (B, past + L) when decoding
    position_ids: torch.Tensor
    labels: torch.Tensor | None  # (B, L'), -100 at visual tokens and padding
    dcal_context: DCALContext | None  # None when there is nothing to cross-attend to
    cross_attention_cache: CrossAttentionCache | None  # handed back for the next decode step


@dataclass
class CrossLMMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, L' or logits_to_keep, vocab)
    cache: Cache | None = None  # the LLM's KV cache (transformers' name since 5.24)
    cross_attention_cache: CrossAttentionCache | None = None
    attention_mask: torch.Tensor | None = None  # (B, L') after media expansion
    labels: torch.Tensor | None = None  # (B, L') after media expansion

    @property
    def past_key_values(self) -> Cache | None:
        """The pre-5.24 name of `cache`, kept for callers that still read it."""
        warnings.warn("CrossLMMOutput.past_key_values is deprecated, read `cache` instead", FutureWarning, stacklevel=2)
        return self.cache


class CrossLMMPreTrainedModel(PreTrainedModel):
    config_class = CrossLMMConfig
    config: CrossLMMConfig
    base_model_prefix = "crosslmm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DCALDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def initialize_weights(self) -> None:
        """Close every cross-attention block that was not loaded from a checkpoint.

        The cross-attentions live inside the LLM, whose own `_init_weights` knows nothing
        of gates and re-initialises every Linear; a checkpoint without DCAL weights (a
        stage-1 model with T2V off, an imported LLaVA-OneVision) must still start with
        every block adding exactly 0 (a zero gate or a zero `o_proj`, by
        `cross_attention_init`), and a loaded tensor must never be touched
        (transformers' `init.zeros_`/`init.constant_` skip loaded tensors)."""
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, GatedCrossAttention):
                module.reset_to_closed(init.zeros_, init.constant_)
        std = self.config.identity_embedding_std
        for name in ("temporal_embedding", "spatial_embedding"):
            table = getattr(self, name, None)
            if table is None:
                continue
            if std and name == "spatial_embedding" and self.config.spatial_embedding_init == "sincos":
                if not getattr(table, "_is_hf_initialized", False):  # as init.* does: never touch a loaded tensor
                    with torch.no_grad():
                        table.copy_(sincos_2d_table(self.config.vision_grid_size, table.shape[1]) * std)
            elif std:  # a distinct code per frame / patch from the first step
                init.normal_(table, mean=0.0, std=std)
            else:  # starts adding nothing, like the cross-attention blocks
                init.zeros_(table)
        newline = getattr(self, "media_newline", None)
        if newline is not None:  # LLaVA-OneVision's init of its image_newline
            init.normal_(newline, mean=0.0, std=newline.shape[0] ** -0.5)


class CrossLMMForCausalLM(CrossLMMPreTrainedModel):
    def __init__(self, config: CrossLMMConfig) -> None:
        super().__init__(config)
        self.vision_tower = VisionTower(config)
        self.projector = Projector(
            config.vision_config.hidden_size, config.text_config.hidden_size, config.projector_hidden_act
        )
        # LLaVA-OneVision's learned token after each video (`media_newline`), else absent.
        self.media_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size)) if config.media_newline else None
        # (T, D): the index of each frame within its media item, added to its original
        # tokens (`temporal_embedding_frames` = T), else absent.
        self.temporal_embedding = (nn.Parameter(torch.zeros(config.temporal_embedding_frames, config.text_config.hidden_size))
                                   if config.temporal_embedding_frames else None)
        # (N, D): each original token's patch position within its frame, added to it
        # (`spatial_embedding`), else absent.
        self.spatial_embedding = (nn.Parameter(torch.zeros(config.vision_grid_size ** 2, config.text_config.hidden_size))
                                  if config.spatial_embedding else None)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        install_dcal(
            self.decoder_layers, config.text_config, config.dcal_layer_indices, config.v2v_layer_indices, config.use_t2v,
            CrossAttentionOptions.from_config(config),
        )
        # Blocks that must stay whole on one device or in one FSDP unit: ours and the
        # sub-models' (the ViT's encoder layers, the LLM's decoder layers), explicitly,
        # whatever transformers' post_init collects from children in a given release.
        self._no_split_modules = sorted(
            {*self._no_split_modules, *(getattr(self.vision_tower.vit, "_no_split_modules", None) or ()),
             *(getattr(self.language_model, "_no_split_modules", None) or ())})
        self.post_init()

    # ---- plumbing transformers expects ----

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    @property
    def max_sequence_length(self) -> int | None:
        return getattr(self.config.text_config, "max_position_embeddings", None)

    # ---- vision side ----

    def encode_media(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Frames -> (pooled tokens (F, g*g, D) for the LLM, original tokens (F, N, D) for
        the cross-attentions or None when DCAL is off).

        `vision_features` (F, N, Dv), precomputed by the same vision tower, replaces
        `pixel_values` when the tower is frozen (feature cache, language-side benchmarks)."""
        if (pixel_values is None) == (vision_features is None):
            raise ValueError("pass exactly one of pixel_values and vision_features")
        if vision_features is None:
            vision_features = self.vision_tower(pixel_values)
        expected = (self.vision_tower.original_tokens_per_frame, self.config.vision_config.hidden_size)
        if vision_features.dim() != 3 or tuple(vision_features.shape[1:]) != expected:
            raise ValueError(
                f"vision_features must have shape (num_frames, {expected[0]}, {expected[1]}), "
                f"got {tuple(vision_features.shape)}"
            )
        vision_features = vision_features.to(self.projector.linear_1.weight.dtype)
        config = self.config

        def pool(features: torch.Tensor) -> torch.Tensor:
            return pool_frames(features, config.vision_grid_size, config.pooled_grid_size, config.pooling_mode, config.pooling_antialias)

        if config.pool_after_projector:  # LLaVA-OneVision's order
            projected = self.project_frames(vision_features)
            return pool(projected), (projected if config.use_dcal else None)
        originals = self.project_frames(vision_features) if config.use_dcal else None
        return self.projector(pool(vision_features)), originals

    def project_frames(self, vision_features: torch.Tensor) -> torch.Tensor:
        """(F, N, Dv) -> (F, N, D). Without autograd, frames are projected in chunks into
        one preallocated tensor: the projector's hidden activations (twice the size of
        its output) then exist for one chunk at a time, which is what bounds the prefill's
        peak memory on long videos. With autograd every activation is kept, unless the
        vision tower checkpoints its chunks (training the ViT with activation
        checkpointing): then so does the projector, chunk by chunk."""
        if torch.is_grad_enabled():
            if not self.vision_tower.checkpoint_chunks:
                return self.projector(vision_features)
            step = self.config.vision_chunk_size
            return torch.cat([checkpoint(self.projector, vision_features[start:start + step], use_reentrant=False)
                              for start in range(0, vision_features.shape[0], step)])
        num_frames, num_tokens, _ = vision_features.shape
        out = vision_features.new_empty(num_frames, num_tokens, self.config.text_config.hidden_size)
        step = self.config.vision_chunk_size
        for start in range(0, num_frames, step):
            out[start:start + step] = self.projector(vision_features[start:start + step])
        return out

    def mark_originals(self, originals: torch.Tensor, media_num_frames: torch.Tensor) -> torch.Tensor:
        """(F, N, D) projected originals -> the same with each frame's index within its
        media item and each patch's position added, where the config has those tables:
        what the cross-attentions' keys and values are computed from."""
        if self.temporal_embedding is not None:
            originals = originals + self.temporal_embedding[frame_index_in_media(media_num_frames)][:, None].to(originals.dtype)
        if self.spatial_embedding is not None:
            originals = originals + self.spatial_embedding[None].to(originals.dtype)
        return originals

    # ---- forward ----

    def forward(
        self,
        input_ids: torch.LongTensor,  # (B, L) with one media placeholder per media item
        attention_mask: torch.Tensor | None = None,  # (B, L); (B, past + L) when decoding
        pixel_values: torch.Tensor | None = None,  # (F, 3, H, W): all frames of all media, in order
        media_num_frames: torch.Tensor | None = None,  # (M,) frames per media item
        vision_features: torch.Tensor | None = None,  # (F, N, Dv) instead of pixel_values
        labels: torch.LongTensor | None = None,  # (B, L), -100 where no loss
        cache: Cache | None = None,  # the LLM's KV cache; `past_key_values=` is accepted with a FutureWarning
        cross_attention_cache: CrossAttentionCache | None = None,
        position_ids: torch.LongTensor | None = None,  # only for decode steps
        use_cache: bool | None = None,
        logits_to_keep: int | str = 0,  # "labels": only the positions that predict a label (training)
        padding_side: str | None = None,
        **kwargs,
    ) -> CrossLMMOutput:
        cache = compat.resolve_cache_argument(cache, kwargs, "CrossLMMForCausalLM.forward")
        decoding = cache is not None and cache.get_seq_length() > 0
        if decoding:
            inputs = self._decode_inputs(
                input_ids, attention_mask, position_ids, pixel_values, vision_features, cross_attention_cache
            )
        else:
            inputs = self._prefill_inputs(
                input_ids, attention_mask, labels, pixel_values, media_num_frames, vision_features,
                use_cache=bool(use_cache), padding_side=padding_side,
            )
        at_labels = isinstance(logits_to_keep, str)
        if at_labels and (logits_to_keep != "labels" or inputs.labels is None):
            raise ValueError(f"logits_to_keep={logits_to_keep!r}: the only named choice is 'labels', and it needs labels")
        if at_labels:
            # Training: the LM head and the loss only where a label is predicted, not at the
            # thousands of visual positions. targets[:, j] is predicted at position keep[j].
            targets = inputs.labels[:, 1:]
            keep = (targets != IGNORE_INDEX).any(0).nonzero().flatten()
            num_items = kwargs.pop("num_items_in_batch", None)
        outputs = self.language_model(
            inputs_embeds=inputs.embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=use_cache,
            labels=None if at_labels else inputs.labels,
            logits_to_keep=keep if at_labels else logits_to_keep,
            dcal_context=inputs.dcal_context,
            **compat.cache_kwargs(cache),
            **kwargs,
        )
        loss = outputs.loss
        if at_labels:
            kept = targets[:, keep]
            total = torch.nn.functional.cross_entropy(outputs.logits.float().flatten(0, 1), kept.flatten(),
                                                      ignore_index=IGNORE_INDEX, reduction="sum")
            denominator = num_items if num_items is not None else (kept != IGNORE_INDEX).sum().clamp(min=1)
            loss = total / denominator
        return CrossLMMOutput(
            loss=loss,
            logits=outputs.logits,
            cache=compat.output_cache(outputs),
            cross_attention_cache=inputs.cross_attention_cache,
            attention_mask=inputs.attention_mask,
            labels=inputs.labels,
        )

    def _prefill_inputs(
        self, input_ids, attention_mask, labels, pixel_values, media_num_frames, vision_features, *, use_cache, padding_side
    ) -> LLMInputs:
        """Training and the first generation step: expand placeholders, build the DCAL context."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        has_media = pixel_values is not None or vision_features is not None
        if media_num_frames is None:
            if has_media:
                raise ValueError("media_num_frames (frames of each media item) is required with pixel_values/vision_features")
            media_num_frames = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        media_num_frames = torch.as_tensor(media_num_frames, device=input_ids.device).reshape(-1)
        if media_num_frames.numel() and not has_media:
            raise ValueError("media_num_frames was given without pixel_values or vision_features")
        if has_media:
            given = (pixel_values if pixel_values is not None else vision_features).shape[0]
            if given != int(media_num_frames.sum()):
                raise ValueError(
                    f"got {given} frames but media_num_frames={media_num_frames.tolist()} adds up to {int(media_num_frames.sum())}"
                )
            most = self.config.temporal_embedding_frames
            if most and int(media_num_frames.max()) > most:
                raise ValueError(
                    f"a media item has {int(media_num_frames.max())} frames, more than the {most} this model's temporal "
                    f"embedding knows (temporal_embedding_frames); sample at most {most} frames"
                )

        layout = build_layout(
            input_ids,
            attention_mask,
            labels,
            media_num_frames,
            media_token_id=self.config.media_token_id,
            pooled_tokens_per_frame=self.config.tokens_per_frame,
            v2v_scope=self.config.v2v_scope,
            tokens_after_media=self.config.tokens_after_media,
            max_length=self.max_sequence_length,
            padding_side=padding_side or infer_padding_side(attention_mask),
        )
        batch, dim = input_ids.shape[0], self.config.text_config.hidden_size
        text_embeds = self.get_input_embeddings()(input_ids).reshape(-1, dim)
        embeds = text_embeds.new_zeros(batch * layout.length, dim)
        embeds = embeds.index_copy(0, layout.text_target, text_embeds[layout.text_source])

        # Decoding reads T2V keys from this cache; a prompt without media gets an empty one
        # so every decode step can insist on receiving it.
        cross_cache = None
        if use_cache and self.config.use_t2v:
            cross_cache = CrossAttentionCache(layout.frames_per_sample, self.vision_tower.original_tokens_per_frame)
        ctx = None
        if has_media:
            pooled, originals = self.encode_media(pixel_values, vision_features)
            embeds = embeds.index_copy(0, layout.visual_target, pooled.reshape(-1, dim).to(embeds.dtype))
            if self.media_newline is not None:
                newline = self.media_newline.to(embeds.dtype).expand(layout.newline_target.numel(), dim)
                embeds = embeds.index_copy(0, layout.newline_target, newline)
            if self.config.use_dcal:
                originals = self.mark_originals(originals, media_num_frames)
                ctx = DCALContext(originals, originals.shape[1], layout.v2v, layout.t2v, cross_cache)
        return LLMInputs(
            embeds.view(batch, layout.length, dim), layout.attention_mask, layout.position_ids, layout.labels, ctx, cross_cache
        )

    def _decode_inputs(self, input_ids, attention_mask, position_ids, pixel_values, vision_features, cross_cache) -> LLMInputs:
        """A generation step after prefill: new text tokens only, T2V against the side cache."""
        if pixel_values is not None or vision_features is not None:
            raise ValueError("media can only be passed with the prompt, not in a decode step")
        if attention_mask is None:
            raise ValueError("decode steps need the attention_mask over past and new tokens")
        if position_ids is None:
            step = input_ids.shape[1]
            position_ids = attention_mask.long().cumsum(-1)[:, -step:] - 1
        if cross_cache is None and self.config.use_t2v:
            raise ValueError(
                "a decode step needs the cross_attention_cache returned by the prefill (its T2V keys and values); "
                "without it the new tokens would silently skip text-to-visual attention"
            )
        embeds = self.get_input_embeddings()(input_ids)
        ctx = None
        if cross_cache is not None and cross_cache.has_media:
            groups = cross_cache.decode_groups(input_ids.shape[0], input_ids.shape[1])
            ctx = DCALContext(None, cross_cache.original_tokens_per_frame, None, groups, cross_cache)
        return LLMInputs(embeds, attention_mask, position_ids, None, ctx, cross_cache)

    # ---- generation ----

    def generate(self, *args, **kwargs) -> torch.LongTensor:
        from crosslmm.model.generation import generate

        return generate(self, *args, **kwargs)
