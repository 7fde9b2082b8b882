"""A deterministic procedural video world with questions that need fine detail.

Why it exists: CrossLMM's claim is that a few pooled tokens per frame plus cross-attention
to the original patch tokens keep the detail that pooling alone throws away. To measure
that on a 2-core CPU we need videos that are tiny (64x64, 8 frames) yet whose questions
cannot be answered from a blurred summary of each frame: *which* quadrant holds *which*
colour at *which* frame, which way a 10-pixel sprite moves, whether a sprite carries
2-pixel stripes or dots. Every answer is computed from the scene's ground truth, and a
question is only asked when its answer is unambiguous (exactly one object in a
quadrant, a unique first appearance, ...).

Layout of this module, top to bottom:

1. vocabulary (palette, shapes, patterns, regions, question families);
2. the scene model (`SceneObject`, `Scene`) and `generate_sample`;
3. `render`: scene -> (T, H, W, 3) uint8 frames;
4. facts: every question a scene can answer unambiguously, per family;
5. records: choosing a balanced handful of facts per video and formatting them as
   LLaVA conversations (multiple-choice A-D or one-word answers);
6. `encode_video` (PyAV, yuv420p, near-lossless) and `write_dataset`.

Frame numbering: a video is written with exactly `frames` frames at a constant rate, so
`crosslmm.data.video.load_video(path, num_frames=frames)`, which picks the frame on
screen at the centre of each of `frames` equal time segments, returns every frame once,
in order. "frame k" in a question (1-based) is therefore the k-th frame the model sees.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# --------------------------------------------------------------------------- vocabulary

# Saturated, mutually distant colours: they stay recognisable after yuv420p chroma
# subsampling and stay far from the grey background and from the black pattern marks.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "magenta": (220, 60, 220),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
_PLURAL = {"square": "squares", "circle": "circles", "triangle": "triangles", "cross": "crosses"}  # count questions
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "checks")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
STATIC = "static"  # one-word answer for an object that does not move
STATIC_OPTION = "does not move"  # the same answer as a multiple-choice option
REGIONS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
_ALL_NAMES = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
FAMILIES: tuple[str, ...] = (
    "color_at_region_time",
    "shape_at_region_time",
    "motion_direction",
    "appearance_order",
    "count",
    "pattern",
)
FORMS: tuple[str, ...] = ("mc", "short")
LETTERS = "ABCD"
MARK_COLOR = (10, 10, 10)  # pattern marks: far from every palette colour and the background

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
# How a multiple-choice question is answered. "letter": the letter alone, as the paper's
# benchmarks ask (MC_SUFFIX). "option-letter": the option's text, then its letter in
# brackets ("up (B)"): the answer word first turns the option-letter hop, which a small
# language model learns only after a long plateau (docs/synthetic.md), into a copy of the
# letter in front of the word just written. "sentence": "The answer is up (B)", the same
# with the word spelled as it is in the options (a leading space, so the same token).
# Scored the same way: the first standalone letter.
MC_REPLIES: tuple[str, ...] = ("letter", "option-letter", "sentence")
MC_SENTENCE_PREFIX = "The answer is "
MC_SUFFIXES: dict[str, str] = {
    "letter": MC_SUFFIX,
    "option-letter": "Answer with the option's text from the given choices, then its letter in brackets.",
    "sentence": "Answer with \"The answer is\", the option's text from the given choices, then its letter in brackets.",
}
SHORT_SUFFIX = "Answer the question using a single word."

# Sizes below are for a 64-pixel frame and scale with `size`.
_REFERENCE_SIZE = 64
# Sprite side in pixels, never below 10 whatever the frame size: at 8 pixels a circle
# and a cross with arms wide enough to keep their colour through yuv420p differ by four
# pixels (the codec's colour blocks are 2 pixels at any frame size).
_OBJECT_SIZE = (10, 14)
_SPEED = (4, 6)  # pixels per frame for moving objects
_GAP = 4  # minimum empty pixels between two visible sprites (codec bleed must not join them)
_CELL = 2  # pattern cell side
_NOISE = 6  # background texture amplitude (grey levels)
# Every sprite edge, pattern cell, position and step is a multiple of this: yuv420p keeps
# one colour sample per 2x2 block, and a block straddling a sprite edge or a black
# pattern mark washes the colour out (seen: checked green decoded as grey-green).
_GRID = 2


# --------------------------------------------------------------------------- scene model


@dataclass(frozen=True)
class SceneObject:
    """One sprite: what it looks like, when it is on screen and where.

    Position is linear in the frame index, so motion is a constant cardinal velocity
    (or none): "which direction" always has exactly one answer.
    """

    shape: str
    color: str
    pattern: str
    size: int  # side of the sprite's square box, pixels
    start: int  # first visible frame (0-based)
    end: int  # one past the last visible frame
    x0: int  # top-left corner at frame 0 (extrapolated when start > 0)
    y0: int
    dx: int  # pixels per frame
    dy: int

    @property
    def name(self) -> str:
        """How questions refer to it; unique within a scene."""
        return f"{self.color} {self.shape}"

    @property
    def direction(self) -> str:
        """Cardinal direction of motion, or `STATIC`. Image y grows downwards."""
        if self.dx > 0:
            return "right"
        if self.dx < 0:
            return "left"
        if self.dy > 0:
            return "down"
        if self.dy < 0:
            return "up"
        return STATIC

    def visible(self, t: int) -> bool:
        return self.start <= t < self.end

    def box(self, t: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) with exclusive ends, at frame t."""
        x, y = self.x0 + self.dx * t, self.y0 + self.dy * t
        return x, y, x + self.size, y + self.size


@dataclass(frozen=True)
class Scene:
    """Everything needed to render a video and to answer questions about it."""

    size: int
    frames: int
    background: tuple[int, int, int]
    texture_seed: int
    objects: tuple[SceneObject, ...]

    def visible_at(self, t: int) -> list[SceneObject]:
        return [obj for obj in self.objects if obj.visible(t)]

    def find(self, name: str) -> SceneObject:
        return next(obj for obj in self.objects if obj.name == name)


