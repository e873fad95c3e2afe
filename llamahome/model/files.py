"""The files of a local model directory, checked one by one before ``from_pretrained`` reads them.

transformers reports a damaged file from deep inside itself and often without its name: a raw
``SafetensorError`` for a truncated ``model.safetensors``, a ``TypeError`` for a config.json
that holds a list, a validator's multi-line message for a bad field. Each file is read here the
cheap way first (JSON parsed, safetensors headers only, nothing loaded), and whatever is wrong
is a :class:`ModelError` that names the file, says what is wrong with it and what to do.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from llamahome.errors import ModelError

__all__ = [
    "check_config",
    "check_json_files",
    "check_model_dir",
    "check_weights",
    "read_config",
]

CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# JSON files next to the weights that transformers parses (tokenizer, generation defaults).
_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    SAFETENSORS_INDEX,
)
_REDO = "restore it from its source, or export/download the model again"


def read_json(path: Path) -> Any:
    """Parse a JSON file; a ModelError naming it when it is unreadable, not UTF-8 or not JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise ModelError(f"{path}: cannot be read ({err.strerror or err}).") from err
    except UnicodeDecodeError as err:
        raise ModelError(
            f"{path}: is not UTF-8 text (byte {err.start}), so not JSON: the file is damaged; "
            f"{_REDO}."
        ) from err
    except json.JSONDecodeError as err:
        size = path.stat().st_size
        what = "is empty" if size == 0 else f"is not valid JSON ({err.msg}, line {err.lineno})"
        raise ModelError(f"{path}: {what}: the file is damaged or truncated; {_REDO}.") from err


def check_config(directory: Path) -> dict[str, Any]:
    """Check ``config.json`` as JSON: an object with a ``model_type``; return it."""
    path = directory / CONFIG
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ModelError(
            f"{path}: holds a JSON {type(raw).__name__}, not an object of model settings: the "
            f"file is damaged or not a Hugging Face config; {_REDO}."
        )
    if not isinstance(raw.get("model_type"), str):
        raise ModelError(
            f"{path}: has no \"model_type\" (e.g. \"llama\"), so transformers cannot tell "
            f"which model it describes; {_REDO}."
        )
    return raw


def read_config(directory: Path, **kwargs: Any) -> Any:
    """Load ``config.json`` with ``AutoConfig`` (no weights); every failure names the file.

    Args:
        directory: A local Hugging Face model directory.
        **kwargs: ``AutoConfig.from_pretrained`` keywords (``trust_remote_code``, ``revision``).

    Returns:
        The ``PretrainedConfig``.

    Raises:
        ModelError: config.json is missing, damaged, or holds a value transformers rejects.
    """
    from transformers import AutoConfig

    check_config(directory)
    try:
        return AutoConfig.from_pretrained(directory, **kwargs)
    except Exception as err:  # noqa: BLE001 - validators raise many types; all are the file's
        reason = " ".join(str(err).split())[:240] or type(err).__name__
        raise ModelError(f"{directory / CONFIG}: {reason}; fix the value or {_REDO}.") from err


def check_json_files(directory: Path) -> None:
    """Parse the tokenizer and generation JSON files the directory has (each named on failure)."""
    for name in _JSON_FILES:
        if (directory / name).is_file():
            read_json(directory / name)


