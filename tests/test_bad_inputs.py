"""The bad-input catalogue: every row is one mistake a user can make, and the answer it gets.

Each row: the input (an entry point and its overrides, a data file, a checkpoint, a cache
budget, an API call), the exit status and a phrase the one ``error:`` line must contain. No row
may print a traceback (``LLAMAHOME_DEBUG`` unset). Most rows fail in the config checks before a
model loads, so they run in-process through the entry functions with the same ``user_errors``
wrapper as the CLI; rows that need the real command line (Hydra's own parsing, the run-dir
guard) run as subprocesses, a handful only (each starts Python, torch and Hydra).

Serve rows (``SERVE_ROWS``) send bad HTTP requests to the real app (``build_server`` on a tiny
model, its engine running) and expect an OpenAI-style error object with a 4xx status.

Further tables: damaged checkpoint bytes (600 seeded files), damaged model directories through
``load_model``, chat input (``CHAT_ROWS``: the session always goes on), and run directories
that hold a run (``RUNDIR_CLI_ROWS`` through the real command line, ``RUNDIR_ROWS`` in process:
every refused command leaves the directory byte for byte as it was). The damaged files are built
from seeds in ``bad_files.py``.
"""

from __future__ import annotations

import csv
import importlib
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bad_files import damaged_checkpoints, prepare_run, snapshot, write_bad_models
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
CHAT = ("model=tiny", "print_config=false")

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
    # -------------------------------------------------------------- lengths past the context
    # (model=tiny: 2,048 positions). Refused from the config alone, before the weights load.
    ("len-passkey-100k", "evaluate", ("model=tiny", "task=passkey", "task.lengths=[100000]"), 2,
     "ConfigError: task.lengths=[100000] is 100000 tokens (+ 8 for the answer) but the model's "
     "context is 2048 tokens"),
    ("len-passkey-at-context", "evaluate",
     ("model=tiny", "task=passkey", "task.lengths=[512,2048]"), 2,
     "ConfigError: task.lengths=[512, 2048] is 2048 tokens (+ 8 for the answer)"),
    ("len-ruler-4096", "evaluate", ("model=tiny", "task=ruler", "task.lengths=[4096]"), 2,
     "ConfigError: task.lengths=[4096] is 4096 tokens (+ 48 for the answer) but the model's "
     "context is 2048"),
    ("len-niah-one-too-long", "evaluate", ("model=tiny", "task=niah", "task.lengths=[1024,4096]"),
     2, "ConfigError: task.lengths=[1024, 4096] is 4096 tokens"),
    ("len-ppl-100k", "evaluate", ("model=tiny", "task=streaming_ppl", "task.length=100000"), 2,
     "ConfigError: task.length=100000 is 100000 tokens but the model's context is 2048"),
    ("len-ppl-rolling-prefill", "evaluate",
     ("model=tiny", "cache=window", "cache.window_length=256", "cache.position_rolling=true",
      "task.length=100000", "task.prefix=4000"), 2,
     "ConfigError: task.length=100000 (the cache budget, positions rolled) is 4000 tokens"),
    ("len-ppl-rolling-budget", "evaluate",
     ("model=tiny", "cache=h2o", "cache.budget_ratio=0.2", "cache.position_rolling=true",
      "task.length=100000"), 2,
     "ConfigError: task.length=100000 (the cache budget, positions rolled) is 20001 tokens"),
    # A model directory whose config.json says 256 positions.
    ("len-model-dir", "evaluate",
     ("model=hf", "model.pretrained={files}/ctx256", "task=passkey", "task.lengths=[512]"), 2,
     "ConfigError: task.lengths=[512] is 512 tokens (+ 8 for the answer) but the model's "
     "context is 256 tokens"),
    ("len-smollm2-9000", "evaluate", ("model=smollm2", "task=passkey", "task.lengths=[9000]"), 2,
     "ConfigError: task.lengths=[9000] is 9000 tokens (+ 8 for the answer) but the model's "
     "context is 8192 tokens"),
    ("len-summarization-document", "evaluate",
     ("model=tiny", "task=summarization", "task.data_file={files}/long_document.jsonl",
      "task.show_progress=false"), 2,
     "ConfigError: task.data_file={files}/long_document.jsonl line 2 is"),
    ("len-summarization-not-utf8", "evaluate",
     ("model=tiny", "task=summarization", "task.data_file={files}/latin1.txt"), 2,
     "DataError: {files}/latin1.txt:1: not valid UTF-8"),
    # The same without weights: only a check that reads the config alone, before loading, can
    # give this line.
    ("len-gen-prompt-file-config-only", "generate",
     ("model=hf", "model.pretrained={files}/ctx256_no_weights",
      "prompt_file={files}/long_prompt.txt"), 2,
     "ConfigError: prompt_file={files}/long_prompt.txt is"),
    ("len-train-max-seq-length", "train", ("data.max_seq_length=4096",), 2,
     "ConfigError: data.max_seq_length=4096 is 4096 tokens but the model's context is 2048"),
    ("len-chat-max-new-tokens", "chat", ("max_new_tokens=2048",), 2,
     "ConfigError: max_new_tokens=2048 is 2048 tokens (+ 1 for a message) but the model's "
     "context is 2048"),
    # -------------------------------------------------------------- damaged model files
    # model=<dir> of a tiny Llama saved with save_pretrained, one file damaged per row.
    ("weights-truncated", "generate", ("model=hf", "model.pretrained={files}/m_truncated"), 2,
     "ModelError: {files}/m_truncated/model.safetensors: is truncated:"),
    ("weights-empty", "generate", ("model=hf", "model.pretrained={files}/m_empty"), 2,
     "ModelError: {files}/m_empty/model.safetensors: is truncated or not a safetensors file "
     "(0 bytes"),
    ("weights-random-bytes", "generate", ("model=hf", "model.pretrained={files}/m_garbage"), 2,
     "ModelError: {files}/m_garbage/model.safetensors: is truncated or not a safetensors file"),
    ("weights-header-only", "generate", ("model=hf", "model.pretrained={files}/m_header_only"),
     2, "ModelError: {files}/m_header_only/model.safetensors: is truncated:"),
    ("weights-trailing-bytes", "generate", ("model=hf", "model.pretrained={files}/m_trailing"),
     2, "ModelError: {files}/m_trailing/model.safetensors: has trailing bytes"),
    ("weights-bad-header", "generate", ("model=hf", "model.pretrained={files}/m_bad_header"), 2,
     "ModelError: {files}/m_bad_header/model.safetensors: is damaged or not a safetensors file"),
    ("weights-shard-missing", "generate",
     ("model=hf", "model.pretrained={files}/m_shard_missing"), 2,
     "ModelError: {files}/m_shard_missing/model-00002-of-00002.safetensors: missing"),
    ("weights-index-not-json", "generate",
     ("model=hf", "model.pretrained={files}/m_index_not_json"), 2,
     "ModelError: {files}/m_index_not_json/model.safetensors.index.json: is not valid JSON"),
    ("weights-bin-truncated", "generate", ("model=hf", "model.pretrained={files}/m_bin_truncated"),
     2, "ModelError: {files}/m_bin_truncated/pytorch_model.bin: is truncated or damaged"),
    ("weights-none", "generate", ("model=hf", "model.pretrained={files}/m_no_weights"), 2,
     "ModelError: {files}/m_no_weights: config.json but no weights"),
    ("config-not-json", "generate", ("model=hf", "model.pretrained={files}/m_config_not_json"),
     2, "ModelError: {files}/m_config_not_json/config.json: is not valid JSON"),
    ("config-empty", "generate", ("model=hf", "model.pretrained={files}/m_config_empty"), 2,
     "ModelError: {files}/m_config_empty/config.json: is empty"),
    ("config-a-list", "generate", ("model=hf", "model.pretrained={files}/m_config_list"), 2,
     "ModelError: {files}/m_config_list/config.json: holds a JSON list"),
    ("config-no-model-type", "generate",
     ("model=hf", "model.pretrained={files}/m_config_no_type"), 2,
     "ModelError: {files}/m_config_no_type/config.json: has no \"model_type\""),
    ("config-bad-value", "generate", ("model=hf", "model.pretrained={files}/m_config_bad_value"),
     2, "ModelError: {files}/m_config_bad_value/config.json: Validation error for field "
     "'hidden_size'"),
    ("config-not-utf8", "generate", ("model=hf", "model.pretrained={files}/m_config_latin1"), 2,
     "ModelError: {files}/m_config_latin1/config.json: is not UTF-8"),
    ("tokenizer-json-damaged", "generate",
     ("model=hf", "model.pretrained={files}/m_tokenizer_damaged"), 2,
     "ModelError: {files}/m_tokenizer_damaged/tokenizer.json: is not valid JSON"),
    ("generation-config-damaged", "generate",
     ("model=hf", "model.pretrained={files}/m_generation_damaged"), 2,
     "ModelError: {files}/m_generation_damaged/generation_config.json: is not valid JSON"),
    ("run-export-truncated", "evaluate",
     ("model=hf", "model.pretrained={files}/run_export_truncated", "task.length=40",
      "task.prefix=8"), 2,
     "ModelError: {files}/run_export_truncated/export/model.safetensors: is truncated:"),
    ("gguf-truncated", "generate",
     ("model=hf", "model.pretrained={files}/gguf_truncated", "+model.gguf_file=model.gguf"), 2,
     "ModelError: gguf_truncated: could not load weights from {files}/gguf_truncated/model.gguf"),
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
    # Seeded: random bytes hit torch's unpickler in a different state on every draw.
    (root / "garbage.ckpt").write_bytes(random.Random(0).randbytes(4096))
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
    write_bad_models(root)
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
    defaults = {"train": TRAIN, "generate": GEN, "chat": CHAT}.get(entry, ())
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


