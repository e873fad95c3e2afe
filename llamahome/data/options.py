"""The ``data`` config group as a checked dataclass: a bad value is a ConfigError naming its key.

Checks run when the DataModule is built, before any model is loaded, so a typo costs seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from llamahome.data.formats import PROMPT_STYLES, RECORD_FORMATS, FieldNames
from llamahome.errors import ConfigError

FORMATS = ("pydoc", "stdlib", "alpaca", "chat", "text", "samsum", "custom", "hf")
FILE_FORMATS = ("alpaca", "chat", "text", "samsum")
BUILTIN_PATHS = ("builtin:pydoc_alpaca",)
BATCHING = ("padding", "packing")


@dataclass
class DataOptions:
    """All ``data.*`` keys (see docs/data.md for what each does)."""

    format: str = "pydoc"
    name: str | None = None
    path: str | None = None
    val_path: str | None = None
    batch_size: int = 4
    eval_batch_size: int | None = None
    max_seq_length: int = 256
    batching: str = "padding"
    num_workers: int = 0
    pin_memory: bool = False
    seed: int = 42
    val_fraction: float = 0.1
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    cache_dir: str | None = None
    record_format: str | None = None
    prompt_style: str | None = None
    template: dict[str, str] | None = None
    fields: dict[str, str] | None = None
    system_prompt: str | None = None
    group_by: str | None = None
    answer_chars: int = 600
    file: str | None = None
    subset: str | None = None
    train_split: str = "train"
    val_split: str | None = None
    hook_args: dict[str, Any] = field(default_factory=dict)
    group_size: int = 50
    pad_to_multiple_of: int = 1

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> DataOptions:
        """Build from config keys, converting OmegaConf containers and rejecting unknown keys.

        Raises:
            ConfigError: An unknown key or a bad value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(
                f"data.{unknown[0]}: unknown key (known keys: {', '.join(sorted(known))})"
            )
        opts = cls(**{k: _plain(v) for k, v in kwargs.items()})
        opts.validate()
        return opts

    def validate(self) -> None:
        """Check every value; raise ConfigError naming the first bad key."""
        _choice("format", self.format, FORMATS)
        if self.name is None:
            self.name = self.format
        if self.val_path is not None and self.format not in FILE_FORMATS:
            raise ConfigError(
                f"data.val_path: only file-based formats ({', '.join(FILE_FORMATS)}) take it; "
                f"data={self.format} splits by data.val_fraction or data.val_split"
            )
        _choice("batching", self.batching, BATCHING)
        _int("batch_size", self.batch_size, 1)
        if self.eval_batch_size is not None:
            _int("eval_batch_size", self.eval_batch_size, 1)
        # 2 tokens is the least that holds an input and a target.
        _int("max_seq_length", self.max_seq_length, 2)
        _int("num_workers", self.num_workers, 0)
        _int("seed", self.seed, None)
        _int("answer_chars", self.answer_chars, 1)
        _int("group_size", self.group_size, 1)
        _int("pad_to_multiple_of", self.pad_to_multiple_of, 1)
        for key in ("max_train_samples", "max_val_samples"):
            if getattr(self, key) is not None:
                _int(key, getattr(self, key), 1)
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, int | float):
            raise ConfigError(f"data.val_fraction={self.val_fraction!r}: must be a number")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction}: must be in [0, 1)")
        if self.record_format is not None:
            _choice("record_format", self.record_format, RECORD_FORMATS)
        if self.prompt_style is not None:
            _choice("prompt_style", self.prompt_style, PROMPT_STYLES)
        for key, value in (self.fields or {}).items():
            if key not in vars(FieldNames()):
                raise ConfigError(
                    f"data.fields.{key}: unknown field (known: {', '.join(vars(FieldNames()))})"
                )
            if not isinstance(value, str) or not value:
                raise ConfigError(f"data.fields.{key}: must be a non-empty string")
        if self.format in FILE_FORMATS and not self.path:
            raise ConfigError(
                f"data.path: required for data={self.format} (a file, a glob or a directory)"
            )
        if self.format == "hf" and not self.path:
            raise ConfigError(
                "data.path: required for data=hf (a save_to_disk directory or hub id)"
            )
        if str(self.path or "").startswith("builtin:") and self.path not in BUILTIN_PATHS:
            raise ConfigError(
                f"data.path={self.path}: unknown (built in: {', '.join(BUILTIN_PATHS)})"
            )

    def field_names(self) -> FieldNames:
        """Return the configured field names."""
        return FieldNames(**(self.fields or {}))


def _plain(value: Any) -> Any:
    # Hydra hands nested groups over as DictConfig/ListConfig; the rest of the code wants dicts.
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"data.{key}={value!r}: expected one of {', '.join(allowed)}")


def _int(key: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"data.{key}={value!r}: must be an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"data.{key}={value}: must be at least {minimum}")
