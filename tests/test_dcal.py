"""The cross-attentions attend where method.md says and nowhere else; gradients are right."""

from __future__ import annotations

import types

import pytest
import torch

from conftest import MEDIA, frames, set_gates, tiny_model
from crosslmm import compat
from crosslmm.bench.flops import flop_counter
from crosslmm.model.dcal import DCALContext, DCALDecoderLayer
from crosslmm.model.splice import build_layout


def test_dcal_sits_every_k_layers_and_keeps_llm_weight_names():
    model = tiny_model(dcal_every_k=2)
    kinds = [type(layer).__name__ for layer in model.decoder_layers]
    assert kinds == ["Qwen2DecoderLayer", "DCALDecoderLayer", "Qwen2DecoderLayer", "DCALDecoderLayer"]
    names = {n for n, _ in model.named_parameters()}
    for layer in (0, 1):  # a plain and a DCAL layer have the same pretrained names
        assert f"language_model.model.layers.{layer}.self_attn.q_proj.weight" in names
        assert f"language_model.model.layers.{layer}.mlp.gate_proj.weight" in names
    assert "language_model.model.layers.1.v2v.gate" in names and "language_model.model.layers.1.t2v.gate" in names
    assert not any(".v2v." in n or ".t2v." in n for n in names if ".layers.0." in n or ".layers.2." in n)


def test_text_before_a_media_item_is_unaffected_by_it(model):
    """T2V media causality: two videos in one prompt; changing the second changes nothing
    before it, and text before the first video has no cross-attention update at all."""
    ids = torch.tensor([[5, 6, MEDIA, 7, 8, 9, MEDIA, 10, 11]])
    nf = torch.tensor([2, 3])
    first, second = frames(2, seed=1), frames(3, seed=2)
    with torch.no_grad():
        a = model(ids, pixel_values=torch.cat([first, second]), media_num_frames=nf).logits
        b = model(ids, pixel_values=torch.cat([first, frames(3, seed=9)]), media_num_frames=nf).logits
    g2 = model.config.tokens_per_frame
    second_start = 2 + 2 * g2 + 3  # [5, 6] + video 1 + [7, 8, 9]
    torch.testing.assert_close(a[0, :second_start], b[0, :second_start], atol=1e-6, rtol=0)
    assert not torch.allclose(a[0, second_start:], b[0, second_start:], atol=1e-4)

    # Text before any media: identical to a model whose cross-attentions are all closed.
    closed = tiny_model()
    with torch.no_grad():
        c = closed(ids, pixel_values=torch.cat([first, second]), media_num_frames=nf).logits
    assert torch.equal(a[0, :2], c[0, :2])