# ------------------------------------------------------------------------ any checkpoint bytes
def test_any_bytes_as_a_checkpoint_load_or_fail_in_one_line(tmp_path) -> None:
    """The loader on 600 damaged files: a checkpoint dict or one ConfigError line, never another
    exception (random bytes used to end in IndexError, KeyError or UnicodeDecodeError ~9% of
    the time) and never torch's advice to load with weights_only=False."""
    from llamahome.errors import ConfigError
    from llamahome.training.ckpt_check import load_checkpoint_safely

    path = tmp_path / "damaged.ckpt"
    refused = 0
    for seed, data in enumerate(damaged_checkpoints(600)):
        path.write_bytes(data)
        try:
            state = load_checkpoint_safely(path)
        except ConfigError as err:
            refused += 1
            message = str(err)
            assert message.startswith(f"ckpt_path={path}: "), (seed, message)
            assert "\n" not in message and "weights_only=False" not in message, (seed, message)
        else:  # a byte changed inside the tensor data: the file still is a checkpoint
            assert isinstance(state["state_dict"]["model.w"], torch.Tensor), seed
            assert isinstance(state["global_step"], int), seed
    assert refused > 500  # the draws really are damaged files, not 600 good ones


@pytest.mark.parametrize(
    ("held", "phrase"),
    [
        pytest.param({"state_dict": 5, "global_step": 1}, "state_dict is not a dict", id="sd-int"),
        pytest.param({"state_dict": {"w": [1.0]}, "global_step": 1}, "is a list, not a tensor",
                     id="sd-list-value"),
        pytest.param({"state_dict": {}, "global_step": "12"}, "global_step is '12'",
                     id="step-str"),
        pytest.param({"state_dict": {}}, "not a Lightning checkpoint", id="no-step"),
        pytest.param([torch.zeros(2)], "holds list", id="a-list"),
        pytest.param(torch.zeros(2), "holds Tensor", id="a-tensor"),
    ],
)
def test_a_loadable_file_of_the_wrong_shape_is_one_line(held, phrase, tmp_path) -> None:
    from llamahome.errors import ConfigError
    from llamahome.training.ckpt_check import load_checkpoint_safely

    torch.save(held, tmp_path / "odd.ckpt")
    with pytest.raises(ConfigError, match=phrase):
        load_checkpoint_safely(tmp_path / "odd.ckpt")


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
    # Overrides Hydra refuses: checked before Hydra runs (utils/preflight.py), one line, exit 2.
    ("unknown-key", ("optim.not_a_key=1",), 2, "optim.not_a_key is not a config key"),
    ("unknown-group-option", ("cache=nosuch",), 2, "cache=nosuch is not an option of cache"),
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


