"""The synthetic video world: determinism, splits, balance, and every answer checked
against the *decoded* mp4 (after yuv420p compression), read back with the same
`load_video(path, num_frames=frames)` call a model's data pipeline uses.

The checker below knows only the rendering vocabulary (palette, shape and pattern
templates, the 2-pixel grid sprites sit on); it finds sprites in decoded pixels and
answers each question itself, so a wrong ground truth, an off-by-one frame number or a
colour the codec washed out all fail here.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from crosslmm.data.video import load_video
from crosslmm.synth import (
    COLORS,
    FAMILIES,
    FORMS,
    LETTERS,
    PATTERNS,
    SHAPES,
    STATIC,
    STATIC_OPTION,
    answer_text,
    generate_sample,
    region_box,
    render,
    scene_for,
    shape_mask,
    write_dataset,
)
from crosslmm.synth.world import MARK_COLOR, pattern_cell, pattern_mask, pattern_visible

SEED = 11
N_VIDEOS = 150  # about 450 questions: enough for the balance checks
N_VERIFIED = 48  # videos whose every question is re-answered from pixels


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, N_VIDEOS, SEED)
    return out


def load_records(out: Path) -> dict[str, list[dict]]:
    meta = json.loads((out / "meta.json").read_text())
    return {split: json.loads((out / f"{split}.json").read_text()) for split in meta["params"]["splits"]}


def all_records(out: Path) -> list[dict]:
    return [r for records in load_records(out).values() for r in records]


# --------------------------------------------------------------------------- a pixel-level checker


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean image, by min-label propagation."""
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(none).reshape(h, w), none)
    while True:
        p = np.pad(labels, 1, constant_values=none)
        new = np.where(mask, np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]), none)
        if np.array_equal(new, labels):
            return [labels == label for label in np.unique(labels[labels < none])]
        labels = new


def detect(frame: np.ndarray) -> list[dict]:
    """Sprites in one decoded frame: colour, shape, pattern and box.

    Each pixel takes the nearest of background (the frame's median), palette colours
    and the pattern mark colour; a connected non-background blob is fitted with every
    shape template on the 2-pixel grid (best IoU), its colour is the majority palette
    class inside the fitted shape and its pattern the template that best matches its
    dark pixels.
    """
    pixels = frame.astype(float)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    references = np.concatenate([background[None], np.array(list(COLORS.values()), float), [MARK_COLOR]])
    classes = ((pixels[:, :, None] - references[None, None]) ** 2).sum(-1).argmin(-1)
    mark = len(references) - 1
    found = []
    for blob in components(classes != 0):
        if blob.sum() < 20:
            continue
        fit = fit_shape(blob)
        if fit is None:
            continue
        shape, side, x0, y0, inside = fit
        labels = classes[y0:y0 + side, x0:x0 + side][inside]
        palette = labels[(labels >= 1) & (labels < mark)] - 1
        color = list(COLORS)[np.bincount(palette, minlength=len(COLORS)).argmax()]
        cell = pattern_cell(frame.shape[0])
        score = {p: (pattern_mask(p, side, cell)[inside] == (labels == mark)).mean() for p in PATTERNS}
        found.append({"name": f"{color} {shape}", "color": color, "shape": shape,
                      "pattern": max(score, key=score.get), "box": (x0, y0, x0 + side, y0 + side)})
    return found


def fit_shape(blob: np.ndarray):
    ys, xs = np.nonzero(blob)
    extent = max(np.ptp(xs), np.ptp(ys)) + 1
    best = None
    for side in range(extent - extent % 2 - 2, extent + 3, 2):
        for y0 in range(ys.min() - ys.min() % 2 - 2, ys.min() + 1, 2):
            for x0 in range(xs.min() - xs.min() % 2 - 2, xs.min() + 1, 2):
                if side < 4 or min(x0, y0) < 0 or max(x0, y0) + side > blob.shape[0]:
                    continue
                crop = blob[y0:y0 + side, x0:x0 + side]
                if crop.sum() != blob.sum():
                    continue
                for shape in SHAPES:
                    template = shape_mask(shape, side)
                    iou = (template & crop).sum() / (template | crop).sum()
                    if best is None or iou > best[0]:
                        best = (iou, shape, side, x0, y0, template)
    return None if best is None else best[1:]


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def inside(a, b) -> bool:
    return b[0] <= a[0] and b[1] <= a[1] and a[2] <= b[2] and a[3] <= b[3]


