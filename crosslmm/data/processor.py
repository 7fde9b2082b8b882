"""Chat messages and media -> model inputs; LLaVA records -> training examples.

`CrossLMMProcessor` is the one place where text, media and the model's token layout
meet. Everything the model decides (placeholder id, pooled tokens per frame, tokens
after each media item, the LLM's context length) is read from the checkpoint's
`config.json`, never stored twice, so the processor cannot disagree with the model. The
processor's own options (frame sampling, `max_length`) live in `processor_config.json`.

Input ids carry ONE placeholder per media item; the model expands it (see
`crosslmm/model/splice.py`). The processor only computes the expanded length, to refuse
a sequence that would not fit instead of truncating it: truncation after splicing is the
classic way to train on a sample whose answer was cut off.

Training labels are built by rendering the chat template incrementally (see
`_render_segments`): only the assistant turns' content and their end-of-turn token are
learned, never the user turns or the assistant header. A template whose renderings are
not prefix-consistent (e.g. one that rewrites earlier turns) is refused, because there
the token boundaries of "what the model saw" and "what it must predict" are undefined.
An assistant turn may name a `given` prefix of its value (`{"from": "gpt", "value":
"left (D)", "given": "left"}`): that prefix is context, as a prefilled reply is at
inference, and only the rest is learned.

Records that cannot be encoded correctly raise `RecordError`; nothing is silently
repaired (no inserted placeholder, no reused media, no substituted sample).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch
from jinja2 import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from crosslmm.data.image_processing import FrameProcessor
from crosslmm.data.video import DEFAULT_MAX_FRAMES, VideoClip, VideoDecodeError, load_media
from crosslmm.model.configuration import CrossLMMConfig
from crosslmm.model.splice import IGNORE_INDEX  # one definition, shared with the model

PROCESSOR_CONFIG_NAME = "processor_config.json"
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
# Placeholder spellings accepted in text: LLaVA's two and our own token.
PLACEHOLDERS = ("<image>", "<video>", "<media>")
# LLaVA speaker names -> chat-template roles.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# End-of-turn tokens of common chat templates. A base model's tokenizer often names a
# different eos (Qwen2 base: <|endoftext|>) than the template's turn end (<|im_end|>).
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")
_OPTION_NAMES = ("num_frames", "fps", "max_frames", "max_length")


class RecordError(ValueError):
    """A training record that cannot be encoded faithfully; the message starts with its id."""


Message = Mapping[str, str]
MediaItem = str | os.PathLike | VideoClip


@dataclass(frozen=True)
class _Segment:
    text: str
    learn: bool  # an assistant answer: learn up to and including its end-of-turn token


class CrossLMMProcessor:
    """Tokenizer + frame processor + frame sampling, bound to one model config.

    Frame sampling: with `fps` set, one frame per 1/fps seconds (at most `max_frames`) and
    `num_frames` is ignored; else `num_frames` frames (or `max_frames` if `num_frames` is
    None). Images are always one frame. `max_length` (default: the LLM's
    `max_position_embeddings`) bounds the sequence AFTER media expansion.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        frame_processor: FrameProcessor,
        config: CrossLMMConfig,
        *,
        num_frames: int | None = 8,
        fps: float | None = None,
        max_frames: int = DEFAULT_MAX_FRAMES,
        max_length: int | None = None,
    ) -> None:
        if config.media_token_id is None:
            raise ValueError("the model config has no media_token_id; build the checkpoint with `crosslmm build`")
        self.tokenizer = tokenizer
        self.frame_processor = frame_processor
        self.config = config
        self.num_frames = num_frames
        self.fps = fps
        self.max_frames = max_frames
        self._max_length_option = max_length
        self.media_token = tokenizer.convert_ids_to_tokens(config.media_token_id)
        self._check_media_token()
        self.end_of_turn_ids = _end_of_turn_ids(tokenizer, config)

    # ------------------------------------------------------------------ model-side values

    @property
    def media_token_id(self) -> int:
        return self.config.media_token_id

    @property
    def tokens_per_frame(self) -> int:
        return self.config.tokens_per_frame

    @property
    def tokens_after_media(self) -> int:
        return self.config.tokens_after_media

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, or its eos id when it has no pad token."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        return int(pad)

    @property
    def max_length(self) -> int | None:
        """The option if set, else the LLM's context length (None: unbounded)."""
        if self._max_length_option is not None:
            return self._max_length_option
        return getattr(self.config.text_config, "max_position_embeddings", None)

    @property
    def sampling(self) -> dict[str, Any]:
        """Keyword arguments for `load_media`: exactly one sampling mode."""
        if self.fps is not None:
            return {"num_frames": None, "fps": self.fps, "max_frames": self.max_frames}
        return {"num_frames": self.num_frames, "fps": None, "max_frames": self.max_frames}

    def media_key(self, path: str | os.PathLike) -> str:
        """Identifies one decoded clip for a feature cache: the file's resolved path plus
        the sampling options, so two media roots holding the same relative path, or a
        change of frame count, can never reuse each other's features (moving the data
        only costs a re-encode)."""
        s = self.sampling
        return f"{Path(path).resolve().as_posix()}|n={s['num_frames']}|fps={s['fps']}|max={s['max_frames']}"

    def record_media_keys(self, record: Mapping[str, Any], media_root: str | os.PathLike) -> list[str]:
        """The feature-cache keys of a record's media, without opening any file
        (RecordError for media paths that are malformed or leave `media_root`)."""
        try:
            return [self.media_key(_resolve_inside(Path(media_root), p)) for p in _record_media(record)]
        except RecordError as err:
            raise RecordError(f"{record.get('id', '<no id>')}: {err}") from err

    def expanded_length(self, num_tokens: int, media_num_frames: Sequence[int]) -> int:
        """Sequence length the model will see: each placeholder becomes its frames'
        pooled tokens plus `tokens_after_media`."""
        visual = sum(int(n) * self.tokens_per_frame + self.tokens_after_media for n in media_num_frames)
        return num_tokens - len(media_num_frames) + visual

    # ------------------------------------------------------------------ save / load

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, config: CrossLMMConfig | None = None, **options: Any
    ) -> CrossLMMProcessor:
        """Load from a checkpoint directory (config.json, tokenizer, optional
        preprocessor_config.json and processor_config.json). `options` override the saved
        processor options; `config` is for a processor saved apart from its model."""
        directory = Path(directory)
        if config is None:
            if not (directory / "config.json").is_file():
                raise FileNotFoundError(
                    f"{directory / 'config.json'} is missing: the processor reads the model's config; save the "
                    "processor next to the model or pass config="
                )
            config = CrossLMMConfig.from_pretrained(directory, local_files_only=True)
        unknown = set(options) - set(_OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown processor options {sorted(unknown)}; expected {list(_OPTION_NAMES)}")
        saved = _read_processor_options(directory / PROCESSOR_CONFIG_NAME)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        return cls(tokenizer, _load_frame_processor(directory, config), config, **{**saved, **options})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer, processor_config.json and preprocessor_config.json (the
        latter only when the directory has none describing the same frame processing, so
        a vision checkpoint's original file is kept). The model's config.json is the
        model's to write: save the processor next to it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        options = {"num_frames": self.num_frames, "fps": self.fps, "max_frames": self.max_frames,
                   "max_length": self._max_length_option}
        (directory / PROCESSOR_CONFIG_NAME).write_text(json.dumps(options, indent=2) + "\n")
        existing = directory / PREPROCESSOR_CONFIG_NAME
        if not existing.is_file() or _frame_processor_from_file(existing, self.config) != self.frame_processor:
            existing.write_text(json.dumps(_preprocessor_dict(self.frame_processor), indent=2) + "\n")

    # ------------------------------------------------------------------ inference

    def __call__(
        self,
        messages: Sequence[Message],
        media: Sequence[MediaItem] | None = None,
        add_generation_prompt: bool = True,
        return_tensors: str = "pt",
    ) -> dict[str, torch.Tensor | None]:
        """Chat messages (placeholders `<image>`, `<video>` or `<media>` in their content)
        and the media in placeholder order -> a batch of one for `model(**inputs)` or
        `model.generate(**inputs)`. Raises ValueError on a placeholder/media mismatch or
        a sequence longer than `max_length` after expansion."""
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        media = list(media or [])
        ids = self._prompt_tokens(messages, len(media), add_generation_prompt)
        clips = [item if isinstance(item, VideoClip) else load_media(item, **self.sampling) for item in media]
        frames = [clip.num_frames for clip in clips]
        self._check_length(len(ids), frames, ValueError, prefix="")
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": torch.cat([self.frame_processor(clip) for clip in clips]) if clips else None,
            "media_num_frames": torch.tensor(frames, dtype=torch.long),
        }

    def prompt_ids(self, messages: Sequence[Message], media_num_frames: Sequence[int],
                   add_generation_prompt: bool = True) -> list[int]:
        """The prompt's token ids for media already decoded elsewhere (`media_num_frames`:
        frames of each item, in placeholder order), with the same checks as `__call__`:
        for callers that encode a video once and ask it many questions."""
        ids = self._prompt_tokens(messages, len(media_num_frames), add_generation_prompt)
        self._check_length(len(ids), list(media_num_frames), ValueError, prefix="")
        return ids

    def _prompt_tokens(self, messages: Sequence[Message], num_media: int, add_generation_prompt: bool) -> list[int]:
        chat = [{"role": m["role"], "content": self._with_media_token(_content(m))} for m in messages]
        placeholders = sum(m["content"].count(self.media_token) for m in chat)
        if placeholders != num_media:
            raise ValueError(
                f"the messages hold {placeholders} media placeholder(s) (<image>, <video> or <media>) but "
                f"{num_media} media item(s) were given; each media item needs exactly one placeholder"
            )
        text = render_chat(self.tokenizer, chat, add_generation_prompt)
        ids = self._tokenize(text)
        self._check_placeholder_tokens(ids, num_media)
        return ids

    # ------------------------------------------------------------------ training

    def encode_record(
        self,
        record: Mapping[str, Any],
        media_root: str | os.PathLike,
        *,
        load_pixels: bool = True,
        frame_counts: Mapping[str, int] | None = None,
        uint8_pixels: bool = False,
    ) -> dict[str, Any]:
        """A LLaVA record -> `id`, `input_ids` (L,), `labels` (L,), `pixel_values`
        (F, 3, S, S) or None, `media_num_frames` (M,), `media_keys` (M strings).

        `uint8_pixels`: `pixel_values` are the resized uint8 frames, to be normalised
        later with `frame_processor.normalize` (on the GPU, by the trainer).

        `load_pixels=False` (training from a feature cache): `pixel_values` is None. The
        frame count of each media item is taken from `frame_counts[media_key]` when
        given there, without touching the file; otherwise the file is decoded (to count
        frames: with `fps` sampling the count depends on the duration) and the pixels are
        not processed. Raises RecordError, message starting with the record id, for
        anything that would make the example wrong.
        """
        record_id = str(record.get("id", "<record without id>"))
        try:
            encoded = self._encode_record(record, Path(media_root), load_pixels, frame_counts or {}, uint8_pixels)
        except RecordError as err:
            raise RecordError(f"{record_id}: {err}") from err
        return {"id": record_id, **encoded}

    def _encode_record(self, record, media_root: Path, load_pixels: bool, frame_counts, uint8_pixels: bool = False
                       ) -> dict[str, Any]:
        relative_paths = _record_media(record)
        chat = [{"role": role, "content": self._with_media_token(text), "given": given}
                for role, text, given in _record_turns(record)]
        placeholders = sum(m["content"].count(self.media_token) for m in chat)
        if placeholders != len(relative_paths):
            raise RecordError(
                f"{placeholders} media placeholder(s) in the conversation but {len(relative_paths)} media file(s); "
                "each media item needs exactly one placeholder (<image> or <video>)"
            )
        paths = [_resolve_inside(media_root, p) for p in relative_paths]
        keys = [self.media_key(path) for path in paths]

        input_ids, labels = self._tokenize_with_labels(chat)
        self._check_placeholder_tokens(input_ids, len(paths), RecordError)
        frames, pixels = self._load_record_media(paths, keys, load_pixels, frame_counts, uint8_pixels)
        self._check_length(len(input_ids), frames, RecordError, prefix="too long after splicing the media: ")
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": torch.cat(pixels) if pixels else None,
            "media_num_frames": torch.tensor(frames, dtype=torch.long),
            "media_keys": keys,
        }

    def _load_record_media(self, paths, keys, load_pixels, frame_counts, uint8_pixels: bool = False
                           ) -> tuple[list[int], list[torch.Tensor]]:
        frames, pixels = [], []
        for path, key in zip(paths, keys):
            if not load_pixels and key in frame_counts:
                frames.append(int(frame_counts[key]))
                continue
            try:
                clip = load_media(path, **self.sampling)
            except FileNotFoundError:
                raise RecordError(f"media file {path} is missing") from None
            except (VideoDecodeError, IsADirectoryError) as err:
                raise RecordError(f"media file {path} cannot be decoded: {err}") from err
            frames.append(clip.num_frames)
            if load_pixels:
                pixels.append(self.frame_processor.resize(clip) if uint8_pixels else self.frame_processor(clip))
        return frames, pixels

    def _tokenize_with_labels(self, chat: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids and labels, segment by segment: a segment boundary is never inside
        a token, so the label mask follows the template's text exactly."""
        input_ids: list[int] = []
        labels: list[int] = []
        for segment in _render_segments(self.tokenizer, chat):
            ids = self._tokenize(segment.text)
            input_ids += ids
            labels += self._answer_labels(ids) if segment.learn else [IGNORE_INDEX] * len(ids)
        return input_ids, labels

    def _answer_labels(self, ids: list[int]) -> list[int]:
        """Learn the answer up to and including its last end-of-turn token; what the
        template puts after it (ChatML's newline) is not the model's to predict. A
        template without an end-of-turn token has the whole answer learned."""
        ends = [i for i, token in enumerate(ids) if token in self.end_of_turn_ids]
        stop = ends[-1] + 1 if ends else len(ids)
        return ids[:stop] + [IGNORE_INDEX] * (len(ids) - stop)

    # ------------------------------------------------------------------ checks and helpers

    def _with_media_token(self, text: str) -> str:
        for placeholder in PLACEHOLDERS:
            text = text.replace(placeholder, self.media_token)
        return text

    def _tokenize(self, text: str) -> list[int]:
        # Chat templates write their own BOS where the model wants one.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_media_token(self) -> None:
        if self._tokenize(f"a {self.media_token} b").count(self.media_token_id) != 1:
            raise ValueError(
                f"the tokenizer does not keep {self.media_token!r} (id {self.media_token_id}) as one token; "
                "it must be an added special token"
            )

    def _check_placeholder_tokens(self, ids: list[int], expected: int, error: type[ValueError] = ValueError) -> None:
        """The rendered chat must carry exactly the placeholders the text had: a
        template that drops or duplicates content would otherwise misplace media."""
        found = ids.count(self.media_token_id)
        if found != expected:
            raise error(f"the rendered chat holds {found} media token(s), expected {expected}")

    def _check_length(self, num_tokens: int, frames: list[int], error: type[ValueError], prefix: str) -> None:
        limit = self.max_length
        length = self.expanded_length(num_tokens, frames)
        if limit is not None and length > limit:
            raise error(
                f"{prefix}{length} tokens after expanding {len(frames)} media item(s) "
                f"({sum(frames)} frames x {self.tokens_per_frame} tokens) exceed max_length={limit}; "
                "sample fewer frames or shorten the text (nothing is truncated)"
            )


# --------------------------------------------------------------------------- chat rendering


_PROBE = "crosslmm-template-probe"


def render_chat(tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text for messages with string content (placeholders in the
    text). Templates written for typed content (LLaVA-OneVision's iterate over
    `{"type": "text"}` parts and silently drop a plain string) get each message as one
    text part instead, so no question ever disappears from a prompt."""
    if _template_wants_typed_content(tokenizer):
        chat = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in chat]
    else:  # only what a template knows (a record turn's `given` is ours)
        chat = [{"role": m["role"], "content": m["content"]} for m in chat]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


_TYPED_CONTENT: dict[str, bool] = {}  # chat template text -> wants typed content


def _template_wants_typed_content(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    if not isinstance(template, str):
        return False  # no template (apply_chat_template says so) or a dict of named ones: used as given
    if template not in _TYPED_CONTENT:
        def renders(content) -> bool:
            try:
                text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
            except Exception:  # noqa: BLE001 - a template that cannot render this form
                return False
            return _PROBE in text

        if renders(_PROBE):
            _TYPED_CONTENT[template] = False
        elif renders([{"type": "text", "text": _PROBE}]):
            _TYPED_CONTENT[template] = True
        else:
            raise ValueError("the tokenizer's chat template renders neither string nor typed text content: "
                             "a user message's text does not appear in its output")
    return _TYPED_CONTENT[template]


def _render_segments(tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]]) -> list[_Segment]:
    """Split the rendered conversation into prompt text and assistant answers.

    For each assistant turn i: render(turns[:i], generation prompt) ends where the answer
    starts; render(turns[:i+1]) ends where it ends. Each rendering must extend the
    previous one, and the pieces must add up to the full rendering, else RecordError.
    """

    def render(turns: list[dict[str, str]], prompt: bool) -> str:
        try:
            return render_chat(tokenizer, turns, prompt)
        except TemplateError as err:
            raise RecordError(f"the chat template refused the conversation: {err}") from err

    segments: list[_Segment] = []
    done = ""
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        prompt = render(chat[:i], True)
        answered = render(chat[: i + 1], False)
        _require_prefix(done, prompt, i)
        _require_prefix(prompt, answered, i)
        answer = answered[len(prompt):]
        given = message.get("given") or ""
        if not answer.startswith(given):  # a template that rewrites the answer's start
            raise RecordError(f"turn {i}: the rendered answer does not start with its given prefix {given!r}")
        segments += [_Segment(prompt[len(done):] + given, False), _Segment(answer[len(given):], True)]
        done = answered
    full = render(chat, False)
    _require_prefix(done, full, len(chat))
    segments.append(_Segment(full[len(done):], False))
    return [s for s in segments if s.text]


def _require_prefix(prefix: str, text: str, turn: int) -> None:
    if not text.startswith(prefix):
        raise RecordError(
            f"the chat template is not prefix-consistent at turn {turn} (rendering more turns changed earlier "
            "text), so answer tokens cannot be told apart from prompt tokens"
        )


def _end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, config: CrossLMMConfig) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(config.text_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in KNOWN_END_OF_TURN if token in vocab)
    return ids


def _content(message: Message) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise TypeError(
            f"message content must be a string with <image>/<video> placeholders, got {type(content).__name__}"
        )
    return content


# --------------------------------------------------------------------------- LLaVA records


def _record_media(record: Mapping[str, Any]) -> list[str]:
    """The record's media paths, in placeholder order ("video" or "image": one, not both)."""
    present = [key for key in ("video", "image") if record.get(key) is not None]
    if len(present) == 2:
        raise RecordError("has both 'video' and 'image'; their placeholder order would be ambiguous")
    if not present:
        return []
    value = record[present[0]]
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise RecordError(f"'{present[0]}' must be a path or a list of paths, got {value!r}")
    return paths


def _record_turns(record: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """(role, text, given prefix or None) per turn, checked."""
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise RecordError("has no 'conversations' list")
    turns = []
    for n, turn in enumerate(conversations):
        speaker = turn.get("from") if isinstance(turn, Mapping) else None
        value = turn.get("value") if isinstance(turn, Mapping) else None
        if speaker not in ROLES or not isinstance(value, str):
            raise RecordError(f"turn {n} must be {{'from': human|gpt|system, 'value': str}}, got {turn!r}")
        given = turn.get("given")
        if given is not None and (ROLES[speaker] != "assistant" or not isinstance(given, str)
                                  or not value.startswith(given) or given == value):
            raise RecordError(f"turn {n}: 'given' must be a proper prefix of an assistant turn's value, got {given!r}")
        turns.append((ROLES[speaker], value, given))
    if not any(role == "assistant" for role, _, _ in turns):
        raise RecordError("the conversation has no assistant ('gpt') turn, so there is nothing to learn")
    if any(role == "assistant" and any(p in text for p in PLACEHOLDERS) for role, text, _ in turns):
        raise RecordError("a media placeholder sits in an assistant turn; media belong in user turns")
    return turns


def _resolve_inside(root: Path, relative: str) -> Path:
    """`root / relative`, refused if it leaves `root` (lexically: `..` or an absolute
    path). Symlinks inside the root are followed on purpose: datasets often link their
    media folders from elsewhere."""
    root_norm = PurePath(os.path.normpath(os.path.abspath(root)))
    target = PurePath(os.path.normpath(os.path.abspath(root / relative)))
    if target != root_norm and root_norm not in target.parents:
        raise RecordError(f"media path {relative!r} escapes media_root {root}")
    return Path(target)


# --------------------------------------------------------------------------- files


def _read_processor_options(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    options = json.loads(path.read_text())
    unknown = set(options) - set(_OPTION_NAMES)
    if unknown:
        raise ValueError(f"{path} has unknown options {sorted(unknown)}; expected {list(_OPTION_NAMES)}")
    return options


def _load_frame_processor(directory: Path, config: CrossLMMConfig) -> FrameProcessor:
    path = directory / PREPROCESSOR_CONFIG_NAME
    if path.is_file():
        return _frame_processor_from_file(path, config)
    return FrameProcessor.from_vision_config(config.image_size, config.vision_config.model_type)


def _frame_processor_from_file(path: Path, config: CrossLMMConfig) -> FrameProcessor:
    return FrameProcessor.from_preprocessor_config(path, image_size=config.image_size)


def _preprocessor_dict(processor: FrameProcessor) -> dict[str, Any]:
    """A transformers-style preprocessor config that `FrameProcessor.from_preprocessor_config`
    reads back to an equal FrameProcessor (every setting explicit)."""
    side = processor.size
    clip_like = processor.resize_mode == "shortest_edge"
    size = {"shortest_edge": side} if clip_like else {"height": side, "width": side}
    crop = processor.crop_size
    return {
        "image_processor_type": "CLIPImageProcessor" if clip_like else "SiglipImageProcessor",
        "do_resize": processor.resize_mode != "none",
        "size": size,
        "resample": processor.resample,
        "do_center_crop": crop is not None,
        "crop_size": {"height": crop, "width": crop} if crop is not None else None,
        "do_rescale": processor.rescale_factor is not None,
        "rescale_factor": processor.rescale_factor,
        "do_normalize": processor.image_mean is not None,
        "image_mean": list(processor.image_mean) if processor.image_mean is not None else None,
        "image_std": list(processor.image_std) if processor.image_std is not None else None,
    }
