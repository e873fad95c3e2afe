"""Damaged files for the bad-input catalogue (``test_bad_inputs.py``), built from seeds.

Checkpoint bytes, model directories with one damaged file each, and run directories in every
state a run leaves behind. Everything random is drawn from ``random.Random(seed)``.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path

import torch


def damaged_checkpoints(count: int) -> list[bytes]:
    """``count`` seeded byte strings: random, random behind a zip/pickle magic, and a real
    Lightning-shaped checkpoint truncated, with bytes overwritten, or with bytes inserted."""
    buffer = io.BytesIO()
    torch.save({"state_dict": {"model.w": torch.arange(64.0).reshape(8, 8)}, "global_step": 3},
               buffer)
    real = buffer.getvalue()
    magics = (b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x80\x05", b"{", b"\x93NUMPY")
    out = []
    for seed in range(count):
        rng = random.Random(seed)
        kind = seed % 5
        if kind == 0:
            data = rng.randbytes(rng.randint(1, 4096))
        elif kind == 1:
            data = rng.choice(magics) + rng.randbytes(rng.randint(0, 2048))
        elif kind == 2:
            data = real[: rng.randint(1, len(real) - 1)]
        elif kind == 3:
            damaged = bytearray(real)
            for _ in range(rng.randint(1, 8)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            data = bytes(damaged)
        else:
            at = rng.randrange(len(real))
            data = real[:at] + rng.randbytes(rng.randint(1, 64)) + real[at:]
        out.append(data)
    return out


def write_bad_models(root: Path) -> None:
    """A tiny Llama saved as a user's model directory, then one damaged copy per row."""
    from llamahome import load_model

    good = root / "m_good"
    model, tokenizer = load_model("tiny", attn_implementation="sdpa")
    model.save_pretrained(good)
    tokenizer.save_pretrained(good)
    weights = (good / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(weights[:8], "little")
    config = json.loads((good / "config.json").read_text())

    def variant(name: str, **files: bytes | None) -> Path:
        path = root / name
        shutil.copytree(good, path, copy_function=os.link)  # links: no 7 MB copy per row
        for file, data in files.items():
            target = path / file.replace("__", ".")
            target.unlink(missing_ok=True)  # never write through a link into the good copy
            if data is not None:
                target.write_bytes(data)
        return path

    variant("m_truncated", model__safetensors=weights[: len(weights) // 2])
    variant("m_empty", model__safetensors=b"")
    variant("m_garbage", model__safetensors=random.Random(1).randbytes(1000))
    variant("m_header_only", model__safetensors=weights[:header_end])
    variant("m_trailing", model__safetensors=weights + b"\0" * 64)
    bad_header = (64).to_bytes(8, "little") + b"{not a header" + b" " * 51 + weights[header_end:]
    variant("m_bad_header", model__safetensors=bad_header)
    shard_map = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                "lm_head.weight": "model-00002-of-00002.safetensors"}}
    sharded = variant("m_shard_missing", model__safetensors=None)
    (sharded / "model-00001-of-00002.safetensors").write_bytes(weights)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(shard_map))
    index = variant("m_index_not_json", model__safetensors=None)
    (index / "model.safetensors.index.json").write_text('{"weight_map": {')
    variant("m_no_weights", model__safetensors=None)
    legacy = io.BytesIO()  # pytorch_model.bin, as older exports and hub repos hold it
    torch.save(model.state_dict(), legacy)
    half = legacy.getvalue()[: len(legacy.getvalue()) // 2]
    variant("m_bin_truncated", model__safetensors=None, pytorch_model__bin=half)
    variant("m_config_not_json", config__json=b'{"model_type": "llama", ')
    variant("m_config_empty", config__json=b"")
    variant("m_config_list", config__json=b"[]")
    variant("m_config_no_type", config__json=json.dumps({"hidden_size": 128}).encode())
    bad_value = json.dumps({**config, "hidden_size": "big"}).encode()
    variant("m_config_bad_value", config__json=bad_value)
    variant("m_config_latin1", config__json='{"name": "caf\xe9"}'.encode("latin-1"))
    variant("m_tokenizer_damaged", tokenizer__json=(good / "tokenizer.json").read_bytes()[:100])
    variant("m_generation_damaged", generation_config__json=b'{"max_length": ')
    short = {**config, "max_position_embeddings": 256}
    variant("ctx256", config__json=json.dumps(short).encode())
    variant("ctx256_no_weights", model__safetensors=None, config__json=json.dumps(short).encode())
    run = root / "run_export_truncated"
    shutil.copytree(root / "run_full", run)
    shutil.copytree(root / "m_truncated", run / "export", copy_function=os.link)
    gguf = root / "gguf_truncated"
    gguf.mkdir()
    from llamahome.model.load import resolve_location, spec_from_config_name

    smollm2 = spec_from_config_name("smollm2")
    embedded = Path(resolve_location(smollm2.pretrained, smollm2)) / smollm2.gguf_file
    with open(embedded, "rb") as file:  # the first 64 KiB: a GGUF cut short by a download
        (gguf / "model.gguf").write_bytes(file.read(1 << 16))
    (root / "long_prompt.txt").write_text("import os\n" * 200, encoding="utf-8")
    documents = [{"document": "A short one.", "summary": "Short."},
                 {"document": "word " * 3000, "summary": "Long."}]
    (root / "long_document.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents))


def prepare_run(files: Path, target: Path, state: str) -> Path:
    shutil.copytree(files / "run_full", target)
    history = target / "run_history.jsonl"
    records = [json.loads(line) for line in history.read_text().splitlines()]
    if state == "interrupted":
        records[-1] = {**records[-1], "status": "interrupted", "exit_code": 143}
    elif state == "killed":
        records = records[:-1]  # kill -9: a start, never an end
    elif state == "failed":
        records[-1] = {**records[-1], "status": "failed", "exit_code": 1}
    text = "".join(json.dumps(r) + "\n" for r in records)
    if state == "cut":
        text += '{"time": "2026-01-0'  # a write cut short by a full disk or kill -9
    if state == "metrics-only":
        for name in ("checkpoints", "run_history.jsonl"):
            path = target / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return target
    history.write_text(text)
    return target


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory under ``root`` (None), by relative path."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }
