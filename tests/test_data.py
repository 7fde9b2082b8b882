"""Processor, LLaVA records, mixtures, dataset, collator and sampler on real files: a tiny
CrossLMM checkpoint built from tiny SigLIP + Qwen2 checkpoints (ChatML tokenizer), mp4
videos written with PyAV and a PNG written with PIL."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from checkpoint_factory import make_llm, make_vision
from crosslmm import CrossLMMConfig, CrossLMMForCausalLM
from crosslmm.checkpoints.build import build
from crosslmm.data.dataset import (
    DataCollator,
    LengthGroupedSampler,
    LLaVADataset,
    load_mixture,
    load_records,
)
from crosslmm.data.image_processing import FrameProcessor
from crosslmm.data.processor import CrossLMMProcessor, RecordError

FRAMES = 4  # frames sampled per video in these tests


def key_of(media_root, relative: str) -> str:
    """Feature-cache key: the resolved file path plus the sampling options."""
    return f"{(media_root / relative).resolve().as_posix()}|n={FRAMES}|fps=None|max=32"


# --------------------------------------------------------------------------- fixtures


def write_video(path, num_frames: int = 6, size=(32, 24)) -> None:
    """A 10 fps H.264 clip; frame i is a solid grey level, so frames differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 16 + 30 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = 100 * i, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    vision, llm = make_vision("siglip", base / "vision"), make_llm("qwen2", base / "llm")
    return build(vision, llm, base / "crosslmm", tokens_per_frame=4, dcal_every_k=2)


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "media"
    write_video(root / "videos" / "a.mp4")
    write_video(root / "videos" / "b.mp4", num_frames=3)
    (root / "images").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "images" / "p.png")
    (root / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    write_video(root.parent / "outside.mp4")  # exists, but outside media_root
    return root


@pytest.fixture(scope="module")
def processor(checkpoint):
    return CrossLMMProcessor.from_pretrained(checkpoint, num_frames=FRAMES)


def record(rid="r1", media=None, key="video", turns=None):
    turns = turns or [("human", "<video>\nwhat colour is the square?"), ("gpt", "red")]
    out = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if media is not None:
        out[key] = media
    return out


def learned_spans(processor, example) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    labels, ids = example["labels"].tolist(), example["input_ids"].tolist()
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token  # labels are the inputs; the model shifts them
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [processor.tokenizer.decode(span) for span in spans]


# --------------------------------------------------------------------------- labels and media


def test_labels_are_exactly_the_answer_and_end_of_turn(processor, media_root):
    example = processor.encode_record(record(media="videos/a.mp4"), media_root)
    assert learned_spans(processor, example) == ["red<|im_end|>"]

    ids, labels = example["input_ids"], example["labels"]
    first = int((labels != -100).nonzero()[0])
    assert processor.tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")  # header not learned
    assert processor.tokenizer.decode(ids[-1:]) == "\n" and labels[-1] == -100  # newline after <|im_end|>
    assert (ids == processor.media_token_id).sum() == 1
    assert labels[ids == processor.media_token_id].eq(-100).all()

    assert example["id"] == "r1"
    assert example["pixel_values"].shape == (FRAMES, 3, 28, 28) and example["pixel_values"].dtype == torch.float32
    assert example["media_num_frames"].tolist() == [FRAMES] and example["media_num_frames"].dtype == torch.long
    assert example["media_keys"] == [key_of(media_root, "videos/a.mp4")]


def test_multi_turn_with_system_prompt(processor, media_root):
    turns = [
        ("system", "you are a helpful assistant"),
        ("human", "<video>\nwhat colour is the square?"), ("gpt", "red"),
        ("human", "how many circles appear?"), ("gpt", "three circles appear"),
    ]
    example = processor.encode_record(record(media="videos/a.mp4", turns=turns), media_root)
    assert learned_spans(processor, example) == ["red<|im_end|>", "three circles appear<|im_end|>"]
    full = processor.tokenizer.decode(example["input_ids"])
    assert full.startswith("<|im_start|>system\nyou are a helpful assistant<|im_end|>\n")
    assert full.count("<|im_start|>") == 5


def test_a_given_prefix_of_an_answer_is_context_not_learned(processor, media_root):
    turns = [("human", "<video>\nwhich colour?\nA. red\nB. blue"), ("gpt", "blue (B)"),
             ("human", "and the shape?"), ("gpt", "square")]
    plain = processor.encode_record(record(media="videos/a.mp4", turns=turns), media_root)
    given = record(media="videos/a.mp4", turns=turns)
    given["conversations"][1]["given"] = "blue"
    example = processor.encode_record(given, media_root)
    assert torch.equal(example["input_ids"], plain["input_ids"])  # the same text, token for token
    assert learned_spans(processor, example) == [" (B)<|im_end|>", "square<|im_end|>"]
    for bad in ("red", "blue (B)"):  # not a prefix; the whole answer
        given["conversations"][1]["given"] = bad
        with pytest.raises(RecordError, match="given"):
            processor.encode_record(given, media_root)
    given["conversations"][1]["given"] = None
    given["conversations"][0]["given"] = "<video>"  # only an assistant turn has a given prefix
    with pytest.raises(RecordError, match="given"):
        processor.encode_record(given, media_root)


def test_image_record(processor, media_root):
    example = processor.encode_record(
        record(key="image", media="images/p.png", turns=[("human", "<image>\ndescribe"), ("gpt", "a square")]),
        media_root,
    )
    assert example["media_num_frames"].tolist() == [1]
    assert example["pixel_values"].shape == (1, 3, 28, 28)
    assert learned_spans(processor, example) == ["a square<|im_end|>"]


def test_text_only_record(processor, media_root):
    example = processor.encode_record(record(turns=[("human", "hello"), ("gpt", "hi")]), media_root)
    assert example["pixel_values"] is None
    assert example["media_num_frames"].shape == (0,) and example["media_keys"] == []
    assert learned_spans(processor, example) == ["hi<|im_end|>"]


def test_multi_media_record_keeps_placeholder_order(processor, media_root):
    turns = [("human", "<video> then <image> then <video>"), ("gpt", "three")]
    example = processor.encode_record(
        record(media=["videos/b.mp4", "images/p.png", "./videos/a.mp4"], turns=turns), media_root
    )
    assert example["media_num_frames"].tolist() == [FRAMES, 1, FRAMES]  # an image is one frame, by content
    assert example["pixel_values"].shape == (2 * FRAMES + 1, 3, 28, 28)
    assert (example["input_ids"] == processor.media_token_id).sum() == 3
    assert example["media_keys"] == [key_of(media_root, p) for p in ("videos/b.mp4", "images/p.png", "videos/a.mp4")]
    image_only = record(media="images/p.png", turns=[("human", "<image>"), ("gpt", "x")])
    alone = processor.encode_record(image_only, media_root)
    assert torch.equal(example["pixel_values"][FRAMES], alone["pixel_values"][0])


def test_without_pixels_uses_frame_counts_or_decodes(processor, media_root):
    rec = record(media="videos/a.mp4")
    decoded = processor.encode_record(rec, media_root, load_pixels=False)
    assert decoded["pixel_values"] is None and decoded["media_num_frames"].tolist() == [FRAMES]
    # With a known count the file is never opened: it need not exist.
    missing = record(media="videos/cached_only.mp4")
    key = key_of(media_root, "videos/cached_only.mp4")
    cached = processor.encode_record(missing, media_root, load_pixels=False, frame_counts={key: 7})
    assert cached["media_num_frames"].tolist() == [7] and cached["media_keys"] == [key]
    assert torch.equal(cached["labels"], decoded["labels"])


# --------------------------------------------------------------------------- rejected records


BAD_RECORDS = {
    "no placeholder": (
        record("no-ph", media="videos/a.mp4", turns=[("human", "what?"), ("gpt", "red")]), "placeholder"
    ),
    "too many placeholders": (
        record("two-ph", media="videos/a.mp4", turns=[("human", "<video><video>"), ("gpt", "red")]), "placeholder"
    ),
    "placeholder without media": (record("orphan"), "placeholder"),
    "missing file": (record("gone", media="videos/nope.mp4"), "missing"),
    "undecodable": (record("broken", media="videos/broken.mp4"), "cannot be decoded"),
    "escapes root": (record("escape", media="../outside.mp4"), "escapes media_root"),
    "absolute path": (record("absolute", media="/etc/passwd"), "escapes media_root"),
    "no answer": (record("mute", media="videos/a.mp4", turns=[("human", "<video> hi")]), "no assistant"),
    "bad speaker": (record("who", turns=[("robot", "hi"), ("gpt", "x")]), "turn 0"),
}


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_bad_record_is_skipped_with_a_warning(processor, media_root, caplog, name):
    bad, reason = BAD_RECORDS[name]
    with pytest.raises(RecordError, match=rf"^{bad['id']}: .*{reason}"):
        processor.encode_record(bad, media_root)

    good = record("good", media="videos/a.mp4")
    dataset = LLaVADataset([(good, media_root), (bad, media_root)], processor)
    with caplog.at_level(logging.WARNING, logger="crosslmm.data"):
        assert dataset[1] is None
    assert dataset[0]["id"] == "good"  # never replaced by another sample
    assert dataset.skipped == 1
    assert any(bad["id"] in r.getMessage() and r.name == "crosslmm.data" for r in caplog.records)


def test_too_long_after_splicing_is_skipped_not_truncated(checkpoint, media_root, caplog):
    short = CrossLMMProcessor.from_pretrained(checkpoint, num_frames=FRAMES, max_length=30)
    rec = record("long", media="videos/a.mp4")
    text_only = short.encode_record(record("fits", turns=[("human", "hi"), ("gpt", "red")]), media_root)
    assert len(text_only["input_ids"]) <= 30
    with pytest.raises(RecordError, match=r"^long: too long.* exceed max_length=30"):
        short.encode_record(rec, media_root)
    dataset = LLaVADataset([(rec, media_root)], short)
    with caplog.at_level(logging.WARNING, logger="crosslmm.data"):
        assert dataset[0] is None
    assert "long" in caplog.text and dataset.skipped == 1


def test_template_that_rewrites_earlier_turns_is_refused(checkpoint, media_root):
    processor = CrossLMMProcessor.from_pretrained(checkpoint, num_frames=FRAMES)
    processor.tokenizer.chat_template = (
        "{{ messages|length }}{% for m in messages %}{{ m['role'] + ':' + m['content'] + '<|im_end|>' }}{% endfor %}"
    )
    with pytest.raises(RecordError, match="prefix-consistent"):
        processor.encode_record(record(turns=[("human", "hi"), ("gpt", "red")]), media_root)


# --------------------------------------------------------------------------- inference call


def test_processor_call_and_model_forward(checkpoint, processor, media_root):
    messages = [{"role": "user", "content": "<video>\nwhat colour is the square?"}]
    inputs = processor(messages, media=[media_root / "videos" / "a.mp4"])
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert text.endswith("<|im_start|>assistant\n") and "<media>" in text
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape and inputs["input_ids"].shape[0] == 1
    assert inputs["pixel_values"].shape == (FRAMES, 3, 28, 28) and inputs["media_num_frames"].tolist() == [FRAMES]

    model = CrossLMMForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = inputs["input_ids"].shape[1] - 1 + FRAMES * model.config.tokens_per_frame
    assert logits.shape[:2] == (1, expected) and torch.isfinite(logits).all()

    # A training batch (video + image + text-only, one skipped) gives a finite loss.
    dataset = LLaVADataset(
        [
            (record("v", media="videos/a.mp4"), media_root),
            (record("i", key="image", media="images/p.png", turns=[("human", "<image> what?"), ("gpt", "a square")]),
             media_root),
            (record("t", turns=[("human", "hello"), ("gpt", "hi there")]), media_root),
            (record("bad", media="videos/nope.mp4"), media_root),
        ],
        processor,
    )
    batch = DataCollator(processor.tokenizer)([dataset[i] for i in range(len(dataset))])
    model.train()
    loss = model(**{k: v for k, v in batch.items() if k not in ("ids", "media_keys")}).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()


def test_processor_call_refuses_mismatch_and_overflow(checkpoint, processor, media_root):
    video = media_root / "videos" / "a.mp4"
    with pytest.raises(ValueError, match="1 media placeholder.* 2 media item"):
        processor([{"role": "user", "content": "<image> hi"}], media=[video, video])
    with pytest.raises(ValueError, match="0 media placeholder.* 1 media item"):
        processor([{"role": "user", "content": "hi"}], media=[video])
    short = CrossLMMProcessor.from_pretrained(checkpoint, num_frames=FRAMES, max_length=20)
    with pytest.raises(ValueError, match=r"\d+ tokens after expanding 1 media item.* exceed max_length=20"):
        short([{"role": "user", "content": "<video> hi"}], media=[video])
    assert short([{"role": "user", "content": "hi"}])["pixel_values"] is None  # text alone fits


# --------------------------------------------------------------------------- save / load


def test_save_and_load_round_trip(checkpoint, tmp_path):
    processor = CrossLMMProcessor.from_pretrained(checkpoint, num_frames=3, max_frames=16, max_length=300)
    out = tmp_path / "saved"
    CrossLMMConfig.from_pretrained(checkpoint).save_pretrained(out)  # the model's part of the directory
    processor.save_pretrained(out)
    assert json.loads((out / "processor_config.json").read_text()) == {
        "num_frames": 3, "fps": None, "max_frames": 16, "max_length": 300
    }
    loaded = CrossLMMProcessor.from_pretrained(out)
    assert (loaded.num_frames, loaded.fps, loaded.max_frames, loaded.max_length) == (3, None, 16, 300)
    assert loaded.frame_processor == processor.frame_processor
    assert (loaded.media_token_id, loaded.tokens_per_frame, loaded.media_token) == (
        processor.media_token_id, processor.tokens_per_frame, "<media>"
    )
    chat = [{"role": "user", "content": "<video> what colour is the square?"}]
    text = processor.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert loaded.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    # Options given at load time override the saved ones; fps sampling ignores num_frames.
    fps = CrossLMMProcessor.from_pretrained(out, fps=2.0)
    assert fps.sampling == {"num_frames": None, "fps": 2.0, "max_frames": 16}
    assert fps.media_key("a.mp4") == f"{Path('a.mp4').resolve().as_posix()}|n=None|fps=2.0|max=16"


def test_custom_frame_processor_survives_save(checkpoint, tmp_path):
    out = tmp_path / "clip_like"
    shutil.copytree(checkpoint, out)
    processor = CrossLMMProcessor.from_pretrained(out)
    processor.frame_processor = FrameProcessor(
        size=32, resize_mode="shortest_edge", crop_size=28, image_mean=(0.1, 0.2, 0.3), image_std=(0.9, 0.8, 0.7)
    )
    processor.save_pretrained(out)
    assert CrossLMMProcessor.from_pretrained(out).frame_processor == processor.frame_processor
    with pytest.raises(FileNotFoundError, match="config.json"):
        CrossLMMProcessor.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- files and mixtures


def _write_records(path, prefix: str, n: int) -> None:
    records = [record(f"{prefix}{i}", turns=[("human", "hi"), ("gpt", str(i))]) for i in range(n)]
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    else:
        path.write_text(json.dumps(records))


def test_load_records_json_and_jsonl(tmp_path):
    _write_records(tmp_path / "a.json", "a", 3)
    _write_records(tmp_path / "b.jsonl", "b", 2)
    assert [r["id"] for r in load_records(tmp_path / "a.json")] == ["a0", "a1", "a2"]
    assert [r["id"] for r in load_records(tmp_path / "b.jsonl")] == ["b0", "b1"]
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        load_records(tmp_path / "bad.jsonl")


def _mixture(tmp_path, datasets, seed=0, **top):
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"datasets": datasets, "seed": seed, **top}))
    return load_mixture(path)


