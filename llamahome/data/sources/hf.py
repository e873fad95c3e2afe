"""Hugging Face datasets as a source: ``save_to_disk`` directories and hub ids.

A local directory goes through ``datasets.load_from_disk``; anything else is a hub id (or a
builder name) for ``datasets.load_dataset``, which uses the local HF cache when offline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamahome.data.sources.files import Record
from llamahome.errors import DataError

VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


def load_splits(
    path: str, subset: str | None, train_split: str, val_split: str | None
) -> tuple[Any, Any | None]:
    """Load the train split and, when present, a validation split.

    Args:
        path: A ``save_to_disk`` directory or a hub id.
        subset: The dataset configuration (hub datasets with several), or None.
        train_split: Split to train on.
        val_split: Split to validate on; None picks the first of validation/valid/val/test
            that exists, else the caller splits ``train`` deterministically.

    Returns:
        ``(train, val_or_None)`` as ``datasets.Dataset`` objects.

    Raises:
        DataError: The dataset or a named split cannot be loaded.
    """
    import datasets

    try:
        if Path(path).expanduser().is_dir():
            loaded = datasets.load_from_disk(str(Path(path).expanduser()))
        else:
            loaded = datasets.load_dataset(path, subset)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFound...)
        raise DataError(f"data.path={path}: cannot load this Hugging Face dataset: {e}") from e
    if isinstance(loaded, datasets.Dataset):
        if val_split is not None:
            raise DataError(
                f"data.path={path}: holds a single split, so data.val_split={val_split} "
                "cannot be found; leave it unset to split deterministically"
            )
        return loaded, None
    splits = list(loaded.keys())
    if train_split not in loaded:
        raise DataError(f"data.train_split={train_split}: not in {path} (splits: {splits})")
    if val_split is None:
        val_split = next((s for s in VAL_SPLIT_NAMES if s in loaded and s != train_split), None)
        return loaded[train_split], loaded[val_split] if val_split else None
    if val_split not in loaded:
        raise DataError(f"data.val_split={val_split}: not in {path} (splits: {splits})")
    return loaded[train_split], loaded[val_split]


def iter_records(dataset: Any, where: str) -> Iterator[Record]:
    """Yield a dataset's rows as Records (origin ``where[row]``, each row its own group).

    Args:
        dataset: A ``datasets.Dataset`` (or any sequence of dicts).
        where: A label for messages, e.g. ``"data/hf[train]"``.

    Yields:
        Records.

    Raises:
        DataError: A row is not a mapping.
    """
    for i, row in enumerate(dataset):
        origin = f"{where}[{i}]"
        if not isinstance(row, dict):
            raise DataError(f"{origin}: expected a record (dict), got {type(row).__name__}")
        yield Record(data=dict(row), origin=origin, group=origin)


def column_names(dataset: Any) -> list[str]:
    """Return the columns of a ``datasets.Dataset`` or the keys of a list of dicts' first row."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    try:
        first = dataset[0]
    except (IndexError, KeyError, TypeError):
        return []
    return list(first) if isinstance(first, dict) else []
