"""The LightningDataModule: one class for every ``conf/data`` format.

``hydra.utils.instantiate(cfg.data, tokenizer=tokenizer)`` builds it; the keys are checked at
once (:class:`~llamahome.data.options.DataOptions`), before any model loads. ``prepare_data``
(rank 0 of each node) reads, renders and tokenizes the data into the on-disk cache; ``setup``
(every rank) loads it from there, cuts it to ``max_seq_length`` and pads or packs it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from llamahome.data import (
    Collator,
    DataOptions,
    LengthGroupedBatchSampler,
    Record,
    Renderer,
    RowDataset,
    Sample,
    ShapeStats,
    call_hook,
    cap,
    detect_record_format,
    encode_cached,
    load_split_records,
    shape,
    split_by_group,
    tokenizer_fingerprint,
)
from llamahome.data.sources import custom
from llamahome.errors import ConfigError, DataError
from llamahome.utils.paths import cache_root

log = logging.getLogger(__name__)

# What each format's records look like and how instructions are prompted, unless overridden.
_RECORD_FORMAT = {
    "pydoc": "alpaca",
    "stdlib": "text",
    "alpaca": "alpaca",
    "chat": "chat",
    "text": "text",
    "samsum": "samsum",
}
_PROMPT_STYLE = {"pydoc": "auto"}


class LlamaHomeDataModule(L.LightningDataModule):
    """Data for training and validation, from any supported format.

    Args:
        tokenizer: The model's tokenizer.
        **options: The ``data.*`` keys of :class:`~llamahome.data.options.DataOptions`
            (``format``, ``path``, ``batch_size``, ``max_seq_length``, ``batching``...).

    Raises:
        ConfigError: An unknown key or a bad value (the message names ``data.<key>``).
        DataError: A named file does not exist.
    """

    def __init__(self, tokenizer: Any, **options: Any) -> None:
        super().__init__()
        self.opts = DataOptions.from_kwargs(options)
        self.tokenizer = tokenizer
        self.save_hyperparameters(vars(self.opts))
        self.cache_dir = cache_root(self.opts.cache_dir) / "data"
        self._renderer: Renderer | None = None
        record_format = self.opts.record_format or _RECORD_FORMAT.get(self.opts.format)
        if record_format is not None:  # custom/hf decide after seeing the columns
            self._renderer = self._make_renderer(record_format)
        if self.opts.format == "custom":
            custom.parse_hook(self.opts.file)  # a missing file fails now, not after model load
        self._samples: dict[str, list[Sample]] | None = None
        self._fingerprint: str | None = None
        self._user_collator: Any = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self._stats: dict[str, ShapeStats] = {}
        self._cache_hits: dict[str, bool] = {}
        self._seconds: dict[str, float] = {}

    # ----------------------------------------------------------------------------- building
    def _make_renderer(self, record_format: str) -> Renderer:
        o = self.opts
        style = o.prompt_style or _PROMPT_STYLE.get(o.format, "alpaca")
        return Renderer(
            self.tokenizer, record_format, style, o.template, o.field_names(), o.system_prompt
        )

    def _render(self) -> dict[str, list[Sample]]:
        if self._samples is None:
            start = time.perf_counter()
            train, val = load_split_records(self.opts, self.tokenizer)
            if self._renderer is None:
                fmt = detect_record_format(
                    list(train[0].data), self.opts.field_names(), train[0].origin
                )
                self._renderer = self._make_renderer(fmt)
            self._samples = {"train": self._render_all(train), "val": self._render_all(val)}
            self._seconds["read_render"] = time.perf_counter() - start
        return self._samples

    def _render_all(self, records: list[Record]) -> list[Sample]:
        assert self._renderer is not None
        return [self._renderer(r) for r in records]

    def _tokenizer_fp(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.tokenizer)
        return self._fingerprint

    def _uses_user_collator(self) -> bool:
        if self.opts.format != "custom":
            return False
        path, _ = custom.parse_hook(self.opts.file)
        return callable(getattr(custom.load_module(path), custom.COLLATOR_FUNCTION, None))

    def prepare_data(self) -> None:
        """Read, render and tokenize into the cache (Lightning runs this on one rank per node)."""
        if self._uses_user_collator():
            return  # the user's hook owns tokenization; nothing to cache
        samples = self._render()
        fp = self._tokenizer_fp()
        for split, items in samples.items():
            if items:
                start = time.perf_counter()
                _, self._cache_hits[split] = encode_cached(
                    items, self.tokenizer, self.cache_dir, fp
                )
                self._seconds[f"tokenize_{split}"] = time.perf_counter() - start

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenized splits (from the cache when present) and shape them into rows.

        Args:
            stage: Lightning's stage; every stage gets both splits.

        Raises:
            DataError: Bad input, or nothing trainable left after max_seq_length.
        """
        if self.train_dataset is not None:
            return
        if self._uses_user_collator():
            self._setup_user_collator()
            return
        samples = self._render()
        fp = self._tokenizer_fp()
        packing = self.opts.batching == "packing"
        for split, items in samples.items():
            if not items:
                continue
            start = time.perf_counter()
            docs, hit = encode_cached(items, self.tokenizer, self.cache_dir, fp)
            # When prepare_data ran in this process it already reported the real hit/miss.
            self._cache_hits.setdefault(split, hit)
            self._seconds.setdefault(f"tokenize_{split}", time.perf_counter() - start)
            limit = self.opts.max_train_samples if split == "train" else self.opts.max_val_samples
            rows, stats = shape(docs, self.opts.max_seq_length, packing, limit, self.opts.seed)
            self._stats[split] = stats
            if split == "train" and not rows:
                raise DataError(
                    f"{self._describe()}: every training sample was dropped: no answer token "
                    f"fits in data.max_seq_length={self.opts.max_seq_length}; raise it"
                )
            dataset = RowDataset(docs, rows)
            if split == "train":
                self.train_dataset = dataset
            elif rows:
                self.val_dataset = dataset
        self._warn_truncation()

    def _setup_user_collator(self) -> None:
        o = self.opts
        if o.batching == "packing":
            raise ConfigError(
                f"data.batching=packing: {o.file} brings its own get_data_collator, which "
                "receives unpacked rows; use data.batching=padding"
            )
        path, _ = custom.parse_hook(o.file)
        self._user_collator = custom.get_collator(path, self.tokenizer)
        train = call_hook(o, self.tokenizer, o.train_split)
        if o.val_split is not None:
            val = call_hook(o, self.tokenizer, o.val_split)
        else:
            train_idx, val_idx = split_by_group(
                [str(i) for i in range(len(train))], o.val_fraction, o.seed
            )
            train, val = Subset(train, train_idx), Subset(train, val_idx)
        self.train_dataset = Subset(
            train, cap(list(range(len(train))), o.max_train_samples, o.seed)
        )
        val = Subset(val, cap(list(range(len(val))), o.max_val_samples, o.seed))
        self.val_dataset = val if len(val) else None
        if not len(self.train_dataset):
            raise DataError(f"data.file={o.file}: the custom dataset's train split is empty")

    def _describe(self) -> str:
        o = self.opts
        if o.format == "custom":
            return f"data.file={o.file}"
        return f"data.path={o.path}" if o.path else f"data={o.format}"

    def _warn_truncation(self) -> None:
        for split, stats in self._stats.items():
            if stats.truncated or stats.dropped:
                log.warning(
                    "%s: %d of %d samples truncated to data.max_seq_length=%d, %d dropped "
                    "(no answer token left)",
                    split,
                    stats.truncated,
                    stats.documents,
                    self.opts.max_seq_length,
                    stats.dropped,
                )

    # ---------------------------------------------------------------------------- loaders
    def _collator(self) -> Any:
        if self._user_collator is not None:
            return self._user_collator
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        return Collator(pad, self.opts.batching == "packing", self.opts.pad_to_multiple_of)

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.opts.num_workers
        return {
            "num_workers": workers,
            "pin_memory": self.opts.pin_memory,
            "persistent_workers": workers > 0,
            "collate_fn": self._collator(),
        }

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches; with padding, rows of similar length are batched together."""
        if self.train_dataset is None:
            raise RuntimeError("call setup() before train_dataloader()")
        generator = torch.Generator().manual_seed(self.opts.seed)
        ds = self.train_dataset
        if isinstance(ds, RowDataset) and self.opts.batching == "padding":
            sampler = LengthGroupedBatchSampler(
                RandomSampler(ds, generator=generator),
                self.opts.batch_size,
                False,
                lengths=ds.lengths,
                group_size=self.opts.group_size,
            )
            return DataLoader(ds, batch_sampler=sampler, **self._loader_kwargs())
        return DataLoader(
            ds,
            batch_size=self.opts.batch_size,
            shuffle=True,
            generator=generator,
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader | list:
        """Batches in a fixed order; an empty list when there is no validation data."""
        if self.val_dataset is None:
            return []
        return DataLoader(
            self.val_dataset,
            batch_size=self.opts.eval_batch_size or self.opts.batch_size,
            shuffle=False,
            **self._loader_kwargs(),
        )

    # ---------------------------------------------------------------------------- report
    def summary(self) -> dict[str, Any]:
        """Describe the prepared data (call after ``setup``).

        Returns:
            ``train_samples``/``val_samples`` (rows per epoch), ``train_documents``/
            ``val_documents`` (records), ``train_tokens``/``val_tokens`` (real tokens),
            ``train_label_tokens``, ``truncated``/``chunked``/``dropped`` (both splits),
            ``format``, ``batching``, ``max_seq_length``, ``cache_hit`` and timings.
        """
        if self.train_dataset is None:
            raise RuntimeError("call setup() before summary()")
        tr = self._stats.get("train", ShapeStats())
        va = self._stats.get("val", ShapeStats())
        user = self._user_collator is not None
        return {
            "format": self.opts.format,
            "batching": "custom collator" if user else self.opts.batching,
            "max_seq_length": self.opts.max_seq_length,
            "train_samples": len(self.train_dataset),
            "val_samples": len(self.val_dataset) if self.val_dataset is not None else 0,
            "train_documents": len(self.train_dataset) if user else tr.documents,
            "val_documents": va.documents,
            "train_tokens": tr.tokens,
            "val_tokens": va.tokens,
            "train_label_tokens": tr.label_tokens,
            "truncated": tr.truncated + va.truncated,
            "chunked": tr.chunked + va.chunked,
            "dropped": tr.dropped + va.dropped,
            "cache_hit": all(self._cache_hits.values()) if self._cache_hits else False,
            "seconds": {k: round(v, 3) for k, v in self._seconds.items()},
        }
