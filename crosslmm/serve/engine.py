"""The server's model loop: one worker thread owns the model; requests wait in a bounded
queue and run in batches.

- Admission happens before any media is decoded: a full queue is refused at once.
- Requests whose decoding options agree (temperature, top_p, max_tokens, stop; one
  choice, no seed) run as one batch: left-padded prompts, each with its own videos'
  features. The others run alone.
- Encoded videos are cached by content hash and sampling (`EncodedVideoCache`): a second
  question about a video skips decoding and the vision tower.
- The last few single conversations keep their KV and cross-attention caches: a request
  that repeats one of them and adds a turn (a chat client sends the whole history each
  time) runs only its new tokens; `usage.prompt_tokens_details.cached_tokens` counts the
  positions that came from there.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from crosslmm.data.video import VideoDecodeError, load_media
from crosslmm.infer import encode_clip, left_pad
from crosslmm.serve.media import EncodedVideoCache, MediaError, MediaLimits, MediaSource, check_duration, file_digest


class QueueFull(Exception):
    """The server's queue is full: answer 503 now, before reading any media."""


class Cancelled(Exception):
    """Every request of a batch went away (client gone or timed out)."""


@dataclass
class Job:
    """One chat completion request, as the engine runs it. `emit(kind, payload)` is
    called from the worker thread: ("delta", (choice, text)), ("done", result) or
    ("error", exception)."""

    messages: list[dict[str, str]]
    media: list[MediaSource]
    emit: Callable[[str, Any], None]
    frames: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys share a batch; None: runs alone."""
        if self.n != 1 or self.seed is not None:
            return None
        return (self.temperature, self.top_p, self.max_tokens, self.stop)


@dataclass
class _Prepared:
    job: Job
    ids: list[int]
    features: list[torch.Tensor]
    frames: list[int]
    media_keys: tuple[str, ...]


@dataclass
class _Conversation:
    media_keys: tuple[str, ...]
    history: list[int]  # text ids in the caches plus the last generated one
    state: Any  # GenerateOutput


class Engine:
    def __init__(self, model, processor, limits: MediaLimits, *, max_batch: int = 8, max_queue: int = 32,
                 video_cache_bytes: int = 2**30, conversations: int = 4, batch_window_s: float = 0.005) -> None:
        self.model, self.processor, self.limits = model, processor, limits
        self.device = next(model.parameters()).device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.batch_window_s = batch_window_s
        self.videos = EncodedVideoCache(video_cache_bytes)
        self._conversations: deque[_Conversation] = deque(maxlen=conversations)
        self._pending: deque[Job] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self.batches_run = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name="crosslmm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ queue

    def submit(self, job: Job) -> None:
        with self._condition:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self._pending.append(job)
            self._condition.notify()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join(timeout=10)

    def _take_batch(self) -> list[Job] | None:
        with self._condition:
            while not self._pending and not self._stopping:
                self._condition.wait()
            if self._stopping:
                return None
        if self.batch_window_s and self.max_batch > 1:
            time.sleep(self.batch_window_s)  # let requests that arrive together run together
        with self._condition:
            first = self._pending.popleft()
            batch = [first]
            key = first.batch_key
            if key is not None:
                for job in list(self._pending):
                    if len(batch) >= self.max_batch:
                        break
                    if job.batch_key == key:
                        self._pending.remove(job)
                        batch.append(job)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [job for job in batch if not job.cancelled.is_set()]
            prepared = [p for p in (self._prepare(job) for job in live) if p is not None]
            if prepared:
                try:
                    self._run(prepared)
                except Cancelled:
                    pass
                except Exception as err:  # a model failure fails its batch, not the server
                    for item in prepared:
                        item.job.emit("error", err)
            for job in batch:
                for source in job.media:
                    source.cleanup()

    # ------------------------------------------------------------------ one batch

    def _prepare(self, job: Job) -> _Prepared | None:
        try:
            features, frames, keys = [], [], []
            for source in job.media:
                check_duration(source.path, self.limits)
                key = f"{source.digest or file_digest(source.path)}|frames={job.frames}"
                encoded = self.videos.get(key)
                if encoded is None:
                    try:
                        clip = load_media(source.path, num_frames=job.frames, max_frames=self.limits.max_frames)
                    except VideoDecodeError as err:
                        raise MediaError(422, str(err).replace(str(source.path), "the media"), "media_unreadable") from None
                    if clip.num_frames > self.limits.max_frames:
                        raise MediaError(413, f"{clip.num_frames} frames, over the limit of {self.limits.max_frames}",
                                         "too_many_frames")
                    encoded = encode_clip(self.model, self.processor, clip)
                    self.videos.put(key, encoded)
                features.append(encoded)
                frames.append(encoded.shape[0])
                keys.append(key)
            try:
                ids = self.processor.prompt_ids(job.messages, frames)
            except ValueError as err:
                code = "context_length_exceeded" if "longer than" in str(err) or "context" in str(err) else "invalid_request"
                raise MediaError(400, str(err), code) from None
            return _Prepared(job, ids, features, frames, tuple(keys))
        except MediaError as err:
            job.emit("error", err)
            return None

    def _continuation(self, item: _Prepared) -> _Conversation | None:
        for conversation in list(self._conversations):
            if conversation.media_keys == item.media_keys and len(conversation.history) > 1 \
                    and item.ids[:len(conversation.history)] == conversation.history:
                self._conversations.remove(conversation)  # its caches are extended in place
                return conversation
        return None

    def _run(self, batch: list[_Prepared]) -> None:
        job = batch[0].job
        pad = self.processor.pad_token_id
        arguments: dict[str, Any] = {}
        cached = [0] * len(batch)
        conversation = self._continuation(batch[0]) if len(batch) == 1 and job.n == 1 else None
        if conversation is not None:
            chunk = batch[0].ids[len(conversation.history) - 1:]
            past = conversation.state.attention_mask
            cached[0] = past.shape[1]
            arguments.update(input_ids=torch.tensor([chunk], device=self.device),
                             attention_mask=torch.cat([past, past.new_ones(1, len(chunk))], dim=1),
                             cache=conversation.state.cache, cross_attention_cache=conversation.state.cross_attention_cache)
        else:
            input_ids, mask = left_pad([item.ids for item in batch], pad)
            arguments.update(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))
            features = [f for item in batch for f in item.features]
            if features:
                arguments.update(vision_features=torch.cat(features),
                                 media_num_frames=torch.tensor([n for item in batch for n in item.frames], device=self.device))
        sampling = job.temperature > 0
        options: dict[str, Any] = {"max_new_tokens": job.max_tokens, "do_sample": sampling, "num_return_sequences": job.n}
        if sampling:
            options["temperature"] = job.temperature
            if job.top_p is not None:
                options["top_p"] = job.top_p
        if job.stop:
            options.update(stop_strings=list(job.stop), tokenizer=self.processor.tokenizer)
        generator = None
        if job.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(job.seed)
        streamer = _BatchStreamer(self.processor, [item.job for item in batch], job.n)
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        with torch.inference_mode():
            out = self.model.generate(**arguments, **options, generator=generator, streamer=streamer,
                                      return_dict_in_generate=True)
        if len(batch) == 1 and job.n == 1:
            generated = out.sequences[0, arguments["input_ids"].shape[1]:].tolist()  # ends where decoding stopped
            self._conversations.append(_Conversation(batch[0].media_keys, batch[0].ids + generated, out))
        for index, item in enumerate(batch):
            prompt = self.processor.expanded_length(len(item.ids), item.frames)
            rows = range(index * job.n, (index + 1) * job.n)
            item.job.emit("done", {
                "choices": [{"text": streamer.final_text(row), "finish_reason": streamer.finish_reason(row, job.max_tokens)}
                            for row in rows],
                "usage": {"prompt_tokens": prompt, "completion_tokens": sum(len(streamer.tokens[row]) for row in rows),
                          "cached_tokens": cached[index]},
            })


class _BatchStreamer:
    """Routes each step's tokens (rows,) to the rows' jobs as text deltas. The text of a
    row is cut at its first stop string (not included, as OpenAI's `stop`), and text that
    could still become a stop string is held back until it cannot."""

    def __init__(self, processor, jobs: list[Job], n: int) -> None:
        self.tokenizer = processor.tokenizer
        self.stop_ids = set(processor.end_of_turn_ids)
        eos = processor.tokenizer.eos_token_id
        if eos is not None:
            self.stop_ids.add(eos)
        self.jobs, self.n = jobs, n
        rows = len(jobs) * n
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [0] * rows  # characters sent
        self.ended = [False] * rows  # end of turn or stop string seen
        self.stopped = [False] * rows
        self._prompt_seen = False

    def put(self, ids: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if all(job.cancelled.is_set() for job in self.jobs):
            raise Cancelled
        for row, token in enumerate(ids.tolist()):
            if self.ended[row]:
                continue
            if token in self.stop_ids:
                self.ended[row] = True
                self.stopped[row] = True
                continue
            self.tokens[row].append(token)
            self._send(row, final=False)

    def end(self) -> None:
        for row in range(len(self.tokens)):
            self._send(row, final=True)

    def _text(self, row: int) -> tuple[str, bool]:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        stops = self.jobs[row // self.n].stop
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _send(self, row: int, final: bool) -> None:
        job = self.jobs[row // self.n]
        if job.cancelled.is_set():
            return
        text, hit = self._text(row)
        if hit:
            self.ended[row] = self.stopped[row] = True
            final = True
        if not final:
            if text.endswith("\ufffd"):
                return
            hold = max((k for s in job.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        if len(text) > self.sent[row]:
            job.emit("delta", (row % self.n, text[self.sent[row]:]))
            self.sent[row] = len(text)

    def final_text(self, row: int) -> str:
        return self._text(row)[0]

    def finish_reason(self, row: int, max_tokens: int) -> str:
        return "stop" if self.stopped[row] or len(self.tokens[row]) < max_tokens else "length"