class DecodedVideo:
    """Sprites found in each decoded frame, and the facts questions ask about."""

    def __init__(self, frames: np.ndarray):
        self.size = frames.shape[1]
        self.frames = [detect(frame) for frame in frames]

    def names(self) -> set[str]:
        return {d["name"] for found in self.frames for d in found}

    def first_seen(self, name: str) -> int:
        return min(t for t, found in enumerate(self.frames) if any(d["name"] == name for d in found))

    def track(self, name: str) -> list[tuple[int, int]]:
        return [d["box"][:2] for found in self.frames for d in found if d["name"] == name]

    def pattern_of(self, name: str) -> str:
        return Counter(d["pattern"] for found in self.frames for d in found if d["name"] == name).most_common(1)[0][0]

    def alone_in(self, region: str, t: int) -> dict:
        box = region_box(region, self.size)
        touching = [d for d in self.frames[t] if overlaps(d["box"], box)]
        assert len(touching) == 1 and inside(touching[0]["box"], box), (region, t, touching)
        return touching[0]

    def direction(self, name: str) -> str:
        track = self.track(name)
        dx, dy = track[-1][0] - track[0][0], track[-1][1] - track[0][1]
        if dx == dy == 0:
            return STATIC
        if abs(dx) > abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"


PLURAL = {"squares": "square", "circles": "circle", "triangles": "triangle", "crosses": "cross"}


def expected_answer(question: str, video: DecodedVideo, frame_offset: int = -1) -> str:
    """Answer a generated question from decoded pixels alone; "frame k" is decoded frame
    k + frame_offset (0-based), so -1 reads the text as 1-based."""
    if m := re.match(r"What (colour|shape) is the object in the (\S+) quadrant in frame (\d+)\?", question):
        attribute, region, frame = m.groups()
        found = video.alone_in(region, int(frame) + frame_offset)
        return found["color" if attribute == "colour" else "shape"]
    if m := re.match(r"Which direction does the (\w+ \w+) move\?", question):
        return video.direction(m[1])
    if m := re.match(r"(?:Which object|What colour is the object that) appears (first|last) in the video\?", question):
        seen = {name: video.first_seen(name) for name in video.names()}
        target = (min if m[1] == "first" else max)(seen.values())
        (name,) = [n for n, t in seen.items() if t == target]
        return name if question.startswith("Which") else name.split()[0]
    if m := re.match(r"Does the (\w+ \w+) appear before the (\w+ \w+)\?", question):
        return "yes" if video.first_seen(m[1]) < video.first_seen(m[2]) else "no"
    if m := re.match(r"How many (\w+)( objects)? appear in the video\?", question):
        names = video.names()
        if m[1] == "objects":
            return str(len(names))
        if m[2]:
            return str(sum(n.split()[0] == m[1] for n in names))
        return str(sum(n.split()[1] == PLURAL[m[1]] for n in names))
    if m := re.match(r"What pattern does the (\w+ \w+) have\?", question):
        return video.pattern_of(m[1])
    if m := re.match(r"(?:Which object has|What colour is the object with) (\w+)\?", question):
        (name,) = [n for n in video.names() if video.pattern_of(n) == m[1]]
        return name if question.startswith("Which") else name.split()[0]
    raise AssertionError(f"no checker for question {question!r}")


def question_text(record: dict) -> str:
    return record["conversations"][0]["value"].split("\n")[1]


def decode_all(out: Path, records: list[dict], frames: int) -> dict[str, DecodedVideo]:
    videos = sorted({r["video"] for r in records})
    return {v: DecodedVideo(load_video(out / v, num_frames=frames).frames) for v in videos}


