"""Vision towers, pooling, presets and the supported dependency range."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from conftest import MEDIA, VISION, frames, set_gates, tiny_config, tiny_model
from crosslmm import CrossLMMForCausalLM
from crosslmm.model.pooling import pool_frames
from crosslmm.model.vision import VisionTower
from crosslmm.presets import preset_config


@pytest.mark.parametrize("vision", ["siglip", "siglip2", "clip"])
def test_every_supported_vision_encoder_runs_end_to_end(vision):
    model = tiny_model(vision=vision)
    set_gates(model)
    ids = torch.tensor([[5, MEDIA, 6]])
    out = model.generate(ids, pixel_values=frames(3), media_num_frames=torch.tensor([3]), max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, 6)


@pytest.mark.parametrize("vision", ["siglip", "siglip2", "clip"])
def test_features_are_the_full_encoders_second_to_last_hidden_state(vision):
    """The truncated tower must compute exactly what LLaVA-OneVision reads from the full one."""
    config = tiny_config(vision=vision)
    torch.manual_seed(0)
    full = AutoModel.from_config(config.vision_config).eval()
    tower = VisionTower(config).eval()
    missing, unexpected = tower.vit.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    px = frames(2)
    with torch.no_grad():
        ours = tower(px)
        if vision == "siglip2":
            grid, patch = 7, 4
            patches = px.reshape(2, 3, grid, patch, grid, patch).permute(0, 2, 4, 3, 5, 1).reshape(2, grid * grid, -1)
            hidden = full(pixel_values=patches, pixel_attention_mask=torch.ones(2, 49, dtype=torch.long),
                          spatial_shapes=torch.tensor([[7, 7], [7, 7]]), output_hidden_states=True).hidden_states[-2]
        else:
            hidden = full(pixel_values=px, output_hidden_states=True).hidden_states[-2]
            if vision == "clip":
                hidden = hidden[:, 1:]
    assert ours.shape == (2, 49, 32)
    torch.testing.assert_close(ours, hidden, atol=1e-6, rtol=1e-6)


def test_siglip2_patch_order_matches_its_image_processor():
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    image = torch.randn(3, 28, 28)
    theirs = torch.from_numpy(convert_image_to_patches(image.numpy(), 4))
    ours = image.reshape(1, 3, 7, 4, 7, 4).permute(0, 2, 4, 3, 5, 1).reshape(49, -1)
    assert torch.equal(ours, theirs)


def test_chunked_encoding_does_not_change_features():
    a, b = tiny_config(vision_chunk_size=1), tiny_config(vision_chunk_size=64)
    torch.manual_seed(0)
    tower_a = VisionTower(a).eval()
    tower_b = VisionTower(b).eval()
    tower_b.load_state_dict(tower_a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(tower_a(frames(5)), tower_b(frames(5)), atol=1e-6, rtol=1e-6)


def test_pooling_modes():
    features = torch.arange(2 * 27 * 27 * 4, dtype=torch.float32).reshape(2, 729, 4)
    average = pool_frames(features, 27, 3, "average")
    assert average.shape == (2, 9, 4)
    blocks = features.view(2, 3, 9, 3, 9, 4).mean(dim=(2, 4)).reshape(2, 9, 4)
    torch.testing.assert_close(average, blocks)
    one = pool_frames(features, 27, 1, "bilinear", antialias=True)
    torch.testing.assert_close(one[:, 0], features.mean(1), atol=1e-3, rtol=1e-4)  # a linear ramp: the mean
    centre = pool_frames(features, 27, 1, "bilinear", antialias=False)
    torch.testing.assert_close(centre[:, 0], features[:, 13 * 27 + 13])  # why antialias is the default
    assert pool_frames(features, 27, 14, "bilinear", antialias=False).shape == (2, 196, 4)  # LLaVA-OV layout
    assert pool_frames(features, 27, 27, "bilinear") is features


def test_dcal_layers_of_the_paper_shapes():
    config = preset_config("crosslmm-2b")
    assert config.dcal_layer_indices == [3, 7, 11, 15, 19, 23, 27]
    assert preset_config("crosslmm-2b", dcal_every_k=8).dcal_layer_indices == [7, 15, 23]
    assert preset_config("crosslmm-2b", use_v2v=False, use_t2v=False).dcal_layer_indices == []
    assert config.vision_grid_size == 27 and config.num_vision_layers_used == 26


def test_2b_stage1_trainable_parameters_match_the_paper_on_the_meta_device():
    from crosslmm import CrossLMMForCausalLM

    with torch.device("meta"):
        model = CrossLMMForCausalLM(preset_config("crosslmm-2b", v2v_at_last_layer=True))  # the paper's layout
    count = lambda key: sum(p.numel() for n, p in model.named_parameters() if key in n)  # noqa: E731
    v2v, projector = count(".v2v."), count("projector.")
    assert 5.4e6 < v2v / 7 < 5.6e6  # one V2V block, method.md: about 5.5 M
    assert 4.0e6 < projector < 4.2e6
    assert 42e6 < v2v + projector < 44e6  # the paper's Table 3: ~43 M trainable in stage 1


def test_no_v2v_block_at_the_final_layer_unless_asked():
    """Its update would reach nothing: no later layer reads the visual positions."""
    from crosslmm import CrossLMMForCausalLM

    config = tiny_config()  # 4 layers, K = 2: DCALs at 1 and 3
    model = CrossLMMForCausalLM(config)
    assert config.dcal_layer_indices == [1, 3] and config.v2v_layer_indices == [1]
    assert model.decoder_layers[3].v2v is None and model.decoder_layers[3].t2v is not None
    assert tiny_config(v2v_at_last_layer=True).v2v_layer_indices == [1, 3]
    with pytest.raises(ValueError, match="read by nothing"):
        tiny_config(dcal_every_k=4, use_t2v=False)


def test_baseline_is_the_same_code_path_without_dcal():
    from crosslmm import CrossLMMConfig, CrossLMMForCausalLM

    config = CrossLMMConfig.baseline(VISION["siglip"]().to_dict() | {"image_size": 56}, tiny_config().text_config, media_token_id=MEDIA)
    model = CrossLMMForCausalLM(config).eval()
    assert config.tokens_per_frame == 196 and not config.use_dcal
    assert not any(".v2v." in n or ".t2v." in n for n, _ in model.named_parameters())
    with torch.no_grad():
        out = model(torch.tensor([[5, MEDIA, 6]]), pixel_values=frames(2, size=56), media_num_frames=torch.tensor([2]))
    assert out.logits.shape == (1, 2 * 196 + 2, 128)


def test_chunked_projection_without_autograd_equals_the_plain_projection():
    model = tiny_model(vision_chunk_size=2)
    features = torch.randn(5, 49, 32)
    plain = model.projector(features)
    with torch.no_grad():
        chunked = model.project_frames(features)
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)
    assert model.project_frames(features).requires_grad  # with autograd: the plain path


def test_a_temporal_embedding_starts_at_zero_loads_into_an_old_checkpoint_and_bounds_frames(tmp_path):
    """`temporal_embedding_frames` added to a checkpoint saved without it (what a recipe's
    model_overrides does) starts adding exactly nothing; once trained it changes what the
    cross-attentions read; a video longer than the table is refused, not silently clamped."""
    from crosslmm import CrossLMMConfig, CrossLMMForCausalLM
    from crosslmm.model.modeling import frame_index_in_media, parameter_part

    assert frame_index_in_media(torch.tensor([3, 2])).tolist() == [0, 1, 2, 0, 1]
    model = tiny_model()
    set_gates(model)  # open blocks: the embedding would show at once if it were not zero
    model.save_pretrained(tmp_path)
    config = CrossLMMConfig(**{**model.config.to_dict(), "temporal_embedding_frames": 4})
    marked = CrossLMMForCausalLM.from_pretrained(tmp_path, config=config).eval()
    assert parameter_part("temporal_embedding") == "projector"
    assert torch.equal(marked.temporal_embedding, torch.zeros(4, config.text_config.hidden_size))
    ids, px, counts = torch.tensor([[5, MEDIA, 6, 7]]), frames(3), torch.tensor([3])
    with torch.no_grad():
        before = model.eval()(ids, pixel_values=px, media_num_frames=counts).logits
        torch.testing.assert_close(marked(ids, pixel_values=px, media_num_frames=counts).logits, before)
        marked.temporal_embedding.normal_()
        assert not torch.allclose(marked(ids, pixel_values=px, media_num_frames=counts).logits, before)
        with pytest.raises(ValueError, match="more than the 4 this model's temporal embedding knows"):
            marked(ids, pixel_values=frames(5), media_num_frames=torch.tensor([5]))
    with pytest.raises(ValueError, match="no DCAL"):
        tiny_config(use_v2v=False, use_t2v=False, temporal_embedding_frames=4)


def test_a_spatial_embedding_loads_into_an_old_checkpoint_and_a_positive_std_gives_distinct_codes(tmp_path):
    """`spatial_embedding` (one row per patch position) added to a checkpoint saved
    without it starts at zero by default, so the loaded model computes what it did;
    with `identity_embedding_std` > 0 both identity tables start as distinct random codes,
    which changes what trained blocks read, and a saved table is loaded, not redrawn."""
    from crosslmm import CrossLMMConfig, CrossLMMForCausalLM
    from crosslmm.model.modeling import parameter_part

    model = tiny_model()
    set_gates(model)
    model.save_pretrained(tmp_path / "old")
    ids, px, counts = torch.tensor([[5, MEDIA, 6, 7]]), frames(3), torch.tensor([3])
    with torch.no_grad():
        before = model.eval()(ids, pixel_values=px, media_num_frames=counts).logits
    zero = CrossLMMConfig(**{**model.config.to_dict(), "spatial_embedding": True})
    marked = CrossLMMForCausalLM.from_pretrained(tmp_path / "old", config=zero).eval()
    assert parameter_part("spatial_embedding") == "projector"
    assert marked.spatial_embedding.shape == (model.vision_tower.original_tokens_per_frame, zero.text_config.hidden_size)
    assert not marked.spatial_embedding.any()
    with torch.no_grad():
        torch.testing.assert_close(marked(ids, pixel_values=px, media_num_frames=counts).logits, before)

    coded = CrossLMMConfig(**{**model.config.to_dict(), "spatial_embedding": True, "temporal_embedding_frames": 4,
                              "identity_embedding_std": 0.5})
    drawn = CrossLMMForCausalLM.from_pretrained(tmp_path / "old", config=coded).eval()
    for table in (drawn.spatial_embedding, drawn.temporal_embedding):
        assert 0.4 < float(table.detach().std()) < 0.6
    with torch.no_grad():
        assert not torch.allclose(drawn(ids, pixel_values=px, media_num_frames=counts).logits, before)
    drawn.save_pretrained(tmp_path / "new")
    reloaded = CrossLMMForCausalLM.from_pretrained(tmp_path / "new").eval()
    assert torch.equal(reloaded.spatial_embedding, drawn.spatial_embedding)
    assert torch.equal(reloaded.temporal_embedding, drawn.temporal_embedding)
    with pytest.raises(ValueError, match="no DCAL"):
        tiny_config(use_v2v=False, use_t2v=False, spatial_embedding=True)
    with pytest.raises(ValueError, match="identity_embedding_std"):
        tiny_config(identity_embedding_std=-1.0)


def test_a_sincos_spatial_table_encodes_row_and_column_and_a_saved_one_is_not_redrawn(tmp_path):
    """`spatial_embedding_init="sincos"`: MAE's fixed 2-D table scaled to
    `identity_embedding_std`, its first half shared by the patches of a row and its
    second by those of a column (what makes a region one direction for a T2V query),
    every patch still distinct; a trained table is loaded as saved."""
    from crosslmm import CrossLMMConfig, CrossLMMForCausalLM
    from crosslmm.model.modeling import sincos_2d_table

    table = sincos_2d_table(4, 16)  # (16 patches, width 16)
    assert table.shape == (16, 16)
    torch.testing.assert_close(table.pow(2).mean(), torch.tensor(1.0))
    rows, cols = table[:, :8].view(4, 4, 8), table[:, 8:].view(4, 4, 8)  # (row, column, half)
    assert torch.equal(rows, rows[:, :1].expand_as(rows))  # the row half depends on the row only
    assert torch.equal(cols, cols[:1].expand_as(cols))  # the column half on the column only
    assert torch.cdist(table, table).add(torch.eye(16)).min() > 0.1  # distinct codes

    config = CrossLMMConfig(**{**tiny_model().config.to_dict(), "spatial_embedding": True, "identity_embedding_std": 0.5,
                               "spatial_embedding_init": "sincos"})
    model = CrossLMMForCausalLM(config)
    grid = config.vision_grid_size
    torch.testing.assert_close(model.spatial_embedding.detach(), 0.5 * sincos_2d_table(grid, model.spatial_embedding.shape[1]))
    with torch.no_grad():
        model.spatial_embedding.add_(1.0)  # as training would move it
    model.save_pretrained(tmp_path / "trained")
    reloaded = CrossLMMForCausalLM.from_pretrained(tmp_path / "trained")
    assert reloaded.config.spatial_embedding_init == "sincos"
    assert torch.equal(reloaded.spatial_embedding, model.spatial_embedding)
    with pytest.raises(ValueError, match="spatial_embedding_init"):
        tiny_config(spatial_embedding_init="learned")


def test_a_sink_loads_closed_into_a_checkpoint_without_one_and_kv_heads_must_divide(tmp_path):
    """A sink is new weights: loading a model trained without one starts it at zero (never
    uninitialised memory). A zero sink is still one more key, at logit 0: a fresh block adds
    nothing either way, but an open one trained without a sink reads a little less."""
    trained = tiny_model()
    set_gates(trained)
    trained.save_pretrained(tmp_path / "plain")
    with_sink = CrossLMMForCausalLM.from_pretrained(tmp_path / "plain", cross_attention_sink=True).eval()
    sinks = [p for n, p in with_sink.named_parameters() if "sink" in n]
    assert len(sinks) == 2 * 3 and all(not p.any() for p in sinks)  # layers 1 (V2V, T2V) and 3 (T2V)
    ids, px, counts = torch.tensor([[5, MEDIA, 6, 7]]), frames(2), torch.tensor([2])
    with torch.no_grad():
        before = trained(ids, pixel_values=px, media_num_frames=counts).logits
        after = with_sink(ids, pixel_values=px, media_num_frames=counts).logits
    assert torch.allclose(before, after, atol=0.5) and not torch.equal(before, after)
    # Its zeros draw no random numbers: a fresh model with a sink has every other tensor of
    # the same seed's model without one (a recipe's text stages stay bit for bit the same).
    fresh, fresh_with_sink = tiny_model(seed=3).state_dict(), tiny_model(seed=3, cross_attention_sink=True).state_dict()
    assert all(torch.equal(tensor, fresh_with_sink[name]) for name, tensor in fresh.items())
    with pytest.raises(ValueError, match="cross_attention_kv_heads=3"):
        tiny_config(cross_attention_kv_heads=3)
