"""Bad input fails loudly, naming the problem, and never truncates silently."""

from __future__ import annotations

import pytest
import torch

from conftest import MEDIA, frames, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_more_placeholders_than_media(model):
    ids = torch.tensor([[5, MEDIA, 6, MEDIA]])
    with pytest.raises(ValueError, match=r"2 media placeholder\(s\).*1 media item"):
        model(ids, pixel_values=frames(2), media_num_frames=torch.tensor([2]))


def test_media_without_placeholder(model):
    with pytest.raises(ValueError, match=r"0 media placeholder\(s\).*1 media item"):
        model(torch.tensor([[5, 6]]), pixel_values=frames(2), media_num_frames=torch.tensor([2]))


def test_placeholder_without_media(model):
    with pytest.raises(ValueError, match=r"1 media placeholder\(s\).*0 media item"):
        model(torch.tensor([[5, MEDIA]]))


def test_frame_count_disagrees_with_media_num_frames(model):
    with pytest.raises(ValueError, match="adds up to 3"):
        model(torch.tensor([[5, MEDIA]]), pixel_values=frames(2), media_num_frames=torch.tensor([3]))


def test_media_num_frames_is_required_with_frames(model):
    with pytest.raises(ValueError, match="media_num_frames"):
        model(torch.tensor([[5, MEDIA]]), pixel_values=frames(2))


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 28, 28, 3), (3, 28, 28)])
def test_wrong_frame_tensor_shape(model, shape):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_frames, 3, 28, 28\)"):
        model(torch.tensor([[5, MEDIA]]), pixel_values=torch.zeros(shape), media_num_frames=torch.tensor([shape[0]]))


def test_wrong_vision_feature_shape(model):
    with pytest.raises(ValueError, match="vision_features must have shape"):
        model(torch.tensor([[5, MEDIA]]), vision_features=torch.zeros(2, 50, 32), media_num_frames=torch.tensor([2]))


def test_sequence_longer_than_context_after_splicing(model):
    # 512-token context; 130 frames x 4 tokens = 520 visual tokens.
    ids = torch.tensor([[5, MEDIA, 6, 7]])
    with pytest.raises(ValueError, match=r"sample 0 is 523 tokens long after splicing .*context of 512"):
        model(ids, vision_features=torch.zeros(130, 49, 32), media_num_frames=torch.tensor([130]))


def test_zero_frame_media_item(model):
    with pytest.raises(ValueError, match="at least one frame"):
        model(torch.tensor([[5, MEDIA]]), vision_features=torch.zeros(0, 49, 32), media_num_frames=torch.tensor([0]))


def test_media_in_a_decode_step(model):
    out = model.generate(torch.tensor([[5, MEDIA]]), pixel_values=frames(1), media_num_frames=torch.tensor([1]), max_new_tokens=1)
    assert out.shape == (1, 3)
    prefill = model(torch.tensor([[5, MEDIA]]), pixel_values=frames(1), media_num_frames=torch.tensor([1]), use_cache=True)
    with pytest.raises(ValueError, match="only be passed with the prompt"):
        model(torch.tensor([[6]]), attention_mask=torch.ones(1, prefill.attention_mask.shape[1] + 1, dtype=torch.long),
              cache=prefill.cache, cross_attention_cache=prefill.cross_attention_cache,
              pixel_values=frames(1), media_num_frames=torch.tensor([1]))


def test_decode_step_without_the_cross_attention_cache(model):
    prefill = model(torch.tensor([[5, MEDIA]]), pixel_values=frames(1), media_num_frames=torch.tensor([1]), use_cache=True)
    mask = torch.ones(1, prefill.attention_mask.shape[1] + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="needs the cross_attention_cache"):
        model(torch.tensor([[6]]), attention_mask=mask, cache=prefill.cache)


def test_text_only_prompt_still_hands_out_a_cross_attention_cache(model):
    out = model(torch.tensor([[5, 6, 7]]), use_cache=True)
    assert out.cross_attention_cache is not None and not out.cross_attention_cache.has_media
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, eos_token_id=[]).shape == (1, 6)


def test_generate_argument_errors(model):
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="identical copies"):
        model.generate(ids, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences must be >= 1"):
        model.generate(ids, num_return_sequences=0, do_sample=True)
    assert model.generate(ids, max_new_tokens=2, eos_token_id=torch.tensor(2)).shape[0] == 1


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(dcal_every_k=5), "leaves no DCAL layer"),
        (dict(media_token_id=500), "outside the LLM's vocabulary"),
        (dict(tokens_per_frame=8), "square number"),
        (dict(tokens_per_frame=64), "larger than the vision encoder"),
        (dict(pooling_mode="max"), "pooling_mode"),
        (dict(v2v_scope="clip"), "v2v_scope"),
        (dict(dcal_every_k=0), "dcal_every_k"),
        (dict(vision_feature_layer=7), "vision_feature_layer"),
    ],
)
def test_bad_config_options(option, message):
    from conftest import tiny_config

    with pytest.raises(ValueError, match=message):
        tiny_config(**option)
