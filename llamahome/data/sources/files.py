"""Finding data files and reading records from them, with errors that name the file and line.

A *record* is one raw example (a dict) plus where it came from (``file:line``) and a *group*
used for the train/val split (records of one group always land in the same split).
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamahome.errors import DataError

RECORD_SUFFIXES = (".json", ".jsonl", ".csv")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclass
class Record:
    """One raw example.

    Attributes:
        data: The fields, as read.
        origin: ``file:line`` (or another human-readable location) for error messages.
        group: Split key; records sharing a group go to the same split.
        split: ``"train"``/``"val"`` when the source already decided, else ``None``.
    """

    data: dict[str, Any]
    origin: str
    group: str
    split: str | None = field(default=None)


def resolve_files(path: str | Path, key: str, suffixes: Iterable[str]) -> list[Path]:
    """Expand ``path`` (a file, a glob or a directory) into a sorted list of files.

    Args:
        path: What the user wrote in ``key``.
        key: The config key, named in errors (``data.path``).
        suffixes: File endings taken from a directory (a named file is taken whatever its name).

    Returns:
        Existing files, sorted, never empty.

    Raises:
        DataError: Nothing exists or matches there.
    """
    text = str(path)
    p = Path(text).expanduser()
    if any(ch in text for ch in "*?["):
        files = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
        if not files:
            raise DataError(f"{key}={text}: no file matches this pattern")
        return files
    if p.is_file():
        return [p]
    if p.is_dir():
        wanted = tuple(suffixes)
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and f.suffix.lower() in wanted
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise DataError(f"{key}={text}: the directory has no {'/'.join(wanted)} files")
        return files
    raise DataError(f"{key}={text}: no such file or directory")


def read_text(path: Path) -> str:
    """Read a UTF-8 file (a BOM is dropped), naming the line of any undecodable byte.

    Args:
        path: The file.

    Returns:
        Its text.

    Raises:
        DataError: The file cannot be read or is not UTF-8.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-save as UTF-8") from e


def read_records(path: Path) -> Iterator[Record]:
    """Read dict records from a ``.jsonl``, ``.json`` (array, or JSON Lines) or ``.csv`` file.

    Args:
        path: The file.

    Yields:
        Records whose origin is ``path:line``; the group is the origin, so every record is
        its own split unit.

    Raises:
        DataError: Malformed JSON (with its line number), or a line that is not an object.
    """
    text = read_text(path)
    if path.suffix.lower() == ".csv":
        yield from _read_csv(path, text)
    elif path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        yield from _read_json_array(path, text)
    elif path.suffix.lower() == ".json" and "\n" in text.strip():
        yield from _read_json_object(path, text)
    else:
        yield from _read_jsonl(path, text)


def _record(data: Any, path: Path, line: int) -> Record:
    if not isinstance(data, dict):
        raise DataError(
            f"{path}:{line}: expected a JSON object per record, got {type(data).__name__}"
        )
    origin = f"{path}:{line}"
    return Record(data=data, origin=origin, group=origin)


def _read_jsonl(path: Path, text: str) -> Iterator[Record]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})"
            ) from e
        yield _record(data, path, lineno)


def _read_json_array(path: Path, text: str) -> Iterator[Record]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
    # json.loads keeps no positions, so find each element's line with a raw decoder pass:
    # errors then point at the record, not at line 1.
    lines = _array_element_lines(text, len(items))
    for item, lineno in zip(items, lines, strict=True):
        yield _record(item, path, lineno)


def _read_json_object(path: Path, text: str) -> Iterator[Record]:
    # A pretty-printed object: one record, or a wrapper such as {"data": [records]}. If the
    # whole file does not parse, it is JSON Lines under a .json name: report by line.
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        first = next(line for line in text.splitlines() if line.strip())
        try:
            json.loads(first)
        except json.JSONDecodeError:
            raise DataError(
                f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
            ) from e
        yield from _read_jsonl(path, text)
        return
    lists = [k for k, v in data.items() if isinstance(v, list)] if isinstance(data, dict) else []
    if len(lists) == 1 and all(isinstance(x, dict) for x in data[lists[0]]):
        for i, item in enumerate(data[lists[0]]):
            origin = f"{path}:{lists[0]}[{i}]"
            yield Record(data=item, origin=origin, group=origin)
        return
    yield _record(data, path, 1)


def _array_element_lines(text: str, count: int) -> list[int]:
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    lines: list[int] = []
    for _ in range(count):
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)
    return lines


def _read_csv(path: Path, text: str) -> Iterator[Record]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    try:
        for row in reader:
            # line_num is the physical line where the row *ended*; rows may span lines.
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: more values than header columns")
            yield _record(dict(row), path, reader.line_num)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e


def require_str(record: Record, key: str, optional: bool = False) -> str:
    """Return ``record.data[key]`` as a string, or raise an error naming the record and field.

    Args:
        record: The record.
        key: The field.
        optional: Missing or null gives ``""`` instead of an error.

    Returns:
        The value.

    Raises:
        DataError: The field is missing (and required) or not a string/number.
    """
    value = record.data.get(key)
    if value is None:
        if optional:
            return ""
        have = ", ".join(sorted(map(str, record.data))) or "none"
        raise DataError(f"{record.origin}: record is missing field '{key}' (fields: {have})")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(
            f"{record.origin}: field '{key}' must be a string, got {type(value).__name__}"
        )
    return str(value)
