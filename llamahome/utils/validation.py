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