def test_mixture_sampling_modes(tmp_path):
    (tmp_path / "sub").mkdir()
    _write_records(tmp_path / "a.json", "a", 10)
    _write_records(tmp_path / "sub" / "b.jsonl", "b", 10)
    datasets = [
        {"path": "a.json", "sampling": "all"},
        {"path": "a.json", "sampling": "first:3"},
        {"path": "sub/b.jsonl", "sampling": "random:4", "media_root": "media_b/"},
        {"path": "sub/b.jsonl", "sampling": "25%"},
    ]
    pairs = _mixture(tmp_path, datasets, media_root="data/")
    ids = [r["id"] for r, _ in pairs]
    assert ids[:10] == [f"a{i}" for i in range(10)]
    assert ids[10:13] == ["a0", "a1", "a2"]
    random4, percent = ids[13:17], ids[17:]
    assert len(random4) == 4 and len(set(random4)) == 4 and all(i.startswith("b") for i in random4)
    assert len(percent) == 3  # 25 % of 10, rounded up
    roots = [root for _, root in pairs]
    assert roots[0] == tmp_path / "data" and roots[13] == tmp_path / "media_b" and roots[17] == tmp_path / "data"

    again = [r["id"] for r, _ in _mixture(tmp_path, datasets, media_root="data/")]
    assert again == ids  # deterministic given the seed
    other_seeds = {tuple(r["id"] for r, _ in _mixture(tmp_path, datasets, seed=s)[13:17]) for s in range(1, 6)}
    assert len(other_seeds | {tuple(random4)}) > 1
    assert _mixture(tmp_path, [{"path": "a.json"}])[0][1] == tmp_path  # default media_root: the YAML's folder


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"path": "a.json", "sampling": "some"}, "unknown sampling"),
        ({"path": "a.json", "sampling": "first:-1"}, "unknown sampling"),
        ({"path": "a.json", "sampling": "random:11"}, "asks for 11 records but the file has only 10"),
        ({"path": "a.json", "sampling": "150%"}, "percentage"),
        ({"path": "missing.json"}, "does not exist"),
        ({"path": "a.json", "samplng": "all"}, "unknown keys"),
    ],
)
def test_mixture_errors(tmp_path, entry, message):
    _write_records(tmp_path / "a.json", "a", 10)
    with pytest.raises(ValueError, match=message):
        _mixture(tmp_path, [entry])


