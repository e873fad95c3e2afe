"""Rows to batches: the row dataset, the padding/packing collator and length-grouped batching.

Batch keys:

- ``input_ids`` (long, B×T), ``attention_mask`` (long, 1 on real tokens, 0 on padding),
  ``labels`` (long, -100 on prompt tokens, padding and the first token of every document),
  ``position_ids`` (long, restarting at 0 at every document start, so packed rows carry their
  document boundaries; plain ``arange`` rows when padding);
- with packing also ``seq_lens`` (long, B×D: each row's document lengths, 0-padded) and
  ``cu_seqlens`` (int32, cumulative document boundaries over the flattened B×T batch, the
  padding tail of each row counted as its own segment), the layout varlen attention kernels take.

Only :data:`MODEL_INPUTS` are meant for ``model(**...)``; the rest is metadata.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, Sampler

from llamahome.data.encode import IGNORE_INDEX, TokenizedDocs
from llamahome.data.shaping import Row

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")


class RowDataset(Dataset):
    """Rows of tokenized documents; item ``i`` is row ``i`` as numpy arrays.

    Args:
        docs: The tokenized documents.
        rows: Spans per row (from :func:`llamahome.data.shaping.shape`).
    """

    def __init__(self, docs: TokenizedDocs, rows: list[Row]) -> None:
        self.docs = docs
        self.rows = rows
        self.lengths = [sum(b - a for a, b in row) for row in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return ``input_ids``, ``labels``, ``position_ids`` and ``seq_lens`` of one row."""
        row = self.rows[index]
        ids = np.concatenate([self.docs.input_ids[a:b] for a, b in row])
        labels = np.concatenate([self.docs.labels[a:b] for a, b in row]).copy()
        seq_lens = [b - a for a, b in row]
        starts = np.cumsum([0, *seq_lens[:-1]])
        # The token opening a document must not be predicted from the previous document.
        labels[starts] = IGNORE_INDEX
        positions = np.concatenate([np.arange(n) for n in seq_lens])
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "seq_lens": seq_lens}


class Collator:
    """Pad rows to the longest in the batch (right padding) and stack them.

    Args:
        pad_id: Token id used for padding (masked out by ``attention_mask`` and labels).
        packing: Add ``seq_lens`` and ``cu_seqlens`` for packed rows.
        pad_to_multiple_of: Round the batch length up (tensor-core friendly shapes on GPU).
    """

    def __init__(self, pad_id: int, packing: bool = False, pad_to_multiple_of: int = 1) -> None:
        self.pad_id = pad_id
        self.packing = packing
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate row items into a batch dict (see the module docstring)."""
        width = max(len(it["input_ids"]) for it in items)
        width = -(-width // self.multiple) * self.multiple
        n = len(items)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        for i, it in enumerate(items):
            t = len(it["input_ids"])
            input_ids[i, :t] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            labels[i, :t] = torch.as_tensor(it["labels"], dtype=torch.long)
            attention[i, :t] = 1
            positions[i, :t] = torch.as_tensor(it["position_ids"], dtype=torch.long)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "position_ids": positions,
        }
        if self.packing:
            batch.update(_packing_metadata([it["seq_lens"] for it in items], width))
        return batch


def _packing_metadata(seq_lens: list[list[int]], width: int) -> dict[str, torch.Tensor]:
    most = max(len(s) for s in seq_lens)
    lens = torch.zeros((len(seq_lens), most), dtype=torch.long)
    bounds = [0]
    for i, row in enumerate(seq_lens):
        lens[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        for n in row:
            bounds.append(bounds[-1] + n)
        tail = width - sum(row)
        if tail:
            bounds.append(bounds[-1] + tail)
    return {"seq_lens": lens, "cu_seqlens": torch.as_tensor(bounds, dtype=torch.int32)}


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of similar length, to waste little padding, still in random order.

    Indices come from ``sampler`` (random, or Lightning's DistributedSampler under DDP: being a
    BatchSampler subclass with a ``sampler`` argument lets Lightning swap it in). Each run of
    ``batch_size * group_size`` indices is sorted by length and cut into batches, as Hugging
    Face's LengthGroupedSampler and llama-recipes' LengthBasedBatchSampler do.

    Args:
        sampler: Source of indices.
        batch_size: Rows per batch.
        drop_last: Drop a final short batch.
        lengths: Length of every row of the dataset.
        group_size: Batches per sorted group; larger groups pad less but are less random.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool,
        lengths: Sequence[int] | None = None,
        group_size: int = 50,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if lengths is None:
            raise ValueError("LengthGroupedBatchSampler needs the row lengths")
        self.lengths = lengths
        self.group_size = group_size

    def __iter__(self) -> Iterator[list[int]]:
        """Yield lists of indices, each batch of rows of similar length."""
        indices = list(self.sampler)
        span = self.batch_size * self.group_size
        for g in range(0, len(indices), span):
            group = sorted(indices[g : g + span], key=lambda i: -self.lengths[i])
            for b in range(0, len(group), self.batch_size):
                batch = group[b : b + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    yield batch

    def __len__(self) -> int:
        """Return the number of batches per epoch."""
        n = len(self.sampler)  # type: ignore[arg-type]
        span = self.batch_size * self.group_size
        full, rest = divmod(n, span)
        per_group = span // self.batch_size
        if self.drop_last:
            return full * per_group + rest // self.batch_size
        return full * per_group + -(-rest // self.batch_size)
