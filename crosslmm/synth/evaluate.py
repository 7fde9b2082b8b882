"""Accuracy on the synthetic world's held-out questions, per question family and form,
and how much of a held-out caption a model reads from its video.

Multiple choice is scored on the first option letter of the answer (A-D), short answers
on the first word, case- and punctuation-insensitive: what the questions ask for ("Answer
with the option's letter", "using a single word"). This is the project's check until the
evaluation harness's `crosslmm eval synthetic` exists.

Question accuracy stays at chance until a model reads its video well enough to answer;
`caption_grounding` sees the reading start much earlier. It scores, teacher-forced, the
words of held-out captions that cannot be copied from the caption so far (a sprite's
colour, shape and pattern when it is first named, its quadrant when it changes, its
motion), once with the right video and once with another video: the difference is what
the model took from the pixels, the control is what it guesses from the text alone.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from crosslmm.infer import answer
from crosslmm.synth.world import (
    CAPTION_PROMPT,
    LETTERS,
    MC_SENTENCE_PREFIX,
    Scene,
    caption,
    caption_record,
    scene_for,
    split_indices,
)

# New tokens for an answer: a letter, one word, or the longest option-text reply
# ("The answer is does not move (B)": 14 tokens with this world's tokenizer, then EOS).
ANSWER_TOKENS = 16


def extract(prediction: str, form: str) -> str:
    """The scored part of a prediction: an option letter or the first word."""
    if form == "mc":
        match = re.search(rf"\b([{''.join(LETTERS)}])\b", prediction.strip())
        return match.group(1) if match else ""
    words = re.findall(r"[a-z0-9]+", prediction.lower())
    return words[0] if words else ""


def is_correct(prediction: str, record: dict) -> bool:
    """The option letter (multiple choice) or the first word, lower-cased (short answer)."""
    expected = record["answer"] if record["form"] == "mc" else str(record["answer"]).lower()
    return extract(prediction, record["form"]) == expected


_OPTION_REPLY = re.compile(rf"^(?:{re.escape(MC_SENTENCE_PREFIX)})?(?P<option>.+?)\s*\((?P<letter>[{LETTERS}])\)")


def option_reply(prediction: str) -> tuple[str, str] | None:
    """(option text, letter) of a reply in an option-text style ("up (B)", "The answer
    is up (B)"), or None."""
    match = _OPTION_REPLY.match(prediction.strip())
    return (match["option"], match["letter"]) if match else None


def option_reply_breakdown(answered: Iterable[tuple[dict, str]]) -> dict[str, dict[str, float]]:
    """Where multiple-choice replies in an option-text style went wrong, overall and per
    family, from (record, prediction) pairs: `option_right` (the reply names the correct
    option: perception), `letter_follows` (of the replies that name an option, those whose
    letter is that option's: the copy; 0.25 without one) and `letter_right` (the scored
    letter). Counts beside the rates."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for record, prediction in answered:
        if record["form"] != "mc":
            continue
        options, reply = record["options"], option_reply(prediction)
        named = reply is not None and reply[0] in options
        for key in ("all", record["type"]):
            c = counts[key]
            c["questions"] += 1
            c["names_an_option"] += named
            c["option_right"] += named and reply[0] == options[LETTERS.index(record["answer"])]
            c["letter_follows"] += named and LETTERS[options.index(reply[0])] == reply[1]
            c["letter_right"] += is_correct(prediction, record)
    return {key: {**c, "option_right_rate": c["option_right"] / c["questions"],
                  "letter_follows_rate": c["letter_follows"] / max(c["names_an_option"], 1),
                  "letter_right_rate": c["letter_right"] / c["questions"]}
            for key, c in sorted(counts.items())}


def evaluate(model, processor, records: list[dict], media_root: str | Path, max_new_tokens: int = ANSWER_TOKENS) -> dict:
    """Greedy answers for `records`; returns overall and per (type, form) accuracy and the
    predictions themselves."""
    hits: dict[str, list[int]] = defaultdict(list)
    predictions = []
    for record in records:
        question = record["conversations"][0]["value"]
        raw = answer(model, processor, question, [Path(media_root) / record["video"]], max_new_tokens=max_new_tokens)
        correct = int(is_correct(raw, record))
        for key in ("all", f"form/{record['form']}", f"type/{record['type']}", f"type/{record['type']}/{record['form']}"):
            hits[key].append(correct)
        predictions.append({"id": record["id"], "prediction": raw, "answer": record["answer"], "correct": bool(correct)})
    accuracy = {key: sum(v) / len(v) for key, v in sorted(hits.items())}
    counts = {key: len(v) for key, v in sorted(hits.items())}
    return {"accuracy": accuracy, "count": counts, "predictions": predictions}


def evaluate_text_world(model, processor, records: list[dict], max_new_tokens: int = ANSWER_TOKENS) -> dict:
    """Accuracy of a text-pretrained LLM on `text_world_records`: every question asked
    alone after its scene's caption as text, the way a video question is asked after the
    video (multi-turn context would let earlier answers leak). What the base LLM knows of
    the world before it sees pixels."""
    hits: dict[str, list[int]] = defaultdict(list)
    for record in records:
        turns = record["conversations"]
        caption_turn = turns[0]["value"] == CAPTION_PROMPT  # `caption_as_answer` records
        description = turns[0]["value"].split("\n", 1)[0]
        humans = [turn["value"] for turn in turns[2 if caption_turn else 0::2]]
        for j, (human, meta) in enumerate(zip(humans, record["questions"])):
            if caption_turn:  # the caption as the assistant's earlier turn, then the question
                raw = _chat_answer(model, processor, [
                    {"role": "user", "content": CAPTION_PROMPT}, {"role": "assistant", "content": turns[1]["value"]},
                    {"role": "user", "content": human}], max_new_tokens)
            else:
                question = human if j == 0 else f"{description}\n{human}"
                raw = answer(model, processor, question, [], max_new_tokens=max_new_tokens)
            correct = int(is_correct(raw, meta))
            for key in ("all", f"form/{meta['form']}", f"type/{meta['type']}", f"type/{meta['type']}/{meta['form']}"):
                hits[key].append(correct)
    return {"accuracy": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
            "count": {k: len(v) for k, v in sorted(hits.items())}}


@torch.inference_mode()
def _chat_answer(model, processor, messages: list[dict], max_new_tokens: int) -> str:
    inputs = processor(messages)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def probe(kind: str, model, processor, data: str | Path, limit: int) -> dict[str, float]:
    """A training-time measurement (`probe` in a recipe): `questions` answers the first
    `limit` records of a held-out question file (its videos beside it), `text` the
    questions of the first `limit` text-world records, `captions` scores caption
    grounding on the first `limit` held-out videos of a dataset folder. Flat
    {metric: value} with `all` first."""
    data = Path(data)
    if kind == "questions":
        records = json.loads(data.read_text())[:limit]
        return evaluate(model, processor, records, data.parent)["accuracy"]
    if kind == "text":
        return evaluate_text_world(model, processor, json.loads(data.read_text())[:limit])["accuracy"]
    if kind == "captions":
        return caption_grounding(model, processor, split_scenes(data, "test", limit), data)["accuracy"]
    raise ValueError(f"unknown probe kind {kind!r}; choose questions, text or captions")


# One sprite in a frame's description ("white triangle with dots top-right") and one in
# the motion sentence ("white triangle down"); see `world.caption`.
_CAPTION_ITEM = re.compile(r"(?P<colour>[a-z]+) (?P<shape>[a-z]+)(?: with (?P<pattern>[a-z]+))? "
                           r"(?P<place>(?:top|bottom)-(?:left|right))")
_MOTION_ITEM = re.compile(r"(?P<colour>[a-z]+) (?P<shape>[a-z]+) (?P<motion>[a-z]+)")


def novel_caption_words(text: str) -> list[tuple[str, int, int]]:
    """(category, start, end) character spans of the caption words that carry new
    information: a sprite's colour, shape and pattern at its first mention, its quadrant
    at its first mention and whenever it changes, and every motion word."""
    frames_part, _, motion_part = text.partition("motion: ")
    offset = len(frames_part) + len("motion: ")
    words, last_place = [], {}
    for item in _CAPTION_ITEM.finditer(frames_part):
        sprite = (item["colour"], item["shape"])
        if sprite not in last_place:
            words += [(name, *item.span(name)) for name in ("colour", "shape", "pattern") if item[name]]
        if last_place.get(sprite) != item["place"]:
            words.append(("place", *item.span("place")))
        last_place[sprite] = item["place"]
    for item in _MOTION_ITEM.finditer(motion_part):
        start, end = item.span("motion")
        words.append(("motion", start + offset, end + offset))
    return words


@torch.no_grad()
def caption_grounding(model, processor, scenes: Sequence[tuple[int, Scene]], media_root: str | Path) -> dict:
    """Teacher-forced accuracy on the novel words (`novel_caption_words`) of the captions
    of `scenes` ((video index, scene) pairs whose videos are in `media_root`), per word
    category, with each caption's own video (`video/...`) and with the next scene's video
    (`other/...`). A word counts as right when every one of its tokens is the argmax."""
    if len(scenes) < 2:
        raise ValueError("caption grounding needs at least two videos (each one is the other's control)")
    model.eval()
    encoded = [processor.encode_record(caption_record(scene, index), media_root) for index, scene in scenes]
    # Each video is encoded once: it is read twice, as its own caption's and as a control.
    features = [model.vision_tower(item["pixel_values"]) for item in encoded]
    hits: dict[str, list[int]] = defaultdict(list)
    for i, ((_, scene), item) in enumerate(zip(scenes, encoded)):
        text = caption(scene)
        spans = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        answer_positions = (item["labels"] != -100).nonzero().squeeze(1)[: len(spans["input_ids"])]
        if item["input_ids"][answer_positions].tolist() != spans["input_ids"]:
            raise ValueError(f"{item['id']}: the caption tokenizes differently inside the chat template")
        for source, frames in (("video", features[i]), ("other", features[(i + 1) % len(features)])):
            logits = model(input_ids=item["input_ids"][None], vision_features=frames,
                           media_num_frames=item["media_num_frames"]).logits[0]
            shift = logits.shape[0] - item["input_ids"].shape[0]  # the visual tokens spliced in
            right = logits[answer_positions - 1 + shift].argmax(-1) == item["input_ids"][answer_positions]
            for category, start, end in novel_caption_words(text):
                tokens = [t for t, (a, b) in enumerate(spans["offset_mapping"]) if a < end and b > start]
                correct = int(bool(right[tokens].all()))
                hits[f"{source}/{category}"].append(correct)
                hits[f"{source}/all"].append(correct)
    return {"accuracy": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
            "count": {k: len(v) for k, v in sorted(hits.items())}}


def split_scenes(data_dir: str | Path, split: str = "test", limit: int = 0) -> list[tuple[int, Scene]]:
    """(video index, scene) of a dataset's split, regenerated from its meta.json (the
    scenes are a function of the dataset's seed and index, see `world.scene_for`)."""
    params = json.loads((Path(data_dir) / "meta.json").read_text())["params"]
    splits = split_indices(params["n"], params["seed"], params["splits"])
    if split not in splits:
        raise ValueError(f"{data_dir} has no split {split!r}; it has {sorted(splits)}")
    indices = splits[split]
    indices = indices[:limit] if limit else indices
    return [(i, scene_for(params["seed"], i, params["frames"], params["size"])) for i in indices]


def training_scenes(data_dir: str | Path, count: int, heldout: int) -> tuple[list[Scene], list[Scene]]:
    """The first `count` scenes of a world's training split and the `heldout` after them:
    what the vision encoder's pretraining learns from and is scored on."""
    split = [scene for _, scene in split_scenes(data_dir, "train", count + heldout)]
    if len(split) < count + heldout:
        raise ValueError(f"{data_dir}'s training split has {len(split)} scenes, fewer than {count} + {heldout} held out")
    return split[:count], split[count:]
