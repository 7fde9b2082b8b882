"""`crosslmm build`, `crosslmm import-llava-ov` and `crosslmm params` on real (tiny) checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from checkpoint_factory import make_llm, make_vision
from conftest import closed_blocks, cross_attention_blocks, frames
from crosslmm import CrossLMMForCausalLM
from crosslmm.cli import app

pytestmark = pytest.mark.lowest_bound  # also run on the lowest supported transformers (.ci/run)
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cli(*args: str):
    result = CliRunner().invoke(app, list(map(str, args)))
    return result


@pytest.mark.parametrize("vision, llm", [("siglip", "qwen2"), ("siglip2", "llama"), ("clip", "qwen2")])
def test_build_reload_forward_and_generate(tmp_path, vision, llm):
    vision_dir = make_vision(vision, tmp_path / "vision")
    llm_dir = make_llm(llm, tmp_path / "llm", tie=(llm == "qwen2"))
    out = tmp_path / "crosslmm"
    result = _cli("build", "--vision", vision_dir, "--llm", llm_dir, "--out", out, "--tokens-per-frame", "4", "--every-k", "2")
    assert result.exit_code == 0, result.output

    model = CrossLMMForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    media_id = tokenizer.convert_tokens_to_ids("<media>")
    assert model.config.media_token_id == media_id and model.config.tokens_per_frame == 4
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)  # resized for the new token

    # Pretrained weights arrived unchanged; new parts are fresh with closed gates.
    source_llm = AutoModelForCausalLM.from_pretrained(llm_dir)
    llm_state = model.language_model.state_dict()
    for key, value in source_llm.state_dict().items():
        if "embed_tokens" in key or "lm_head" in key:
            assert torch.equal(llm_state[key][: value.shape[0]], value), key
        else:
            assert torch.equal(llm_state[key], value), key
    source_vision = AutoModel.from_pretrained(vision_dir)
    vit_state = model.vision_tower.vit.state_dict()
    for key, value in source_vision.state_dict().items():
        if key in vit_state:
            assert torch.equal(vit_state[key], value), key
    assert cross_attention_blocks(model) and closed_blocks(model) == cross_attention_blocks(model)
    if llm == "qwen2":  # tied embeddings stay tied through build and reload
        assert model.language_model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<media>\nwhat colour is the square?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert (ids == media_id).sum() == 1
    logits = model(ids, pixel_values=frames(3), media_num_frames=torch.tensor([3])).logits
    assert torch.isfinite(logits).all()
    out_ids = model.generate(ids, pixel_values=frames(3), media_num_frames=torch.tensor([3]), max_new_tokens=4)
    assert out_ids.shape[1] <= ids.shape[1] + 4
    assert isinstance(tokenizer.decode(out_ids[0, ids.shape[1]:]), str)


def test_build_detects_the_vision_type_from_config_not_from_the_path(tmp_path):
    # A CLIP checkpoint in a directory named like SigLIP must still build a CLIP tower.
    vision_dir = make_vision("clip", tmp_path / "siglip-so400m-patch14-384")
    llm_dir = make_llm("qwen2", tmp_path / "llm")
    assert _cli("build", "--vision", vision_dir, "--llm", llm_dir, "--out", tmp_path / "m").exit_code == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "clip_vision_model"


def test_build_errors_name_the_file(tmp_path):
    llm_dir = make_llm("qwen2", tmp_path / "llm")
    result = _cli("build", "--vision", tmp_path / "nowhere", "--llm", llm_dir, "--out", tmp_path / "m")
    assert result.exit_code == 2 and "nowhere" in result.output and "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = _cli("build", "--vision", tmp_path / "empty", "--llm", llm_dir, "--out", tmp_path / "m")
    assert result.exit_code == 2 and "config.json is missing" in result.output
    result = _cli("build", "--vision", llm_dir, "--llm", llm_dir, "--out", tmp_path / "m")
    assert result.exit_code == 2 and "model_type='qwen2'" in result.output and "vision encoders" in result.output


def test_build_reports_mismatched_shapes(tmp_path):
    from crosslmm.checkpoints import CheckpointError, assemble
    from conftest import tiny_config

    state = {"projector.linear_1.weight": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match=r"projector.linear_1.weight: checkpoint \(3, 3\), model expects \(64, 32\)"):
        assemble(tiny_config(), state)


def _tiny_llava_ov(directory):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from conftest import TEXT, VISION

    text = TEXT["qwen2"]()
    config = LlavaOnevisionConfig(vision_config=VISION["siglip"](), text_config=text, image_token_id=125, video_token_id=126)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.save_pretrained(directory)
    return model


def test_imported_llava_onevision_gives_the_same_logits(tmp_path):
    reference = _tiny_llava_ov(tmp_path / "ov")
    result = _cli("import-llava-ov", tmp_path / "ov", tmp_path / "imported")
    assert result.exit_code == 0, result.output
    model = CrossLMMForCausalLM.from_pretrained(tmp_path / "imported").eval()
    assert model.config.media_newline and model.config.pool_after_projector and not model.config.use_dcal
    assert model.config.tokens_per_frame == 16  # ceil(7 / 2) ** 2 on the tiny 7x7 grid

    num_frames, video_tokens = 3, 3 * 16 + 1
    before, after = [5, 6, 7], [8, 9, 10, 11]
    ours_ids = torch.tensor([before + [126] + after])
    their_ids = torch.tensor([before + [126] * video_tokens + after])
    px = frames(num_frames)
    with torch.no_grad():
        ours = model(ours_ids, pixel_values=px, media_num_frames=torch.tensor([num_frames])).logits
        theirs = reference(input_ids=their_ids, pixel_values_videos=px[None]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_imported_llava_onevision_switches_to_the_crosslmm_layout(tmp_path):
    _tiny_llava_ov(tmp_path / "ov")
    assert _cli("import-llava-ov", tmp_path / "ov", tmp_path / "cl", "--layout", "crosslmm", "--tokens-per-frame", "4").exit_code == 0
    model = CrossLMMForCausalLM.from_pretrained(tmp_path / "cl").eval()
    config = model.config
    assert config.tokens_per_frame == 4 and config.use_v2v and config.use_t2v and not config.media_newline
    assert cross_attention_blocks(model) and closed_blocks(model) == cross_attention_blocks(model)
    out = model.generate(torch.tensor([[5, 126, 6]]), pixel_values=frames(2), media_num_frames=torch.tensor([2]), max_new_tokens=3)
    assert out.shape[1] <= 6


def test_params_2b_stage1_json_matches_the_paper():
    result = _cli("params", "crosslmm-2b", "--stage", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    # No V2V at the final layer (read by nothing): 6 V2V blocks of 5.5 M + the projector;
    # with that block too, the paper's layout, the count is Table 3's ~43 M.
    assert 36e6 < data["trainable"] < 38e6 and 42e6 < data["trainable_with_last_layer_v2v"] < 44e6
    assert data["components"]["gates"] == 13 and data["dcal_layers"] == [3, 7, 11, 15, 19, 23, 27]
    assert data["v2v_layers"] == [3, 7, 11, 15, 19, 23]
    text = _cli("params", "crosslmm-2b", "--stage", "1").output
    assert "paper (Table 3" in text and "~43 M" in text
    stage2 = json.loads(_cli("params", "crosslmm-2b", "--stage", "2", "--json").output)
    assert stage2["trainable"] == stage2["total"] > 2e9


def test_params_of_a_checkpoint_directory(tmp_path):
    from conftest import tiny_model

    tiny_model(use_t2v=False).save_pretrained(tmp_path)
    stage1 = json.loads(_cli("params", str(tmp_path), "--json").output)
    stage2 = json.loads(_cli("params", str(tmp_path), "--stage", "2", "--json").output)
    assert stage1["components"]["t2v"] == 0 and stage2["components"]["t2v"] > 0  # stage 2 switches T2V on
    assert _cli("params", str(tmp_path / "missing")).exit_code == 2


def test_ask_answers_about_a_video_and_fails_clearly_on_a_missing_one(tmp_path):
    import av
    import numpy as np

    vision_dir = make_vision("siglip", tmp_path / "vision")
    llm_dir = make_llm("qwen2", tmp_path / "llm")
    assert _cli("build", "--vision", vision_dir, "--llm", llm_dir, "--out", tmp_path / "m", "--tokens-per-frame", "4",
                "--every-k", "2").exit_code == 0
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 32
        for i in range(4):
            frame = np.full((32, 32, 3), 40 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    result = _cli("ask", video, "what colour is it?", "--model", tmp_path / "m", "--max-new-tokens", "4", "--num-frames", "2")
    assert result.exit_code == 0, result.output
    # An untrained model may say anything: the CLI must say what the library's greedy answer is.
    from crosslmm.infer import answer, load

    model, processor = load(tmp_path / "m", num_frames=2)
    expected = answer(model, processor, "what colour is it?", [video], max_new_tokens=4)
    assert result.output == expected + "\n"
    with torch.no_grad():  # and that answer is the model's own greedy continuation of the processed prompt
        inputs = processor([{"role": "user", "content": "<video>\nwhat colour is it?"}], media=[video])
        ids = model.generate(**inputs, max_new_tokens=4)
    assert processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == expected
    missing = _cli("ask", tmp_path / "nope.mp4", "what?", "--model", tmp_path / "m")
    assert missing.exit_code == 2 and "nope.mp4" in missing.output


# A ChatML template for typed content, the way LLaVA-OneVision's is written: it reads
# only {"type": "text"} parts, so a plain-string message would render as nothing.
TYPED_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _llava_ov_with_processor(directory):
    """A tiny LLaVA-OneVision checkpoint as transformers 5 saves one with its processor:
    tokenizer with <image>/<video> and a typed-content chat template, and the unified
    processor_config.json (image processor inside)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from checkpoint_factory import CORPUS
    from conftest import VISION
    from crosslmm.checkpoints.scratch import train_tokenizer

    tokenizer = train_tokenizer(CORPUS, vocab_size=300, media_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tokenizer.chat_template = TYPED_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    from transformers import Qwen2Config

    from conftest import _TEXT

    # K = 4 (the paper's) needs more than 4 layers.
    text = Qwen2Config(**{**_TEXT, "vocab_size": len(tokenizer), "num_hidden_layers": 8})
    config = LlavaOnevisionConfig(vision_config=VISION["siglip"](), text_config=text,
                                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_id=tokenizer.convert_tokens_to_ids("<video>"))
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(directory)
    image_processor = {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 28, "width": 28},
                       "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}
    (directory / "processor_config.json").write_text(json.dumps({
        "image_processor": image_processor, "processor_class": "LlavaOnevisionProcessor", "image_token": "<image>",
        "video_token": "<video>", "num_image_tokens": 49, "vision_feature_select_strategy": "full"}))
    return tokenizer


def test_llava_onevision_route_imports_trains_and_answers(tmp_path):
    from benchmark_fixtures import write_video
    from crosslmm.data.processor import CrossLMMProcessor

    _llava_ov_with_processor(tmp_path / "ov")
    result = _cli("import-llava-ov", tmp_path / "ov", tmp_path / "init", "--layout", "crosslmm", "--tokens-per-frame", "4")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "init" / "processor_config.json").read_text())
    assert "image_processor" not in saved and "processor_class" not in saved  # ours, not transformers'
    processor = CrossLMMProcessor.from_pretrained(tmp_path / "init")
    assert [float(x) for x in processor.frame_processor.image_mean] == [0.5, 0.5, 0.5]  # SigLIP's, from the checkpoint
    # The typed-content template still renders our plain-string messages, question included.
    inputs = processor([{"role": "user", "content": "how many circles appear in the video?"}])
    assert "how many circles appear" in processor.tokenizer.decode(inputs["input_ids"][0])

    (tmp_path / "data" / "videos").mkdir(parents=True)
    records = []
    for i in range(4):
        write_video(tmp_path / "data" / "videos" / f"{i}.mp4", num_frames=4, size=32, seed=i)
        records.append({"id": f"r{i}", "video": f"videos/{i}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nwhat colour is the object?"}, {"from": "gpt", "value": "red"}]})
    (tmp_path / "data" / "train.json").write_text(json.dumps(records))
    trained = tmp_path / "stage1"
    result = _cli("train", str(REPO_CONFIGS / "stage1.yaml"), f"model={tmp_path / 'init'}", f"output_dir={trained}",
                  f"data.train={tmp_path / 'data' / 'train.json'}", "data.num_frames=2", "data.max_frames=2", "data.num_workers=0",
                  "per_device_batch_size=2", "gradient_accumulation=1", "max_steps=2", "mixed_precision=no",
                  "save_every=0", "gradient_checkpointing=false")
    assert result.exit_code == 0, result.output
    losses = [json.loads(line)["loss"] for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(loss > 0 for loss in losses)  # answers were labelled: the template kept them
    result = _cli("ask", str(tmp_path / "data" / "videos" / "0.mp4"), "what colour is the object?", "--model",
                  str(trained / "model"), "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
