"""A byte-level BPE tokenizer trained locally on the standard library, for models made from scratch.

``model=tiny`` has no pretrained vocabulary, so it gets one trained here with ``tokenizers`` on
text that every machine has. Training is deterministic (fixed file order; the trainer breaks ties by
pair order) and the result is cached, so every run and every rank sees the same vocabulary.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from llamahome.data.sources.stdlib import read_source, stdlib_files
from llamahome.errors import ConfigError
from llamahome.utils.paths import atomic_dir, cache_root, fingerprint

log = logging.getLogger(__name__)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK]
# Top-level stdlib modules (~4.7 MB on CPython 3.11): enough text for an 8k vocabulary, and
# training stays well under 15 s on 2 cores.
_TRAIN_MAX_BYTES = 5_000_000
# Bump when the recipe below changes, so old caches are not reused.
_RECIPE_VERSION = 1


def build_bpe_tokenizer(
    vocab_size: int = 8192, cache_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train (or load from cache) a byte-level BPE tokenizer on the stdlib's ``.py`` sources.

    The tokenizer prepends ``<s>`` when called with ``add_special_tokens=True`` (as Llama's
    does), has ``</s>`` as eos, ``<pad>`` as pad and ``<unk>`` as unk, and no chat template.

    Args:
        vocab_size: Target vocabulary size, special tokens included.
        cache_dir: Cache root; default ``$LLAMAHOME_CACHE`` or ``~/.cache/llamahome``.

    Returns:
        A fast tokenizer; ``len(tokenizer)`` is the embedding size a model needs.

    Raises:
        ConfigError: ``vocab_size`` is too small to hold the 256 bytes and the special tokens.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(
            f"tokenizer vocab_size={vocab_size} must be at least {256 + len(SPECIAL_TOKENS)} "
            "(256 bytes + special tokens)"
        )
    files = stdlib_files(top_level_only=True, max_bytes=_TRAIN_MAX_BYTES)
    key = fingerprint(
        _RECIPE_VERSION,
        vocab_size,
        sys.version,
        [(f.name, f.stat().st_size) for f in files],
    )
    target = cache_root(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}"
    if not target.is_dir():
        log.info("training a %d-token byte-level BPE on %d stdlib files", vocab_size, len(files))
        atomic_dir(target, lambda tmp: _train(files, vocab_size, tmp))
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def _train(files: list[Path], vocab_size: int, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The trainer breaks frequency ties by pair order, so parallel training is reproducible
    # for a fixed file order (checked: identical tokenizer.json across runs).
    tok.train_from_iterator((read_source(f) for f in files), trainer=trainer, length=len(files))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=1_000_000,
        padding_side="right",
    )
    fast.save_pretrained(str(out_dir))