def matches(record: dict, video: DecodedVideo, frame_offset: int = -1) -> bool:
    want = expected_answer(question_text(record), video, frame_offset)
    got = answer_text(record)
    return got == want or (want == STATIC and got == STATIC_OPTION)


def verify_answers(out: Path, records: list[dict], frames: int) -> Counter:
    """Re-answer every record from its decoded video; returns how many per family."""
    decoded = decode_all(out, records, frames)
    for record in records:
        assert matches(record, decoded[record["video"]]), (record["id"], question_text(record), answer_text(record))
    return Counter(record["type"] for record in records)


# --------------------------------------------------------------------------- tests


def test_every_answer_is_read_back_from_the_decoded_video(dataset):
    records = all_records(dataset)
    videos = sorted({r["video"] for r in records})[:N_VERIFIED]
    checked = verify_answers(dataset, [r for r in records if r["video"] in videos], frames=8)
    assert set(checked) == set(FAMILIES)
    assert min(checked.values()) >= 8


def test_reading_frame_numbers_off_by_one_fails(dataset):
    """The frame in a question matters: read as 0-based, many answers stop holding."""
    records = [r for r in all_records(dataset) if r["type"].endswith("_at_region_time")][:40]
    decoded = decode_all(dataset, records, frames=8)

    def holds(record: dict) -> bool:
        try:
            return matches(record, decoded[record["video"]], frame_offset=0)
        except (AssertionError, IndexError):  # no lone object there, or past the last frame
            return False

    assert sum(not holds(r) for r in records) >= 0.3 * len(records)


def test_mc_options_include_what_the_video_shows(dataset):
    """A wrong option is another object's colour or shape whenever the scene has one, so
    knowing which colours a video holds is not enough: where and when are needed."""
    records = [r for r in all_records(dataset) if r["type"].endswith("_at_region_time") and r["form"] == "mc"]
    assert len(records) >= 40
    for record in records:
        scene = scene_for(SEED, int(Path(record["video"]).stem[3:]))
        attribute = "color" if record["type"].startswith("color") else "shape"
        present = {getattr(obj, attribute) for obj in scene.objects}
        assert answer_text(record) in present
        assert present <= set(record["options"]) or len(present) > 4, (record["id"], present, record["options"])


def test_other_frame_counts_and_sizes(tmp_path):
    write_dataset(tmp_path, 6, SEED, frames=12, size=96, splits={"train": 1.0})
    records = all_records(tmp_path)
    clip = load_video(tmp_path / records[0]["video"], num_frames=12)
    assert clip.frames.shape == (12, 96, 96, 3)
    verify_answers(tmp_path, records, frames=12)


def test_question_frame_k_is_the_kth_decoded_frame(dataset):
    """Uniform sampling of exactly `frames` frames returns each written frame once, in
    order, and each decoded frame is (up to compression) the rendered frame it claims."""
    for index in range(4):
        clip = load_video(dataset / "videos" / f"vid{index:06d}.mp4", num_frames=8)
        assert clip.frame_indices == list(range(8))
        assert clip.timestamps == pytest.approx([t / 4 for t in range(8)])  # fps=4
        rendered = render(scene_for(SEED, index)).astype(float)
        for k, frame in enumerate(clip.frames.astype(float)):
            errors = np.abs(rendered - frame).mean(axis=(1, 2, 3))
            assert errors[k] == errors.min() and errors[k] < 3, (index, k, errors)