def region_box(region: str, size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), exclusive ends, of a named quadrant."""
    half = size // 2
    vertical, horizontal = region.split("-")
    x0 = 0 if horizontal == "left" else half
    y0 = 0 if vertical == "top" else half
    return x0, y0, x0 + half, y0 + half


def _scaled(value: int, size: int, minimum: int = 1) -> int:
    return max(minimum, round(value * size / _REFERENCE_SIZE))


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int = 0) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def _inside(inner: tuple[int, int, int, int], outer: tuple[int, int, int, int]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


# --------------------------------------------------------------------------- generation


def generate_sample(rng: np.random.Generator, frames: int = 8, size: int = 64) -> Scene:
    """Draw a scene: 2-4 non-overlapping sprites with distinct (colour, shape) names,
    some moving, some appearing or disappearing midway, one or two patterned.

    Sprites are placed one by one and a placement that would touch an already placed
    sprite in any frame where both are visible is redrawn, so no question ever has to
    reason about occlusion. Deterministic given the generator's state.
    """
    if frames < 3:
        raise ValueError(f"frames must be at least 3 (motion needs several frames), got {frames}")
    if size < 48 or size % 2:
        raise ValueError(f"size must be an even number >= 48 (yuv420p; room for four 10-pixel sprites), got {size}")
    while True:
        objects = _draw_objects(rng, frames, size)
        if objects is not None:
            break
    grey = int(rng.integers(50, 67))
    return Scene(size, frames, (grey, grey, grey), int(rng.integers(2**31)), tuple(objects))


def _draw_objects(rng: np.random.Generator, frames: int, size: int) -> list[SceneObject] | None:
    count = int(rng.integers(2, 5))
    names = rng.permutation([(c, s) for c in COLORS for s in SHAPES])[:count]
    patterned = _draw_patterns(rng, count)
    objects: list[SceneObject] = []
    for (color, shape), pattern in zip(names, patterned):
        obj = _place(rng, str(shape), str(color), pattern, objects, frames, size)
        if obj is None:
            return None
        objects.append(obj)
    return objects


def _draw_patterns(rng: np.random.Generator, count: int) -> list[str]:
    """One or two sprites carry distinct patterns (so "which object has stripes" has a
    single answer), the rest are plain. Every scene gets one, or "plain" would be the
    majority answer of the pattern questions."""
    patterns = ["plain"] * count
    how_many = int(rng.integers(1, 3))
    for slot, pattern in zip(rng.permutation(count)[:how_many], rng.permutation(PATTERNS[1:])):
        patterns[int(slot)] = str(pattern)
    return patterns


def _draw_timing(rng: np.random.Generator, frames: int) -> tuple[int, int]:
    """Visible interval [start, end): at least `min_visible` frames, often the whole video."""
    min_visible = max(3, frames // 3)
    latest = frames - min_visible
    start = 0 if latest == 0 or rng.random() < 0.45 else int(rng.integers(1, latest + 1))
    end = frames if rng.random() < 0.75 else int(rng.integers(start + min_visible, frames + 1))
    return start, end


def _grid_range(low: int, high: int) -> tuple[int, int]:
    """[low, high] pixels as an inclusive range of grid units (at least one unit)."""
    return max(1, math.ceil(low / _GRID)), max(1, high // _GRID)


def _draw_velocity(rng: np.random.Generator, size: int, room: int, steps: int) -> tuple[int, int]:
    """(dx, dy) in grid units: static (30%) or a cardinal step that keeps the sprite in
    `room` units of travel over `steps` frames."""
    if steps == 0 or rng.random() < 0.3:
        return 0, 0
    low, high = _grid_range(_scaled(_SPEED[0], size), _scaled(_SPEED[1], size))
    speed = min(int(rng.integers(low, high + 1)), room // steps)
    if speed < 1:
        return 0, 0
    return [(-speed, 0), (speed, 0), (0, -speed), (0, speed)][int(rng.integers(4))]


def _place(
    rng: np.random.Generator,
    shape: str,
    color: str,
    pattern: str,
    placed: Sequence[SceneObject],
    frames: int,
    size: int,
    tries: int = 60,
) -> SceneObject | None:
    """A sprite that stays fully inside the frame (one grid unit from the border) while
    visible and keeps `_GAP` pixels from every placed sprite; None after `tries` failed
    draws. Geometry is drawn in grid units, then scaled to pixels."""
    smallest = _OBJECT_SIZE[0]
    low, high = _grid_range(_scaled(smallest, size, smallest), _scaled(_OBJECT_SIZE[1], size, smallest))
    sides = list(range(low, high + 1))
    if pattern != "plain":
        sides = [u for u in sides if pattern_visible(shape, u * _GRID, pattern_cell(size))]
        if not sides:  # no size of this shape shows the pattern: plain beats a wrong answer
            pattern, sides = "plain", list(range(low, high + 1))
    side = int(rng.choice(sides))
    room = size // _GRID - side - 2  # travel room in units, one unit of margin each side
    gap = _scaled(_GAP, size, 2)
    for _ in range(tries):
        start, end = _draw_timing(rng, frames)
        dx, dy = _draw_velocity(rng, size, room, end - 1 - start)
        # Range of the corner at `start` such that the corner at end-1 is in range too.
        travel_x, travel_y = dx * (end - 1 - start), dy * (end - 1 - start)
        x_start = int(rng.integers(1 + max(0, -travel_x), 1 + room - max(0, travel_x) + 1))
        y_start = int(rng.integers(1 + max(0, -travel_y), 1 + room - max(0, travel_y) + 1))
        candidate = SceneObject(shape, color, pattern, side * _GRID, start, end,
                                (x_start - dx * start) * _GRID, (y_start - dy * start) * _GRID,
                                dx * _GRID, dy * _GRID)
        if not any(_clash(candidate, other, frames, gap) for other in placed):
            return candidate
    return None


def _clash(a: SceneObject, b: SceneObject, frames: int, gap: int) -> bool:
    return any(a.visible(t) and b.visible(t) and _overlaps(a.box(t), b.box(t), gap) for t in range(frames))


# --------------------------------------------------------------------------- rendering


def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) bool mask of a shape drawn in its box (triangle apex up)."""
    centre = (np.arange(side) + 0.5) - side / 2
    y, x = np.meshgrid(centre, centre, indexing="ij")
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return x**2 + y**2 <= (side / 2) ** 2
    if shape == "triangle":
        row = np.arange(side)[:, None]
        return np.abs(x) <= (row + 1) / 2
    if shape == "cross":
        # Arms at most a third of the side, starting on a grid line: an arm that straddles
        # yuv420p colour blocks loses its colour (thin ones entirely). Never empty.
        offset = min(_GRID * math.ceil(side / (3 * _GRID)), (side - 1) // 2)
        arm = side - 2 * offset
        return (np.abs(x) < arm / 2) | (np.abs(y) < arm / 2)
    raise ValueError(f"unknown shape {shape!r}")


def pattern_mask(pattern: str, side: int, cell: int = _CELL) -> np.ndarray:
    """(side, side) bool mask of the dark marks of a pattern, in `cell`-pixel units:
    stripes are horizontal bands, dots a sparse grid, checks a checkerboard."""
    row, col = np.meshgrid(np.arange(side) // cell, np.arange(side) // cell, indexing="ij")
    if pattern == "plain":
        return np.zeros((side, side), dtype=bool)
    if pattern == "stripes":
        return row % 2 == 1
    if pattern == "dots":
        return (row % 2 == 0) & (col % 2 == 0)
    if pattern == "checks":
        return (row + col) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


def pattern_cell(size: int) -> int:
    """Side of one pattern cell in a frame of `size` pixels (a whole number of grid units)."""
    return _GRID * _scaled(_CELL // _GRID, size)


def pattern_visible(shape: str, side: int, cell: int) -> bool:
    """Whether every pattern looks different from every other on this sprite, by at least
    four cells of marks. Patterns are anchored to the sprite's box, so on a thin cross the
    dot grid can fall entirely between the arms; such sprites are drawn plain."""
    inside = shape_mask(shape, side)
    marks = [pattern_mask(pattern, side, cell) & inside for pattern in PATTERNS]
    least = min(int((a ^ b).sum()) for i, a in enumerate(marks) for b in marks[i + 1:])
    return least >= 4 * cell * cell


def render(scene: Scene) -> np.ndarray:
    """The video's frames, (T, H, W, 3) uint8 RGB.

    The background carries faint static grey noise so that frames are not flat (a flat
    frame would let the codec and the vision tower take shortcuts nobody meets in real
    video); grey noise leaves chroma untouched, so colours stay clean.
    """
    noise = np.random.default_rng(scene.texture_seed).integers(-_NOISE, _NOISE + 1, (scene.size, scene.size, 1))
    background = np.clip(np.asarray(scene.background)[None, None] + noise, 0, 255).astype(np.uint8)
    video = np.repeat(background[None], scene.frames, axis=0)
    cell = pattern_cell(scene.size)
    for obj in scene.objects:
        sprite = _sprite(obj, cell)
        mask = shape_mask(obj.shape, obj.size)
        for t in range(obj.start, obj.end):
            x0, y0, x1, y1 = obj.box(t)
            region = video[t, y0:y1, x0:x1]
            region[mask] = sprite[mask]
    return video


def _sprite(obj: SceneObject, cell: int) -> np.ndarray:
    sprite = np.empty((obj.size, obj.size, 3), dtype=np.uint8)
    sprite[:] = COLORS[obj.color]
    sprite[pattern_mask(obj.pattern, obj.size, cell)] = MARK_COLOR
    return sprite


# --------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Fact:
    """One unambiguous question about a scene.

    `answer` is the correct multiple-choice option text and `distractors` the pool of
    wrong options to draw three from (fewer than three: no multiple-choice form); the
    first `required` of them are always shown. `short_answer` is the one-word answer
    (None: no short form, e.g. when the answer is "red square").
    """

    family: str
    question: str
    answer: str
    distractors: tuple[str, ...] = ()
    short_answer: str | None = None
    required: int = 0

    @property
    def forms(self) -> tuple[str, ...]:
        forms = []
        if len(self.distractors) >= len(LETTERS) - 1:
            forms.append("mc")
        if self.short_answer is not None:
            forms.append("short")
        return tuple(forms)

    def answer_for(self, form: str) -> str:
        """The canonical answer in a form, used to balance answers."""
        return self.answer if form == "mc" else str(self.short_answer)


def _fact(family: str, question: str, answer: str, vocabulary: Iterable[str], in_scene: Iterable[str] = (),
          short: bool = True) -> Fact:
    """A fact whose wrong options are drawn from `vocabulary`, always including the
    values `in_scene` (other objects' colours, shapes, ...): otherwise "what colour is
    the object top-left in frame 3" could be answered by noticing which colours the
    video holds at all, with no need to know where or when."""
    present = tuple(dict.fromkeys(v for v in in_scene if v != answer))
    rest = tuple(v for v in vocabulary if v != answer and v not in present)
    return Fact(family, question, answer, present + rest, answer if short else None, len(present))


def _alone_in_region(scene: Scene, region: str, t: int) -> SceneObject | None:
    """The object in `region` at frame t when exactly one visible object touches the
    quadrant and lies entirely inside it; otherwise None (the question would be ambiguous)."""
    box = region_box(region, scene.size)
    touching = [obj for obj in scene.visible_at(t) if _overlaps(obj.box(t), box)]
    if len(touching) == 1 and _inside(touching[0].box(t), box):
        return touching[0]
    return None


def _region_facts(scene: Scene) -> list[Fact]:
    facts = []
    for t in range(scene.frames):
        for region in REGIONS:
            obj = _alone_in_region(scene, region, t)
            if obj is None:
                continue
            where = f"in the {region} quadrant in frame {t + 1}"
            facts.append(_fact("color_at_region_time", f"What colour is the object {where}?", obj.color,
                               COLORS, (o.color for o in scene.objects)))
            facts.append(_fact("shape_at_region_time", f"What shape is the object {where}?", obj.shape,
                               SHAPES, (o.shape for o in scene.objects)))
    return facts


def _motion_facts(scene: Scene) -> list[Fact]:
    options = (*DIRECTIONS, STATIC_OPTION)
    facts = []
    for obj in scene.objects:
        option = STATIC_OPTION if obj.direction == STATIC else obj.direction
        fact = _fact("motion_direction", f"Which direction does the {obj.name} move?", option, options)
        facts.append(replace(fact, short_answer=obj.direction))  # "static", one word
    return facts


def _appearance_facts(scene: Scene) -> list[Fact]:
    facts = []
    starts = [obj.start for obj in scene.objects]
    names = [obj.name for obj in scene.objects]
    colors = Counter(obj.color for obj in scene.objects)
    for word, pick in (("first", min), ("last", max)):
        target = pick(starts)
        if starts.count(target) != 1:
            continue
        obj = scene.objects[starts.index(target)]
        facts.append(_fact("appearance_order", f"Which object appears {word} in the video?", obj.name,
                           _ALL_NAMES, names, short=False))
        if colors[obj.color] == 1:
            facts.append(_fact("appearance_order", f"What colour is the object that appears {word} in the video?",
                               obj.color, COLORS, colors))
    for a in scene.objects:
        for b in scene.objects:
            if a is not b and a.start != b.start:
                answer = "yes" if a.start < b.start else "no"
                facts.append(Fact("appearance_order", f"Does the {a.name} appear before the {b.name}?",
                                  answer, (), answer))
    return facts


def _count_facts(scene: Scene) -> list[Fact]:
    numbers = [str(k) for k in range(6)]

    def fact(question: str, count: int) -> Fact:
        return _fact("count", question, str(count), numbers)

    facts = [fact("How many objects appear in the video?", len(scene.objects))]
    for shape in SHAPES:
        facts.append(fact(f"How many {_PLURAL[shape]} appear in the video?",
                          sum(obj.shape == shape for obj in scene.objects)))
    for color in COLORS:
        facts.append(fact(f"How many {color} objects appear in the video?",
                          sum(obj.color == color for obj in scene.objects)))
    return facts


def _pattern_facts(scene: Scene) -> list[Fact]:
    facts = []
    names = [obj.name for obj in scene.objects]
    patterns = [obj.pattern for obj in scene.objects]
    colors = Counter(obj.color for obj in scene.objects)
    for obj in scene.objects:
        facts.append(_fact("pattern", f"What pattern does the {obj.name} have?", obj.pattern, PATTERNS, patterns))
        if obj.pattern == "plain":
            continue
        facts.append(_fact("pattern", f"Which object has {obj.pattern}?", obj.name, _ALL_NAMES, names, short=False))
        if colors[obj.color] == 1:
            facts.append(_fact("pattern", f"What colour is the object with {obj.pattern}?", obj.color, COLORS, colors))
    return facts


def scene_facts(scene: Scene) -> list[Fact]:
    """Every unambiguous question the scene answers, all families together."""
    return [*_region_facts(scene), *_motion_facts(scene), *_appearance_facts(scene),
            *_count_facts(scene), *_pattern_facts(scene)]


# --------------------------------------------------------------------------- records


@dataclass
class Balancer:
    """Running counts that steer choices towards what has been used least.

    Picking the least-used family, form, answer and correct-letter position (random
    among ties) keeps every family present, letters uniform and no answer a trivial
    majority, without rejecting scenes. One balancer per split keeps each split balanced.
    """

    families: Counter = field(default_factory=Counter)
    forms: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)
    letters: Counter = field(default_factory=Counter)

    @staticmethod
    def least_used(rng: np.random.Generator, items: Sequence, count: Callable[[object], int]):
        ties = rng.random(len(items))
        return items[min(range(len(items)), key=lambda i: (count(items[i]), ties[i]))]


def make_questions(scene: Scene, rng: np.random.Generator, count: int, balancer: Balancer,
                   mc_reply: str = "letter") -> list[dict]:
    """Up to `count` distinct questions about `scene`, as records without id/video.

    Families are spread first (least-used family among those the scene can answer),
    then form, then answer value; a family is only repeated when the scene answers
    fewer than `count` families.
    """
    remaining = scene_facts(scene)
    records = []
    for _ in range(count):
        if not remaining:
            break
        families = sorted({fact.family for fact in remaining}, key=FAMILIES.index)
        family = balancer.least_used(rng, families, lambda f: balancer.families[f])
        in_family = [fact for fact in remaining if fact.family == family]
        forms = [form for form in FORMS if any(form in fact.forms for fact in in_family)]
        form = balancer.least_used(rng, forms, lambda f: balancer.forms[family, f])
        candidates = [fact for fact in in_family if form in fact.forms]
        fact = balancer.least_used(rng, candidates, lambda f: balancer.answers[family, form, f.answer_for(form)])
        remaining.remove(fact)
        balancer.families[family] += 1
        balancer.forms[family, form] += 1
        balancer.answers[family, form, fact.answer_for(form)] += 1
        records.append(_mc_record(fact, rng, balancer, mc_reply) if form == "mc" else _short_record(fact))
    return records


def mc_reply(options: Sequence[str], letter: str, style: str) -> str:
    """The assistant's reply to a multiple-choice question whose answer is `letter`."""
    if style not in MC_REPLIES:
        raise ValueError(f"mc_reply must be one of {MC_REPLIES}, got {style!r}")
    if style == "letter":
        return letter
    reply = f"{options[LETTERS.index(letter)]} ({letter})"
    return reply if style == "option-letter" else MC_SENTENCE_PREFIX + reply


_mc_reply_for = mc_reply  # for functions whose `mc_reply` argument (the style's name) hides it


def restyle_mc(record: dict, style: str) -> dict:
    """`record` (one question, as in `<split>.json`) with its multiple-choice instruction
    and reply in `style`; short answers unchanged. Lets one rendered world train both
    styles (its videos, hence a feature cache, stay the same)."""
    if record["form"] != "mc":
        return record
    human, gpt = record["conversations"]
    lines = human["value"].split("\n")
    if lines[-1] not in MC_SUFFIXES.values():
        raise ValueError(f"{record.get('id')}: the prompt does not end with a multiple-choice instruction")
    prompt = "\n".join([*lines[:-1], MC_SUFFIXES[style]])
    reply = mc_reply(record["options"], record["answer"], style)
    return {**record, "conversations": [{**human, "value": prompt}, {**gpt, "value": reply}]}


def state_mc_answers(records: Sequence[dict], fraction: float = 0.5, seed: int = 0) -> list[dict]:
    """Multi-turn records (`train_multiturn.json`, option-letter style) with "The answer
    is <option text>." written before a random `fraction` of their multiple-choice
    questions: the stated-answer scaffold (docs/synthetic.md, H1). A model that learned
    the stated hop on text keeps reading a marked option's letter on video questions,
    while the unstated half can only be answered by marking the options from what it
    sees. Draws one number per multiple-choice turn, in order, from `random.Random(seed)`."""
    rng = random.Random(seed)
    out = []
    for record in records:
        turns = [dict(turn) for turn in record["conversations"]]
        for human, gpt in zip(turns[0::2], turns[1::2]):
            match = re.fullmatch(rf"(.+) \(([{LETTERS}])\)", gpt["value"])
            if match and rng.random() < fraction:
                media = "<video>\n" if human["value"].startswith("<video>\n") else ""
                human["value"] = f"{media}The answer is {match[1]}.\n{human['value'][len(media):]}"
        out.append({**record, "conversations": turns})
    return out


def copy_drill(record: dict, letter: str) -> dict:
    """`record` (one multiple-choice question with a text-first reply, as in `<split>.json`)
    as a drill of the copy alone: the reply names option `letter`, right or not, and its
    text is `given` (context, not learned), so only that letter is taught.

    A drill teaches the copy where it is used, after a video, and because the named
    option is chosen at random, perception can neither help nor be taught a wrong answer
    (measured in docs/synthetic.md, "the copy without the answer stated": drills teach
    the same copy as text hops, which does carry over to video questions)."""
    human, gpt = record["conversations"]
    style = next((s for s, suffix in MC_SUFFIXES.items() if human["value"].endswith(suffix)), None)
    if record.get("form") != "mc" or style not in ("option-letter", "sentence"):
        raise ValueError(f"{record.get('id')}: a copy drill needs a multiple-choice record in the "
                         f"option-letter or sentence style")
    reply = _option_text_given({**gpt, "value": mc_reply(record["options"], letter, style)})
    return {**record, "id": f"{record['id']}_drill{letter}", "answer": letter, "conversations": [human, reply]}


def _option_text_given(turn: dict) -> dict:
    """A text-first multiple-choice reply turn ("left (D)", "The answer is left (D)") with
    everything before its letter `given`: context, not learned (`crosslmm.data.processor`)."""
    return {**turn, "given": turn["value"].rsplit(" (", 1)[0]}


def _mc_record(fact: Fact, rng: np.random.Generator, balancer: Balancer, style: str = "letter") -> dict:
    letter = balancer.least_used(rng, list(LETTERS), lambda x: balancer.letters[fact.family, x])
    balancer.letters[fact.family, letter] += 1
    wanted = len(LETTERS) - 1
    shown = list(fact.distractors[:min(fact.required, wanted)])
    rest = fact.distractors[len(shown):]
    shown += [rest[int(i)] for i in rng.choice(len(rest), wanted - len(shown), replace=False)]
    options = [shown[int(i)] for i in rng.permutation(wanted)]
    options.insert(LETTERS.index(letter), fact.answer)
    lines = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    prompt = f"{fact.question}\n{lines}\n{MC_SUFFIXES[style]}"
    return _record(fact.family, "mc", prompt, letter, options, mc_reply(options, letter, style))


def _short_record(fact: Fact) -> dict:
    return _record(fact.family, "short", f"{fact.question}\n{SHORT_SUFFIX}", str(fact.short_answer), None)


def _record(family: str, form: str, prompt: str, answer: str, options: list[str] | None,
            reply: str | None = None) -> dict:
    record: dict = {"type": family, "form": form, "answer": answer}
    if options is not None:
        record["options"] = options
    record["conversations"] = [
        {"from": "human", "value": f"<video>\n{prompt}"},
        {"from": "gpt", "value": answer if reply is None else reply},
    ]
    return record


# --------------------------------------------------------------------------- video files


def pick_codec() -> str:
    """H.264 when this PyAV build has an encoder for it, else MPEG-4 part 2."""
    for name in ("libx264", "mpeg4"):
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
                return name
            except Exception:  # listed but not usable as an encoder
                continue
    raise RuntimeError("this PyAV build has neither libx264 nor mpeg4 encoders")


def _codec_options(codec: str) -> dict[str, str]:
    """Near-lossless settings (2-pixel patterns and colours must survive) whose output is
    a function of the input alone.

    x264 is run at a constant quantiser with one thread: its default CRF rate control
    (macroblock-tree) gave a different stream for the same frames in about one encode
    in ten, in the first encodes of a process and across processes; constant QP never
    did in hundreds of encodes. QP 6 costs about 6 KB per 64x64x8 video.
    """
    if codec == "libx264":
        return {"qp": "6", "preset": "medium", "threads": "1"}
    return {"threads": "1"}


_FF_QP2LAMBDA = 118  # FFmpeg's scale from quantiser to the `global_quality` lambda


def encode_video(frames: np.ndarray, path: str | Path, fps: int = 4, codec: str | None = None) -> str:
    """Write (T, H, W, 3) uint8 frames as an mp4 at a constant rate; returns the codec.

    Frame i gets presentation time i / fps, so uniform segment-centre sampling of T
    frames (crosslmm.data.video.load_video) returns exactly frames 0..T-1 in order.
    """
    codec = codec or pick_codec()
    time_base = Fraction(1, fps)
    height, width = frames.shape[1:3]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps, options=_codec_options(codec))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = time_base
        if codec == "mpeg4":  # a fixed quantiser rather than the default 200 kb/s
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = 2 * _FF_QP2LAMBDA
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = i, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return codec


# --------------------------------------------------------------------------- dataset


def video_id(index: int) -> str:
    """File stem of video `index`; zero-padded so names sort in generation order."""
    return f"vid{index:06d}"


def video_index(path: str | Path) -> int:
    """The index `video_id` named a record's video file by (`videos/vid000123.mp4` -> 123)."""
    return int(Path(path).stem.removeprefix("vid"))


def scene_for(seed: int, index: int, frames: int = 8, size: int = 64) -> Scene:
    """The scene of video `index` of a dataset with `seed`: independent of n, so a
    smaller dataset's videos are a prefix of a larger one's."""
    return generate_sample(np.random.default_rng([seed, 0, index]), frames, size)


def split_indices(n: int, seed: int, splits: Mapping[str, float]) -> dict[str, list[int]]:
    """Assign whole videos to splits (so no video is in two), sizes by largest remainder."""
    if any(share < 0 for share in splits.values()) or not sum(splits.values()) > 0:
        raise ValueError(f"split shares must be non-negative with a positive sum, got {dict(splits)}")
    total = sum(splits.values())
    exact = {name: n * share / total for name, share in splits.items()}
    sizes = {name: math.floor(value) for name, value in exact.items()}
    by_remainder = sorted(splits, key=lambda name: (-(exact[name] - sizes[name]), list(splits).index(name)))
    for name in by_remainder[: n - sum(sizes.values())]:
        sizes[name] += 1
    order = np.random.default_rng([seed, 2]).permutation(n).tolist()
    result, offset = {}, 0
    for name in splits:
        result[name] = sorted(order[offset: offset + sizes[name]])
        offset += sizes[name]
    return result


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    frames: int = 8,
    size: int = 64,
    splits: Mapping[str, float] | None = None,
    questions_per_video: int = 3,
    fps: int = 4,
    mc_reply: str = "letter",
) -> dict:
    """Write `n` videos and their questions; returns the metadata also saved as meta.json.

    Layout: `videos/<id>.mp4`, one `<split>.json` list of LLaVA records per split (one
    question each, the form evaluation uses), `train_multiturn.json` (the training
    split's questions grouped per video as multi-turn conversations, see
    `multiturn_records`), `train_captions.json` (one dense caption per training video,
    see `caption`), and `meta.json` (parameters, codec, counts per split / type / form, correct-letter and
    answer histograms).
    Everything is a function of (n, seed, frames, size, splits, questions_per_video, fps):
    scenes and questions draw from generators seeded by (seed, purpose, index) only;
    `mc_reply` (see MC_REPLIES) changes only the multiple-choice instruction and reply.
    """
    if mc_reply not in MC_REPLIES:
        raise ValueError(f"mc_reply must be one of {MC_REPLIES}, got {mc_reply!r}")
    splits = dict(splits or {"train": 0.9, "test": 0.1})
    _check_int("n", n, 0)
    _check_int("questions_per_video", questions_per_video, 1)
    _check_int("fps", fps, 1)
    generate_sample(np.random.default_rng(0), frames, size)  # rejects bad frames/size before writing
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    codec = pick_codec()
    meta: dict = {
        "generator": "crosslmm.synth.world",
        "params": {"n": n, "seed": seed, "frames": frames, "size": size, "splits": splits,
                   "questions_per_video": questions_per_video, "fps": fps, "mc_reply": mc_reply},
        "codec": codec, "pix_fmt": "yuv420p", "families": list(FAMILIES),
        "videos": {}, "questions": {}, "counts": {}, "letters": {}, "answers": {},
    }
    for split, indices in split_indices(n, seed, splits).items():
        records = _write_split(out_dir, indices, seed, frames, size, questions_per_video, fps, codec, mc_reply)
        (out_dir / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
        if split == "train":
            (out_dir / "train_multiturn.json").write_text(json.dumps(multiturn_records(records), indent=1) + "\n")
            captions = [caption_record(scene_for(seed, i, frames, size), i) for i in indices]
            (out_dir / "train_captions.json").write_text(json.dumps(captions, indent=1) + "\n")
        meta["videos"][split] = len(indices)
        meta["questions"][split] = len(records)
        meta["counts"][split] = _histogram(records, lambda r: (r["type"], r["form"]))
        multiple_choice = [r for r in records if r["form"] == "mc"]
        meta["letters"][split] = _histogram(multiple_choice, lambda r: (r["type"], r["answer"]))
        meta["answers"][split] = _histogram(records, lambda r: (r["type"], r["form"], answer_text(r)))
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _write_split(out_dir: Path, indices: Sequence[int], seed: int, frames: int, size: int,
                 questions_per_video: int, fps: int, codec: str, mc_reply: str = "letter") -> list[dict]:
    balancer = Balancer()
    records = []
    for index in indices:
        scene = scene_for(seed, index, frames, size)
        vid = video_id(index)
        encode_video(render(scene), out_dir / "videos" / f"{vid}.mp4", fps, codec)
        questions = make_questions(scene, np.random.default_rng([seed, 1, index]), questions_per_video, balancer,
                                   mc_reply)
        for j, question in enumerate(questions):
            records.append({"id": f"{vid}_q{j}", "video": f"videos/{vid}.mp4", **question})
    return records


CAPTION_PROMPT = "Describe every frame of the video."


def caption(scene: Scene, region_first: bool = False) -> str:
    """A dense frame-by-frame description: every visible sprite with its colour, shape,
    pattern and the quadrant holding its centre, then each sprite's motion. The
    pretraining text of the synthetic world (the paper's stage 1 trains on captions):
    every word is grounded in a specific frame and place, so a from-scratch language
    model learns to read the visual tokens far faster than from one-word answers.

    `region_first` writes each frame's sprites quadrant by quadrant, the quadrant before
    the sprite ("frame 3: top-left red circle, bottom-right ..."): every colour word is
    then a lookup of a given frame and quadrant, the one the "colour/shape in the
    top-left quadrant in frame 3" questions need, about twenty of them per video."""
    half = scene.size / 2
    parts = []
    for t in range(scene.frames):
        seen = []
        for obj in scene.visible_at(t):
            x0, y0, x1, y1 = obj.box(t)
            region = f"{'top' if (y0 + y1) / 2 < half else 'bottom'}-{'left' if (x0 + x1) / 2 < half else 'right'}"
            pattern = "" if obj.pattern == "plain" else f" with {obj.pattern}"
            seen.append((region, f"{region} {obj.name}{pattern}" if region_first else f"{obj.name}{pattern} {region}"))
        if region_first:
            seen.sort(key=lambda item: REGIONS.index(item[0]))  # stable: drawing order within a quadrant
        seen = [text for _, text in seen]
        parts.append(f"frame {t + 1}: {', '.join(seen) if seen else 'empty'}.")
    parts.append("motion: " + ", ".join(f"{obj.name} {obj.direction}" for obj in scene.objects) + ".")
    return " ".join(parts)


def append_caption_turns(records: Sequence[dict], seed: int, frames: int = 8, size: int = 64,
                         region_first: bool = True) -> list[dict]:
    """Multi-turn question records with their video's caption asked last, as one more turn.

    The caption's frame-and-place lookups then train the cross-attention's queries beside
    the questions, on the same decoded video and at the cost of its tokens only. It comes
    after the questions so that no answer can be read from it; `seed` (and `frames`,
    `size`) must be the world's, which regenerates each video's scene from its index."""
    out = []
    for record in records:
        text = caption(scene_for(seed, video_index(record["video"]), frames, size), region_first=region_first)
        out.append({**record, "conversations": [*record["conversations"], {"from": "human", "value": CAPTION_PROMPT},
                                                {"from": "gpt", "value": text}]})
    return out


# A place-and-time question: (quadrant, frame number). Public: the probe tools find these questions by it.
AT_REGION_TIME = re.compile(r"in the ((?:top|bottom)-(?:left|right)) quadrant in frame (\d+)\?")
_NAMED_OBJECT = re.compile(r"^(?:What pattern does|Which direction does) the ([a-z]+ [a-z]+) (?:have|move)\?", re.MULTILINE)
_FIRST_OR_LAST = re.compile(r"^(?:Which object|What colour is the object that) appears (first|last) in the video\?", re.MULTILINE)
_WITH_PATTERN = re.compile(r"^(?:Which object has|What colour is the object with) ([a-z]+)\?", re.MULTILINE)
_BEFORE = re.compile(r"^Does the ([a-z]+ [a-z]+) appear before the ([a-z]+ [a-z]+)\?", re.MULTILINE)
# "How many objects / circles / red objects appear in the video?": group 1 names what is counted.
COUNT_QUESTION = re.compile(r"^How many ((?:[a-z]+ )?objects|[a-z]+) appear in the video\?", re.MULTILINE)
_SINGULAR = {plural: shape for shape, plural in _PLURAL.items()}


def counted_objects(scene: Scene, counted: str) -> list[SceneObject]:
    """The sprites a count question's group 1 ("objects", "circles", "red objects") counts."""
    if counted == "objects":
        return list(scene.objects)
    if counted.endswith(" objects"):
        return [obj for obj in scene.objects if obj.color == counted.split()[0]]
    return [obj for obj in scene.objects if obj.shape == _SINGULAR[counted]]


def object_patches(obj: SceneObject, t: int, size: int, grid: int) -> list[int]:
    """Row-major indices, in a `grid` x `grid` patch grid over a `size`-px frame, of the
    patches the sprite's box overlaps at frame t."""
    cell = size // grid
    x0, y0, x1, y1 = obj.box(t)
    rows = range(max(y0, 0) // cell, min(y1 - 1, size - 1) // cell + 1)
    columns = range(max(x0, 0) // cell, min(x1 - 1, size - 1) // cell + 1)
    return [r * grid + c for r in rows for c in columns]


def grounding_targets(scene: Scene, question: str, grid: int, counts: bool = False
                      ) -> list[int] | list[list[int]] | None:
    """The original tokens the answer to `question` (a user turn's text) is about, as
    indices over the video's frames in order (frame * grid² + patch), or None when its
    answer has no one place.

    Colour or shape "in the top-left quadrant in frame 3": that sprite's patches in frame
    3. Pattern of a named sprite, and the sprite with a named pattern: its patches in
    every frame it is visible. The object that appears first or last: its patches in the
    frame it appears. Questions that compare two looks get two head groups
    (`crosslmm.train.grounding`): a sprite's motion, its patches in the first and in the
    last frame it is visible (direction is their difference; its average place over every
    frame says nothing about it); "does A appear before B", A and B in the frames they
    appear. Counts: None, or with `counts` every counted sprite in the frame it appears
    (each once, so each weighs about the same in T2V's average; a count of 0 has no place:
    None). Why that can carry a number through a softmax: the sprites are distinct (no two
    share colour and shape), so the average of k of them is a mixture of k identities,
    whose spread says k even though its total mass does not. The targets of
    `crosslmm.train.grounding`'s auxiliary loss; like the vision encoder's per-patch
    labels, they come free from the renderer."""
    per_frame = grid * grid

    def at(obj: SceneObject, t: int) -> list[int]:
        return [t * per_frame + p for p in object_patches(obj, t, scene.size, grid)]

    def visible(obj: SceneObject) -> range:
        return range(obj.start, min(obj.end, scene.frames))

    match = AT_REGION_TIME.search(question)
    if match:
        t = int(match[2]) - 1
        obj = _alone_in_region(scene, match[1], t)  # the rule the question was asked under
        if obj is None:
            raise ValueError(f"{question!r}: no sprite alone in that quadrant in frame {t + 1}: not this scene's question")
        return at(obj, t)
    match = _NAMED_OBJECT.search(question)
    if match:
        obj = scene.find(match[1])
        if match[0].startswith("Which direction"):
            return [at(obj, visible(obj)[0]), at(obj, visible(obj)[-1])]
        return [i for t in visible(obj) for i in at(obj, t)]
    match = _FIRST_OR_LAST.search(question)
    if match:
        starts = [obj.start for obj in scene.objects]
        obj = scene.objects[starts.index((min if match[1] == "first" else max)(starts))]
        return at(obj, obj.start)
    match = _WITH_PATTERN.search(question)
    if match:
        (obj,) = [obj for obj in scene.objects if obj.pattern == match[1]]  # asked only when one has it
        return [i for t in visible(obj) for i in at(obj, t)]
    match = _BEFORE.search(question)
    if match:
        first, second = scene.find(match[1]), scene.find(match[2])
        return [at(first, first.start), at(second, second.start)]
    match = COUNT_QUESTION.search(question) if counts else None
    if match:
        targets = dict.fromkeys(i for obj in counted_objects(scene, match[1]) for i in at(obj, visible(obj)[0]))
        return list(targets) or None  # sprites that touch one patch give it once
    return None


def add_grounding(records: Sequence[dict], seed: int, frames: int = 8, size: int = 64, grid: int = 8,
                  counts: bool = False) -> list[dict]:
    """Question records with a `grounding` field: per assistant turn, `grounding_targets`
    of the question before it (null for none; `counts`: count questions get targets too).
    `seed`, `frames` and `size` must be the world's (its scenes are regenerated from the
    video indices); `grid` the vision encoder's patch grid (the `small` preset's SigLIP: 8)."""
    out = []
    for record in records:
        scene = scene_for(seed, video_index(record["video"]), frames, size)
        questions = [turn["value"] for turn in record["conversations"] if turn["from"] == "human"]
        out.append({**record, "grounding": [grounding_targets(scene, q, grid, counts) for q in questions]})
    return out


def caption_record(scene: Scene, index: int) -> dict:
    vid = video_id(index)
    return {"id": f"{vid}_caption", "video": f"videos/{vid}.mp4", "type": "caption", "conversations": [
        {"from": "human", "value": f"<video>\n{CAPTION_PROMPT}"}, {"from": "gpt", "value": caption(scene)}]}


TEXT_WORLD_FIRST_INDEX = 10**6  # text-world scenes: far beyond any video index, never a test scene
TEXT_WORLD_PREFIX = "Video description: "


def text_world_records(seed: int, count: int, frames: int = 8, size: int = 64, questions_per_video: int = 6,
                       caption_as_answer: bool = False, first: int = 0) -> list[dict]:
    """The world as text only: per fresh scene, its dense caption as the context of a
    multi-turn conversation of its questions, with no media.

    A language model pretrained on these already knows the world before it sees pixels
    (the question families, the answer words, option letters, counting, "before"), as
    every CrossLMM variant of the paper starts from one pretrained Qwen2.5. Scenes are
    drawn from indices `TEXT_WORLD_FIRST_INDEX + first + i`, so none is a video of the dataset
    (in particular none is a held-out test scene); rendering is never needed, so the
    supply is unlimited and costs nothing but the text.

    With `caption_as_answer` the caption is the assistant's answer to the caption prompt
    (`CAPTION_PROMPT`, as in `caption_record`) before the questions: the loss then also
    trains the model to write captions, a far denser signal than one-word answers."""
    balancer, records = Balancer(), []
    for i in range(first, first + count):
        index = TEXT_WORLD_FIRST_INDEX + i
        scene = scene_for(seed, index, frames, size)
        questions = make_questions(scene, np.random.default_rng([seed, 3, index]), questions_per_video, balancer)
        turns = []
        if caption_as_answer:
            turns = [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": caption(scene)}]
        for j, record in enumerate(questions):
            human, gpt = record["conversations"]
            question = human["value"].replace("<video>\n", "", 1)
            in_context = j == 0 and not caption_as_answer
            text = f"{TEXT_WORLD_PREFIX}{caption(scene)}\n{question}" if in_context else question
            turns += [{"from": "human", "value": text}, {"from": "gpt", "value": gpt["value"]}]
        records.append({"id": f"text{index:07d}", "type": "text_world", "conversations": turns,
                        "questions": [{k: q[k] for k in ("type", "form", "answer")} for q in questions]})
    return records


LETTER_HOP_PREFIX = "The answer is "


def letter_hop_records(seed: int, count: int, frames: int = 8, size: int = 64, first: int = 0,
                       families: Sequence[str] | None = None, mc_reply: str = "letter",
                       stated: bool = True, stated_fraction: float = 0.0) -> list[dict]:
    """The option-letter hop alone, as text: per fresh scene one multiple-choice question
    of the world, its answer stated before it ("The answer is up."), the option letter as
    the reply.

    Every multiple-choice question needs this second hop after the lookup (find the
    option whose text is the answer, reply its letter), and a small from-scratch language
    model learns it only after a long plateau at chance (docs/synthetic.md, "the
    option-letter hop"); with the answer given, nothing else is left to learn, so the
    plateau is crossed once, in a cheap text-only stage, before any pixels. Families are
    balanced as in the datasets; `families` keeps only those (a scene without one of them
    gives no record), for a curriculum that crosses the plateau on a few answer words
    first. Scenes are the text world's (`TEXT_WORLD_FIRST_INDEX + first + i`): never a
    video of a dataset; `first` keeps a held-out probe apart. `mc_reply` as in
    `write_dataset` (the two styles with the option's text: the reply repeats the given
    answer, then its letter).

    `stated=False` leaves the answer out (option-text styles only): the reply's option
    text is then unknowable from the prompt, so the one thing left to learn is the copy
    from the reply's own words to their letter — the path a video question takes after
    the model has named its answer. With the answer stated, a model may instead match
    the statement against the options, a copy that does not carry over to video
    questions (docs/synthetic.md, "2026-12-04"). The reply's option text is then `given`
    (context, not learned: see `crosslmm.data.processor`), so the model is not also
    taught that a question's answer is a guess.

    `stated_fraction` (with `stated=False`): that share of the records, drawn apart from
    the scenes' own draws, state the answer anyway and learn the whole reply, so a reply's
    start is learned somewhere; without any, a model trained on these alone comes to
    predict " (" there with near certainty (docs/synthetic.md, "eleventh session")."""
    if not stated and mc_reply == "letter":
        raise ValueError("stated=False needs a reply style with the option's text (option-letter or sentence): "
                         "a bare letter is unknowable without the answer")
    if stated_fraction and (stated or not 0 < stated_fraction < 1):
        raise ValueError("stated_fraction is for stated=False, in (0, 1)")
    balancer, records = Balancer(), []
    states = np.random.default_rng([seed, 91])  # one draw per record written, when stated_fraction is set
    for i in range(first, first + count):
        index = TEXT_WORLD_FIRST_INDEX + i
        rng = np.random.default_rng([seed, 4, index])
        facts = [fact for fact in scene_facts(scene_for(seed, index, frames, size))
                 if "mc" in fact.forms and (families is None or fact.family in families)]
        if not facts:
            continue
        present = sorted({fact.family for fact in facts}, key=FAMILIES.index)
        family = balancer.least_used(rng, present, lambda f: balancer.families[f])
        candidates = [fact for fact in facts if fact.family == family]
        fact = balancer.least_used(rng, candidates, lambda f: balancer.answers[family, "mc", f.answer])
        balancer.families[family] += 1
        balancer.answers[family, "mc", fact.answer] += 1
        record = _mc_record(fact, rng, balancer, mc_reply)
        question = record["conversations"][0]["value"].replace("<video>\n", "", 1)
        stated_here = stated or (stated_fraction > 0 and states.random() < stated_fraction)
        statement = f"{LETTER_HOP_PREFIX}{fact.answer}.\n" if stated_here else ""
        reply = {"from": "gpt", "value": record["conversations"][1]["value"]}
        if not stated_here:
            reply = _option_text_given(reply)
        records.append({"id": f"hop{index:07d}", "type": "text_world", "questions": [
            {k: record[k] for k in ("type", "form", "answer", "options")}], "conversations": [
            {"from": "human", "value": statement + question}, reply]})
    return records


# Every option text a multiple-choice question of the world can show (49): what the lookup
# drill draws its options from.
MC_OPTION_TEXTS: tuple[str, ...] = (*COLORS, *SHAPES, *PATTERNS, *DIRECTIONS, STATIC_OPTION,
                                    *(str(k) for k in range(6)), *_ALL_NAMES)


def lookup_drill_records(seed: int, count: int, queries: int = 4, first: int = 0,
                         mc_reply: str = "option-letter") -> list[dict]:
    """The stated option-letter hop without a question, `queries` times per record: four
    options drawn at random from every option text of the world (`MC_OPTION_TEXTS`), then
    turns "The answer is X." -> "X (L)", the first with the options and the reply
    instruction, the next ones the statement alone (the same options).

    Why: a from-scratch language model sits at chance on the hop (`letter_hop_records`)
    for about 6,000 steps and reaches 90 % at 7,500-9,750. On these records it starts to
    find the letter by about 2,200 steps, and after 2,000-3,250 of them the hop crosses in
    1,000-1,500 steps (docs/synthetic.md, "2026-12-07 (tenth session)"). Both need one
    circuit (find the option whose text is the stated answer, read the letter two tokens
    before it); here it has four letters per record to learn from, no question between
    the statement and the options, and options of every kind mixed. Answers are drawn with replacement, so a
    later turn may repeat an earlier one (its letter is then also in an earlier reply)."""
    style_suffix, pool = MC_SUFFIXES[mc_reply], sorted(MC_OPTION_TEXTS)
    records = []
    for i in range(first, first + count):
        rng = np.random.default_rng([seed, 77, i])
        options = [pool[j] for j in rng.choice(len(pool), size=len(LETTERS), replace=False)]
        lines = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, options))
        conversations = []
        for turn, pick in enumerate(rng.integers(0, len(LETTERS), size=queries)):
            statement = f"{LETTER_HOP_PREFIX}{options[pick]}."
            prompt = f"{statement}\n{lines}\n{style_suffix}" if turn == 0 else statement
            conversations += [{"from": "human", "value": prompt},
                              {"from": "gpt", "value": _mc_reply_for(options, LETTERS[pick], mc_reply)}]
        records.append({"id": f"drill{i}", "type": "text_world", "conversations": conversations})
    return records


def option_completion_records(seed: int, count: int, frames: int = 8, size: int = 64, first: int = 0) -> list[dict]:
    """Text-only multiple-choice questions whose answer is an object ("Which object
    appears last?"), the reply's first word given, the rest of the option and its letter
    to be learned: where that first word names one option only, the rest is a copy from
    the prompt.

    Why: a model that reads colour well and shape poorly answered such questions with an
    object no option names, the colour of one and the shape of another ("yellow square"
    among "red square", "yellow circle", ...): 28 of 100 appearance-order and 34 of 100
    pattern replies of G2, where completing the option its colour names would have been
    right 24 and 17 times (docs/synthetic.md). Without a video the copy is the only thing
    these records can teach. Scenes are the text world's, as in `letter_hop_records`
    (`first` keeps a held-out probe apart); a scene whose drawn question does not fit
    gives no record, so fewer than `count` come back."""
    records = []
    for record in letter_hop_records(seed, count, frames, size, first=first, families=("appearance_order", "pattern"),
                                     mc_reply="option-letter", stated=False):
        human, reply = record["conversations"]
        words = reply["value"].rsplit(" (", 1)[0].split()
        options = record["questions"][0]["options"]
        if len(words) < 2 or sum(option.split()[0] == words[0] for option in options) != 1:
            continue
        records.append({**record, "id": record["id"].replace("hop", "complete", 1),
                        "conversations": [human, {**reply, "given": words[0]}]})
    return records


def multiturn_records(records: Sequence[dict]) -> list[dict]:
    """One multi-turn LLaVA record per video, its questions in order: the video is
    decoded and encoded once for all of them, so a training step costs about a sixth of
    the vision compute per question (the way LLaVA-style video instruction data is
    usually laid out). The video placeholder stays in the first question only."""
    by_video: dict[str, list[dict]] = {}
    for record in records:
        by_video.setdefault(record["video"], []).append(record)
    grouped = []
    for video, questions in by_video.items():
        turns = []
        for j, record in enumerate(questions):
            human, gpt = record["conversations"]
            text = human["value"] if j == 0 else human["value"].replace("<video>\n", "", 1)
            turns += [{"from": "human", "value": text}, {"from": "gpt", "value": gpt["value"]}]
        grouped.append({"id": Path(video).stem, "video": video, "conversations": turns})
    return grouped


def answer_text(record: dict) -> str:
    """The answer as words: the chosen option's text for multiple choice."""
    if record["form"] == "mc":
        return record["options"][LETTERS.index(record["answer"])]
    return record["answer"]


def _histogram(records: Iterable[dict], key: Callable[[dict], tuple[str, ...]]) -> dict:
    """Nested counts, keys in sorted order so meta.json is byte-stable."""
    counts = Counter(key(record) for record in records)
    tree: dict = {}
    for path in sorted(counts):
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = counts[path]
    return tree
