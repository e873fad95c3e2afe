"""Shaping and batching: chunking, packing, the collator and length-grouped batches."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamahome.data.collate import Collator, LengthGroupedBatchSampler, RowDataset
from llamahome.data.encode import IGNORE_INDEX, TokenizedDocs
from llamahome.data.shaping import cut_documents, pack, shape


def make_docs(lengths: list[int], prompt: int = 0, splittable: bool = False) -> TokenizedDocs:
    """Documents whose token ids say where they come from: doc d, position p → 1000*d + p."""
    ids, labels, offsets = [], [], [0]
    for d, n in enumerate(lengths):
        doc = [1000 * d + p for p in range(n)]
        ids += doc
        labels += [IGNORE_INDEX if p < prompt else t for p, t in enumerate(doc)]
        offsets.append(len(ids))
    return TokenizedDocs(
        np.asarray(ids, dtype=np.int32),
        np.asarray(labels, dtype=np.int32),
        np.asarray(offsets, dtype=np.int64),
        np.full(len(lengths), splittable),
    )


@settings(max_examples=60, deadline=None, derandomize=True)  # the same examples every run
@given(
    lengths=st.lists(st.integers(min_value=2, max_value=40), min_size=1, max_size=60),
    max_len=st.integers(min_value=2, max_value=48),
)
def test_packing_loses_nothing_and_fits(lengths, max_len):
    docs = make_docs(lengths, splittable=True)
    rows, stats = shape(docs, max_len, packing=True)
    spans = [span for row in rows for span in row]
    assert all(sum(b - a for a, b in row) <= max_len for row in rows)
    assert len(spans) == len(set(spans))  # no span used twice
    # Every token of every document is in some row (chunks overlap by exactly one token).
    seen = {int(t) for a, b in spans for t in docs.input_ids[a:b]}
    assert seen == set(docs.input_ids.tolist())
    assert stats.truncated == 0 and stats.dropped == 0


def test_pack_best_fit_is_tight_and_deterministic():
    spans = [(0, 6), (6, 10), (10, 14), (14, 16), (16, 18)]  # lengths 6, 4, 4, 2, 2
    rows = pack(spans, max_len=8)
    assert sorted(sum(b - a for a, b in row) for row in rows) == [2, 8, 8]
    assert pack(spans, max_len=8) == rows


def test_collator_resets_positions_and_masks_document_starts():
    docs = make_docs([5, 3, 4], prompt=2)
    rows = pack(cut_documents(docs, 16)[0], 16)
    assert len(rows) == 1
    batch = Collator(pad_id=0, packing=True)(
        [RowDataset(docs, rows)[0], RowDataset(docs, [[(0, 5)]])[0]]
    )
    ids, pos, labels = batch["input_ids"][0], batch["position_ids"][0], batch["labels"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert starts == [0, 5, 9]  # one reset per document (longest first)
    for s, e in zip(starts, [*starts[1:], 12], strict=True):
        assert ids[s:e].tolist() == list(range(ids[s], ids[s] + e - s))  # one whole document
        assert pos[s:e].tolist() == list(range(e - s))
        assert (labels[s : s + 2] == IGNORE_INDEX).all()  # prompt masked...
        assert labels[s + 2 : e].tolist() == ids[s + 2 : e].tolist()  # ...answer trains
    assert batch["seq_lens"].tolist() == [[5, 4, 3], [5, 0, 0]]
    # Flattened B×T boundaries, the second row's padding tail as its own segment.
    assert batch["cu_seqlens"].tolist() == [0, 5, 9, 12, 17, 24]
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * 7
    assert (batch["labels"][1, 5:] == IGNORE_INDEX).all()


def test_truncation_drops_prompt_only_documents():
    docs = make_docs([10, 30, 30], prompt=8)
    spans, stats = cut_documents(docs, 6)
    assert (stats.truncated, stats.dropped) == (3, 3) and spans == []
    spans, stats = cut_documents(docs, 12)
    assert (stats.truncated, stats.dropped, len(spans)) == (2, 0, 3)


def test_length_grouped_batches_cover_everything_once():
    lengths = [int(x) for x in np.random.default_rng(0).integers(1, 200, size=103)]
    sampler = LengthGroupedBatchSampler(
        torch.randperm(103, generator=torch.Generator().manual_seed(0)).tolist(),
        batch_size=8,
        drop_last=False,
        lengths=lengths,
        group_size=4,
    )
    batches = list(sampler)
    assert len(batches) == len(sampler) == 13
    assert sorted(i for b in batches for i in b) == list(range(103))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    shuffled = [list(range(103))[k : k + 8] for k in range(0, 103, 8)]
    assert padded < sum(len(b) * max(lengths[i] for i in b) for b in shuffled)


def test_lightning_can_inject_a_distributed_sampler(tmp_path, monkeypatch):
    """Under DDP Lightning rebuilds our batch sampler around a DistributedSampler."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from llamahome.data.collate import Collator

    docs = make_docs([3 + (7 * i) % 23 for i in range(40)], prompt=1)
    ds = RowDataset(docs, [[s] for s in cut_documents(docs, 64)[0]])
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = DataLoader(
            ds,
            batch_sampler=LengthGroupedBatchSampler(range(len(ds)), 4, False, lengths=ds.lengths),
            collate_fn=Collator(0),
        )
    seen = []
    for rank in range(2):
        dist = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        new = _update_dataloader(loader, dist)
        assert isinstance(new.batch_sampler, LengthGroupedBatchSampler)
        assert new.batch_sampler.lengths == ds.lengths
        seen += [i for batch in new.batch_sampler for i in batch]
    assert sorted(seen) == list(range(len(ds)))