def test_same_inputs_same_dataset(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    write_dataset(first, 12, SEED)
    write_dataset(second, 12, SEED)
    for name in ("train.json", "test.json", "meta.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    videos = sorted(p.name for p in (first / "videos").iterdir())
    assert videos == sorted(p.name for p in (second / "videos").iterdir()) and len(videos) == 12
    for name in videos:
        a = load_video(first / "videos" / name, num_frames=8).frames
        b = load_video(second / "videos" / name, num_frames=8).frames
        assert np.array_equal(a, b), name
    write_dataset(tmp_path / "c", 12, SEED + 1)
    assert (tmp_path / "c" / "train.json").read_bytes() != (first / "train.json").read_bytes()


def test_small_dataset_is_quick(tmp_path):
    start = time.perf_counter()
    meta = write_dataset(tmp_path, 12, SEED)
    assert time.perf_counter() - start < 5
    assert meta == json.loads((tmp_path / "meta.json").read_text())
    assert sum(meta["videos"].values()) == 12 and len(list((tmp_path / "videos").glob("*.mp4"))) == 12


def test_splits_hold_whole_videos(dataset, tmp_path):
    by_split = load_records(dataset)
    videos = {split: {r["video"] for r in records} for split, records in by_split.items()}
    assert not videos["train"] & videos["test"]
    assert len(videos["train"]) + len(videos["test"]) == N_VIDEOS
    assert len(videos["test"]) == round(N_VIDEOS * 0.1)
    ids = [r["id"] for records in by_split.values() for r in records]
    assert len(ids) == len(set(ids))

    meta = write_dataset(tmp_path, 20, SEED, splits={"train": 0.8, "val": 0.1, "test": 0.1})
    assert meta["videos"] == {"train": 16, "val": 2, "test": 2}
    seen = [{r["video"] for r in json.loads((tmp_path / f"{s}.json").read_text())} for s in ("train", "val", "test")]
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == 20


def test_record_format(dataset):
    records = all_records(dataset)
    for r in records:
        assert r["type"] in FAMILIES and r["form"] in FORMS
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt" and gpt["value"] == r["answer"]
        assert human["value"].startswith("<video>\n") and human["value"].count("<video>") == 1
        assert (dataset / r["video"]).is_file() and r["id"].startswith(Path(r["video"]).stem)
        if r["form"] == "mc":
            assert r["answer"] in LETTERS and len(r["options"]) == len(set(r["options"])) == 4
            listed = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, r["options"]))
            assert f"\n{listed}\nAnswer with the option's letter from the given choices directly." in human["value"]
        else:
            assert "options" not in r and re.fullmatch(r"[a-z0-9]+", r["answer"])
    assert {(r["type"], r["form"]) for r in records} == {(f, form) for f in FAMILIES for form in FORMS}


def test_option_letter_replies_name_the_option_then_its_letter(dataset, tmp_path):
    """The "option-letter" world is the default world with only the multiple-choice
    instruction and reply changed, so one rendered world (and its feature cache) can
    train either, and both are scored on the same letter."""
    from crosslmm.eval.extract import extract_answer
    from crosslmm.synth.evaluate import extract, is_correct
    from crosslmm.synth.world import MC_SUFFIXES, multiturn_records, restyle_mc

    meta = write_dataset(tmp_path, N_VIDEOS, SEED, mc_reply="option-letter")
    assert meta["params"]["mc_reply"] == "option-letter"
    letter_world, option_world = all_records(dataset), all_records(tmp_path)
    assert [restyle_mc(r, "option-letter") for r in letter_world] == option_world
    assert [restyle_mc(r, "letter") for r in option_world] == letter_world
    restyled = [restyle_mc(r, "option-letter") for r in json.loads((dataset / "train.json").read_text())]
    assert multiturn_records(restyled) == json.loads((tmp_path / "train_multiturn.json").read_text())
    for r in option_world:
        human, gpt = r["conversations"]
        if r["form"] == "short":
            assert gpt["value"] == r["answer"]
            continue
        option = r["options"][LETTERS.index(r["answer"])]
        assert gpt["value"] == f"{option} ({r['answer']})" and human["value"].endswith(MC_SUFFIXES["option-letter"])
        sentence = restyle_mc(r, "sentence")
        assert sentence["conversations"][1]["value"] == f"The answer is {option} ({r['answer']})"
        assert sentence["conversations"][0]["value"].endswith(MC_SUFFIXES["sentence"])
        for reply in (gpt["value"], sentence["conversations"][1]["value"]):
            assert extract(reply, "mc") == r["answer"] == extract_answer("synthetic", reply)
            assert is_correct(reply, r)
    with pytest.raises(ValueError, match="mc_reply"):
        write_dataset(tmp_path / "bad", 2, SEED, mc_reply="word")
    with pytest.raises(ValueError, match="multiple-choice instruction"):
        restyle_mc({**letter_world[0], "form": "mc", "conversations": [
            {"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A"}]}, "letter")


