"""Build config nodes into objects, reporting a bad value as a ConfigError naming its key."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from llamahome.errors import ConfigError, LlamaHomeError


def build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(cfg[key])``, with failures reported as ConfigError naming ``key``.

    Lists and dicts reach constructors as plain Python containers (``_convert_="all"``):
    peft, transformers and torch serialise or type-check them and reject ``ListConfig``.
    LlamaHome's own validation errors (raised inside constructors) pass through unchanged.
    """
    node = OmegaConf.select(cfg, key)
    if node is None or (isinstance(node, DictConfig) and len(node) == 0):
        return None
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, LlamaHomeError):
            raise cause from None
        raise ConfigError(f"{key}: {error_message(cause or err)}") from err
    except LlamaHomeError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {error_message(err)}") from err


def error_message(err: BaseException) -> str:
    """The last line of an exception's message (where wrapped library errors say what failed)."""
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__


def check_cache_config(cfg: DictConfig) -> None:
    """Refuse a non-integer ``seed`` and H2O ratios that keep more than the whole sequence.

    ``cache.budget_ratio`` above 1 is refused by the cache spec; its two halves given separately
    (``heavy_ratio + recent_ratio``) must obey the same bound. The seed is checked here because
    every entry point that builds a cache also seeds.

    Raises:
        ConfigError: Naming the key(s) and the value.
    """
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed must be an integer, got {seed!r}.")
    heavy = OmegaConf.select(cfg, "cache.heavy_ratio")
    recent = OmegaConf.select(cfg, "cache.recent_ratio")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (heavy, recent))
    if numbers and heavy + recent > 1:
        raise ConfigError(
            f"cache.heavy_ratio={heavy} + cache.recent_ratio={recent} = {heavy + recent:g} keeps "
            "more than the whole sequence: the two must sum to at most 1 (e.g. 0.1 + 0.1)."
        )