# ------------------------------------------------------------------------------ command line
# What Hydra would refuse with a multi-line message (exit 1) is checked before it runs
# (utils/preflight.py via utils/cli.py:launch): one `error: ConfigError:` line, exit 2, for every
# entry point. (id, entry, arguments, phrase in the line.) In-process: the same `launch` as
# `python -m llamahome.<entry>`; the last test sends real non-UTF-8 bytes through the OS.
_OPTIONS = "choose one of full, h2o, keydiff, knorm, kvzip, learned, sink, snapkv, tova, window"
_ENTRIES = ("train", "eval", "generate", "chat", "serve")
COMMAND_LINE_ROWS = [
    *[(f"{e}-unknown-option", e, ("cache=nosuch",),
       f"cache=nosuch is not an option of cache: {_OPTIONS}") for e in _ENTRIES],
    ("train-option-typo", "train", ("model=tny",), "Did you mean model=tiny?"),
    ("train-unknown-key", "train", ("optim.lrr=1",),
     "optim.lrr is not a config key: optim has no 'lrr'; its keys are lr, betas, weight_decay, "
     "eps. Did you mean optim.lr?"),
    ("eval-unknown-key", "eval", ("task=passkey", "task.lenghts=[64]"),
     "Did you mean task.lengths?"),
    ("generate-unknown-key", "generate", ("generate.max_new_tokens=8",),
     "the generate config has no 'generate'; its keys are "),
    ("chat-unknown-key", "chat", ("chat.max_new_tokens=8",), "Did you mean max_new_tokens?"),
    ("serve-unknown-key", "serve", ("serve.prot=9000",), "Did you mean serve.port?"),
    *[(f"{e}-not-utf8", e, ("seed=1", "system_prompt=caf\udce9"),
       "the argument 'system_prompt=caf\\xe9' is not UTF-8 text (byte 0xe9)") for e in _ENTRIES],
    *[(f"{e}-malformed", e, ("cache.budget_ratio=[0.2",),
       "cannot parse the override 'cache.budget_ratio=[0.2'") for e in ("train", "eval", "chat")],
    ("generate-no-equals", "generate", ("prompt",),
     "cannot parse the override 'prompt' (missing EQUAL"),
    ("serve-unclosed-quote", "serve", ("serve.api_key='abc",), "cannot parse the override"),
    ("train-unknown-flag", "train", ("--lr", "1e-4"), "unknown option '--lr'"),
    ("eval-comma-without-m", "eval", ("cache=full,h2o",), "add -m (--multirun)"),
    ("train-add-existing-group", "train", ("+cache=h2o",), "write cache=<option>"),
    ("train-group-null", "train", ("debug=null",), "a config group takes an option name"),
    *[(f"{e}-sweep-unknown-option", e, ("-m", "cache=full,nosuch"),
       "cache=nosuch is not an option") for e in ("train", "eval", "generate")],
    ("train-sweep-unknown-key", "train", ("-m", "optim.lrr=1e-4,3e-4"),
     "optim.lrr is not a config key"),
]


