"""A fresh CrossLMM computes exactly what the pooled-only model and the stock LLM compute."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import MEDIA, frames, set_gates, tiny_config, tiny_model
from crosslmm import CrossLMMForCausalLM

pytestmark = pytest.mark.lowest_bound  # also run on the lowest supported transformers (.ci/run)


def _inputs():
    ids = torch.tensor([[5, 6, 7, MEDIA, 8, 9, 10, 11]])
    return dict(input_ids=ids, pixel_values=frames(3), media_num_frames=torch.tensor([3]))


@pytest.mark.parametrize("text", ["qwen2", "qwen3", "llama"])
def test_zero_gates_equal_pooled_only_model_exactly(text):
    crosslmm = tiny_model(text=text)
    pooled_only = CrossLMMForCausalLM(tiny_config(text=text, use_v2v=False, use_t2v=False)).eval()
    missing, unexpected = pooled_only.load_state_dict(crosslmm.state_dict(), strict=False)
    assert not missing and all(".v2v." in k or ".t2v." in k for k in unexpected) and unexpected

    with torch.no_grad():
        a = crosslmm(**_inputs()).logits
        b = pooled_only(**_inputs()).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("text", ["qwen2", "qwen3", "llama"])
def test_llm_part_equals_the_unmodified_transformers_decoder(text):
    """Same LLM weights in the stock transformers class, fed the same spliced embeddings."""
    crosslmm = tiny_model(text=text)
    stock = AutoModelForCausalLM.from_config(crosslmm.config.text_config).eval()
    stock_state = {k.removeprefix("language_model."): v for k, v in crosslmm.state_dict().items()
                   if k.startswith("language_model.") and ".v2v." not in k and ".t2v." not in k}
    stock.load_state_dict(stock_state, strict=True)

    inputs = _inputs()
    with torch.no_grad():
        spliced = crosslmm._prefill_inputs(
            inputs["input_ids"], None, None, inputs["pixel_values"], inputs["media_num_frames"], None,
            use_cache=False, padding_side=None,
        )
        ours = crosslmm(**inputs).logits
        theirs = stock(inputs_embeds=spliced.embeds, attention_mask=spliced.attention_mask,
                       position_ids=spliced.position_ids).logits
    assert torch.equal(ours, theirs)


def test_text_only_input_is_the_stock_llm_even_with_open_gates():
    crosslmm = tiny_model()
    set_gates(crosslmm)
    stock = AutoModelForCausalLM.from_config(crosslmm.config.text_config).eval()
    stock.load_state_dict({k.removeprefix("language_model."): v for k, v in crosslmm.state_dict().items()
                           if k.startswith("language_model.") and ".v2v." not in k and ".t2v." not in k})
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(crosslmm(ids).logits, stock(ids).logits)


def test_open_gates_change_the_output():
    """Guards the tests above against a DCAL that silently never runs."""
    crosslmm = tiny_model()
    with torch.no_grad():
        closed = crosslmm(**_inputs()).logits
        set_gates(crosslmm)
        opened = crosslmm(**_inputs()).logits
    assert not torch.allclose(closed, opened, atol=1e-4)
    assert torch.isfinite(opened).all()


def test_loss_at_label_positions_only_equals_the_full_loss(model):
    """Training computes the LM head and the cross-entropy only where a label is
    predicted; the loss and its gradients are those of the full computation."""
    torch.manual_seed(3)
    ids = torch.tensor([[11, 12, MEDIA, 13, 14, 15, 16], [11, MEDIA, 21, 22, 23, 24, 25]])
    labels = torch.full_like(ids, -100)
    labels[0, 5:] = ids[0, 5:]
    labels[1, 4:] = ids[1, 4:]
    px = frames(4)
    nf = torch.tensor([2, 2])
    model.zero_grad()
    full = model(ids, pixel_values=px, media_num_frames=nf, labels=labels)
    full.loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    kept = model(ids, pixel_values=px, media_num_frames=nf, labels=labels, logits_to_keep="labels")
    kept.loss.backward()
    torch.testing.assert_close(kept.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert kept.logits.shape[1] < full.logits.shape[1] // 2  # the visual positions got no LM head
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        model(ids, pixel_values=px, media_num_frames=nf, logits_to_keep="labels")
