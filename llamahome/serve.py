"""Serve a model over an OpenAI-compatible HTTP API: ``python -m llamahome.serve``.

    python -m llamahome.serve model=smollm2 cache=h2o serve.port=8000
    python -m llamahome.serve model=outputs/train/runs/<time>      # a run, its export/, a dir
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'

FastAPI + uvicorn in front, one engine thread owning the model behind (llamahome/serving/):
continuous batching, one KV cache per request, admission by KV memory (``serve.kv_memory``),
Prometheus metrics on ``/metrics``. Binds 127.0.0.1 unless told otherwise; ``serve.api_key``
(or ``LLAMAHOME_API_KEY``) turns on bearer-token auth. The key is never printed or logged.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from llamahome.errors import ConfigError
from llamahome.utils.cli import launch, quiet_libraries, user_errors
from llamahome.utils.validation import build

log = logging.getLogger("llamahome.serve")
TYPED_MODEL: list[str] = []


def check_serve(cfg: DictConfig) -> dict[str, Any]:
    """Validate the ``serve`` keys (before the model loads) and return them as a dict.

    Raises:
        ConfigError: Naming the first bad ``serve.<key>``.
    """
    from llamahome.serving.memory import parse_bytes

    serve = dict(cfg.serve)
    integers = ("port", "max_batch_size", "max_queue", "max_new_tokens", "prefill_chunk")
    for key, low in zip(integers, (0, 1, 1, 1, 1), strict=True):
        value = serve.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"serve.{key}={value!r} must be an integer >= {low}")
    if serve["port"] > 65535:
        raise ConfigError(f"serve.port={serve['port']} must be <= 65535")
    if not 0 <= float(serve.get("temperature", 1.0)) <= 2:
        raise ConfigError(f"serve.temperature={serve['temperature']!r} must be in [0, 2]")
    if not 0 < float(serve.get("top_p", 1.0)) <= 1:
        raise ConfigError(f"serve.top_p={serve['top_p']!r} must be in (0, 1]")
    serve["api_key"] = serve.get("api_key") or os.environ.get("LLAMAHOME_API_KEY") or None
    serve["max_body_bytes"] = parse_bytes(serve.get("max_body_bytes"), "serve.max_body_bytes")
    if serve.get("kv_memory") is not None:
        serve["kv_memory"] = parse_bytes(serve["kv_memory"], "serve.kv_memory")
    return serve


def build_server(cfg: DictConfig):
    """Load the model and return ``(app, engine, serve settings)``; the engine is started."""
    serve = check_serve(cfg)
    cache_spec = build(cfg, "cache")
    model_spec = build(cfg, "model")

    # After the checks: a bad serve.* or cache.* value is answered before torch and FastAPI load.
    from llamahome.model.load import load_model
    from llamahome.model.scorer import check_scorer_available
    from llamahome.serving.app import ServeSettings, create_app
    from llamahome.serving.engine import Engine, build_cache

    check_scorer_available(cache_spec, model_spec)  # cache=learned: is there a scorer?
    model, tokenizer = load_model(model_spec)
    engine = Engine(
        model, tokenizer, lambda spec, seq_len: build_cache(spec, model.config, seq_len),
        max_batch_size=serve["max_batch_size"], max_queue=serve["max_queue"],
        kv_memory=serve.get("kv_memory"), prefill_chunk=serve["prefill_chunk"],
    )
    name = serve.get("model_name") or model_spec.name
    settings = ServeSettings(
        model_ids=[name, *{str(cfg.model.get("name")), str(model_spec.pretrained), *TYPED_MODEL}
                   - {name, "None"}],
        default_cache=cache_spec,
        context_length=int(serve.get("context_length") or model.config.max_position_embeddings),
        max_new_tokens=serve["max_new_tokens"],
        temperature=float(serve["temperature"]),
        top_p=float(serve["top_p"]),
        api_key=serve["api_key"],
        max_body_bytes=serve["max_body_bytes"],
    )
    engine.start()
    return create_app(engine, settings), engine, serve


def serve(cfg: DictConfig) -> None:
    """Build the server and run uvicorn until interrupted."""
    check_serve(cfg)  # a bad serve.* value: one line, before the config tree and any loading
    if cfg.get("print_config"):
        from llamahome.utils.rich_utils import print_config_tree

        print_config_tree(cfg)  # redacts serve.api_key
    app, engine, serve_cfg = build_server(cfg)
    auth = "bearer token required" if serve_cfg["api_key"] else "no auth"
    print(
        f"[serve] http://{serve_cfg['host']}:{serve_cfg['port']}/v1 | model "
        f"{app.state.settings.model_ids[0]} | cache={cfg.cache.policy} | "
        f"KV pool {engine.pool.pool / 2**30:.2f} GiB | batch<={serve_cfg['max_batch_size']} | "
        f"{auth}",
        flush=True,
    )
    import uvicorn

    try:
        uvicorn.run(
            app, host=serve_cfg["host"], port=serve_cfg["port"],
            log_level=str(serve_cfg.get("log_level", "info")),
        )
    finally:
        engine.stop()


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    quiet_libraries()
    with user_errors():
        serve(cfg)


if __name__ == "__main__":
    # Clients may also name the model as it was typed (model=outputs/train/runs/...).
    TYPED_MODEL.extend(a.removeprefix("model=") for a in sys.argv[1:] if a.startswith("model="))
    launch(main, "serve")  # model=<dir|run|hub id>, one-line errors, fast --help
