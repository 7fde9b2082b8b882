"""Serving benchmarks (run by command, never as timed tests; figures in docs/serving.md).

- `load_test`: N concurrent streaming clients against a loopback server (one it starts
  itself, or `--url` of a running one), bounded in requests and in time; requests/s and
  percentiles of time to first token and total latency.
- `chat_turns`: time to first token of each turn of a `VideoChat` (the first pays for
  decoding, the vision tower and the prompt; later ones run only their new tokens), and
  the same questions asked without the caches.
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from crosslmm.serve.media import is_loopback


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def start_local_server(model_dir: str | Path, media_root: str | Path, **options):
    """A server for `model_dir` on a free loopback port in a background thread:
    (base URL, uvicorn server)."""
    from crosslmm.serve.server import build_app, serve_in_background

    return serve_in_background(build_app(model_dir, media_root=media_root, **options))


async def _one(client, url: str, body: dict) -> tuple[float, float]:
    started = time.perf_counter()
    first = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and first is None:
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - started, end - started


async def _run_load(url: str, bodies: list[dict], clients: int, max_requests: int, max_seconds: float) -> dict:
    import httpx

    ttft, total, errors = [], [], []
    issued = 0
    deadline = time.perf_counter() + max_seconds
    lock = asyncio.Lock()

    async def client_loop(client) -> None:
        nonlocal issued
        while True:
            async with lock:
                if issued >= max_requests or time.perf_counter() >= deadline:
                    return
                body = bodies[issued % len(bodies)]
                issued += 1
            try:
                first, whole = await _one(client, url, body)
                ttft.append(first)
                total.append(whole)
            except Exception as err:  # counted and reported, the test goes on
                errors.append(str(err))

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600.0) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "clients": clients, "requests": len(total), "errors": len(errors), "first_errors": errors[:3],
        "seconds": elapsed, "requests_per_s": len(total) / elapsed if elapsed else 0.0,
        "ttft_ms": {f"p{q}": 1000 * percentile(ttft, q) for q in (50, 90, 99)},
        "total_ms": {f"p{q}": 1000 * percentile(total, q) for q in (50, 90, 99)},
        "mean_total_ms": 1000 * statistics.fmean(total) if total else float("nan"),
    }


def video_cache_speedup(url: str, videos: list[Path], max_tokens: int = 4) -> list[dict]:
    """Latency of a first question about each video (decoded and encoded) and of a
    second, different question about it (the encoded-video cache hits), greedy, not
    streamed, one at a time."""
    import httpx

    rows = []
    questions = ["What happens in the video?", "How many objects are there?"]
    with httpx.Client(base_url=url, timeout=600.0) as client:
        for video in videos:
            times = []
            for question in questions:
                body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video.name}},
                                                                   {"type": "text", "text": question}]}],
                        "max_tokens": max_tokens, "temperature": 0}
                started = time.perf_counter()
                response = client.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                times.append(time.perf_counter() - started)
            rows.append({"video": video.name, "first_ms": 1000 * times[0], "cache_hit_ms": 1000 * times[1]})
    return rows


def load_test(*, model_dir: str | Path | None, url: str | None, videos: list[Path], question: str, clients: list[int],
              max_requests: int, max_seconds: float, max_tokens: int, inline: bool = False, max_batch: int = 8,
              frames: int | None = None) -> list[dict]:
    """One row per client count (each also carries the encoded-video cache measurement,
    `video_cache_speedup`, taken first). With `url` the server must be on loopback;
    without it a server for `model_dir` is started here with the videos' folder as its
    media root."""
    server = None
    if url is None:
        url, server = start_local_server(model_dir, videos[0].parent, max_batch=max_batch, max_queue=max(clients) * 2,
                                         frames=frames)
    host = urlparse(url).hostname or ""
    if not is_loopback(host):
        raise ValueError(f"the load test only talks to loopback servers, not {host!r}")
    bodies = []
    for video in videos:
        media = ("data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()) if inline else video.name
        bodies.append({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": media}},
                                                                  {"type": "text", "text": question}]}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True})
    try:
        cache = video_cache_speedup(url, videos, max_tokens) if not inline else []
        rows = [asyncio.run(_run_load(url, bodies, n, max_requests, max_seconds)) for n in clients]
        for row in rows:
            row["video_cache"] = cache
        return rows
    finally:
        if server is not None:
            server.should_exit = True


def chat_turns(model_dir: str | Path, video: Path, questions: list[str], frames: int | None = None,
               max_new_tokens: int = 16, repeats: int = 3) -> dict:
    """Median time to first token of each turn of one conversation (turn 1 includes
    decoding the video and the vision tower, as a user waits for them), against the same
    turn asked as a fresh request: a new chat that decodes and encodes the video again
    and prefills the whole conversation so far."""
    from crosslmm.infer import load
    from crosslmm.serve.chat import VideoChat

    options = {"num_frames": frames} if frames else {}
    model, processor = load(model_dir, **options)
    cached: list[list[float]] = [[] for _ in questions]
    fresh: list[list[float]] = [[] for _ in questions]
    reused, prompt = [0] * len(questions), [0] * len(questions)
    for _ in range(repeats):
        chat = VideoChat(model, processor, [video])
        for turn, question in enumerate(questions):
            earlier = [dict(m) for m in chat.messages]
            chat.answer(question, max_new_tokens=max_new_tokens)
            stats = chat.last_turn
            cached[turn].append(stats.time_to_first_token_s + (chat.setup_seconds if turn == 0 else 0.0))
            reused[turn], prompt[turn] = stats.reused_tokens, stats.prompt_tokens
            replay = VideoChat(model, processor, [video])
            replay.messages = earlier
            replay.answer(question, max_new_tokens=1)
            fresh[turn].append(replay.setup_seconds + replay.last_turn.time_to_first_token_s)
    return {
        "turns": [{"turn": i + 1, "prompt_tokens": prompt[i], "reused_tokens": reused[i],
                   "ttft_ms": 1000 * statistics.median(cached[i]), "fresh_ttft_ms": 1000 * statistics.median(fresh[i])}
                  for i in range(len(questions))],
        "frames": processor.num_frames, "tokens_per_frame": model.config.tokens_per_frame,
    }
