"""`crosslmm serve`: an OpenAI-compatible chat completions server for video questions.

Clients of vLLM or SGLang work unchanged: `POST /v1/chat/completions` takes `messages`
whose content is a string or typed parts (`text`, `video_url`, `image_url`; URLs are
`data:` base64, `file://` or plain paths under `--media-root`, or http(s) from allowed
hosts), streams `chat.completion.chunk` events or answers one `chat.completion`, and
reports `usage` (with `prompt_tokens_details.cached_tokens`). `GET /v1/models`, `GET
/health`. Every refusal is an OpenAI-style error body `{"error": {"message", "type",
"code"}}` and the server goes on serving. A crosslmm extension: `"frames": N` asks for
fewer frames per video than the server's ceiling.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from crosslmm.serve.engine import Engine, Job, QueueFull
from crosslmm.serve.media import MediaError, MediaLimits, MediaSource, resolve

ERROR_TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
               422: "invalid_request_error", 503: "server_overloaded", 504: "timeout"}


@dataclass
class ServeSettings:
    """The operator's limits (`crosslmm serve` options)."""

    model_name: str = "crosslmm"
    max_body_bytes: int = 64 * 2**20
    max_tokens: int = 1024  # ceiling of max_tokens / max_completion_tokens
    request_timeout_s: float = 300.0
    max_choices: int = 8


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def error_response(status: int, message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "code": code, "param": None}}
    return JSONResponse(body, status_code=status)


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    app = FastAPI(title="crosslmm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings = engine, settings
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(400, f"malformed request: {err.errors()}", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), "not_found" if err.status_code == 404 else "http_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": engine.queued, "video_cache": {"hits": engine.videos.hits,
                                                                          "misses": engine.videos.misses,
                                                                          "bytes": engine.videos.size_bytes}}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "crosslmm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.monotonic()
        try:
            body = await _read_json(request, settings.max_body_bytes)
            options = _options(body, settings, engine)
            messages, urls = _messages(body.get("messages"))
        except RequestError as err:
            return error_response(err.status, str(err), err.code)
        if engine.queued >= engine.max_queue:  # admission, before any media is read
            return error_response(503, f"the server's queue is full ({engine.max_queue} waiting); retry later", "queue_full")
        sources: list[MediaSource] = []
        try:
            for url in urls:
                sources.append(await asyncio.to_thread(resolve, url, engine.limits))
        except MediaError as err:
            for source in sources:
                source.cleanup()
            return error_response(err.status, str(err), err.code)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = Job(messages=messages, media=sources, emit=emit, **options["job"])
        try:
            engine.submit(job)
        except QueueFull as err:
            for source in sources:
                source.cleanup()
            return error_response(503, str(err), "queue_full")
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        deadline = started + settings.request_timeout_s
        if options["stream"]:
            return StreamingResponse(_stream(job, events, completion_id, settings, options, deadline),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.get(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                job.cancelled.set()
                return error_response(504, f"the request took longer than {settings.request_timeout_s:.0f} s", "timeout")
            if kind == "error":
                return _engine_error(payload)
            if kind == "delta":  # the whole text comes with "done"
                continue
            return JSONResponse(_completion(completion_id, settings.model_name, payload))

    return app


def _engine_error(err: Exception) -> JSONResponse:
    if isinstance(err, MediaError):
        return error_response(err.status, str(err), err.code)
    return error_response(500, f"the model failed on this request: {type(err).__name__}: {err}", "model_error")


async def _read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is over the limit of {limit} bytes", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request body is over the limit of {limit} bytes", "request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the request body is not JSON: {err}", "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", "invalid_request")
    return body


def _number(body: dict, name: str, kind: type, low: float, high: float, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise RequestError(400, f"{name} must be a{'n integer' if kind is int else ' number'}", "invalid_request")
    if not low <= value <= high:
        raise RequestError(400, f"{name} must be in [{low}, {high}], got {value}", "invalid_request")
    return kind(value)


def _options(body: dict, settings: ServeSettings, engine: Engine) -> dict:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", int, 1, settings.max_tokens, min(256, settings.max_tokens))
    temperature = _number(body, "temperature", float, 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", float, 0.0, 1.0, None)
    seed = _number(body, "seed", int, 0, 2**63 - 1, None)
    n = _number(body, "n", int, 1, settings.max_choices, 1)
    if n > 1 and temperature == 0:
        raise RequestError(400, "n > 1 needs temperature > 0 (greedy choices would be identical)", "invalid_request")
    frames = _number(body, "frames", int, 1, 2**31, engine.limits.max_frames)
    if frames > engine.limits.max_frames:
        raise RequestError(413, f"frames={frames} is over this server's limit of {engine.limits.max_frames} frames "
                                f"per video (a request may only ask for fewer)", "too_many_frames")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop must be a string or a list of up to 4 non-empty strings", "invalid_request")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be true or false", "invalid_request")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError(400, "stream_options must be an object", "invalid_request")
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise RequestError(404 if isinstance(model, str) else 400, f"the model {model!r} does not exist; this server "
                                                                    f"serves {settings.model_name!r}", "model_not_found")
    return {"stream": stream, "include_usage": bool(stream_options.get("include_usage", False)),
            "job": {"frames": frames, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                    "stop": tuple(stop), "n": n}}


_PLACEHOLDERS = {"video_url": "<video>", "image_url": "<image>"}


def _messages(raw: Any) -> tuple[list[dict[str, str]], list[str]]:
    """OpenAI messages -> processor messages (media as placeholders, in order) and the
    media URLs in placeholder order."""
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "messages must be a non-empty list", "invalid_request")
    messages, urls = [], []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
            raise RequestError(400, f"messages[{i}] must be an object with role system, user or assistant", "invalid_request")
        role = "system" if message["role"] == "developer" else message["role"]
        content = message.get("content")
        if isinstance(content, str):
            if any(tag in content for tag in ("<video>", "<image>", "<media>")):
                raise RequestError(400, f"messages[{i}]: media go in video_url/image_url parts, not as placeholders in text",
                                   "invalid_request")
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(400, f"messages[{i}].content must be a string or a list of parts", "invalid_request")
        pieces = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if any(tag in part["text"] for tag in ("<video>", "<image>", "<media>")):
                    raise RequestError(400, f"messages[{i}].content[{j}]: media go in video_url/image_url parts",
                                       "invalid_request")
                pieces.append(part["text"])
            elif kind in _PLACEHOLDERS and role == "user":
                spec = part.get(kind)
                url = spec.get("url") if isinstance(spec, dict) else spec if isinstance(spec, str) else None
                if not isinstance(url, str):
                    raise RequestError(400, f"messages[{i}].content[{j}].{kind}.url must be a string", "invalid_request")
                urls.append(url)
                pieces.append(_PLACEHOLDERS[kind] + "\n")
            else:
                raise RequestError(400, f"messages[{i}].content[{j}]: unsupported content part {kind!r} for role {role} "
                                        f"(text, video_url, image_url)", "invalid_content_part")
        messages.append({"role": role, "content": "".join(pieces)})
    if messages[-1]["role"] != "user":
        raise RequestError(400, "the last message must be the user's", "invalid_request")
    return messages, urls


def _completion(completion_id: str, model: str, result: dict) -> dict:
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": choice["text"]},
                     "finish_reason": choice["finish_reason"], "logprobs": None}
                    for i, choice in enumerate(result["choices"])],
        "usage": _usage(result["usage"]),
    }


