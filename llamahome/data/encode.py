"""Tokenize Samples into flat token arrays, once, and cache them on disk.

Documents are stored back to back in flat int32 arrays with an offsets array (the layout of
nanoGPT's ``.bin`` files and Megatron's indexed datasets): compact, memory-mappable, and cheap to
slice into rows for padding or packing. The cache key is a hash of the tokenizer and of the
rendered samples themselves, so any change in data, template or tokenizer re-tokenizes, and a
rerun with the same inputs skips tokenization.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamahome.data.formats import Sample
from llamahome.utils.paths import atomic_write, fingerprint

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Bump when the encoding below changes, so old caches are not reused.
_ENCODING_VERSION = 1
_BATCH = 512


@dataclass
class TokenizedDocs:
    """Documents as flat arrays: document ``i`` is ``input_ids[offsets[i]:offsets[i + 1]]``.

    Attributes:
        input_ids: All token ids, int32.
        labels: Same length; ``-100`` where the loss must ignore the token (prompts).
        offsets: ``len(docs) + 1`` boundaries, int64.
        splittable: Per document, whether it may be cut into rows instead of truncated.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    splittable: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """Return the token count of every document."""
        return np.diff(self.offsets)

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(input_ids, labels)`` of document ``i``."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.labels[a:b]

    def save(self, path: Path) -> None:
        """Write to ``path`` (``.npz``) atomically: a reader never sees a half-written file."""
        with atomic_write(path) as fh:
            np.savez(
                fh,
                input_ids=self.input_ids,
                labels=self.labels,
                offsets=self.offsets,
                splittable=self.splittable,
            )

    @classmethod
    def load(cls, path: Path) -> TokenizedDocs:
        """Read what :meth:`save` wrote."""
        with np.load(path) as z:
            return cls(z["input_ids"], z["labels"], z["offsets"], z["splittable"])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash everything about a tokenizer that changes token ids or templates.

    Args:
        tokenizer: A transformers tokenizer.

    Returns:
        A short hex key.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return fingerprint(
        type(tokenizer).__name__,
        body,
        getattr(tokenizer, "chat_template", None),
        [str(t) for t in tokenizer.all_special_tokens],
    )


def samples_fingerprint(samples: Sequence[Sample]) -> str:
    """Hash rendered samples (their text, masks and flags) for the cache key."""
    return fingerprint(
        [
            (s.segments, s.add_bos, s.add_eos, s.splittable, s.token_ids, s.token_labels)
            for s in samples
        ]
    )


def cache_path(cache_dir: Path, tokenizer_fp: str, samples: Sequence[Sample]) -> Path:
    """Return the cache file for these samples under this tokenizer."""
    key = fingerprint(_ENCODING_VERSION, tokenizer_fp, samples_fingerprint(samples))
    return cache_dir / "tokenized" / f"{key}.npz"


def leading_special_ids(tokenizer: Any) -> list[int]:
    """Return the special ids the tokenizer puts before text by default (Llama's bos; often none).

    Args:
        tokenizer: A transformers tokenizer.

    Returns:
        The prefix ids, possibly empty.
    """
    probe = "x"
    with_specials = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start : start + len(plain)] == plain:
            return list(with_specials[:start])
    return []


def encode(samples: Sequence[Sample], tokenizer: Any) -> TokenizedDocs:
    """Tokenize samples: prompt segments get label -100, trainable ones their ids.

    Args:
        samples: Rendered samples.
        tokenizer: The tokenizer.

    Returns:
        The documents, untruncated (shaping to max_seq_length happens later, so one cache
        serves every max_seq_length).
    """
    bos = leading_special_ids(tokenizer)
    eos = tokenizer.eos_token_id
    texts = [text for s in samples for text, _ in s.segments]
    ids_per_text: list[list[int]] = []
    for start in range(0, len(texts), _BATCH):
        # The fast tokenizer encodes a batch in parallel; special tokens written in the text
        # (chat-template markers such as <|im_start|>) become their ids.
        batch = texts[start : start + _BATCH]
        ids_per_text.extend(tokenizer(batch, add_special_tokens=False)["input_ids"])

    all_ids: list[int] = []
    all_labels: list[int] = []
    offsets = [0]
    cursor = 0
    for s in samples:
        if s.token_ids is not None:
            all_ids.extend(s.token_ids)
            all_labels.extend(s.token_labels if s.token_labels is not None else s.token_ids)
        else:
            if s.add_bos:
                all_ids.extend(bos)
                all_labels.extend([IGNORE_INDEX] * len(bos))
            for _, trainable in s.segments:
                ids = ids_per_text[cursor]
                cursor += 1
                all_ids.extend(ids)
                all_labels.extend(ids if trainable else [IGNORE_INDEX] * len(ids))
            if s.add_eos and eos is not None:
                all_ids.append(eos)
                all_labels.append(eos)
        offsets.append(len(all_ids))
    return TokenizedDocs(
        input_ids=np.asarray(all_ids, dtype=np.int32),
        labels=np.asarray(all_labels, dtype=np.int32),
        offsets=np.asarray(offsets, dtype=np.int64),
        splittable=np.asarray([s.splittable for s in samples], dtype=bool),
    )


def encode_cached(
    samples: Sequence[Sample], tokenizer: Any, cache_dir: Path, tokenizer_fp: str | None = None
) -> tuple[TokenizedDocs, bool]:
    """Encode samples, reusing the on-disk cache when the same samples were encoded before.

    Args:
        samples: Rendered samples.
        tokenizer: The tokenizer.
        cache_dir: The data cache directory.
        tokenizer_fp: A precomputed :func:`tokenizer_fingerprint` (saves rehashing).

    Returns:
        ``(docs, hit)``: the documents and whether they came from the cache.
    """
    path = cache_path(cache_dir, tokenizer_fp or tokenizer_fingerprint(tokenizer), samples)
    if path.is_file():
        try:
            return TokenizedDocs.load(path), True
        except (OSError, ValueError, KeyError) as e:  # a truncated/foreign file: rebuild it
            log.warning("ignoring unreadable data cache %s (%s)", path, e)
    docs = encode(samples, tokenizer)
    docs.save(path)
    return docs, False