def check_weights(directory: Path) -> None:
    """Check the directory's safetensors weights: every shard present, every header whole.

    Only headers are read (a few KB per file); ``pytorch_model*.bin`` archives get their index
    read. GGUF files are left to the loader, whose errors name the file.

    Raises:
        ModelError: No weights, a shard the index names is missing, or a file is truncated or
            not a safetensors file (names the file and its size).
    """
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        table = read_json(index)
        weight_map = table.get("weight_map") if isinstance(table, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: has no \"weight_map\" of tensor names to files; {_REDO}.")
        shards = sorted({str(name) for name in weight_map.values()})
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            raise ModelError(
                f"{directory / missing[0]}: missing, but {index.name} puts tensors in it "
                f"({len(missing)} of {len(shards)} shards missing): an incomplete download or "
                "copy; fetch the missing shards."
            )
        for name in shards:
            check_safetensors(directory / name)
        return
    single = directory / "model.safetensors"
    if single.is_file():
        check_safetensors(single)
        return
    others = ("pytorch_model*.bin", "*.safetensors", "*.gguf")
    if not any(next(directory.glob(pattern), None) for pattern in others):
        raise ModelError(
            f"{directory}: {CONFIG} but no weights (model.safetensors, a sharded index, "
            "pytorch_model.bin): the export or download is incomplete; point model= at a "
            "complete model directory."
        )
    for path in sorted(directory.glob("*.safetensors")):
        check_safetensors(path)
    for path in sorted(directory.glob("pytorch_model*.bin")):
        check_torch_file(path)


def check_torch_file(path: Path) -> None:
    """Check that a ``torch.save`` file (a zip archive) is whole: its central directory reads.

    Only the archive's index at the end of the file is read; a legacy (non-zip) file is left to
    the loader.
    """
    size = path.stat().st_size
    with open(path, "rb") as file:
        magic = file.read(4)
    if size == 0 or (magic == b"PK\x03\x04" and not _zip_whole(path)):
        raise ModelError(
            f"{path}: is truncated or damaged ({size} bytes; a torch.save archive without its "
            f"index): an interrupted download or copy? {_REDO[0].upper()}{_REDO[1:]}."
        )


def _zip_whole(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def check_safetensors(path: Path) -> None:
    """Check a safetensors file's header and that the file holds all the bytes it describes."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length > size - 8:
            raise ModelError(
                f"{path}: is truncated or not a safetensors file ({size} bytes, no complete "
                f"header): an interrupted download or copy? {_REDO[0].upper()}{_REDO[1:]}."
            )
        raw = file.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError,
            ValueError, IndexError) as err:
        raise ModelError(
            f"{path}: is damaged or not a safetensors file ({size} bytes, unreadable header: "
            f"{type(err).__name__}); {_REDO}."
        ) from err
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        what = "is truncated" if expected > size else "has trailing bytes"
        raise ModelError(
            f"{path}: {what}: {size} bytes, its header describes {expected} (an interrupted "
            f"download or copy?); {_REDO}."
        )


# What from_pretrained can load weights from (sharded safetensors have an index file).
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.gguf")


def check_model_dir(path: str | Path) -> Path:
    """Check that `path` is a Hugging Face model directory with weights, before loading it.

    A training run directory is accepted too: its ``export/`` is used.

    Args:
        path: ``model_path=`` (or a local ``model.pretrained=``).

    Returns:
        The directory to load.

    Raises:
        ModelError: The directory is missing, is a file, has no config.json, or has no weights
            (names the directory and what to point at instead).
    """
    where = Path(path).expanduser()
    if not where.exists():
        raise ModelError(f"model_path={str(path)!r} does not exist.")
    if not where.is_dir():
        raise ModelError(
            f"model_path={str(path)!r} is a file: give the directory of a Hugging Face export "
            "(config.json + model.safetensors + tokenizer), e.g. <train run dir>/export."
        )
    if not (where / "config.json").is_file() and (where / "export" / "config.json").is_file():
        pass  # a training run: load its export/
        where = where / "export"
    if not (where / "config.json").is_file():
        hint = "the train command writes one to <run dir>/export"
        if (where / "adapter_config.json").is_file():
            hint = f"this is a PEFT adapter; evaluate the merged export in {where.parent}"
        elif any(where.glob("*.ckpt")) or (where / "checkpoints").is_dir():
            hint = "this holds Lightning checkpoints; evaluate the run's export/ directory"
        raise ModelError(
            f"{where}: no config.json, so not a Hugging Face model directory ({hint})."
        )
    if not any(next(where.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ModelError(
            f"{where}: config.json but no weights (model.safetensors or pytorch_model.bin): the "
            "export is incomplete; re-run the export or point model_path at a complete one."
        )
    return where