# --------------------------------------------------------------------------- batching


def test_collator_pads_and_concatenates(processor, media_root):
    video = processor.encode_record(record("v", media=["videos/a.mp4", "images/p.png"],
                                           turns=[("human", "<video><image>"), ("gpt", "red")]), media_root)
    text = processor.encode_record(
        record("t", turns=[("human", "what colour is the object in the top left corner?"), ("gpt", "a red square")]),
        media_root,
    )
    collator = DataCollator(processor.tokenizer)
    batch = collator([video, None, text])
    lengths = [len(video["input_ids"]), len(text["input_ids"])]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, max(lengths))
    pad = processor.tokenizer.pad_token_id
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)  # right padding
        assert batch["input_ids"][row, n:].eq(pad).all() and batch["labels"][row, n:].eq(-100).all()
    assert torch.equal(batch["input_ids"][1, : lengths[1]], text["input_ids"])
    assert batch["pixel_values"].shape == (FRAMES + 1, 3, 28, 28)
    assert batch["media_num_frames"].tolist() == [FRAMES, 1]
    assert batch["ids"] == ["v", "t"] and batch["media_keys"] == video["media_keys"]
    assert collator.skipped == 1
    assert collator([text])["pixel_values"] is None
    assert collator([None, None]) is None and collator.skipped == 3
    by_id = DataCollator(processor.pad_token_id)([video, text])
    assert processor.pad_token_id == pad and torch.equal(by_id["input_ids"], batch["input_ids"])


def test_lengths_estimate(processor, media_root):
    rec = record(media="videos/a.mp4", turns=[("human", "<video>" + "x" * 30), ("gpt", "y" * 30)])
    dataset = LLaVADataset([(rec, media_root), (record(turns=[("human", "hi"), ("gpt", "ok")]), media_root)], processor)
    assert dataset.lengths == [20 + FRAMES * processor.tokens_per_frame, 1]


def test_length_grouped_sampler():
    lengths = torch.randint(1, 1000, (537,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=2, seed=3, mega_batch_mult=50)
    first = list(sampler)
    assert sorted(first) == list(range(537)) and len(sampler) == 537
    assert list(sampler) == first  # deterministic for one (seed, epoch)
    for start in range(0, 537, 100):  # each mega-batch is sorted, longest first
        chunk = [lengths[i] for i in first[start : start + 100]]
        assert chunk == sorted(chunk, reverse=True)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(537)) and second != first
    assert list(LengthGroupedSampler(lengths, batch_size=2, seed=4)) != first
