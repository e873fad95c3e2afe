"""llama-recipes' custom dataset hook: ``data.file=path/to/file.py:get_custom_dataset``.

The named function is called as llama-recipes calls it, ``fn(dataset_config, tokenizer, split)``,
and an optional ``get_data_collator(tokenizer)`` in the same file supplies the collator. Only the
file the user named is executed: it is loaded by path with ``spec_from_file_location``, never
searched for on ``sys.path``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from llamahome.errors import ConfigError, DataError

DEFAULT_FUNCTION = "get_custom_dataset"
COLLATOR_FUNCTION = "get_data_collator"


def parse_hook(spec: str | None) -> tuple[Path, str]:
    """Split ``path.py[:function]`` and check that the file exists.

    Args:
        spec: The value of ``data.file``.

    Returns:
        The file and the function name (default ``get_custom_dataset``).

    Raises:
        ConfigError: ``data.file`` is unset or not a ``.py`` file.
        DataError: The file does not exist.
    """
    if not spec:
        raise ConfigError("data.file: set it to path/to/dataset.py[:function] for data=custom")
    path_text, sep, function = str(spec).rpartition(":")
    # rpartition keeps Windows drive letters ("C:\\x.py") and plain paths without a function.
    if not sep or not path_text.endswith(".py") or not function.isidentifier():
        path_text, function = str(spec), DEFAULT_FUNCTION
    path = Path(path_text).expanduser()
    if path.suffix != ".py":
        raise ConfigError(f"data.file={spec}: expected a .py file, optionally with :function")
    if not path.is_file():
        raise DataError(f"data.file={spec}: custom dataset file {path} does not exist")
    return path, function


def load_module(path: Path) -> ModuleType:
    """Execute the user's file as a module (once per process per file content).

    Args:
        path: The ``.py`` file.

    Returns:
        The module.

    Raises:
        DataError: The file raised while being executed.
    """
    resolved = path.resolve()
    digest = hashlib.sha256(resolved.read_bytes()).hexdigest()[:12]
    name = f"llamahome_custom_{resolved.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise DataError(f"{path}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before executing: dataclasses and pickling look modules up by name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise DataError(f"{path}: error while executing the custom dataset file: {e!r}") from e
    return module


def get_function(path: Path, function: str) -> Callable[..., Any]:
    """Return ``function`` from the user's file.

    Raises:
        DataError: The file has no such callable.
    """
    fn = getattr(load_module(path), function, None)
    if not callable(fn):
        raise DataError(f"{path}: has no function '{function}' (data.file={path}:{function})")
    return fn


def get_collator(path: Path, tokenizer: Any) -> Callable[..., Any] | None:
    """Return the file's ``get_data_collator(tokenizer)`` result, or None when it has none."""
    factory = getattr(load_module(path), COLLATOR_FUNCTION, None)
    return factory(tokenizer) if callable(factory) else None