def test_the_stated_answer_scaffold_states_only_multiple_choice_answers(dataset):
    """`state_mc_answers` writes "The answer is <option text>." before a seeded share of
    the multiple-choice questions of option-letter multi-turn records, after the media
    placeholder, and touches nothing else."""
    from crosslmm.synth.world import restyle_mc, multiturn_records, state_mc_answers

    records = multiturn_records([restyle_mc(r, "option-letter") for r in json.loads((dataset / "train.json").read_text())])
    stated = state_mc_answers(records, fraction=0.5, seed=0)
    assert stated == state_mc_answers(records, fraction=0.5, seed=0) and stated != records
    assert state_mc_answers(records, fraction=0.0) == records
    counts = Counter()
    for before, after in zip(records, stated):
        assert after["conversations"][1::2] == before["conversations"][1::2]
        for old, new, gpt in zip(before["conversations"][0::2], after["conversations"][0::2], before["conversations"][1::2]):
            match = re.fullmatch(r"(.+) \(([A-D])\)", gpt["value"])
            if new == old:
                counts["unstated mc" if match else "short"] += 1
                continue
            assert match, "only multiple-choice questions are stated"
            media = "<video>\n" if old["value"].startswith("<video>\n") else ""
            assert new["value"] == f"{media}The answer is {match[1]}.\n{old['value'][len(media):]}"
            counts["stated"] += 1
    assert counts["stated"] and counts["unstated mc"] and counts["short"]


def test_a_copy_drill_names_any_option_and_teaches_only_its_letter(dataset):
    from crosslmm.synth.world import copy_drill, restyle_mc

    records = all_records(dataset)
    mc = restyle_mc(next(r for r in records if r["form"] == "mc"), "option-letter")
    for letter in LETTERS:  # the right option or not: the drill is the copy alone
        drill = copy_drill(mc, letter)
        option = mc["options"][LETTERS.index(letter)]
        assert drill["conversations"][0] == mc["conversations"][0] and drill["answer"] == letter
        assert drill["conversations"][1] == {"from": "gpt", "value": f"{option} ({letter})", "given": option}
    sentence = copy_drill(restyle_mc(mc, "sentence"), "B")["conversations"][1]
    assert sentence["given"] == f"The answer is {mc['options'][1]}"
    with pytest.raises(ValueError, match="copy drill"):
        copy_drill(restyle_mc(mc, "letter"), "A")  # a bare letter reply has no text to copy from
    with pytest.raises(ValueError, match="copy drill"):
        copy_drill(next(r for r in records if r["form"] == "short"), "A")


def test_answers_are_balanced(dataset):
    records = all_records(dataset)
    letters = Counter(r["answer"] for r in records if r["form"] == "mc")
    assert sum(letters.values()) >= 150
    assert set(letters) == set(LETTERS) and max(letters.values()) <= 0.4 * sum(letters.values())
    families = Counter(r["type"] for r in records)
    assert max(families.values()) - min(families.values()) <= 0.1 * len(records) / len(FAMILIES)
    for family in FAMILIES:
        for form in FORMS:
            answers = Counter(answer_text(r) for r in records if r["type"] == family and r["form"] == form)
            top = answers.most_common(1)[0][1] / sum(answers.values())
            assert top <= (0.55 if (family, form) == ("appearance_order", "short") else 0.35), (family, form, answers)


def test_scenes_are_well_formed():
    """Names unique, sprites inside the frame, never within the gap of each other, on
    the 2-pixel grid, and patterns only where they are visible."""
    for seed in range(200):
        scene = generate_sample(np.random.default_rng(seed))
        assert scene == generate_sample(np.random.default_rng(seed))
        names = [obj.name for obj in scene.objects]
        assert 2 <= len(names) <= 4 and len(set(names)) == len(names)
        for obj in scene.objects:
            assert obj.end - obj.start >= 3 and obj.size % 2 == 0 and obj.x0 % 2 == obj.y0 % 2 == 0
            assert obj.pattern == "plain" or pattern_visible(obj.shape, obj.size, pattern_cell(64))
        for t in range(scene.frames):
            boxes = [obj.box(t) for obj in scene.visible_at(t)]
            assert all(0 <= b[0] and 0 <= b[1] and b[2] <= 64 and b[3] <= 64 for b in boxes)
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    assert not overlaps((a[0] - 3, a[1] - 3, a[2] + 3, a[3] + 3), b)


