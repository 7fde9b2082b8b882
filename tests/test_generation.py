"""Caching and batching must not change answers: cached == recomputed, batch == alone."""

from __future__ import annotations

import pytest
import torch

from conftest import EOS, MEDIA, frames, tiny_model, set_gates

pytestmark = pytest.mark.lowest_bound  # also run on the lowest supported transformers (.ci/run)

PAD = 0


def _recompute_greedy(model, ids, pixel_values, media_num_frames, steps):
    """Greedy decoding with a full forward pass over the whole sequence at every step."""
    tokens, all_logits = ids, []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(tokens, pixel_values=pixel_values, media_num_frames=media_num_frames).logits[:, -1]
        all_logits.append(logits)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(all_logits, 1)


def test_cached_generation_equals_full_recomputation(model):
    ids = torch.tensor([[5, 6, MEDIA, 7, 8, 9]])
    px, nf = frames(4), torch.tensor([4])
    cached, cached_logits = model.generate(
        ids, pixel_values=px, media_num_frames=nf, max_new_tokens=12, eos_token_id=[], return_logits=True
    )
    recomputed, recomputed_logits = _recompute_greedy(model, ids, px, nf, 12)
    assert torch.equal(cached, recomputed)
    torch.testing.assert_close(cached_logits, recomputed_logits, atol=1e-5, rtol=1e-5)


def test_a_sink_and_wider_cross_attention_kv_keep_cached_generation_exact():
    """The sink's key and value are appended inside each call, not to the request's cache:
    a decode step must read them exactly as the full recomputation does."""
    model = tiny_model(cross_attention_sink=True, cross_attention_kv_heads=4)
    set_gates(model)
    block = model.language_model.model.layers[1].t2v
    assert block.k_proj.out_features == 4 * 16 and block.sink_value.shape == (4, 16)
    assert float(block.sink_value.abs().sum()) > 0
    ids, px, nf = torch.tensor([[5, 6, MEDIA, 7, 8, 9]]), frames(4), torch.tensor([4])
    cached, cached_logits = model.generate(
        ids, pixel_values=px, media_num_frames=nf, max_new_tokens=8, eos_token_id=[], return_logits=True
    )
    recomputed, recomputed_logits = _recompute_greedy(model, ids, px, nf, 8)
    assert torch.equal(cached, recomputed)
    torch.testing.assert_close(cached_logits, recomputed_logits, atol=1e-5, rtol=1e-5)
    plain = tiny_model(cross_attention_kv_heads=4)  # the same weights without the sink answer otherwise
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "sink" not in k})
    with torch.no_grad():
        full = model(torch.cat([ids, cached[:, ids.shape[1]:]], 1), pixel_values=px, media_num_frames=nf).logits
        without = plain(torch.cat([ids, cached[:, ids.shape[1]:]], 1), pixel_values=px, media_num_frames=nf).logits
    assert not torch.allclose(full, without, atol=1e-4)


def test_cross_attention_kv_is_computed_once_per_request_and_v2v_runs_at_prefill_only(model, monkeypatch):
    calls = {"v2v kv": 0, "t2v kv": 0, "v2v attend": 0, "t2v attend": 0}

    def count(key):
        def hook(*args, **kwargs):
            calls[key] += 1
        return hook

    for layer in model.decoder_layers:
        for kind in ("v2v", "t2v"):
            block = getattr(layer, kind, None)
            if block is not None:
                block.register_forward_hook(count(f"{kind} attend"))
                project = block.project_key_value
                monkeypatch.setattr(block, "project_key_value", lambda o, f=project, k=kind: (count(f"{k} kv")(), f(o))[1])
    ids = torch.tensor([[5, MEDIA, 7]])
    model.generate(ids, pixel_values=frames(2), media_num_frames=torch.tensor([2]), max_new_tokens=6, eos_token_id=[])
    layers, v2v_layers = len(model.config.dcal_layer_indices), len(model.config.v2v_layer_indices)
    assert calls["t2v kv"] == layers and calls["v2v kv"] == v2v_layers  # K/V at prefill only, never per decoded token
    assert calls["v2v attend"] == v2v_layers  # V2V: prefill only
    assert calls["t2v attend"] == layers * 6  # T2V: prefill + 5 decode steps


