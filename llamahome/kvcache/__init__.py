"""KV-cache eviction: budgets, evicting cache layers, policies and the hybrid attention.

``from llamahome.kvcache import make_cache, pinned, CacheSpec, POLICIES`` (loaded lazily, so
importing the package stays cheap).
"""

from typing import Any

__all__ = [
    "POLICIES",
    "CacheSpec",
    "full_kv_bytes",
    "keep_ratio",
    "kv_bytes",
    "make_cache",
    "pinned",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from llamahome.kvcache import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'llamahome.kvcache' has no attribute {name!r}")
