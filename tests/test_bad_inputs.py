"""The bad-input catalogue: every row is one mistake a user can make, and the answer it gets.

Each row: the input (an entry point and its overrides, a data file, a checkpoint, a cache
budget, an API call), the exit status and a phrase the one ``error:`` line must contain. No row
may print a traceback (``LLAMAHOME_DEBUG`` unset). Most rows fail in the config checks before a
model loads, so they run in-process through the entry functions with the same ``user_errors``
wrapper as the CLI; rows that need the real command line (Hydra's own parsing, the run-dir
guard) run as subprocesses, a handful only (each starts Python, torch and Hydra).

Serve rows (``SERVE_ROWS``) send bad HTTP requests to the real app (``build_server`` on a tiny
model, its engine running) and expect an OpenAI-style error object with a 4xx status.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TRAIN, compose

from llamahome.utils.cli import user_errors

FIXTURES = REPO / "tests" / "fixtures" / "data"
TRAIN = (
    *TINY_TRAIN,
    "trainer.max_steps=1",
    "export=false",
    "validate_before_fit=false",
    "~callbacks.sample_generation",
)
GEN = ("model=tiny", "print_config=false", "stream=false", "max_new_tokens=2")

# (id, entry, overrides, exit status, phrase in the error line). {files} is a directory of bad
# data files and checkpoints built once per module (see `files`).
ROWS = [
    # -------------------------------------------------------------- train: CLI overrides
    ("lr-negative", "train", ("optim.lr=-1e-3",), 2, "optim.lr must be a positive number"),
    ("lr-string", "train", ("optim.lr=fast",), 2, "optim.lr"),
    ("max-steps-0", "train", ("trainer.max_steps=0",), 2, "trainer.max_steps must be > 0"),
    ("max-steps-str", "train", ("trainer.max_steps=abc",), 2, "trainer.max_steps must be an int"),
    ("heads-not-dividing", "train", ("model.config.num_attention_heads=3",), 2,
     "model.config is not a valid LlamaConfig"),
    ("val-interval-0", "train", ("trainer.val_check_interval=0",), 2, "val_check_interval"),
    ("val-fraction-1.5", "train", ("data.val_fraction=1.5",), 2, "data.val_fraction=1.5"),
    ("val-fraction-neg", "train", ("data.val_fraction=-0.1",), 2, "data.val_fraction=-0.1"),
    ("val-fraction-str", "train", ("data.val_fraction=half",), 2, "data.val_fraction"),
    ("batch-size-0", "train", ("data.batch_size=0",), 2, "data.batch_size=0"),
    ("seq-len-0", "train", ("data.max_seq_length=0",), 2, "data.max_seq_length"),
    ("batching-bad", "train", ("data.batching=sideways",), 2, "data.batching"),
    ("alpaca-no-path", "train", ("data=alpaca",), 2, "data.path is required"),
    ("alpaca-missing-file", "train", ("data=alpaca", "data.path=/no/such.jsonl"), 2,
     "/no/such.jsonl"),
    ("ckpt-last-none", "train", ("ckpt_path=last",), 2, "ckpt_path=last"),
    ("ckpt-missing", "train", ("ckpt_path=/no/such.ckpt",), 2, "/no/such.ckpt"),
    ("fp16-on-cpu", "train", ("trainer.precision=16-mixed",), 2, "precision"),
    ("qlora-on-cpu", "train", ("peft=qlora",), 2, "qlora"),
    ("model-no-weights", "train", ("model=llama7b",), 2, "ModelError"),
    ("seed-string", "train", ("seed=abc",), 2, "seed must be an integer"),
    ("lora-r-0", "train", ("peft=lora", "peft.r=0"), 2, "peft.r must be a positive integer"),
    ("accumulate-0", "train", ("trainer.accumulate_grad_batches=0",), 2,
     "trainer.accumulate_grad_batches"),
    ("compile-bad", "train", ("compile=maybe",), 2, "compile"),
    # -------------------------------------------------------------- train: cache budgets
    ("h2o-budget-1.5", "train", ("cache=h2o", "cache.budget_ratio=1.5"), 2, "budget_ratio"),
    ("h2o-heavy-neg", "train", ("cache=h2o", "cache.heavy_ratio=-0.1"), 2, "heavy_ratio"),
    ("h2o-ratios-sum", "train", ("cache=h2o", "cache.heavy_ratio=0.7", "cache.recent_ratio=0.6"),
     2, "heavy_ratio"),
    ("window-0", "train", ("cache=window", "cache.window_length=0"), 2, "window_length"),
    # -------------------------------------------------------------- train: data files
    ("alpaca-output-int", "train", ("data=alpaca", "data.path={files}/output_int.jsonl"), 2,
     "field 'output' must be a string, got int"),
    ("alpaca-malformed", "train",
     ("data=alpaca", f"data.path={FIXTURES}/alpaca_malformed.jsonl"), 2, "alpaca_malformed"),
    ("alpaca-missing-field", "train",
     ("data=alpaca", f"data.path={FIXTURES}/alpaca_missing_field.jsonl"), 2, "missing field"),
    ("alpaca-empty-file", "train", ("data=alpaca", "data.path={files}/empty.jsonl"), 2,
     "empty.jsonl"),
    ("alpaca-one-record", "train", ("data=alpaca", "data.path={files}/one.jsonl"), 2,
     "data.val_fraction=0.1 leaves no validation samples (1 train, 0 validation)"),
    ("chat-no-assistant", "train",
     ("data=chat", f"data.path={FIXTURES}/chat_no_assistant.jsonl"), 2, "assistant"),
    ("text-not-utf8", "train", ("data=text", "data.path={files}/latin1.txt"), 2, "latin1.txt"),
    ("custom-missing", "train", ("data=custom", "data.file=/no/such_hook.py"), 2,
     "/no/such_hook.py"),
    # -------------------------------------------------------------- train: checkpoints
    ("ckpt-empty", "train", ("ckpt_path={files}/empty.ckpt",), 2, "the file is empty"),
    ("ckpt-truncated", "train", ("ckpt_path={files}/truncated.ckpt",), 2, "truncated"),
    ("ckpt-garbage", "train", ("ckpt_path={files}/garbage.ckpt",), 2,
     "is not a PyTorch checkpoint"),
    ("ckpt-directory", "train", ("ckpt_path={files}",), 2, "is a directory"),
    ("ckpt-plain-weights", "train", ("ckpt_path={files}/plain_weights.pt",), 2,
     "not a Lightning checkpoint"),
    ("ckpt-pickled-object", "train", ("ckpt_path={files}/pickled.ckpt",), 2,
     "safe loading (weights_only=True) refuses"),
    ("ckpt-wrong-peft", "train", ("peft=lora", "ckpt_path={files}/full.ckpt"), 2,
     "holds a full model (no LoRA adapters)"),
    ("ckpt-wrong-peft-rev", "train", ("ckpt_path={files}/lora.ckpt",), 2, "holds LoRA adapters"),
    ("ckpt-wrong-model", "train",
     ("model.config.hidden_size=64", "model.config.intermediate_size=176",
      "ckpt_path={files}/full.ckpt"), 2, "holds a different model"),
    ("ckpt-wrong-lora-r", "train", ("peft=lora", "peft.r=4", "ckpt_path={files}/lora.ckpt"), 2,
     "holds a different model"),
    # -------------------------------------------------------------- generate
    ("gen-max-new-0", "generate", ("max_new_tokens=0",), 2, "max_new_tokens=0"),
    ("gen-temperature-0", "generate", ("do_sample=true", "temperature=0"), 2, "temperature"),
    ("gen-top-p-2", "generate", ("do_sample=true", "top_p=2"), 2, "top_p"),
    ("gen-penalty-0", "generate", ("repetition_penalty=0",), 2, "repetition_penalty"),
    ("gen-empty-prompt", "generate", ("prompt=' '",), 2, "prompt is empty"),
    ("gen-no-prompt", "generate", ("prompt=null",), 2, "prompt is missing"),
    ("gen-prompt-file-missing", "generate", ("prompt_file=/no/such.txt",), 2, "/no/such.txt"),
    ("gen-prompt-file-latin1", "generate", ("prompt_file={files}/latin1.txt",), 2,
     "is not UTF-8"),
    ("gen-chat-template-bad", "generate", ("chat_template=maybe",), 2, "chat_template"),
    ("gen-seed-string", "generate", ("seed=abc",), 2, "seed must be an integer"),
    ("gen-h2o-budget", "generate", ("cache.budget_ratio=1.5",), 2, "budget_ratio"),
    ("gen-h2o-ratios-sum", "generate", ("cache.heavy_ratio=0.7", "cache.recent_ratio=0.6"), 2,
     "cache.heavy_ratio + cache.recent_ratio"),
    ("gen-prompt-too-long", "generate", ("model.config.max_position_embeddings=16",
                                         "prompt='" + "word " * 40 + "'"), 2,
     "max_position_embeddings"),
    # -------------------------------------------------------------- eval
    ("eval-model-path-missing", "evaluate", ("model=tiny", "model_path=/no/such/export"), 2,
     "/no/such/export"),
]

# Requests against the OpenAI-compatible server, one row each:
# (id, method, path, JSON body or raw bytes, HTTP status, phrase in the error message).
_HI = [{"role": "user", "content": "Hi"}]
SERVE_ROWS: list[tuple[str, str, str, dict | bytes, int, str]] = [
    ("serve-malformed-json", "POST", "/v1/chat/completions", b"{not json", 400, "JSON"),
    ("serve-empty-messages", "POST", "/v1/chat/completions",
     {"model": "tiny", "messages": []}, 400, "messages"),
    ("serve-unknown-model", "POST", "/v1/chat/completions",
     {"model": "gpt-4", "messages": _HI}, 404, "gpt-4"),
    ("serve-budget-too-big", "POST", "/v1/chat/completions",
     {"model": "tiny", "messages": _HI, "kv_cache": {"policy": "h2o", "budget": 1.5}}, 400,
     "budget"),
    ("serve-unknown-policy", "POST", "/v1/chat/completions",
     {"model": "tiny", "messages": _HI, "kv_cache": {"policy": "lru"}}, 400, "lru"),
    ("serve-temperature", "POST", "/v1/chat/completions",
     {"model": "tiny", "messages": _HI, "temperature": 3}, 400, "temperature"),
    ("serve-max-tokens-zero", "POST", "/v1/completions",
     {"model": "tiny", "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ("serve-prompt-too-long", "POST", "/v1/completions",
     {"model": "tiny", "prompt": "word " * 3000, "max_tokens": 2}, 400, "context"),
    ("serve-missing-prompt", "POST", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("serve-wrong-key", "GET", "/v1/models", {}, 401, "API key"),
]

# One bad field never harms anyone (issue #17): strict types as the OpenAI API's, int64 seeds,
# valid Unicode, bounded bodies. Each row: (id, method, path, JSON body or raw bytes or a list of
# byte chunks (sent chunked, without Content-Length), HTTP status, OpenAI error `code`, phrase).
_CHAT, _COMPLETE = "/v1/chat/completions", "/v1/completions"
_C = {"model": "tiny", "messages": _HI, "max_tokens": 2}
_P = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
_RAW_CHAT = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": %s}]%s}'
SERVE_STRICT_ROWS: list[tuple[str, str, dict | bytes | list, int, str, str]] = [
    ("serve-stream-yes", _CHAT, {**_C, "stream": "yes"}, 400, "invalid_type", "stream"),
    ("serve-temperature-string", _CHAT, {**_C, "temperature": "0.5"}, 400, "invalid_type",
     "temperature"),
    ("serve-max-tokens-float", _COMPLETE, {**_P, "max_tokens": 1.5}, 400, "invalid_type",
     "max_tokens"),
    ("serve-max-tokens-bool", _COMPLETE, {**_P, "max_tokens": True}, 400, "invalid_type",
     "max_tokens"),
    ("serve-n-string", _CHAT, {**_C, "n": "1"}, 400, "invalid_type", "'n'"),
    ("serve-seed-past-int64", _CHAT, {**_C, "seed": 2**64}, 400, "invalid_value", "seed"),
    ("serve-seed-below-int64", _COMPLETE, {**_P, "seed": -(2**63) - 1}, 400, "invalid_value",
     "seed"),
    ("serve-seed-float", _COMPLETE, {**_P, "seed": 7.0}, 400, "invalid_type", "seed"),
    ("serve-top-p-nan", _CHAT, _RAW_CHAT % (b'"Hi"', b', "top_p": NaN'), 400, "invalid_value",
     "top_p"),
    ("serve-temperature-infinite", _CHAT, _RAW_CHAT % (b'"Hi"', b', "temperature": 1e999'), 400,
     "invalid_value", "temperature"),
    ("serve-surrogate-content", _CHAT, _RAW_CHAT % (b'"a\\ud800b"', b""), 400, "invalid_value",
     "messages.0.content"),
    ("serve-surrogate-text-part", _CHAT,
     _RAW_CHAT % (b'[{"type": "text", "text": "\\udfff"}]', b""), 400, "invalid_value",
     "surrogate"),
    ("serve-surrogate-prompt", _COMPLETE,
     b'{"model": "tiny", "prompt": "x\\ud800", "max_tokens": 2}', 400, "invalid_value", "prompt"),
    ("serve-surrogate-stop", _COMPLETE,
     b'{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}', 400, "invalid_value", "stop"),
    ("serve-surrogate-model", _COMPLETE, b'{"model": "tiny\\ud800", "prompt": "x"}', 400,
     "invalid_value", "model"),
    ("serve-image-part", _CHAT,
     {**_C, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "invalid_value", "text parts"),
    ("serve-unknown-role", _CHAT, {**_C, "messages": [{"role": "robot", "content": "Hi"}]}, 400,
     "invalid_value", "role"),
    ("serve-echo-string", _COMPLETE, {**_P, "echo": "true"}, 400, "invalid_type", "echo"),
    ("serve-stream-options-string", _CHAT,
     {**_C, "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "invalid_type",
     "include_usage"),
    ("serve-kv-min-tokens-string", _CHAT, {**_C, "kv_cache": {"policy": "h2o", "min_tokens": "0"}},
     400, "invalid_type", "min_tokens"),
    ("serve-kv-policy-number", _CHAT, {**_C, "kv_cache": {"policy": 5}}, 400, "invalid_type",
     "policy"),
    ("serve-logit-bias-string", _CHAT, {**_C, "logit_bias": {"5": "high"}}, 400, "invalid_type",
     "logit_bias"),
    ("serve-prompt-token-ids", _COMPLETE, {**_P, "prompt": [1, 2, 3]}, 400, "invalid_type",
     "prompt"),
    ("serve-body-too-large", _CHAT, b'{"model": "tiny", "messages": [' + b" " * 70_000 + b"]}",
     413, "request_too_large", "max_body_bytes"),
    ("serve-body-too-large-chunked", _CHAT, [b'{"model": "tiny", "x": "'] + [b"y" * 8192] * 10,
     413, "request_too_large", "max_body_bytes"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Bad data files and checkpoints, plus two good checkpoints (full and LoRA) to misuse."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "output_int.jsonl").write_text(
        "".join(f'{{"instruction": "n{i}", "input": "", "output": 12345}}\n' for i in range(8))
    )
    (root / "one.jsonl").write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n')
    (root / "empty.jsonl").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9 ol\xe9, d\xe9j\xe0 vu\n".encode("latin-1") * 20)
    (root / "empty.ckpt").write_bytes(b"")
    (root / "garbage.ckpt").write_bytes(os.urandom(4096))
    torch.save({"model.weight": torch.zeros(2, 2)}, root / "plain_weights.pt")
    torch.save({"state_dict": {}, "global_step": 1, "cfg": _Opaque()}, root / "pickled.ckpt")
    from llamahome.train import train

    torch.set_num_threads(1)
    for name, extra in (("full", ()), ("lora", ("peft=lora",))):
        run = root / f"run_{name}"
        train(compose("train", (*TRAIN, *extra), run))
        (root / f"{name}.ckpt").write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    data = (root / "full.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    return root


class _Opaque:
    """A class weights_only loading refuses: what a foreign or malicious pickle holds."""


def _entry(name: str):
    module = importlib.import_module(f"llamahome.{'eval' if name == 'evaluate' else name}")
    return getattr(module, name)


@pytest.mark.parametrize(
    ("entry", "overrides", "code", "phrase"),
    [pytest.param(*row[1:], id=row[0]) for row in ROWS],
)
def test_bad_input_is_one_clear_line(entry, overrides, code, phrase, files, tmp_path, capsys):
    defaults = {"train": TRAIN, "generate": GEN}.get(entry, ())
    overrides = tuple(o.replace("{files}", str(files)) for o in overrides)
    config = "eval" if entry == "evaluate" else entry
    cfg = compose(config, (*defaults, *overrides), tmp_path / "run")
    torch.set_num_threads(1)
    with pytest.raises(SystemExit) as exit_info, user_errors():
        _entry(entry)(cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == code, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert phrase.replace("{files}", str(files)) in lines[0], lines[0]
    assert "Traceback" not in err
    assert "weights_only=False" not in err


# ------------------------------------------------------------------------------ API misuse
def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, vocab_size=128)


API_ROWS = [
    ("load-model-unknown-id", lambda: _api("load_model")("no/such"), "ModelError", "'no/such'"),
    ("load-model-int", lambda: _api("load_model")(123), "ConfigError", "got int"),
    ("load-model-unknown-option", lambda: _api("load_model")("tiny", bogus=1), "ConfigError",
     "bogus"),
    ("make-cache-ratio-str", lambda: _api("make_cache")("h2o", _tiny_config(), heavy_ratio="x"),
     "CacheError", "cache.heavy_ratio='x'"),
    ("make-cache-policy-none", lambda: _api("make_cache")(None, _tiny_config()), "CacheError",
     "cache.policy=None"),
    ("make-cache-unknown-policy", lambda: _api("make_cache")("lru", _tiny_config()),
     "CacheError", "lru"),
    ("make-cache-unknown-key", lambda: _api("make_cache")("h2o", _tiny_config(), bogus=1),
     "CacheError", "cache.bogus"),
    ("make-cache-ratio-2", lambda: _api("make_cache")("h2o", _tiny_config(), heavy_ratio=2.0),
     "CacheError", "heavy_ratio"),
    ("make-cache-no-config", lambda: _api("make_cache")("h2o", None), "CacheError", "config"),
]


def _api(name: str):
    import llamahome

    return getattr(llamahome, name)


@pytest.mark.parametrize(
    ("call", "kind", "phrase"), [pytest.param(*r[1:], id=r[0]) for r in API_ROWS]
)
def test_api_misuse_raises_a_named_llamahome_error(call, kind, phrase) -> None:
    from llamahome.errors import LlamaHomeError

    with pytest.raises(LlamaHomeError) as info:
        call()
    names = {cls.__name__ for cls in type(info.value).__mro__}
    assert kind in names, type(info.value)
    assert phrase in str(info.value)
    assert len(str(info.value).splitlines()) == 1


# ------------------------------------------------------------------------------ real CLI
CLI_ROWS = [
    # Hydra's own override parsing: its one-line message, exit status 1.
    ("unknown-key", ("optim.not_a_key=1",), 1, "not_a_key"),
    ("unknown-group-option", ("cache=nosuch",), 1, "nosuch"),
    # The run-dir guard, before Hydra writes anything.
    ("run-dir-under-a-file", ("hydra.run.dir={file}/run",), 2, "is a file in the way"),
    ("run-dir-unwritable", ("hydra.run.dir=/proc/llamahome-run",), 2, "hydra.run.dir=/proc"),
    # MissingMandatoryValue through the real Hydra app.
    ("alpaca-no-path-cli", ("data=alpaca", "model=tiny"), 2, "data.path is required"),
]


@pytest.mark.parametrize(
    ("args", "code", "phrase"), [pytest.param(*r[1:], id=r[0]) for r in CLI_ROWS]
)
def test_cli_bad_input_is_one_clear_line(args, code, phrase, tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    args = tuple(a.replace("{file}", str(blocker)) for a in args)
    if not any(a.startswith("hydra.run.dir") for a in args):
        args = (*args, f"hydra.run.dir={tmp_path / 'run'}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LLAMAHOME_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(
        [sys.executable, "-m", "llamahome.train", "print_config=false", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert phrase in result.stderr, result.stderr[-2000:]
    if code == 2:
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and phrase in lines[0], result.stderr[-2000:]


# ------------------------------------------------------------------------------ serve
# Bad serve settings: one error line naming the key, before the model loads.
SERVE_CONFIG_ROWS = [
    ("serve-kv-memory-word", ("serve.kv_memory=lots",), "serve.kv_memory='lots'"),
    ("serve-kv-memory-zero", ("serve.kv_memory=0",), "serve.kv_memory=0"),
    ("serve-body-limit-unit", ("serve.max_body_bytes=4 parsecs",), "serve.max_body_bytes"),
    ("serve-prefill-chunk-0", ("serve.prefill_chunk=0",), "serve.prefill_chunk=0"),
]


@pytest.mark.parametrize(
    ("overrides", "phrase"), [pytest.param(*r[1:], id=r[0]) for r in SERVE_CONFIG_ROWS]
)
def test_bad_serve_setting_is_one_clear_line(overrides, phrase, tmp_path, capsys) -> None:
    cfg = compose("serve", ("model=tiny", "print_config=false", *overrides), tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info, user_errors():
        _entry("serve")(cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(lines) == 1 and phrase in lines[0], err[-2000:]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def serve_app(tmp_path_factory):
    """The real app (FastAPI + the engine thread) on a tiny saved model, with a bearer token."""
    from fastapi.testclient import TestClient

    from llamahome import load_model
    from llamahome.serve import build_server
    from llamahome.utils.cli import model_argument

    model_dir = tmp_path_factory.mktemp("serve-model")
    model, tokenizer = load_model("tiny", attn_implementation="sdpa")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    overrides = [
        *model_argument(["serve", f"model={model_dir}"])[1:], "serve.model_name=tiny",
        "print_config=false", "serve.api_key=sk-catalogue", "serve.max_body_bytes=64KiB",
        "serve.kv_memory=64MiB",
    ]
    cfg = compose("serve", overrides, tmp_path_factory.mktemp("serve-run"))
    app, engine, _ = build_server(cfg)
    with TestClient(app) as client:
        yield client
    engine.stop()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "phrase"),
    [pytest.param(*r[1:], id=r[0]) for r in SERVE_ROWS],
)
def test_bad_request_is_an_openai_error(serve_app, method, path, body, status, phrase) -> None:
    key = "sk-wrong" if status == 401 else "sk-catalogue"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if isinstance(body, bytes):
        answer = serve_app.request(method, path, content=body, headers=headers)
    else:
        answer = serve_app.request(method, path, json=body or None, headers=headers)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert phrase.lower() in error["message"].lower(), error
    # The server survives every row: a good request still gets an answer.
    ok = serve_app.get("/health")
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "phrase"),
    [pytest.param(*r[1:], id=r[0]) for r in SERVE_STRICT_ROWS],
)
def test_bad_field_is_a_4xx_and_no_traceback(serve_app, path, body, status, code, phrase,
                                             caplog) -> None:
    headers = {"Authorization": "Bearer sk-catalogue", "Content-Type": "application/json"}
    if isinstance(body, list):  # no Content-Length: the limit must hold while reading
        answer = serve_app.post(path, content=iter(body), headers=headers)
    elif isinstance(body, bytes):
        answer = serve_app.post(path, content=body, headers=headers)
    else:
        answer = serve_app.post(path, json=body, headers=headers)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == code, error
    assert phrase.lower() in error["message"].lower(), error
    assert not [r for r in caplog.records if r.exc_info], "a client's mistake logged a traceback"
    # The server survives every row: a good request still gets an answer.
    ok = serve_app.post(_COMPLETE, json={**_P, "temperature": 0}, headers=headers)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
