"""Read the configured source and split it: ``DataOptions`` → train and validation Records.

One function per source kind; each returns ``(train, val)`` record lists, already split
(deterministically, by group) and capped by ``max_train_samples``/``max_val_samples``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llamahome.data.options import DataOptions
from llamahome.data.sources import custom, hf
from llamahome.data.sources.files import (
    RECORD_SUFFIXES,
    TEXT_SUFFIXES,
    Record,
    read_records,
    read_text,
    resolve_files,
)
from llamahome.data.sources.pydoc import pydoc_records, write_pydoc_alpaca
from llamahome.data.sources.stdlib import read_source, stdlib_dir, stdlib_files
from llamahome.data.split import cap, split_by_group
from llamahome.errors import DataError

log = logging.getLogger(__name__)

Split = tuple[list[Record], list[Record]]


def load_split_records(opts: DataOptions, tokenizer: Any) -> Split:
    """Load, filter, split and cap the records that ``opts`` describes.

    Args:
        opts: The data options.
        tokenizer: Passed to custom hooks.

    Returns:
        ``(train, val)`` records.

    Raises:
        DataError: Unreadable or malformed input, or no training record left.
    """
    if opts.format == "custom":
        train, val = _custom_records(opts, tokenizer)
    elif opts.format == "hf":
        train, val = _hf_records(opts)
    elif opts.val_path is not None:
        train, val = _records(opts, opts.path), _records(opts, opts.val_path)
    else:
        train, val = _read_and_split(opts, _records(opts, opts.path))
    train = _capped(train, opts.max_train_samples, opts.seed)
    val = _capped(val, opts.max_val_samples, opts.seed)
    if not train:
        raise DataError(f"{_where(opts)}: no training records left after filtering and splitting")
    return train, val


def _where(opts: DataOptions) -> str:
    if opts.format in ("pydoc", "stdlib"):
        return f"data={opts.format}"
    return f"data.path={opts.path}" if opts.format != "custom" else f"data.file={opts.file}"


def _capped(records: list[Record], limit: int | None, seed: int) -> list[Record]:
    return [records[i] for i in cap(list(range(len(records))), limit, seed)]


def _read_and_split(opts: DataOptions, records: list[Record]) -> Split:
    groups = [_group(r, opts.group_by) for r in records]
    train_idx, val_idx = split_by_group(
        groups, opts.val_fraction, opts.seed, [r.split for r in records]
    )
    return [records[i] for i in train_idx], [records[i] for i in val_idx]


def _group(record: Record, group_by: str | None) -> str:
    if group_by is None:
        return record.group
    value = record.data.get(group_by)
    if value is None:
        raise DataError(f"{record.origin}: record is missing field '{group_by}' (data.group_by)")
    return str(value)


def _records(opts: DataOptions, path: str | None) -> list[Record]:
    """Read every record of a built-in or file-based source (unsplit, filtered)."""
    if opts.format == "pydoc":
        return pydoc_records(opts.answer_chars)
    if opts.format == "stdlib":
        root = stdlib_dir()
        return [
            Record({"text": read_source(f)}, origin=str(f), group=f.relative_to(root).as_posix())
            for f in stdlib_files()
        ]
    assert path is not None  # DataOptions.validate guarantees it for file formats
    if path in ("builtin:pydoc_alpaca",):
        path = str(write_pydoc_alpaca(opts.cache_dir, opts.answer_chars))
    key = "data.val_path" if path == opts.val_path else "data.path"
    if opts.format == "text":
        return _text_records(opts, resolve_files(path, key, TEXT_SUFFIXES + (".jsonl", ".json")))
    records = [r for f in resolve_files(path, key, RECORD_SUFFIXES) for r in read_records(f)]
    if not records:
        raise DataError(f"{key}={path}: no records (the files are empty)")
    return records


def _text_records(opts: DataOptions, files: list[Path]) -> list[Record]:
    text_key = opts.field_names().text
    records: list[Record] = []
    for f in files:
        if f.suffix.lower() in (".jsonl", ".json"):
            records.extend(read_records(f))
        else:
            records.append(Record({text_key: read_text(f)}, origin=str(f), group=str(f)))
    kept = [r for r in records if not _blank(r.data.get(text_key))]
    if not kept:
        raise DataError(f"data.path={opts.path}: no text left after dropping empty documents")
    if len(kept) == 1 and opts.val_fraction > 0 and opts.val_path is None:
        kept = _cut_single_text(kept[0], text_key, opts.val_fraction)
    return kept


def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def _cut_single_text(record: Record, text_key: str, val_fraction: float) -> list[Record]:
    # One document cannot be split by group; like nanoGPT, hold out its tail (at a line break).
    text = str(record.data.get(text_key, ""))
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)) + 1)
    if cut <= 0 or not text[cut:].strip():
        return [record]
    head = Record({text_key: text[: cut + 1]}, record.origin, record.group + "#head", "train")
    tail = Record(
        {text_key: text[cut + 1 :]}, record.origin + "#tail", record.group + "#tail", "val"
    )
    return [head, tail]


def _hf_records(opts: DataOptions) -> Split:
    assert opts.path is not None
    train_ds, val_ds = hf.load_splits(opts.path, opts.subset, opts.train_split, opts.val_split)
    if val_ds is None:
        n = len(train_ds)
        if opts.group_by is not None:
            if opts.group_by not in hf.column_names(train_ds):
                raise DataError(f"data.group_by={opts.group_by}: not a column of {opts.path}")
            groups = [str(g) for g in train_ds[opts.group_by]]
        else:
            groups = [str(i) for i in range(n)]
        train_idx, val_idx = split_by_group(groups, opts.val_fraction, opts.seed)
        val_ds = train_ds.select(val_idx)
        train_ds = train_ds.select(train_idx)
    # Cap before converting rows to Python: a hub set can have millions of rows.
    train_ds = train_ds.select(cap(list(range(len(train_ds))), opts.max_train_samples, opts.seed))
    val_ds = val_ds.select(cap(list(range(len(val_ds))), opts.max_val_samples, opts.seed))
    where = opts.path.rstrip("/")
    train = list(hf.iter_records(train_ds, f"{where}[{opts.train_split}]"))
    val = list(hf.iter_records(val_ds, f"{where}[{opts.val_split or 'validation'}]"))
    return train, val


def dataset_config(opts: DataOptions) -> SimpleNamespace:
    """Build the ``dataset_config`` object llama-recipes hooks receive (attribute access).

    It carries llama-recipes' own fields (``dataset``, ``file``, ``train_split``, ``test_split``,
    ``data_path``) plus every ``data.*`` option and ``data.hook_args``.
    """
    values = {k: v for k, v in vars(opts).items() if k != "hook_args"}
    values.update(
        dataset="custom_dataset",
        test_split=opts.val_split,
        data_path=opts.path,
    )
    values.update(opts.hook_args)
    return SimpleNamespace(**values)


def call_hook(opts: DataOptions, tokenizer: Any, split: str) -> Any:
    """Call the user's ``get_custom_dataset(dataset_config, tokenizer, split)``.

    Raises:
        DataError: The file or function is missing, or the function raised.
    """
    path, function = custom.parse_hook(opts.file)
    fn = custom.get_function(path, function)
    try:
        return fn(dataset_config(opts), tokenizer, split)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}:{function}(split={split!r}) raised {e!r}") from e


def _custom_records(opts: DataOptions, tokenizer: Any) -> Split:
    path, function = custom.parse_hook(opts.file)
    where = f"{path}:{function}"
    train = _hook_rows(call_hook(opts, tokenizer, opts.train_split), f"{where}[{opts.train_split}]")
    if opts.val_split is not None:
        val = _hook_rows(call_hook(opts, tokenizer, opts.val_split), f"{where}[{opts.val_split}]")
        return train, val
    train_idx, val_idx = split_by_group([r.group for r in train], opts.val_fraction, opts.seed)
    return [train[i] for i in train_idx], [train[i] for i in val_idx]


def _hook_rows(dataset: Any, where: str) -> list[Record]:
    if dataset is None:
        raise DataError(f"{where}: the custom dataset function returned None")
    try:
        return list(hf.iter_records(dataset, where))
    except TypeError as e:
        raise DataError(
            f"{where}: returned {type(dataset).__name__}, not a dataset of dicts"
        ) from e