def _usage(usage: dict) -> dict:
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]}}


async def _stream(job: Job, events: asyncio.Queue, completion_id: str, settings: ServeSettings, options: dict,
                  deadline: float):
    created = int(time.time())

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": settings.model_name,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(job.n)])
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.get(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                job.cancelled.set()
                error = {"message": f"the request took longer than {settings.request_timeout_s:.0f} s",
                         "type": "timeout", "code": "timeout"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            if kind == "delta":
                yield chunk([{"index": payload[0], "delta": {"content": payload[1]}, "finish_reason": None}])
            elif kind == "error":
                status = getattr(payload, "status", 500)
                error = {"message": str(payload), "type": ERROR_TYPES.get(status, "server_error"),
                         "code": getattr(payload, "code", "model_error")}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            else:
                yield chunk([{"index": i, "delta": {}, "finish_reason": choice["finish_reason"]}
                             for i, choice in enumerate(payload["choices"])])
                if options["include_usage"]:
                    yield chunk([], _usage(payload["usage"]))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that went away stops its rows


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, media_root: str | Path | None = None,
          allowed_hosts: tuple[str, ...] = (), frames: int | None = None, device: str = "cpu", max_batch: int = 8,
          max_queue: int = 32, settings: ServeSettings | None = None, limits: MediaLimits | None = None) -> None:
    """Load the model and serve until interrupted."""
    import uvicorn

    app = build_app(model_dir, media_root=media_root, allowed_hosts=allowed_hosts, frames=frames, device=device,
                    max_batch=max_batch, max_queue=max_queue, settings=settings, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level="info")


def serve_in_background(app: FastAPI, host: str = "127.0.0.1"):
    """Serve `app` on a free port of `host` from a daemon thread, for benchmarks and
    tests: (base URL, uvicorn server); set `server.should_exit = True` to stop it."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError(f"the server did not start on {host}:{port}")
    server.thread = thread
    return f"http://{host}:{port}", server


def build_app(model_dir: str | Path, *, media_root: str | Path | None = None, allowed_hosts: tuple[str, ...] = (),
              frames: int | None = None, device: str = "cpu", max_batch: int = 8, max_queue: int = 32,
              settings: ServeSettings | None = None, limits: MediaLimits | None = None) -> FastAPI:
    from crosslmm.infer import load

    model, processor = load(model_dir, device=device)
    limits = limits or MediaLimits()
    limits.media_root = Path(media_root).resolve() if media_root else limits.media_root
    limits.allowed_hosts = tuple(allowed_hosts) or limits.allowed_hosts
    limits.max_frames = frames or processor.num_frames or limits.max_frames
    engine = Engine(model, processor, limits, max_batch=max_batch, max_queue=max_queue)
    settings = settings or ServeSettings(model_name=Path(model_dir).name or "crosslmm")
    return create_app(engine, settings)
