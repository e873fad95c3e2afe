"""LlamaHome: a Lightning + Hydra home for fine-tuning and running Llama models.

The public API is small on purpose::

    from llamahome import load_model, make_cache
    model, tokenizer = load_model("smollm2")
    cache = make_cache("h2o", model.config, heavy_ratio=0.1, recent_ratio=0.1)
"""

from llamahome.errors import CacheError, ConfigError, DataError, LlamaHomeError, ModelError

__all__ = [
    "CacheError",
    "ConfigError",
    "DataError",
    "LlamaHomeError",
    "ModelError",
    "load_model",
    "make_cache",
]


def __getattr__(name: str):
    # Lazy: `import llamahome` stays cheap (no torch/transformers import) for CLIs and configs.
    if name == "load_model":
        from llamahome.core.model import load_model

        return load_model
    if name == "make_cache":
        from llamahome.core.cache import make_cache

        return make_cache
    raise AttributeError(f"module 'llamahome' has no attribute {name!r}")
