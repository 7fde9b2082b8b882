"""CrossLMMConfig: the single source of truth for every architectural default.

Everything that changes what the model computes lives here and is written to
`config.json` by `save_pretrained`, so training, evaluation and serving read the same
values. The config nests the vision encoder's and the LLM's own transformers configs
unchanged, which is what lets a user assemble CrossLMM from any local SigLIP / CLIP and
Llama-family checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig

POOLING_MODES = ("bilinear", "average")
V2V_SCOPES = ("frame", "video")
CROSS_ATTENTION_INITS = ("zero_output", "zero_gate")
SUPPORTED_VISION_TYPES = ("siglip_vision_model", "siglip2_vision_model", "clip_vision_model")


def _as_config(value: PretrainedConfig | dict | None, default_type: str) -> PretrainedConfig:
    """Turn a nested config given as a dict (as read from config.json) into its class."""
    if value is None:
        return AutoConfig.for_model(default_type)
    if isinstance(value, PretrainedConfig):
        return value
    value = dict(value)
    model_type = value.pop("model_type", default_type)
    return AutoConfig.for_model(model_type, **value)


class CrossLMMConfig(PretrainedConfig):
    r"""Configuration of a CrossLMM video language model.

    Args:
        vision_config: config of the frame encoder (SigLIP, SigLIP2 or CLIP vision model).
        text_config: config of the Llama-family decoder (Qwen2/2.5, Qwen3, Llama, Mistral).
        media_token_id: id of the placeholder token that marks where a media item (video
            or image) goes in `input_ids`; one placeholder per media item.
        tokens_per_frame: pooled visual tokens per frame fed to the LLM; a square g*g
            (1, 4, 9, 16, ..., 196 for the LLaVA-OneVision layout).
        pooling_mode: "bilinear" or "average": how the ViT grid is reduced to g x g.
        pooling_antialias: with bilinear pooling, low-pass filter before resampling so
            every ViT token contributes (without it, 27 -> 1 keeps the single centre
            token). LLaVA-OneVision's own pooling has it off.
        vision_feature_layer: index into the ViT's hidden states (0 = embeddings, -1 =
            last layer). -2, the second to last layer, is LLaVA-OneVision's choice.
        vision_chunk_size: frames encoded per ViT call, bounding activation memory on
            long videos; results do not depend on it.
        dcal_every_k: a Dual Cross-Attention Layer is inserted after the self-attention
            of decoder layers K-1, 2K-1, ... (counting from 0).
        use_v2v / use_t2v: switch the visual-to-visual and text-to-visual
            cross-attentions. With both off the model is the pooled-only (or, at 196
            tokens per frame, the LLaVA-OneVision-layout) baseline and has no DCAL weights.
        v2v_scope: "frame" (each frame's pooled tokens attend to that frame's original
            tokens) or "video" (to all original tokens of the same media item).
        projector_hidden_act: activation between the two projector linears.
        pool_after_projector: pool the projected tokens instead of the ViT features.
            False is the paper's order; True is LLaVA-OneVision's (the `llava-ov`
            compatibility setting of imported checkpoints).
        media_newline: append one learned token after every media item's visual tokens,
            as LLaVA-OneVision does after each video.
        v2v_at_last_layer: build a V2V block in a DCAL at the LLM's final layer. Off by
            default: its update reaches nothing (no later layer reads the visual
            positions, and they carry no loss), so it could never learn; the paper's
            trainable count includes it (docs/architecture.md, "The last DCAL").
        temporal_embedding_frames: 0 (default) or the most frames a media item may have:
            a learned embedding of each frame's index within its media item, added to
            that frame's original tokens before the cross-attentions read them. Without
            it the originals carry no frame identity, so a text token cannot attend to
            "frame 3" through T2V. How it starts: `identity_embedding_std`. Off unless
            measured to help (docs/architecture.md, "Frame and patch identity of the
            originals").
        spatial_embedding: add a learned embedding of each original token's patch
            position (N, D) to the original tokens, for the same reason: a trained
            projector can discard where in the frame a patch was (measured on the
            synthetic world: docs/architecture.md, "Frame and patch identity of the originals"),
            and a T2V query must find "the top-left quadrant". Off by default.
        identity_embedding_std: the standard deviation the temporal and spatial
            embeddings start with. 0 (default): they start at zero and the model computes
            exactly what it did without them; their gradient then comes only from a
            cross-attention that already uses them, which may never happen (the
            zero-gate deadlock's pattern). A positive value gives every frame and patch
            a distinct code from the first step; the model still starts adding nothing
            through a new cross-attention block (its `o_proj` or gate is zero), but a
            checkpoint's trained blocks see their originals shifted.
        spatial_embedding_init: how the spatial table starts when
            `identity_embedding_std` > 0. "normal" (default): an independent random code
            per patch, so a query for a region ("the top-left quadrant") must learn each of
            its patches' codes separately. "sincos": the fixed 2-D sine-cosine table of MAE
            (half the width encodes the row, half the column), scaled to that standard
            deviation and still learned: neighbouring patches start with similar codes and
            a row or column range is one direction, so a region is linearly separable from
            the first step (docs/synthetic.md, seventh session).
        cross_attention_init: how a new cross-attention block starts; both make it add
            exactly zero, so a fresh CrossLMM computes what the pooled-only model computes.
            "zero_output" (default): `o_proj` at zero and the gate at 1 (tanh 0.76).
            "zero_gate": the paper's tanh gate at zero. At a closed gate the block's
            weights get no gradient, and the gate's own gradient only sees the block's
            initial output, a near-uniform average of the originals that the pooled
            tokens already carry: the gate random-walks near zero and nothing is learned
            (docs/architecture.md, "Cross-attention initialisation").
        cross_attention_sink: give every cross-attention block one learned key and value
            per K/V head that each query may attend to besides the originals (starting at
            zero). Without it softmax spends a whole unit of attention on the originals, so
            a query whose object is absent must still read some token, and attending to
            every matching token returns their mean, not how many there are. Off by default
            (the paper has none); docs/architecture.md, "An attention sink".
        cross_attention_kv_heads: key/value heads of every cross-attention block. None
            (default): the LLM's own `num_key_value_heads`, the paper's shape. More heads
            widen the values T2V reads from each original (Hkv x head_dim), which a small
            LLM's grouped-query shape makes narrower than the originals themselves.
    """

    model_type = "crosslmm"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: PretrainedConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        media_token_id: int | None = None,
        tokens_per_frame: int = 9,
        pooling_mode: str = "bilinear",
        pooling_antialias: bool = True,
        vision_feature_layer: int = -2,
        vision_chunk_size: int = 16,
        dcal_every_k: int = 4,
        use_v2v: bool = True,
        use_t2v: bool = True,
        v2v_scope: str = "frame",
        projector_hidden_act: str = "gelu",
        pool_after_projector: bool = False,
        media_newline: bool = False,
        cross_attention_init: str = "zero_output",
        v2v_at_last_layer: bool = False,
        temporal_embedding_frames: int = 0,
        spatial_embedding: bool = False,
        identity_embedding_std: float = 0.0,
        spatial_embedding_init: str = "normal",
        cross_attention_sink: bool = False,
        cross_attention_kv_heads: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vision_config = _as_config(vision_config, "siglip_vision_model")
        self.text_config = _as_config(text_config, "qwen2")
        self.media_token_id = media_token_id
        self.tokens_per_frame = tokens_per_frame
        self.pooling_mode = pooling_mode
        self.pooling_antialias = pooling_antialias
        self.vision_feature_layer = vision_feature_layer
        self.vision_chunk_size = vision_chunk_size
        self.dcal_every_k = dcal_every_k
        self.use_v2v = use_v2v
        self.use_t2v = use_t2v
        self.v2v_scope = v2v_scope
        self.projector_hidden_act = projector_hidden_act
        self.pool_after_projector = pool_after_projector
        self.media_newline = media_newline
        self.cross_attention_init = cross_attention_init
        self.v2v_at_last_layer = v2v_at_last_layer
        self.temporal_embedding_frames = temporal_embedding_frames
        self.spatial_embedding = spatial_embedding
        self.identity_embedding_std = identity_embedding_std
        self.spatial_embedding_init = spatial_embedding_init
        self.cross_attention_sink = cross_attention_sink
        self.cross_attention_kv_heads = cross_attention_kv_heads
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        self.validate_crosslmm()

    def validate_crosslmm(self) -> None:
        """Reject inconsistent options at construction, not deep inside a forward pass."""
        if self.vision_config.model_type not in SUPPORTED_VISION_TYPES:
            raise ValueError(
                f"vision_config.model_type={self.vision_config.model_type!r} is not supported; "
                f"expected one of {SUPPORTED_VISION_TYPES}"
            )
        grid = math.isqrt(self.tokens_per_frame)
        if self.tokens_per_frame < 1 or grid * grid != self.tokens_per_frame:
            raise ValueError(f"tokens_per_frame must be a square number (1, 4, 9, 16, ...), got {self.tokens_per_frame}")
        if grid > self.vision_grid_size:
            raise ValueError(
                f"tokens_per_frame={self.tokens_per_frame} needs a {grid}x{grid} grid, larger than the "
                f"vision encoder's {self.vision_grid_size}x{self.vision_grid_size} patch grid"
            )
        if self.pooling_mode not in POOLING_MODES:
            raise ValueError(f"pooling_mode must be one of {POOLING_MODES}, got {self.pooling_mode!r}")
        if self.cross_attention_init not in CROSS_ATTENTION_INITS:
            raise ValueError(
                f"cross_attention_init must be one of {CROSS_ATTENTION_INITS}, got {self.cross_attention_init!r}"
            )
        kv_heads = self.cross_attention_kv_heads
        if kv_heads is not None and (kv_heads < 1 or self.text_config.num_attention_heads % kv_heads):
            raise ValueError(f"cross_attention_kv_heads={kv_heads} must divide the LLM's "
                             f"{self.text_config.num_attention_heads} attention heads")
        if self.v2v_scope not in V2V_SCOPES:
            raise ValueError(f"v2v_scope must be one of {V2V_SCOPES}, got {self.v2v_scope!r}")
        if self.dcal_every_k < 1:
            raise ValueError(f"dcal_every_k must be >= 1, got {self.dcal_every_k}")
        num_vision_layers = self.vision_config.num_hidden_layers
        if not -num_vision_layers - 1 <= self.vision_feature_layer <= num_vision_layers:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is outside the vision encoder's "
                f"{num_vision_layers} layers"
            )
        if self.vision_chunk_size < 1:
            raise ValueError(f"vision_chunk_size must be >= 1, got {self.vision_chunk_size}")
        if self.use_dcal and not self.dcal_layer_indices:
            raise ValueError(
                f"dcal_every_k={self.dcal_every_k} leaves no DCAL layer in a {self.text_config.num_hidden_layers}-layer "
                "LLM; lower it or switch use_v2v/use_t2v off for a pooled-only model"
            )
        if self.use_v2v and not self.use_t2v and not self.v2v_layer_indices:
            raise ValueError(
                f"dcal_every_k={self.dcal_every_k} puts the only DCAL at the final layer, where V2V is read by "
                "nothing; lower dcal_every_k, switch use_t2v on, or set v2v_at_last_layer=True"
            )
        if self.temporal_embedding_frames < 0:
            raise ValueError(f"temporal_embedding_frames must be >= 0 (0: none), got {self.temporal_embedding_frames}")
        if self.temporal_embedding_frames and not self.use_dcal:
            raise ValueError(
                "temporal_embedding_frames marks the original tokens the cross-attentions read; this model has no "
                "DCAL (use_v2v and use_t2v are off), so set it to 0"
            )
        if self.spatial_embedding and not self.use_dcal:
            raise ValueError(
                "spatial_embedding marks the original tokens the cross-attentions read; this model has no DCAL "
                "(use_v2v and use_t2v are off), so switch it off"
            )
        if self.spatial_embedding and self.vision_config.model_type == "siglip2_vision_model":
            raise ValueError("spatial_embedding needs a fixed patch grid; a NaFlex (siglip2) encoder has none")
        if self.identity_embedding_std < 0:
            raise ValueError(f"identity_embedding_std must be >= 0, got {self.identity_embedding_std}")
        if self.spatial_embedding_init not in ("normal", "sincos"):
            raise ValueError(f"spatial_embedding_init must be 'normal' or 'sincos', got {self.spatial_embedding_init!r}")
        if self.spatial_embedding and self.spatial_embedding_init == "sincos" and self.text_config.hidden_size % 4:
            raise ValueError(f"a sincos spatial table splits the width into row and column sine-cosine pairs: "
                             f"hidden_size {self.text_config.hidden_size} is not a multiple of 4")
        vocab = self.text_config.vocab_size
        if self.media_token_id is not None and not 0 <= self.media_token_id < vocab:
            raise ValueError(f"media_token_id={self.media_token_id} is outside the LLM's vocabulary of {vocab}")

    # ---- derived quantities (never stored, so they cannot disagree with the options) ----

    @property
    def vision_grid_size(self) -> int:
        """Side of the ViT's square patch grid: 27 for so400m-patch14-384."""
        vision = self.vision_config
        if vision.model_type == "siglip2_vision_model":  # NaFlex: a patch budget, no image size
            return math.isqrt(vision.num_patches)
        return vision.image_size // vision.patch_size

    @property
    def image_size(self) -> int:
        """Side in pixels of the square frames the vision encoder takes."""
        return self.vision_grid_size * self.vision_config.patch_size

    @property
    def pooled_grid_size(self) -> int:
        return math.isqrt(self.tokens_per_frame)

    @property
    def tokens_after_media(self) -> int:
        """Learned tokens appended after each media item's frames (LLaVA-OV's newline)."""
        return 1 if self.media_newline else 0

    @property
    def use_dcal(self) -> bool:
        return self.use_v2v or self.use_t2v

    @property
    def dcal_layer_indices(self) -> list[int]:
        """Decoder layers that carry a DCAL: K-1, 2K-1, ... (empty when DCAL is off)."""
        if not self.use_dcal:
            return []
        k = self.dcal_every_k
        return list(range(k - 1, self.text_config.num_hidden_layers, k))

    @property
    def v2v_layer_indices(self) -> list[int]:
        """DCAL layers with a V2V block: all of them but the final decoder layer, whose V2V
        output nothing reads (unless `v2v_at_last_layer`)."""
        if not self.use_v2v:
            return []
        last = self.text_config.num_hidden_layers - 1
        return [i for i in self.dcal_layer_indices if i != last or self.v2v_at_last_layer]

    @property
    def num_vision_layers_used(self) -> int:
        """How many ViT encoder layers run: layers after the feature layer are never built."""
        n = self.vision_config.num_hidden_layers
        return self.vision_feature_layer if self.vision_feature_layer >= 0 else n + 1 + self.vision_feature_layer

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        return self.text_config

    def set_dtype(self, dtype: str) -> None:
        """Record the weights' dtype here and in both nested configs: a reader of the
        vision or text config alone (or a tool loading the LLM by itself) sees the dtype
        the weights are saved in, not the one the model was built with."""
        for config in (self, self.vision_config, self.text_config):
            config.dtype = dtype

    @classmethod
    def baseline(cls, vision_config: PretrainedConfig | dict, text_config: PretrainedConfig | dict, **kwargs: Any) -> "CrossLMMConfig":
        """LLaVA-OneVision's token layout on the CrossLMM code path: 196 tokens per frame,
        no DCAL. Used for like-for-like quality and cost comparisons."""
        kwargs = {"tokens_per_frame": 196, "use_v2v": False, "use_t2v": False, **kwargs}
        return cls(vision_config=vision_config, text_config=text_config, **kwargs)

    def to_llava_ov_compatible(self) -> "CrossLMMConfig":
        """LLaVA-OneVision's exact computation for videos: 2x2 bilinear pooling (27x27 ->
        14x14, no antialiasing) after the projector, one newline token per video, DCAL off."""
        options = self.to_dict()
        options.update(tokens_per_frame=math.ceil(self.vision_grid_size / 2) ** 2, pooling_mode="bilinear",
                       pooling_antialias=False, pool_after_projector=True, media_newline=True,
                       use_v2v=False, use_t2v=False)
        return CrossLMMConfig(**options)

    def to_crosslmm(self, tokens_per_frame: int = 9, **overrides: Any) -> "CrossLMMConfig":
        """The paper's CrossLMM layout (pool before projecting, g*g tokens, no newline,
        DCAL on) from any config, e.g. an imported LLaVA-OneVision: the start of stage 1."""
        options = self.to_dict()
        options.update(tokens_per_frame=tokens_per_frame, pooling_antialias=True, pool_after_projector=False,
                       media_newline=False, use_v2v=True, use_t2v=True)
        options.update(overrides)
        return CrossLMMConfig(**options)
