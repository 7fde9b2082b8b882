"""Named model shapes: the paper's CrossLMM-2B/7B and reduced shapes for CPU work.

A preset is a config, not weights: `crosslmm-2b` has SigLIP so400m-patch14-384 and
Qwen2.5-1.5B-Instruct shapes and builds (on the meta device, instantly) a model whose
parameter counts can be checked against the paper; `reduced` keeps the real visual token
geometry (384 px, patch 14, 27x27 = 729 tokens per frame) at a width a 2-core CPU can
run, so token-count effects are measured at their real size.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2Config, SiglipVisionConfig

from crosslmm.model.configuration import CrossLMMConfig

SIGLIP_SO400M_384 = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
)
QWEN25_15B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
)
QWEN25_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
)
REDUCED_VISION = dict(
    hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
    image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
)
REDUCED_TEXT = dict(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    vocab_size=8192, max_position_embeddings=65536, rope_theta=1000000.0, rms_norm_eps=1e-6, eos_token_id=2,
)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=4)
TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=4096, eos_token_id=2,
)

# The synthetic world's models (docs/synthetic.md): 64 px frames, 8 px patches -> an 8x8
# grid of 64 original tokens per frame; an 8-layer LLM so that K = 1, 2, 4, 8 all exist.
SMALL_VISION = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8)
SMALL_TEXT = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=4096, eos_token_id=2,
)

PRESETS: dict[str, tuple[dict, dict]] = {
    "crosslmm-2b": (SIGLIP_SO400M_384, QWEN25_15B),
    "crosslmm-7b": (SIGLIP_SO400M_384, QWEN25_7B),
    "reduced": (REDUCED_VISION, REDUCED_TEXT),
    "small": (SMALL_VISION, SMALL_TEXT),
    "tiny": (TINY_VISION, TINY_TEXT),
}


def preset_config(name: str, **overrides: Any) -> CrossLMMConfig:
    """The CrossLMMConfig of a preset (paper defaults: 9 tokens per frame, K = 4), with
    any CrossLMMConfig option overridden. The media placeholder is the last vocabulary
    id, an unused padding slot in Qwen2.5's embedding table."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    vision, text = PRESETS[name]
    kwargs: dict[str, Any] = {"media_token_id": text["vocab_size"] - 1, **overrides}
    if name == "small":
        kwargs.setdefault("tokens_per_frame", 1)
        kwargs.setdefault("dcal_every_k", 2)
    if name == "tiny":
        kwargs.setdefault("tokens_per_frame", 4)
        kwargs.setdefault("dcal_every_k", 2)
    return CrossLMMConfig(SiglipVisionConfig(**vision), Qwen2Config(**text), **kwargs)
