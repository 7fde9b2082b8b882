"""`crosslmm serve`, `crosslmm chat` and `crosslmm ask`: the real server on a loopback
port, talked to with httpx and with the `openai` client; every refusal answered with the
right status while the server keeps answering."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from benchmark_fixtures import write_video
from crosslmm.bench.serving import chat_turns, load_test
from crosslmm.infer import default_model_dir, load
from crosslmm.serve.chat import VideoChat
from crosslmm.serve.engine import Engine
from crosslmm.serve.media import MediaLimits
from crosslmm.serve.server import ServeSettings, create_app, serve_in_background

QUESTION = "What pattern does the red square have?\nAnswer the question using a single word."
FOLLOW_UP = "Which direction does the red square move?\nAnswer the question using a single word."


@pytest.fixture(scope="module")
def bundled():
    return load(default_model_dir())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    for i in range(3):
        write_video(root / f"clip{i}.mp4", num_frames=10, seed=20 + i)
    write_video(root / "long.mp4", num_frames=40, fps=2, seed=30)  # 20 s
    (root / "broken.mp4").write_bytes(b"not a video at all" * 50)
    outside = tmp_path_factory.mktemp("outside")
    write_video(outside / "secret.mp4", seed=31)
    (root / "link.mp4").symlink_to(outside / "secret.mp4")
    return root, outside


class Running:
    def __init__(self, app) -> None:
        self.url, self.server = serve_in_background(app)
        self.app = app

    def stop(self) -> None:
        self.server.should_exit = True
        self.server.thread.join(timeout=10)
        self.app.state.engine.stop()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(bundled, media_root, settings: ServeSettings | None = None, **limits) -> Running:
    model, processor = bundled
    engine_options = {k: limits.pop(k) for k in ("max_queue", "max_batch") if k in limits}
    media_limits = MediaLimits(media_root=media_root, max_frames=processor.num_frames, **limits)
    engine = Engine(model, processor, media_limits, **engine_options)
    return Running(create_app(engine, settings or ServeSettings(model_name="crosslmm-test")))


@pytest.fixture(scope="module")
def server(bundled, media):
    running = start(bundled, media[0])
    yield running
    running.stop()


def video_message(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}]}]


def post(server, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60, **kwargs)


def greedy(messages, **extra) -> dict:
    return {"model": "crosslmm-test", "messages": messages, "temperature": 0, "max_tokens": 8, **extra}


def expected_answer(bundled, video: Path, question: str = QUESTION) -> str:
    model, processor = bundled
    return VideoChat(model, processor, [video]).answer(question, max_new_tokens=8)


def test_models_and_health(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "crosslmm-test"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_non_streamed_answer_about_a_video(server, bundled, media):
    response = post(server, greedy(video_message("clip0.mp4")))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == expected_answer(bundled, media[0] / "clip0.mp4")
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 8 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_openai_client_streams_and_answers_the_same(server, media):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = video_message(f"file://{media[0] / 'clip1.mp4'}")
    whole = client.chat.completions.create(model="crosslmm-test", messages=messages, temperature=0, max_tokens=8)
    stream = client.chat.completions.create(model="crosslmm-test", messages=messages, temperature=0, max_tokens=8,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens and not chunks[-1].choices


def test_raw_stream_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=greedy(video_message("clip0.mp4"), stream=True),
                      timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "chat.completion.chunk" for line in lines[:-1])


def test_multi_turn_reuses_the_conversation_caches(server, bundled, media):
    first = post(server, greedy(video_message("clip2.mp4"))).json()
    answer = first["choices"][0]["message"]["content"]
    history = video_message("clip2.mp4") + [{"role": "assistant", "content": answer},
                                            {"role": "user", "content": FOLLOW_UP}]
    second = post(server, greedy(history)).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    model, processor = bundled
    chat = VideoChat(model, processor, [media[0] / "clip2.mp4"])
    assert chat.answer(QUESTION, max_new_tokens=8) == answer
    assert second["choices"][0]["message"]["content"] == chat.answer(FOLLOW_UP, max_new_tokens=8)


def test_second_question_about_a_video_hits_the_encoded_video_cache(server):
    before = httpx.get(server.url + "/health").json()["video_cache"]
    assert post(server, greedy(video_message("clip0.mp4", FOLLOW_UP))).status_code == 200
    assert post(server, greedy(video_message("clip0.mp4", QUESTION))).status_code == 200
    after = httpx.get(server.url + "/health").json()["video_cache"]
    assert after["hits"] >= before["hits"] + 2 - (after["misses"] - before["misses"])
    assert after["hits"] > before["hits"]


def test_concurrent_requests_are_batched_and_answer_as_alone(server, bundled, media):
    names = ["clip0.mp4", "clip1.mp4", "clip2.mp4"] * 3
    alone = {name: expected_answer(bundled, media[0] / name) for name in set(names)}
    with ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(lambda name: post(server, greedy(video_message(name))), names))
    for name, response in zip(names, responses):
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == alone[name]
    assert server.app.state.engine.largest_batch >= 2


def test_data_url_video(server, bundled, media):
    data = base64.b64encode((media[0] / "clip1.mp4").read_bytes()).decode()
    response = post(server, greedy(video_message(f"data:video/mp4;base64,{data}")))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == expected_answer(bundled, media[0] / "clip1.mp4")


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    return body["error"]


@pytest.mark.parametrize("url, status", [
    ("../../../etc/passwd", 403),
    ("/etc/passwd", 403),
    ("link.mp4", 403),  # a symlink pointing out of the media root
    ("http://example.com/video.mp4", 403),  # no remote hosts allowed
    ("ftp://example.com/video.mp4", 400),
    ("broken.mp4", 422),
    ("missing.mp4", 400),
    ("data:video/mp4;base64,@@@", 400),
])
def test_bad_media_is_refused_and_the_server_goes_on(server, url, status):
    response = post(server, greedy(video_message(url)))
    assert response.status_code == status, response.text
    error_of(response)
    assert post(server, greedy(video_message("clip0.mp4"))).status_code == 200


def test_path_traversal_out_of_the_media_root(server, media):
    relative = os.path.relpath(media[1] / "secret.mp4", media[0])
    assert relative.startswith("..")
    response = post(server, greedy(video_message(relative)))
    assert response.status_code == 403 and "outside the media root" in error_of(response)["message"]
    response = post(server, greedy(video_message(f"file://{media[1] / 'secret.mp4'}")))
    assert response.status_code == 403


@pytest.mark.parametrize("body, status", [
    ("{not json", 400),
    (json.dumps({"messages": []}), 400),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "a.wav"}}]}]}), 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}), 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2, "temperature": 0}), 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi <video>"}]}), 400),
    (json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}), 404),
])
def test_malformed_requests_get_openai_errors(server, body, status):
    response = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error_of(response)
    assert post(server, greedy(video_message("clip0.mp4"))).status_code == 200


def test_sampling_options_seed_stop_and_n(server):
    body = greedy(video_message("clip0.mp4"), temperature=0.9, top_p=0.9, seed=7, max_tokens=6)
    first, again = post(server, body).json(), post(server, body).json()
    assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]
    many = post(server, {**body, "n": 3}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    plain = post(server, greedy(video_message("clip0.mp4"), max_tokens=6)).json()["choices"][0]["message"]["content"]
    if len(plain) > 1:
        stopped = post(server, greedy(video_message("clip0.mp4"), max_tokens=6, stop=[plain[1:]])).json()
        assert stopped["choices"][0]["message"]["content"] == plain[:1]
        assert stopped["choices"][0]["finish_reason"] == "stop"
    capped = post(server, greedy(video_message("clip0.mp4"), max_completion_tokens=1)).json()
    assert capped["usage"]["completion_tokens"] <= 1


def test_limits_body_video_length_queue_and_timeout(bundled, media):
    with start(bundled, media[0], ServeSettings(model_name="crosslmm-test", max_body_bytes=4096), max_seconds=5.0) as small:
        response = post(small, greedy(video_message("clip0.mp4", "x" * 8000)))
        assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
        response = post(small, greedy(video_message("long.mp4")))
        assert response.status_code == 413 and error_of(response)["code"] == "video_too_long"
        assert post(small, greedy(video_message("clip0.mp4"))).status_code == 200
    refusals = [  # (server options, settings, status, code)
        ({"max_bytes": 1000}, None, 413, "media_too_large"),
        ({"max_queue": 0}, None, 503, "queue_full"),
        ({}, ServeSettings(model_name="crosslmm-test", request_timeout_s=0.0), 504, "timeout"),
    ]
    for options, settings, status, code in refusals:
        with start(bundled, media[0], settings, **options) as running:
            response = post(running, greedy(video_message("clip0.mp4")))
            assert response.status_code == status and error_of(response)["code"] == code


def test_frames_over_the_servers_ceiling_are_refused(server, bundled):
    ceiling = bundled[1].num_frames
    response = post(server, greedy(video_message("clip0.mp4"), frames=ceiling + 1))
    assert response.status_code == 413 and error_of(response)["code"] == "too_many_frames"
    fewer = post(server, greedy(video_message("clip0.mp4"), frames=2))
    assert fewer.status_code == 200 and fewer.json()["usage"]["prompt_tokens"] < post(
        server, greedy(video_message("clip0.mp4"))).json()["usage"]["prompt_tokens"]


def test_allowed_remote_host(bundled, media):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media[0]))
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    running = start(bundled, None, allowed_hosts=("127.0.0.1",))
    try:
        remote = f"http://127.0.0.1:{web.server_address[1]}/clip0.mp4"
        response = post(running, greedy(video_message(remote)))
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == expected_answer(bundled, media[0] / "clip0.mp4")
        response = post(running, greedy(video_message("clip0.mp4")))  # no media root: no local files
        assert response.status_code == 403
    finally:
        running.stop()
        web.shutdown()


def test_chat_second_turn_reuses_both_caches(bundled, media):
    model, processor = bundled
    chat = VideoChat(model, processor, [media[0] / "clip1.mp4"])
    first = chat.answer(QUESTION, max_new_tokens=8)
    second = chat.answer(FOLLOW_UP, max_new_tokens=8)
    assert chat.last_turn.reused_tokens > 0 and chat.last_turn.reused_tokens < chat.last_turn.prompt_tokens
    fresh = VideoChat(model, processor, [media[0] / "clip1.mp4"])
    fresh.messages = chat.messages[:2]
    assert fresh.messages[1]["content"] == first
    assert fresh.answer(FOLLOW_UP, max_new_tokens=8) == second and fresh.last_turn.reused_tokens == 0


def test_cli_chat_and_streaming_ask(media):
    import subprocess
    import sys

    video = str(media[0] / "clip0.mp4")
    first, then = QUESTION.replace("\n", " "), FOLLOW_UP.replace("\n", " ")  # one line each on stdin
    asked = subprocess.run([sys.executable, "-m", "crosslmm", "ask", video, first, "--max-new-tokens", "8"],
                           capture_output=True, text=True, check=True)
    chatted = subprocess.run([sys.executable, "-m", "crosslmm", "chat", video, "--max-new-tokens", "8", "--timing"],
                             input=f"{first}\n{then}\n\n", capture_output=True, text=True, check=True)
    lines = chatted.stdout.splitlines()
    assert lines[0] == asked.stdout.strip() and len(lines) == 2
    assert chatted.stderr.count("time to first token") == 2 and " 0 of " in chatted.stderr


def test_load_test_and_chat_benchmark_run(media):
    rows = load_test(model_dir=default_model_dir(), url=None, videos=[media[0] / "clip0.mp4", media[0] / "clip1.mp4"],
                     question=QUESTION, clients=[1, 3], max_requests=6, max_seconds=60, max_tokens=4)
    assert [row["clients"] for row in rows] == [1, 3]
    assert all(row["errors"] == 0 and row["requests"] == 6 and row["requests_per_s"] > 0 for row in rows)
    assert rows[1]["ttft_ms"]["p50"] <= rows[1]["total_ms"]["p50"]
    assert [row["video"] for row in rows[0]["video_cache"]] == ["clip0.mp4", "clip1.mp4"]
    with pytest.raises(ValueError, match="loopback"):
        load_test(model_dir=None, url="http://192.0.2.1:8000", videos=[media[0] / "clip0.mp4"], question=QUESTION,
                  clients=[1], max_requests=1, max_seconds=1, max_tokens=1)
    turns = chat_turns(default_model_dir(), media[0] / "clip0.mp4", [QUESTION, FOLLOW_UP], repeats=1, max_new_tokens=4)
    assert turns["turns"][1]["reused_tokens"] > 0 and turns["turns"][0]["reused_tokens"] == 0
