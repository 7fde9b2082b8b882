"""A conversation about one video (or image): decoded and encoded once, and each new
turn runs only its new tokens.

The first turn prefills the prompt (the vision tower, V2V and every DCAL's T2V keys and
values run there); the KV cache and the cross-attention side cache it leaves are kept.
A later turn renders the whole conversation with the chat template as always; when the
tokens already in the caches are a prefix of it (the usual case), only the rest is fed,
so its time to first token no longer grows with the video. When they are not (a template
that rewrites earlier turns), the turn is prefilled from the encoded video again:
correct either way, `last_turn.reused_tokens` says which happened.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crosslmm.data.video import VideoClip, load_media
from crosslmm.infer import encode_clip


@dataclass
class TurnStats:
    prompt_tokens: int  # the turn's whole prompt, text tokens (placeholders count as one)
    reused_tokens: int  # of those, already in the caches
    completion_tokens: int
    time_to_first_token_s: float
    total_s: float


class TokenStreamer:
    """transformers' streamer protocol (`put`, `end`) into a queue, for one row: the
    first `put` (the prompt) is skipped. Iterate it for token ids as they come."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, ids: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._queue.put(int(ids.reshape(-1)[0]))

    def end(self) -> None:
        self._queue.put(None)

    def fail(self, err: BaseException) -> None:
        self._queue.put(err)

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def text_deltas(tokenizer, ids: Iterator[int], stop_ids: set[int]) -> Iterator[tuple[str, int]]:
    """(new text, token id) per token: the decoded text grows token by token, and a piece
    that ends inside a multi-byte character waits for the rest of it."""
    seen: list[int] = []
    emitted = ""
    token = None
    for token in ids:
        if token in stop_ids:
            continue
        seen.append(token)
        text = tokenizer.decode(seen, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        yield text[len(emitted):], token
        emitted = text
    text = tokenizer.decode(seen, skip_special_tokens=True)
    if len(text) > len(emitted):  # an answer that ends inside a character: its rest never came
        yield text[len(emitted):], token


class VideoChat:
    """`chat.ask(question)` streams the answer; the conversation and both caches carry
    over to the next `ask`."""

    def __init__(self, model, processor, media: Sequence[Any] = (), system: str | None = None) -> None:
        self.model, self.processor = model, processor
        self.device = next(model.parameters()).device
        started = time.perf_counter()
        clips = [item if isinstance(item, VideoClip) else load_media(item, **processor.sampling) for item in media]
        self.media_num_frames = [clip.num_frames for clip in clips]
        self.vision_features = torch.cat([encode_clip(model, processor, clip) for clip in clips]) if clips else None
        self.setup_seconds = time.perf_counter() - started  # decoding and the vision tower, once
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self._history: list[int] = []  # text ids in the caches, plus the last generated one (not fed)
        self._state = None  # GenerateOutput of the last turn
        self.last_turn: TurnStats | None = None

    def ask(self, question: str, **generation: Any) -> Iterator[str]:
        """Stream the answer to `question` as text pieces. The first question gets the
        media placeholders in front unless it places them itself."""
        first = not any(m["role"] == "user" for m in self.messages)
        if first and self.media_num_frames and not any(tag in question for tag in ("<video>", "<image>", "<media>")):
            question = "".join("<video>\n" for _ in self.media_num_frames) + question
        messages = self.messages + [{"role": "user", "content": question}]
        ids = self.processor.prompt_ids(messages, self.media_num_frames)
        start = time.perf_counter()
        reuse = self._state is not None and len(self._history) > 1 and ids[:len(self._history)] == self._history
        generation.setdefault("max_new_tokens", 256)
        if reuse:
            chunk = ids[len(self._history) - 1:]  # the last generated token was never fed
            mask = torch.cat([self._state.attention_mask, self._state.attention_mask.new_ones(1, len(chunk))], dim=1)
            arguments = {"input_ids": torch.tensor([chunk], device=self.device), "attention_mask": mask,
                         "cache": self._state.cache, "cross_attention_cache": self._state.cross_attention_cache}
        else:
            arguments = {"input_ids": torch.tensor([ids], device=self.device)}
            if self.vision_features is not None:
                arguments.update(vision_features=self.vision_features,
                                 media_num_frames=torch.tensor(self.media_num_frames, device=self.device))
        streamer, result = TokenStreamer(), {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(**arguments, **generation, streamer=streamer,
                                                        return_dict_in_generate=True)
            except BaseException as err:  # handed to the consumer, raised there
                streamer.fail(err)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        pieces, first_token_at, generated = [], None, []
        stop_ids = set(self.processor.end_of_turn_ids)
        for piece, token in text_deltas(self.processor.tokenizer, _recording(streamer, generated), stop_ids):
            if first_token_at is None:
                first_token_at = time.perf_counter()
            pieces.append(piece)
            yield piece
        worker.join()
        if "out" not in result:  # the worker failed: its error was raised by the streamer
            return
        end = time.perf_counter()
        answer = "".join(pieces)
        # The text as generated (not stripped): re-rendered by the template it tokenizes back to
        # the cached tokens, so the next turn can reuse them.
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self._history = ids + generated
        self._state = result["out"]
        self.last_turn = TurnStats(len(ids), len(ids) - len(chunk) if reuse else 0, len(generated),
                                   (first_token_at or end) - start, end - start)

    def answer(self, question: str, **generation: Any) -> str:
        """The whole answer at once."""
        return "".join(self.ask(question, **generation)).strip()


def _recording(streamer: TokenStreamer, into: list[int]) -> Iterator[int]:
    for token in streamer:
        into.append(token)
        yield token
