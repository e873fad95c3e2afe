"""Fit tokenized documents to ``max_seq_length``: truncate, chunk, and pack into rows.

A *row* is what one batch line holds: a list of ``(start, end)`` spans into the flat token
arrays of :class:`~llamahome.data.encode.TokenizedDocs`. With padding a row is one span; with
packing it is several documents, each with its own position ids.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from llamahome.data.encode import IGNORE_INDEX, TokenizedDocs
from llamahome.data.split import cap

Span = tuple[int, int]
Row = list[Span]


@dataclass
class ShapeStats:
    """What shaping did, for :meth:`LlamaHomeDataModule.summary`.

    Attributes:
        documents: Documents in.
        truncated: Documents cut at max_seq_length (their tail was dropped).
        chunked: Long text documents cut into several rows (nothing dropped).
        dropped: Documents left with no trainable token (e.g. a prompt longer than
            max_seq_length), removed.
        rows: Rows out (the samples a DataLoader yields per epoch).
        tokens: Real (non-padding) tokens in the rows.
        label_tokens: Tokens that contribute to the loss.
    """

    documents: int = 0
    truncated: int = 0
    chunked: int = 0
    dropped: int = 0
    rows: int = 0
    tokens: int = 0
    label_tokens: int = 0
    dropped_examples: list[str] = field(default_factory=list)


def _has_target(labels: np.ndarray, start: int, end: int) -> bool:
    # The first token of a span is never a target (nothing before it in its row predicts it).
    return bool((labels[start + 1 : end] != IGNORE_INDEX).any())


def cut_documents(docs: TokenizedDocs, max_len: int) -> tuple[list[Span], ShapeStats]:
    """Make every document fit ``max_len``.

    Splittable documents (plain text) become overlapping chunks: each chunk starts on the last
    token of the previous one, so every token is still predicted exactly once. Others (prompt +
    answer) are truncated, as llama-recipes does, and counted.

    Args:
        docs: Tokenized documents.
        max_len: ``max_seq_length``.

    Returns:
        Spans of at most ``max_len`` tokens, in document order, and the counts.
    """
    stats = ShapeStats(documents=len(docs))
    spans: list[Span] = []
    for i in range(len(docs)):
        a, b = int(docs.offsets[i]), int(docs.offsets[i + 1])
        if b - a > max_len and docs.splittable[i]:
            stats.chunked += 1
            start = a
            while True:
                end = min(start + max_len, b)
                spans.append((start, end))
                if end == b:
                    break
                start = end - 1
            continue
        if b - a > max_len:
            stats.truncated += 1
            b = a + max_len
        if b - a < 2 or not _has_target(docs.labels, a, b):
            stats.dropped += 1
            continue
        spans.append((a, b))
    return spans, stats


def pack(spans: list[Span], max_len: int) -> list[Row]:
    """Pack spans into rows of at most ``max_len`` tokens (best-fit decreasing; none split).

    Best-fit decreasing wastes little room (well under one document per row) and is
    deterministic; documents are never split, so an instruction keeps its prompt.

    Args:
        spans: Spans, each at most ``max_len`` long.
        max_len: Row capacity.

    Returns:
        Rows in order of creation; every span appears in exactly one row.
    """
    order = sorted(range(len(spans)), key=lambda i: (-(spans[i][1] - spans[i][0]), i))
    rows: list[Row] = []
    # (free room, row index), sorted, to find the tightest row with room in O(log n).
    free: list[tuple[int, int]] = []
    for i in order:
        length = spans[i][1] - spans[i][0]
        at = bisect.bisect_left(free, (length, -1))
        if at == len(free):
            rows.append([spans[i]])
            room, row = max_len - length, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(spans[i])
            room -= length
        if room > 1:  # a 1-token slot can hold nothing trainable
            bisect.insort(free, (room, row))
    return rows


def shape(
    docs: TokenizedDocs,
    max_len: int,
    packing: bool,
    max_rows: int | None = None,
    seed: int = 0,
) -> tuple[list[Row], ShapeStats]:
    """Cut documents to ``max_len``, lay them out in rows (one per row, or packed), cap the rows.

    Args:
        docs: Tokenized documents.
        max_len: ``max_seq_length``.
        packing: Pack several documents per row.
        max_rows: Keep at most this many rows (a seeded random subset, in order).
        seed: Seed of that subset.

    Returns:
        The rows and the counts (tokens counted on the rows kept).
    """
    spans, stats = cut_documents(docs, max_len)
    rows = pack(spans, max_len) if packing else [[s] for s in spans]
    rows = [rows[i] for i in cap(list(range(len(rows))), max_rows, seed)]
    stats.rows = len(rows)
    kept = [span for row in rows for span in row]
    stats.tokens = sum(b - a for a, b in kept)
    stats.label_tokens = sum(int((docs.labels[a + 1 : b] != IGNORE_INDEX).sum()) for a, b in kept)
    return rows, stats
