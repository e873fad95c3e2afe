"""``python -m llamahome.serve``: a real uvicorn server on a free port, called with the official
``openai`` client (and raw HTTP for what the client cannot send): answers equal a greedy
``model.generate`` reference, streaming, per-request caches, OpenAI-style errors, bearer auth,
and one bad request never harming another (a failing row, a dropped client, a huge body).
Continuous batching, the KV pool, 429 and ``/metrics`` are in ``test_serve_batching.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import REPO
from serve_helpers import (
    KEY,
    LONG,
    PROMPT,
    build,
    free_port,
    reference,
    running,
    tracebacks,
    wait_until,
)
from serve_helpers import save_tiny_model as _save

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The app from ``build_server`` under uvicorn; yields (base_url, engine, app)."""
    app, engine, _ = build(
        model_dir, tmp_path_factory.mktemp("serve-run"), f"serve.api_key={KEY}",
        "serve.max_body_bytes=64KiB",
    )
    with running(app) as url:
        yield url, engine, app
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat_text(messages) -> str:
    # The tiny BPE tokenizer has no chat template: the server writes a plain transcript.
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def test_models_list_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and {"running", "waiting", "kv_cache"} <= set(health)
    assert health["kv_cache"]["bytes_pool"] == 256 * 2**20


def test_completion_equals_greedy_generate(server, client):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text == reference(server[1], PROMPT, 10)
    assert out.choices[0].finish_reason == "length"
    usage = out.usage
    assert usage.completion_tokens == 10 and usage.total_tokens == usage.prompt_tokens + 10
    kv = usage.model_extra["kv_cache"]
    assert kv["policy"] == "full" and kv["bytes_held"] == kv["bytes_full"] > 0
    assert kv["keep_ratio"] == 1.0 and 0 < kv["bytes_held"] <= kv["bytes_reserved"]


def test_chat_streaming_equals_non_streaming(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0
    )
    assert whole.object == "chat.completion"
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    assert text == reference(server[1], chat_text(messages), 8)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_raw_sse_ends_with_done(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", server[0] + "/v1/completions", json=body,
        headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_and_seed(server, client):
    ref = reference(server[1], PROMPT, 12)
    stop = ref[len(ref) // 2 : len(ref) // 2 + 3]
    out = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert out.choices[0].text == ref[: ref.find(stop)] and out.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=seed
        ).choices[0].text
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_per_request_cache_policy(server, client):
    kv_cache = {"policy": "h2o", "budget": 0.2, "min_tokens": 0}
    out = client.completions.create(
        model="tiny", prompt=LONG, max_tokens=4, temperature=0, extra_body={"kv_cache": kv_cache}
    )
    kv = out.usage.model_extra["kv_cache"]
    assert kv["policy"] == "h2o" and 0 < kv["bytes_held"] < kv["bytes_full"] / 2
    assert 0.15 < kv["keep_ratio"] < 0.3 and kv["bytes_held"] <= kv["bytes_reserved"]
    full = client.completions.create(model="tiny", prompt=LONG, max_tokens=4, temperature=0)
    assert full.usage.model_extra["kv_cache"]["bytes_full"] == kv["bytes_full"]
    count = client.completions.create(
        model="tiny", prompt=LONG, max_tokens=4, temperature=0,
        extra_body={"kv_cache": {"policy": "window", "budget": 32, "min_tokens": 0}},
    )
    assert count.usage.model_extra["kv_cache"]["policy"] == "window"
    # Under the server's floor (min_tokens 1024) a short request is exactly the full answer.
    short = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
        extra_body={"kv_cache": {"policy": "h2o", "budget": 0.2}},
    )
    kv = short.usage.model_extra["kv_cache"]
    assert short.choices[0].text == reference(server[1], PROMPT, 10)
    assert kv["policy"] == "h2o" and kv["keep_ratio"] == 1.0


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 5e-324}, {"temperature": 1e-320, "seed": 3},
     {"temperature": 1.0, "top_p": 1e-320}],
)
def test_extreme_but_valid_sampling_is_greedy_not_a_500(server, client, sampling, caplog):
    """Sampling limits (a subnormal temperature or top_p) are the greedy answer, not a NaN."""
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, **sampling)
    assert out.choices[0].text == reference(server[1], PROMPT, 6)
    assert not tracebacks(caplog)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"kv_cache": {"policy": "lru"}}, "invalid_kv_cache"),
        ({"kv_cache": {"policy": "h2o", "budget": 1.5}}, "invalid_kv_cache"),
        ({"kv_cache": {"policy": "h2o", "budget": 0}}, "invalid_kv_cache"),
        ({"kv_cache": {"policy": "h2o", "budget": True}}, "invalid_kv_cache"),
        ({"kv_cache": {"policy": "h2o", "ratio": 0.2}}, "invalid_kv_cache"),
        ({"temperature": 3}, "invalid_value"),
        ({"top_p": 0}, "invalid_value"),
        ({"max_tokens": 0}, "invalid_value"),
        ({"max_tokens": 100_000}, "context_length_exceeded"),
        ({"messages": []}, "empty_messages"),
        ({"messages": None}, "invalid_type"),
        ({"n": 2}, "invalid_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_value"),
        ({"temperature": "0.5"}, "invalid_type"),
        ({"stream": "yes"}, "invalid_type"),
    ],
)
def test_bad_requests_get_400(client, body, code, caplog):
    messages = body.pop("messages", [{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=2, extra_body=body
        )
    error = err.value.body
    assert err.value.status_code == 400 and error["code"] == code and error["message"]
    assert error["type"] == "invalid_request_error"
    assert not tracebacks(caplog)


def test_long_prompt_and_unknown_model(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="word " * 3000, max_tokens=2)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
    assert err.value.body["code"] == "model_not_found"


def test_malformed_json_and_auth(server, client):
    url, auth = server[0] + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    json_headers = {**auth, "Content-Type": "application/json"}
    bad = httpx.post(url, content=b"{not json", headers=json_headers)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    shape = httpx.post(url, json=[1, 2], headers=auth)
    assert shape.status_code == 400 and set(shape.json()["error"]) == {
        "message", "type", "param", "code"
    }
    wrong = openai.OpenAI(base_url=server[0] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert httpx.post(url, content=b"{not json").status_code == 401  # auth before parsing
    for raw in (b"", b"null", b'{"model": "tiny", "messages": "hi"}'):
        answer = httpx.post(url, content=raw, headers=json_headers)
        assert answer.status_code == 400 and answer.json()["error"]["message"]
    assert httpx.get(server[0] + "/v1/nowhere", headers=auth).status_code == 404


def test_engine_failure_is_a_500_and_the_server_goes_on(server, client, monkeypatch):
    engine, calls = server[1], []
    real = engine.build_cache

    def fail_once(spec, seq_len):
        calls.append(seq_len)
        if len(calls) == 1:
            raise RuntimeError("simulated out of memory")
        return real(spec, seq_len)

    monkeypatch.setattr(engine, "build_cache", fail_once)
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert err.value.body["type"] == "server_error"
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2


def test_a_row_that_fails_mid_batch_ends_alone(server, client, monkeypatch):
    """A failure inside one row's cache during a shared decode step ends that request only."""
    from concurrent.futures import ThreadPoolExecutor

    engine = server[1]
    real = engine.build_cache

    def sabotage(spec, seq_len):
        cache = real(spec, seq_len)
        if seq_len == len(engine.tokenizer("x = 1")["input_ids"]) + 9:  # the doomed request
            layer, original, steps = cache.layers[-1], cache.layers[-1].update, []

            def update(keys, values, *args, **kwargs):
                steps.append(keys.shape[2])
                if len(steps) == 5:  # its 4th decode step, shared with the other request
                    raise RuntimeError("simulated failure in one row")
                return original(keys, values, *args, **kwargs)

            layer.update = update
        return cache

    monkeypatch.setattr(engine, "build_cache", sabotage)

    def ask(job):
        prompt, max_tokens = job
        try:
            out = client.completions.create(
                model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                extra_body={"ignore_eos": True},
            )
            return out.choices[0].text
        except openai.InternalServerError as err:
            return err.body["type"]

    engine.peak_decode_rows = 0
    with ThreadPoolExecutor(2) as pool:
        with engine.hold():  # both are admitted together, so they share decode steps
            answers = pool.map(ask, [(PROMPT, 12), ("x = 1", 9)])
            wait_until(lambda: engine.queued == 2, "both requests queued")
        answers = list(answers)
    assert answers[1] == "server_error"
    assert answers[0] == reference(engine, PROMPT, 12)
    assert engine.peak_decode_rows == 2  # they did share decode steps


def test_client_gone_mid_stream_frees_its_row(server, client, caplog):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1000, "stream": True}
    with httpx.stream(
        "POST", server[0] + "/v1/completions", json=body,
        headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
    ) as response:
        before = server[1].tokens
        lines = response.iter_lines()
        while not next(lines).startswith('data: {"id'):  # the role chunk
            pass
        while not next(lines).startswith('data: {"id'):  # a text chunk: generation runs
            pass
    out = client.completions.create(model="tiny", prompt="x = 1", max_tokens=3, temperature=0)
    assert out.choices[0].text == reference(server[1], "x = 1", 3)
    assert server[1].tokens - before < 200  # the 1000 tokens nobody reads were not generated
    assert not tracebacks(caplog)


def test_client_gone_without_streaming_frees_its_row(server, caplog):
    """A non-streaming client that hangs up stops its generation (its row is dropped)."""
    engine = server[1]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True}
    before = engine.tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server[0] + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5),
            headers={"Authorization": f"Bearer {KEY}"},
        )
    wait_until(lambda: engine.stats["running"] == 0 and engine.queued == 0, "the row to leave")
    assert engine.tokens - before < 2000
    assert engine.stats["kv_cache"]["bytes_reserved"] == 0
    assert not tracebacks(caplog)