@pytest.mark.parametrize(
    ("entry", "args", "phrase"), [pytest.param(*r[1:], id=r[0]) for r in COMMAND_LINE_ROWS]
)
def test_command_line_mistake_is_one_line_exit_2(entry, args, phrase, monkeypatch, capsys):
    from llamahome.utils.cli import launch

    module = importlib.import_module(f"llamahome.{entry}")
    monkeypatch.setattr(sys, "argv", [f"llamahome/{entry}.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        launch(module.main, entry)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert err.count("\n") == 1 and err.startswith("error: ConfigError: "), err[-2000:]
    assert phrase in err, err


def test_non_utf8_bytes_on_the_real_command_line_are_one_line(tmp_path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LLAMAHOME_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "llamahome.chat", b"system_prompt=caf\xe9"],
        cwd=tmp_path, env=env, capture_output=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.decode() == (
        "error: ConfigError: the argument 'system_prompt=caf\\xe9' is not UTF-8 text (byte 0xe9): "
        "retype it, or set a UTF-8 locale in the terminal (e.g. LANG=C.UTF-8).\n"
    )


# ------------------------------------------------------------------------------ model files, API
MODEL_FILE_API_ROWS = [
    ("api-weights-truncated", "m_truncated", "model.safetensors: is truncated:"),
    ("api-shard-missing", "m_shard_missing", "model-00002-of-00002.safetensors: missing"),
    ("api-config-bad-value", "m_config_bad_value", "config.json: Validation error for field"),
]


@pytest.mark.parametrize(
    ("name", "phrase"), [pytest.param(*r[1:], id=r[0]) for r in MODEL_FILE_API_ROWS]
)
def test_load_model_on_a_damaged_directory_is_a_model_error_naming_the_file(
    name, phrase, files
) -> None:
    from llamahome import load_model
    from llamahome.errors import ModelError

    with pytest.raises(ModelError) as info:
        load_model(str(files / name))
    message = str(info.value)
    assert message.startswith(str(files / name)) and phrase in message, message
    assert len(message.splitlines()) == 1


def test_eval_refuses_a_length_before_the_weights_load(files, tmp_path, monkeypatch) -> None:
    """Every task's length check reads the model's config alone: no weights are loaded."""
    import llamahome.model.load as load
    from llamahome.errors import ConfigError
    from llamahome.eval import evaluate

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the length check")

    monkeypatch.setattr(load, "build_or_load_model", no_weights)
    monkeypatch.setattr(load, "load_tokenizer", no_weights)
    for task in (("task=passkey", "task.lengths=[512]"), ("task=ruler", "task.lengths=[512]"),
                 ("task=niah", "task.lengths=[512]"), ("task=streaming_ppl", "task.length=512")):
        cfg = compose("eval", ("model=hf", f"model.pretrained={files}/ctx256", *task),
                      tmp_path / "run")
        with pytest.raises(ConfigError, match="but the model's context is 256 tokens"):
            evaluate(cfg)


# ------------------------------------------------------------------------------ chat
# Typed into the chat REPL, in process: the same decoding of stdin as `python -m llamahome.chat`
# (surrogateescape, see llamahome.chat.tolerate_bad_bytes). Each row: (id, stdin bytes, phrases
# the output must show in order, answers given). The chat never ends before the input does.
CHAT_ROWS = [
    ("chat-latin1-byte", b"caf\xe9 au lait\n",
     ["[chat] 1 byte(s) of the input were not UTF-8 and were replaced with \ufffd"], 1),
    ("chat-broken-sequence", b"\xe2\x28\xa1 hello\n", ["[chat] 2 byte(s) of the input"], 1),
    ("chat-bad-line-then-good", b"\xff\xfe\nHello there\n", ["[chat] 2 byte(s)", "[chat] "], 2),
    ("chat-cut-at-end-of-input", b"Hi \xe2\x82", ["[chat] 2 byte(s) of the input"], 1),
    ("chat-overlong-nul", b"a\xc0\x80b\n", ["[chat] 2 byte(s) of the input"], 1),
    ("chat-message-past-context", b"word " * 120 + b"\nHi\n",
     ["error: ConfigError: the message (with the chat template) is",
      "but the model's context is 96 tokens (max_position_embeddings): send a shorter "
      "message."], 1),
    ("chat-old-turns-dropped", b"one two three four five six seven\n" * 4,
     ["oldest turn", "to fit the 96-token context"], 4),
]


@pytest.fixture(scope="module")
def chat_model(files):
    from llamahome import load_model

    return load_model(str(files / "m_good"))


@pytest.mark.parametrize(
    ("data", "phrases", "answers"), [pytest.param(*r[1:], id=r[0]) for r in CHAT_ROWS]
)
def test_chat_input_never_ends_the_session(data, phrases, answers, chat_model, capsys) -> None:
    from llamahome.chat import repl
    from llamahome.kvcache.spec import CacheSpec
    from llamahome.model.chat import ChatSession

    model, tokenizer = chat_model
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    session = ChatSession(model, tokenizer, CacheSpec(policy="full"), kwargs)
    session.context = 96  # a small context, so that long input and long histories meet it
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape")

    def read(prompt: str) -> str:
        line = stdin.readline()
        if not line:
            raise EOFError
        return line

    repl(session, read)  # returns at the end of input: nothing raised
    out = capsys.readouterr().out
    statuses = [line for line in out.splitlines() if " tok/s | KV " in line]
    assert len(statuses) == answers, out
    at = 0
    for phrase in phrases:
        found = out.find(phrase, at)
        assert found >= 0, (phrase, out)
        at = found + len(phrase)
    assert "\udce9" not in out and "Traceback" not in out


def test_chat_cli_takes_bytes_that_are_not_utf8(files, tmp_path) -> None:
    """The real command: a latin-1 line on stdin is replaced, answered, and the chat goes on."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("LLAMAHOME_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "llamahome.chat", f"model={files / 'm_good'}", "cache=full",
         "max_new_tokens=4", f"hydra.run.dir={tmp_path / 'chat'}"],
        cwd=REPO, env=env, input=b"caf\xe9\nHello\n/exit\n", capture_output=True, timeout=300,
    )
    out = result.stdout.decode("utf-8", errors="replace")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 byte(s) of the input were not UTF-8 and were replaced" in out
    assert out.count(" tok/s | KV ") == 2, out  # both lines answered (two status lines)
    assert b"Traceback" not in result.stderr


# ------------------------------------------------------------------------------ run directories
# A run dir that holds a run is refused unless resumed or overwritten, and a refused command
# leaves every file in it byte for byte as it was. `run_full` (a finished 1-step run) is copied
# and its history edited per row.
RUN_ARGS = tuple(a for a in TRAIN if a != "~callbacks.sample_generation")

# Through the real command line (Hydra writes .hydra/ and the job log before the task runs):
# (id, module, state of the run dir, extra args, phrases in the one error line).
RUNDIR_CLI_ROWS = [
    ("rundir-finished", "llamahome.train", "finished", (),
     ["ConfigError: hydra.run.dir=", "holds a finished run (global step 1; last.ckpt",
      "Resume it with ckpt_path=last", "overwrite=true"]),
    ("rundir-interrupted", "llamahome.train", "interrupted", (),
     ["holds an interrupted run (exit status 143)", "ckpt_path=last", "overwrite=true"]),
    ("rundir-killed", "llamahome.train", "killed", (),
     ["holds an interrupted run (it never recorded an end", "ckpt_path=last"]),
    # Refused by train's own checks, after Hydra composed the job and the model loaded.
    ("rundir-resume-refused-after-loading", "llamahome.train", "finished",
     ("ckpt_path=last", "peft=lora"), ["holds a full model (no LoRA adapters)"]),
    ("rundir-eval-into-a-train-run", "llamahome.eval", "finished", ("model=tiny",),
     ["is a train run's directory", "pass model="]),
    ("rundir-sweep-over-old-jobs", "llamahome.train", "sweep", ("-m", "optim.lr=1e-3,2e-3"),
     ["hydra.sweep.dir=", "job dir 0 holds a finished run"]),
]


@pytest.mark.parametrize(
    ("module", "state", "extra", "phrases"),
    [pytest.param(*r[1:], id=r[0]) for r in RUNDIR_CLI_ROWS],
)
def test_refused_command_leaves_the_run_dir_byte_identical(
    module, state, extra, phrases, files, tmp_path
) -> None:
    base = tmp_path / "base"
    run = prepare_run(files, base / "0" if state == "sweep" else base, state)
    before = snapshot(base)
    args = list(RUN_ARGS if module == "llamahome.train" else ("print_config=false",))
    if "peft=lora" in extra:
        args.remove("peft=none")
    where = f"hydra.sweep.dir={base}" if state == "sweep" else f"hydra.run.dir={run}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LLAMAHOME_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    flags = [a for a in extra if a.startswith("-")]  # -m before the overrides (argparse)
    extra = [a for a in extra if not a.startswith("-")]
    result = subprocess.run(
        [sys.executable, "-m", module, *flags, *args, *extra, where],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert snapshot(base) == before  # .hydra/, the log, the lock, the history: all untouched


# In process (train() as the Python API and the CLI's task call it):
# (id, state of the run dir, overrides, phrase in the one error line).
RUNDIR_ROWS = [
    ("rundir-another-runs-checkpoint", "finished", ("ckpt_path={files}/lora.ckpt",),
     "holds a finished run"),
    ("rundir-failed-with-checkpoint", "failed", (), "holds a failed run (global step 1"),
    ("rundir-history-cut-short", "cut", (), "holds a finished run (global step 1"),
    ("rundir-metrics-only", "metrics-only", (), "holds a run (metrics.csv)"),
    ("rundir-overwrite-not-bool", "finished", ("overwrite=maybe",),
     "overwrite='maybe' must be true or false"),
    ("rundir-overwrite-and-resume", "finished", ("ckpt_path=last", "overwrite=true"),
     "give one of the two"),
]


@pytest.mark.parametrize(
    ("state", "overrides", "phrase"), [pytest.param(*r[1:], id=r[0]) for r in RUNDIR_ROWS]
)
def test_train_refuses_a_run_dir_it_would_damage(
    state, overrides, phrase, files, tmp_path, capsys
) -> None:
    from llamahome.train import train

    run = prepare_run(files, tmp_path / "run", state)
    before = snapshot(run)
    overrides = tuple(o.replace("{files}", str(files)) for o in overrides)
    cfg = compose("train", (*TRAIN, *overrides), run)
    with pytest.raises(SystemExit) as exit_info, user_errors():
        train(cfg)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert "ConfigError: " in lines[0] and phrase in lines[0], lines[0]
    assert snapshot(run) == before


def test_overwrite_true_starts_over_in_a_finished_run_dir(files, tmp_path) -> None:
    from llamahome.train import train
    from llamahome.utils.rundir import read_run_history

    run = prepare_run(files, tmp_path / "run", "finished")
    old_ckpt = (run / "checkpoints" / "last.ckpt").read_bytes()
    train(compose("train", (*TRAIN, "trainer.max_steps=2", "overwrite=true"), run))
    assert (run / "checkpoints" / "last.ckpt").read_bytes() != old_ckpt
    with open(run / "metrics.csv") as file:
        steps = [row["step"] for row in csv.DictReader(file) if row["train/loss"]]
    assert steps == ["0", "1"]  # the new run's rows only, from step 0
    history = read_run_history(run)
    assert [h["event"] for h in history] == ["start", "end", "start", "end"]
    assert history[2].get("overwrote") is True and history[3]["global_step"] == 2


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