def test_answer_extraction_for_scoring():
    from crosslmm.synth.evaluate import extract

    assert extract("B", "mc") == "B" and extract("B. blue", "mc") == "B" and extract("The answer is C.", "mc") == "C"
    assert extract("maybe", "mc") == ""
    assert extract("Red.", "short") == "red" and extract("  3 circles", "short") == "3" and extract("", "short") == ""


def test_option_reply_breakdown_separates_the_option_named_from_the_letter():
    from crosslmm.synth.evaluate import option_reply, option_reply_breakdown

    assert option_reply("The answer is does not move (B)") == ("does not move", "B")
    assert option_reply("up (C)") == ("up", "C") and option_reply("B") is None
    record = {"form": "mc", "type": "count", "answer": "B", "options": ["4", "2", "0", "1"]}
    answered = [(record, "2 (B)"), (record, "2 (A)"), (record, "4 (A)"), (record, "7 (B)"), (record, "C"),
                ({"form": "short", "type": "count", "answer": "2"}, "2")]
    counts = option_reply_breakdown(answered)
    assert counts.keys() == {"all", "count"} and counts["all"] == counts["count"]
    row = counts["all"]
    assert (row["questions"], row["names_an_option"], row["option_right"], row["letter_follows"], row["letter_right"]) \
        == (5, 3, 2, 2, 2)
    assert row["letter_follows_rate"] == 2 / 3 and row["option_right_rate"] == row["letter_right_rate"] == 2 / 5


def test_synth_eval_command_scores_every_question(tmp_path):
    from typer.testing import CliRunner

    from crosslmm.checkpoints.scratch import corpus_from_records, init_from_scratch
    from crosslmm.cli import app

    write_dataset(tmp_path / "data", n=10, seed=0)
    init_from_scratch("tiny", tmp_path / "model", corpus_from_records([tmp_path / "data" / "train.json"]), vocab_size=400,
                      tokens_per_frame=1)
    result = CliRunner().invoke(app, ["synth-eval", str(tmp_path / "data"), "--model", str(tmp_path / "model"),
                                      "--split", "train", "--limit", "6", "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert scored["count"]["all"] == 6 and len(scored["predictions"]) == 6
    assert 0.0 <= scored["accuracy"]["all"] <= 1.0
    assert scored["accuracy"]["all"] == sum(p["correct"] for p in scored["predictions"]) / 6


def test_synth_text_then_synth_eval_on_the_text_world(tmp_path):
    from typer.testing import CliRunner

    from crosslmm.checkpoints.scratch import corpus_from_records, init_from_scratch
    from crosslmm.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["synth-text", str(tmp_path / "text"), "--n", "6", "--heldout", "2"])
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "text" / "train_text.json").read_text())
    heldout = json.loads((tmp_path / "text" / "heldout_text.json").read_text())
    assert len(train) == 4 and len(heldout) == 2 and not {r["id"] for r in train} & {r["id"] for r in heldout}
    init_from_scratch("tiny", tmp_path / "model", corpus_from_records([tmp_path / "text" / "train_text.json"]),
                      vocab_size=400, tokens_per_frame=1)
    scored = runner.invoke(app, ["synth-eval", str(tmp_path / "text" / "heldout_text.json"), "--model",
                                 str(tmp_path / "model"), "--text", "--out", str(tmp_path / "eval.json")])
    assert scored.exit_code == 0, scored.output
    assert json.loads((tmp_path / "eval.json").read_text())["count"]["all"] == sum(len(r["questions"]) for r in heldout)
    bad = runner.invoke(app, ["synth-text", str(tmp_path / "x"), "--n", "3", "--heldout", "3"])
    assert bad.exit_code != 0 and "--heldout" in bad.output