def _batch():
    """Left-padded batch: different prompt lengths, frame counts, two media, one text-only."""
    prompts = [
        [5, 6, MEDIA, 7, 8],
        [9, MEDIA, 10, 11, 12, 13, 14, MEDIA, 15],
        [16, 17, 18],
    ]
    num_frames = [[3], [1, 5], []]
    pixel = [frames(3, seed=1), frames(1, seed=2), frames(5, seed=3), None]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    px = torch.cat([pixel[0], pixel[1], pixel[2]])
    nf = torch.tensor([3, 1, 5])
    alone = [
        (torch.tensor([prompts[0]]), pixel[0], torch.tensor([3])),
        (torch.tensor([prompts[1]]), torch.cat([pixel[1], pixel[2]]), torch.tensor([1, 5])),
        (torch.tensor([prompts[2]]), None, None),
    ]
    return ids, mask, px, nf, alone, num_frames


def _assert_each_sample_as_alone(model, ids, mask, px, nf, alone):
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, pixel_values=px, media_num_frames=nf)
        assert torch.isfinite(batched.logits).all()
        for row, (a_ids, a_px, a_nf) in enumerate(alone):
            single = model(a_ids, pixel_values=a_px, media_num_frames=a_nf).logits[0]
            valid = batched.attention_mask[row].bool()
            torch.testing.assert_close(batched.logits[row][valid], single, atol=2e-5, rtol=1e-4)


def test_left_padded_batch_gives_each_sample_its_own_logits(model):
    ids, mask, px, nf, alone, _ = _batch()
    _assert_each_sample_as_alone(model, ids, mask, px, nf, alone)


def test_right_padded_batch_gives_each_sample_its_own_logits(model):
    ids, mask, px, nf, alone, _ = _batch()
    lengths = mask.sum(1)
    right_ids = torch.full_like(ids, PAD)
    right_mask = torch.zeros_like(mask)
    for row, n in enumerate(lengths.tolist()):  # move each row's tokens to the left
        right_ids[row, :n] = ids[row, -n:]
        right_mask[row, :n] = 1
    _assert_each_sample_as_alone(model, right_ids, right_mask, px, nf, alone)


def test_batched_generation_equals_generation_alone(model):
    ids, mask, px, nf, alone, _ = _batch()
    batched, batched_logits = model.generate(
        ids, attention_mask=mask, pixel_values=px, media_num_frames=nf, max_new_tokens=8, eos_token_id=[], return_logits=True
    )
    for row, (a_ids, a_px, a_nf) in enumerate(alone):
        single, single_logits = model.generate(
            a_ids, pixel_values=a_px, media_num_frames=a_nf, max_new_tokens=8, eos_token_id=[], return_logits=True
        )
        assert torch.equal(batched[row, ids.shape[1]:], single[0, a_ids.shape[1]:])
        torch.testing.assert_close(batched_logits[row], single_logits[0], atol=2e-5, rtol=1e-4)


def test_return_sequences_share_the_request_cache():
    model = tiny_model()
    set_gates(model)
    ids, px, nf = torch.tensor([[5, MEDIA, 6, 7]]), frames(3), torch.tensor([3])
    one, one_logits = model.generate(ids, pixel_values=px, media_num_frames=nf, max_new_tokens=6, eos_token_id=[], return_logits=True)
    # top_k=1 sampling is greedy decoding, run as 3 sequences over one shared side cache.
    three, three_logits = model.generate(
        ids, pixel_values=px, media_num_frames=nf, max_new_tokens=6, eos_token_id=[], num_return_sequences=3,
        do_sample=True, top_k=1, return_logits=True,
    )
    assert three.shape[0] == 3 and all(torch.equal(row, one[0]) for row in three)
    torch.testing.assert_close(three_logits, one_logits.expand_as(three_logits), atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_with_a_generator_and_stops_at_eos(model):
    ids, px, nf = torch.tensor([[5, MEDIA, 6]]), frames(2), torch.tensor([2])
    kwargs = dict(pixel_values=px, media_num_frames=nf, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, num_return_sequences=4)
    a = model.generate(ids, generator=torch.Generator().manual_seed(3), **kwargs)
    b = model.generate(ids, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a}) > 1  # samples differ from each other

    with torch.no_grad():  # force EOS as the likeliest token: generation stops after it, padding the rest
        model.language_model.lm_head.bias = torch.nn.Parameter(torch.zeros(128))
        model.language_model.lm_head.bias[EOS] = 1e4
    out = model.generate(ids, pixel_values=px, media_num_frames=nf, max_new_tokens=10)
    assert out.shape[1] == ids.shape[1] + 1 and out[0, -1] == EOS
