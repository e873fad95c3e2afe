"""Read an offline W&B run file (``run-*.wandb``) without the network, for assertions in tests.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version) then LevelDB-log
blocks of 32 KiB holding protobuf ``Record`` messages, each possibly split across blocks.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < HEADER:
            offset += left_in_block  # block trailer padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        chunk = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys


def run_record(path: Path):
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError("no run record")


def config_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            keys |= {item.key or "/".join(item.nested_key) for item in record.config.update}
        if kind == "run":
            keys |= {item.key for item in record.run.config.update}
    return keys
