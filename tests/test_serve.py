"""``python -m llamahome.serve``: a real uvicorn server on a free port, called with the official
``openai`` client (and raw HTTP for what the client cannot send): answers equal a greedy
``model.generate`` reference, streaming, batching of concurrent requests, per-request caches,
OpenAI-style errors, bearer auth, a full queue, and a key that never reaches the logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from conftest import REPO, compose

KEY = "sk-test-5f1e2d"
PROMPT = "def foo(x):\n    return"
LONG = "import os\nimport sys\n\nclass Foo:\n    def __init__(self):\n        self.x = 1\n" * 12

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LlamaForCausalLM with its tokenizer, saved as a user's HF directory would be."""
    from llamahome import load_model

    path = tmp_path_factory.mktemp("tiny-hf")
    model, tokenizer = load_model("tiny", attn_implementation="sdpa")
    torch.manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def serve_overrides(model_dir) -> list[str]:
    # model=<dir>, as a user types it (the entry point rewrites it before Hydra parses it).
    from llamahome.utils.cli import model_argument

    return [
        *model_argument(["serve", f"model={model_dir}"])[1:], "serve.model_name=tiny",
        "cache=full", "print_config=false", "serve.batch_window_ms=50", "serve.max_new_tokens=16",
    ]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The app from ``build_server`` under uvicorn in a thread; yields (base_url, engine, app)."""
    import uvicorn

    from llamahome.serve import build_server

    cfg = compose(
        "serve", [*serve_overrides(model_dir), f"serve.api_key={KEY}"],
        tmp_path_factory.mktemp("serve-run"),
    )
    app, engine, serve_cfg = build_server(cfg)
    # A socket bound here and handed to uvicorn: no window in which another process could take
    # a port we picked but had not bound yet.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}", engine, app
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(engine, text: str, max_new_tokens: int) -> str:
    """Greedy continuation by ``model.generate`` (full cache) on the server's own model."""
    enc = engine.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = engine.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
    return engine.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def chat_text(messages) -> str:
    # The tiny BPE tokenizer has no chat template: the server writes a plain transcript.
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def test_models_list_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_completion_equals_greedy_generate(server, client):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text == reference(server[1], PROMPT, 10)
    assert out.choices[0].finish_reason == "length"
    usage = out.usage
    assert usage.completion_tokens == 10 and usage.total_tokens == usage.prompt_tokens + 10
    kv = usage.model_extra["kv_cache"]
    assert kv["policy"] == "full" and kv["bytes_held"] == kv["bytes_full"] > 0


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


def test_four_concurrent_requests_are_batched(server, client):
    engine = server[1]
    prompts = [PROMPT, "x = 1", "import os\nimport sys", "class Foo:\n    pass"]
    batches, rows = engine.batches, engine.rows

    def ask(prompt: str) -> str:
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
        return out.choices[0].text

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [reference(engine, p, 6) for p in prompts]
    assert engine.rows - rows == 4 and engine.batches - batches < 4  # some ran together


def test_concurrent_requests_with_different_caches_are_all_answered(server, client):
    engine = server[1]
    h2o = {"kv_cache": {"policy": "h2o", "budget": 0.2, "min_tokens": 0}}
    jobs = [({}, PROMPT), (h2o, PROMPT), ({}, "x = 1"), (h2o, "x = 1")]
    batches = engine.batches

    def ask(job) -> tuple[str, str]:
        extra, prompt = job
        out = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=6, temperature=0, extra_body=extra
        )
        return out.choices[0].text, out.usage.model_extra["kv_cache"]["policy"]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, jobs))
    assert [policy for _, policy in answers] == ["full", "h2o", "full", "h2o"]
    assert answers[0][0] == reference(engine, PROMPT, 6)  # full rows are exact
    assert engine.batches - batches >= 2  # one cache object per configuration


def test_per_request_cache_policy(server, client):
    kv_cache = {"policy": "h2o", "budget": 0.2, "min_tokens": 0}
    out = client.completions.create(
        model="tiny", prompt=LONG, max_tokens=4, temperature=0, extra_body={"kv_cache": kv_cache}
    )
    kv = out.usage.model_extra["kv_cache"]
    assert kv["policy"] == "h2o" and 0 < kv["bytes_held"] < kv["bytes_full"] / 2
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
    assert kv["policy"] == "h2o" and kv["bytes_held"] == kv["bytes_full"]


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
        ({"messages": None}, "invalid_value"),
        ({"n": 2}, "invalid_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_value"),
    ],
)
def test_bad_requests_get_400(client, body, code):
    messages = body.pop("messages", [{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=2, extra_body=body
        )
    error = err.value.body
    assert err.value.status_code == 400 and error["code"] == code and error["message"]
    assert error["type"] == "invalid_request_error"


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


def test_client_gone_mid_stream_frees_its_row(server, client):
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


def test_still_answers_after_errors(server, client):
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert out.usage.completion_tokens >= 1


def test_full_queue_gets_429(server):
    """A queue of one: the second waiting request is refused at once, with Retry-After."""
    from llamahome.serving.app import create_app
    from llamahome.serving.engine import Engine

    engine, settings = server[1], server[2].state.settings
    idle = Engine(engine.model, engine.tokenizer, engine.build_cache, max_queue=1)  # not started
    app = create_app(idle, settings)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    headers = {"Authorization": f"Bearer {KEY}"}

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            first = asyncio.create_task(http.post("/v1/completions", json=body, headers=headers))
            while idle.queued < 1:
                await asyncio.sleep(0.01)
            second = await http.post("/v1/completions", json=body, headers=headers)
            first.cancel()
            return second

    second = asyncio.run(run())
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["code"] == "rate_limit_exceeded"


def test_cli_binds_localhost_and_never_prints_the_key(model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLAMAHOME_API_KEY": "sk-env-secret-9"}
    args = [f"model={model_dir}", "cache=full", f"serve.port={port}", "print_config=true",
            f"hydra.run.dir={tmp_path}", "serve.api_key=sk-argv-secret-7"]
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
    assert "[serve] http://127.0.0.1:" in out
    logs = out + "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert "sk-argv-secret-7" not in logs and "sk-env-secret-9" not in logs
