"""Shared by the serve tests: a tiny saved model, a real uvicorn server in a thread, references."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from conftest import compose

KEY = "sk-test-5f1e2d"
PROMPT = "def foo(x):\n    return"
# ~300 tokens with the tiny BPE tokenizer: several prefill chunks at serve.prefill_chunk=64.
LONG = "import os\nimport sys\n\nclass Foo:\n    def __init__(self):\n        self.x = 1\n" * 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_model(path: Path) -> Path:
    """A tiny LlamaForCausalLM with its tokenizer, saved as a user's HF directory would be."""
    from llamahome import load_model

    model, tokenizer = load_model("tiny", attn_implementation="sdpa")
    torch.manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build(model_dir: Path, run_dir: Path, *overrides: str):
    """``build_server`` on the saved model, as ``python -m llamahome.serve model=<dir>`` does."""
    from llamahome.serve import build_server
    from llamahome.utils.cli import model_argument

    args = [
        *model_argument(["serve", f"model={model_dir}"])[1:], "serve.model_name=tiny",
        "cache=full", "print_config=false", "serve.max_new_tokens=16", "serve.prefill_chunk=64",
        "serve.kv_memory=256MiB", *overrides,
    ]
    return build_server(compose("serve", args, run_dir))


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port in a thread; yields the base URL."""
    import uvicorn

    # A socket bound here and handed to uvicorn: no window in which another process could take
    # a port we picked but had not bound yet.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # log_config=None: uvicorn's loggers propagate, so tests can read what it logged.
    config = uvicorn.Config(app, log_level="warning", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def reference(engine, text: str, max_new_tokens: int) -> str:
    """Greedy continuation by ``model.generate`` (full cache) on the server's own model."""
    enc = engine.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = engine.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
    return engine.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    """Poll `predicate` until true (a generous deadline: only a hang fails this)."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def tracebacks(caplog) -> list[str]:
    """Log records that carry a traceback (a client's mistake must leave none)."""
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]
