"""The `transformers.Cache` classes that `CacheSpec.build` returns.

Apart from spec.py, so that building a `CacheSpec` (which validates a budget while the command
line is checked) never imports torch or transformers.
"""

from __future__ import annotations

from transformers import Cache, DynamicCache

__all__ = ["FullCache", "PolicyCache"]


class PolicyCache(Cache):
    """A `transformers.Cache` whose layers evict (window, sink or h2o)."""

    def __init__(self, layers: list, policy: str) -> None:
        """Wrap ready-made layers.

        Args:
            layers: One `EvictingLayer` per decoder layer.
            policy: The policy name, kept for logs and summaries.
        """
        super().__init__(layers=layers)
        self.policy = policy


class FullCache(DynamicCache):
    """transformers' `DynamicCache` (no eviction), with a ``policy`` name like the others."""

    policy = "full"
