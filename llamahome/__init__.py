"""LlamaHome: a Lightning + Hydra home for fine-tuning and running Llama models.

The public API is small on purpose::

    from llamahome import load_model, make_cache
    model, tokenizer = load_model("smollm2")
    cache = make_cache("h2o", model.config, budget_ratio=0.2)
"""

from importlib import import_module
from typing import Any

from llamahome.errors import CacheError, ConfigError, DataError, LlamaHomeError, ModelError

# Public name -> the module that defines it. Imported lazily, so `import llamahome` stays cheap
# (no torch/transformers) for CLIs and configs.
_LAZY = {
    "load_model": "llamahome.model.load",
    "load_tokenizer": "llamahome.model.load",
    "ModelSpec": "llamahome.model.load",
    "export_hf": "llamahome.model.export",
    "make_cache": "llamahome.kvcache.spec",
    "CacheSpec": "llamahome.kvcache.spec",
    "POLICIES": "llamahome.kvcache.spec",
    "kv_bytes": "llamahome.kvcache.spec",
    "full_kv_bytes": "llamahome.kvcache.spec",
}

__all__ = [
    "CacheError",
    "ConfigError",
    "DataError",
    "LlamaHomeError",
    "ModelError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llamahome' has no attribute {name!r}")
