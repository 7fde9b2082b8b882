"""Tiny models of the real transformers classes, shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
    Siglip2VisionConfig,
    SiglipVisionConfig,
)

from crosslmm import CrossLMMConfig, CrossLMMForCausalLM

MEDIA = 127  # media placeholder id in the tiny vocabularies
EOS = 2

VISION = {
    "siglip": lambda: SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=4
    ),
    "siglip2": lambda: Siglip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_patches=49, patch_size=4
    ),
    "clip": lambda: CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=4,
        projection_dim=32,
    ),
}
_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=512, eos_token_id=EOS, pad_token_id=0,
)
TEXT = {
    "qwen2": lambda: Qwen2Config(**_TEXT),
    "qwen3": lambda: Qwen3Config(head_dim=16, **_TEXT),
    "llama": lambda: LlamaConfig(**_TEXT),
}


def tiny_config(vision: str = "siglip", text: str = "qwen2", **overrides) -> CrossLMMConfig:
    options = {"media_token_id": MEDIA, "tokens_per_frame": 4, "dcal_every_k": 2, **overrides}
    return CrossLMMConfig(VISION[vision](), TEXT[text](), **options)


def tiny_model(vision: str = "siglip", text: str = "qwen2", seed: int = 0, **overrides) -> CrossLMMForCausalLM:
    torch.manual_seed(seed)
    return CrossLMMForCausalLM(tiny_config(vision, text, **overrides)).eval()


def set_gates(model: CrossLMMForCausalLM, seed: int = 1) -> None:
    """Open every cross-attention block so it matters, as training would: a distinct
    non-zero gate each, a random `o_proj` (a fresh block's is zero by default) and, where
    there is one, a random attention sink (it starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gate"):
                param.copy_(torch.rand(1, generator=generator) * 1.5 + 0.5)
            elif name.endswith("2v.o_proj.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif name.endswith((".sink_key", ".sink_value")):
                param.copy_(torch.randn(param.shape, generator=generator))


def closed_blocks(model: CrossLMMForCausalLM) -> list[str]:
    """Names of the cross-attention blocks that add exactly zero at the moment: a zero
    gate (`zero_gate` init) or a zero `o_proj` (`zero_output` init). Asserting that every
    block is in it is how the tests say "closed", for either init."""
    from crosslmm.model.cross_attention import GatedCrossAttention

    return [
        name for name, module in model.named_modules()
        if isinstance(module, GatedCrossAttention)
        and (module.gate.item() == 0.0 or not torch.count_nonzero(module.o_proj.weight))
    ]


def cross_attention_blocks(model: CrossLMMForCausalLM) -> list[str]:
    from crosslmm.model.cross_attention import GatedCrossAttention

    return [name for name, module in model.named_modules() if isinstance(module, GatedCrossAttention)]


def frames(num: int, seed: int = 0, size: int = 28) -> torch.Tensor:
    return torch.randn(num, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model() -> CrossLMMForCausalLM:
    m = tiny_model()
    set_gates(m)
    return m