def test_a_huge_body_is_refused_unread_and_never_stalls_health(server, caplog):
    """10 MB announced: 413 at once, before the body is read; /health answers meanwhile."""
    port = int(server[0].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        request = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {10 * 2**20}\r\n\r\n"
        )
        sock.sendall(request.encode() + b'{"model": "tiny", "messages": [' + b" " * 65536)
        assert httpx.get(server[0] + "/health", timeout=30).status_code == 200
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(65536)
        head, body = reply.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += sock.recv(65536)
    assert b" 413 " in head.split(b"\r\n", 1)[0], reply[:300]
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert not tracebacks(caplog)


def test_still_answers_after_errors(server, client):
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert out.usage.completion_tokens >= 1


def test_cli_binds_localhost_and_never_prints_the_key(model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLAMAHOME_API_KEY": "sk-env-secret-9"}
    args = [f"model={model_dir}", "cache=full", f"serve.port={port}", "print_config=true",
            f"hydra.run.dir={tmp_path}", "serve.api_key=sk-argv-secret-7", "serve.kv_memory=64MiB"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamahome.serve", *args], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline, ok = time.time() + 90, False
        while time.time() < deadline and proc.poll() is None and not ok:
            try:
                ok = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.3)
        assert ok, "the server did not come up"
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-argv-secret-7", max_retries=0
        )
        assert client.models.list().data[0].id == model_dir.name
        # The model may also be named as it was typed on the command line.
        out = client.completions.create(model=str(model_dir), prompt="x = ", max_tokens=2)
        assert out.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "[serve] http://127.0.0.1:" in out and "KV pool 0.06 GiB" in out
    logs = out + "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert "sk-argv-secret-7" not in logs and "sk-env-secret-9" not in logs
    assert "Traceback" not in logs