def _v2v_update(layer: DCALDecoderLayer, model, pixel_values, nf, ids):
    """The V2V update a DCAL layer adds, with T2V switched off for the measurement."""
    with torch.no_grad():
        pooled, originals = model.encode_media(pixel_values)
        layout = build_layout(ids, None, None, nf, media_token_id=MEDIA, pooled_tokens_per_frame=model.config.tokens_per_frame,
                              v2v_scope=model.config.v2v_scope, max_length=None, padding_side="right")
        hidden = torch.randn(1, layout.length, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
        ctx = DCALContext(originals, originals.shape[1], layout.v2v, None)
        return (layer.cross_attend(hidden, ctx) - hidden)[0, layout.visual_target]


def test_v2v_frame_scope_is_frame_local_and_video_scope_is_not():
    ids, nf = torch.tensor([[5, MEDIA, 6]]), torch.tensor([4])
    changed = frames(4, seed=1).clone()
    changed[2] = frames(1, seed=7)[0]
    g2 = 4
    for scope in ("frame", "video"):
        model = tiny_model(v2v_scope=scope)
        set_gates(model)
        layer = model.decoder_layers[1]
        a = _v2v_update(layer, model, frames(4, seed=1), nf, ids).view(4, g2, -1)
        b = _v2v_update(layer, model, changed, nf, ids).view(4, g2, -1)
        assert not torch.allclose(a[2], b[2], atol=1e-5)  # the changed frame moves
        others_equal = torch.allclose(a[[0, 1, 3]], b[[0, 1, 3]], atol=1e-6, rtol=0)
        assert others_equal == (scope == "frame"), scope


@pytest.mark.parametrize("init", ["zero_gate", "zero_output"])
def test_what_gets_gradient_through_a_closed_cross_attention_at_construction(init):
    """zero_gate (the paper's): only the gates get gradient, the deadlock of
    docs/architecture.md. zero_output (our default): o_proj gets gradient (the block can
    start learning at once) and the gates get none until o_proj has moved."""
    model = tiny_model(cross_attention_init=init).train()
    ids = torch.tensor([[5, MEDIA, 6, 7, 8]])
    loss = model(ids, pixel_values=frames(2), media_num_frames=torch.tensor([2]), labels=ids).loss
    loss.backward()
    learning = ".gate" if init == "zero_gate" else ".o_proj.weight"
    got = set()
    for name, param in model.named_parameters():
        if ".v2v." in name or ".t2v." in name:
            moving = param.grad is not None and bool(torch.count_nonzero(param.grad))
            assert moving == name.endswith(learning), name
            got |= {"v2v" if ".v2v." in name else "t2v"} if moving else set()
    assert got == {"v2v", "t2v"}


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool):
        model = tiny_model().train()
        set_gates(model)
        if checkpointing:
            compat.enable_activation_checkpointing(model)
        ids = torch.tensor([[5, MEDIA, 6, 7, 8, 9], [10, 11, MEDIA, 12, 13, 14]])
        labels = ids.masked_fill(ids == MEDIA, -100)
        model(ids, pixel_values=frames(5), media_num_frames=torch.tensor([2, 3]), labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert all(torch.isfinite(g).all() for g in plain.values())
    assert plain.keys() == checkpointed.keys()
    assert any(".t2v." in n for n in plain) and any(".v2v." in n for n in plain) and any("projector" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def _cross_attention_flops(model, num_frames: int) -> int:
    ids = torch.tensor([[5, 6, MEDIA, 7, 8]])
    with torch.no_grad():
        _, originals = model.encode_media(frames(num_frames))
        layout = build_layout(ids, None, None, torch.tensor([num_frames]), media_token_id=MEDIA,
                              pooled_tokens_per_frame=4, v2v_scope=model.config.v2v_scope, max_length=None, padding_side="right")
        hidden = torch.randn(1, layout.length, 64)
        ctx = DCALContext(originals, originals.shape[1], layout.v2v, None)
        with flop_counter() as counter:
            model.decoder_layers[1].cross_attend(hidden, ctx)
    return counter.get_total_flops()


def test_v2v_cost_grows_linearly_with_frames_in_frame_scope():
    frame_scope, video_scope = tiny_model(v2v_scope="frame"), tiny_model(v2v_scope="video")
    f8, f16 = _cross_attention_flops(frame_scope, 8), _cross_attention_flops(frame_scope, 16)
    assert f16 == 2 * f8
    v8, v16 = _cross_attention_flops(video_scope, 8), _cross_attention_flops(video_scope, 16)
    assert v16 > 2.5 * v8  # the attention term is quadratic in frames


def test_loss_is_next_token_cross_entropy_on_answer_tokens_only():
    model = tiny_model()
    set_gates(model)
    ids = torch.tensor([[5, 6, MEDIA, 7, 8, 9, 10]])
    labels = torch.full_like(ids, -100)
    labels[0, 5:] = ids[0, 5:]  # the "answer": tokens 9 and 10
    out = model(ids, pixel_values=frames(2), media_num_frames=torch.tensor([2]), labels=labels)
    # After expansion the answer tokens sit at the last two positions; each is predicted by the one before.
    logits = out.logits[0]
    expected = torch.nn.functional.cross_entropy(logits[-3:-1], torch.tensor([9, 10]))
    torch.testing.assert_close(out.loss, expected)
    assert (out.labels[0, :-2] == -100).all() and out.labels[0, -2:].tolist() == [9, 10]


@pytest.mark.parametrize("v2v_scope", ["frame", "video"])
def test_a_batch_mixing_images_videos_and_text_attends_without_padded_keys(monkeypatch, v2v_scope):
    """Stage 2's mixture in one batch: an image (1 frame), a 4-frame video, a text-only
    sample. Each sample's logits equal the sample alone, and no cross-attention call
    attends over more frames than its own sample has (no padded keys, so no mask)."""
    import crosslmm.model.cross_attention as cross_attention

    model = tiny_model(v2v_scope=v2v_scope)
    set_gates(model)
    samples = [(torch.tensor([5, MEDIA, 6, 7, 8]), frames(1, seed=3)),
               (torch.tensor([5, 6, MEDIA, 7]), frames(4, seed=4)),
               (torch.tensor([9, 10, 11]), None)]
    with torch.no_grad():
        alone = [model(ids[None], pixel_values=pixels, media_num_frames=torch.tensor([] if pixels is None else
                                                                                      [len(pixels)], dtype=torch.long)
                       ).logits[0] for ids, pixels in samples]
    width = max(len(ids) for ids, _ in samples)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, (sample, _) in enumerate(samples):
        ids[row, :len(sample)], mask[row, :len(sample)] = sample, 1
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        calls.append((key.shape[2], attn_mask is not None))
        return real(query, key, value, attn_mask=attn_mask, **kwargs)

    # The cross-attentions' calls only (the LLM's self-attention uses the same function).
    monkeypatch.setattr(cross_attention, "F", types.SimpleNamespace(scaled_dot_product_attention=recording))
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, pixel_values=torch.cat([samples[0][1], samples[1][1]]),
                        media_num_frames=torch.tensor([1, 4])).logits
    for row, logits in enumerate(alone):
        torch.testing.assert_close(batched[row, :len(logits)], logits, atol=1e-5, rtol=1e-4)
    n = model.vision_tower.original_tokens_per_frame
    assert calls and {keys for keys, _ in calls} <= {n, 4 * n} and not any(masked for _, masked in calls)
