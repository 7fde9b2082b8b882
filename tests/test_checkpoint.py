"""save_pretrained / from_pretrained keep every option and every weight, gates included."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import MEDIA, closed_blocks, cross_attention_blocks, frames, set_gates, tiny_config, tiny_model
from crosslmm import CrossLMMConfig, CrossLMMForCausalLM
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.lowest_bound  # also run on the lowest supported transformers (.ci/run)


def _logits(model):
    ids = torch.tensor([[5, MEDIA, 6, 7]])
    with torch.no_grad():
        return model(ids, pixel_values=frames(3), media_num_frames=torch.tensor([3])).logits


def test_round_trip_preserves_outputs_options_and_gates(tmp_path):
    model = tiny_model(tokens_per_frame=9, v2v_scope="video", pooling_mode="average", dcal_every_k=1, vision_chunk_size=2)
    set_gates(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "crosslmm" and saved["tokens_per_frame"] == 9 and saved["v2v_scope"] == "video"
    assert saved["text_config"]["model_type"] == "qwen2" and saved["vision_config"]["model_type"] == "siglip_vision_model"

    loaded = CrossLMMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.pooling_mode == "average" and loaded.config.dcal_every_k == 1
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(_logits(model), _logits(loaded))

    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # registered with the Auto classes
    assert isinstance(auto, CrossLMMForCausalLM) and torch.equal(_logits(auto), _logits(model))


def test_tied_embeddings_survive_the_round_trip(tmp_path):
    config = tiny_config()
    config.text_config.tie_word_embeddings = True
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = CrossLMMForCausalLM(config).eval()
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = CrossLMMForCausalLM.from_pretrained(tmp_path).eval()
    llm = loaded.language_model
    assert llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_logits(model), _logits(loaded))


def test_missing_cross_attention_weights_load_with_closed_gates(tmp_path):
    """Stage 1 trains without T2V; stage 2 loads that checkpoint with T2V on. The new
    blocks must start closed (the stage-1 model's outputs exactly), never at garbage."""
    stage1 = tiny_model(use_t2v=False)
    set_gates(stage1)
    stage1.save_pretrained(tmp_path)

    config = CrossLMMConfig.from_pretrained(tmp_path)
    config.use_t2v = True
    stage2 = CrossLMMForCausalLM.from_pretrained(tmp_path, config=config).eval()
    t2v = [n for n in cross_attention_blocks(stage2) if n.endswith(".t2v")]
    assert t2v and closed_blocks(stage2) == t2v  # new blocks closed; loaded V2V blocks not re-initialised
    loaded, reloaded = dict(stage1.named_parameters()), dict(stage2.named_parameters())
    assert all(torch.equal(loaded[n], p) for n, p in reloaded.items() if ".v2v." in n)
    assert torch.isfinite(torch.cat([p.flatten() for p in stage2.parameters()])).all()
    assert torch.equal(_logits(stage2), _logits(stage1))


def test_checkpoint_holds_only_safetensors_with_unchanged_llm_names(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.layers.1.self_attn.q_proj.weight" in keys
    assert "language_model.model.layers.1.v2v.q_proj.weight" in keys
    assert "projector.linear_1.weight" in keys and "vision_tower.vit.embeddings.patch_embedding.weight" in keys
