"""The data pipeline, one stage per module; this is its public face.

``sources/`` (records from files, HF datasets, custom hooks, pydoc, the stdlib)
→ ``formats``/``templates`` (a record becomes a prompt + answer :class:`Sample`)
→ ``encode`` (token ids and labels, cached by content)
→ ``shaping`` (cut, pad-group or pack into rows)
→ ``collate`` (rows into batches).

Module names stay importable (``llamahome.data.encode`` is the module, not a function).
``split`` holds train/validation splitting, ``options`` the validated ``conf/data`` keys,
``tokenizer`` the local BPE tokenizer for models trained from scratch. The LightningDataModule in
``llamahome.training.datamodule`` strings these together; nothing here imports Lightning.
"""

from llamahome.data.collate import Collator, LengthGroupedBatchSampler, RowDataset
from llamahome.data.encode import (
    IGNORE_INDEX,
    TokenizedDocs,
    encode_cached,
    tokenizer_fingerprint,
)
from llamahome.data.formats import Renderer, Sample, detect_record_format
from llamahome.data.loading import call_hook, load_split_records
from llamahome.data.options import DataOptions
from llamahome.data.shaping import ShapeStats, shape
from llamahome.data.sources.files import Record, read_text
from llamahome.data.split import cap, split_by_group
from llamahome.data.tokenizer import build_bpe_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DataOptions",
    "LengthGroupedBatchSampler",
    "Record",
    "Renderer",
    "RowDataset",
    "Sample",
    "ShapeStats",
    "TokenizedDocs",
    "build_bpe_tokenizer",
    "call_hook",
    "cap",
    "detect_record_format",
    "encode_cached",
    "load_split_records",
    "read_text",
    "shape",
    "split_by_group",
    "tokenizer_fingerprint",
]
