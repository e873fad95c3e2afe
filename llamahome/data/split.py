"""Deterministic train/val splits by group, and deterministic sample caps."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

log = logging.getLogger(__name__)


def split_by_group(
    groups: Sequence[str],
    val_fraction: float,
    seed: int,
    fixed: Sequence[str | None] | None = None,
) -> tuple[list[int], list[int]]:
    """Split items into train/val so that all items of a group land on the same side.

    Groups are sorted, then shuffled with ``seed``: the split depends only on the set of groups
    and the seed, not on file order or hash randomisation. When ``val_fraction > 0`` and there
    are at least two groups, each side gets at least one group.

    Args:
        groups: The group of every item (a topic, a file, a record's own origin...).
        val_fraction: Share of groups for validation, in ``[0, 1)``.
        seed: Shuffle seed.
        fixed: Per item, ``"train"``/``"val"`` when already decided by the source, else None.

    Returns:
        ``(train_indices, val_indices)``, each in the original item order.
    """
    fixed = fixed or [None] * len(groups)
    free = sorted({g for g, f in zip(groups, fixed, strict=True) if f is None})
    random.Random(seed).shuffle(free)
    n_val = round(len(free) * val_fraction)
    if val_fraction > 0 and len(free) >= 2:
        n_val = min(max(n_val, 1), len(free) - 1)
    elif val_fraction > 0 and free and not any(f == "val" for f in fixed):
        log.warning("only one split group (%s): no validation data", free[0])
    val_groups = set(free[:n_val])
    train: list[int] = []
    val: list[int] = []
    for i, (group, decided) in enumerate(zip(groups, fixed, strict=True)):
        side = decided or ("val" if group in val_groups else "train")
        (val if side == "val" else train).append(i)
    return train, val


def cap(indices: list[int], limit: int | None, seed: int) -> list[int]:
    """Keep at most ``limit`` items: a seeded random subset, kept in the original order.

    A random subset (rather than the first ``limit``) keeps a capped run representative of the
    whole set, e.g. pydoc topics from a to z rather than only a to c.

    Args:
        indices: Item indices.
        limit: The cap, or None for no cap.
        seed: Subset seed.

    Returns:
        The kept indices, in order.
    """
    if limit is None or len(indices) <= limit:
        return list(indices)
    keep = sorted(random.Random(seed).sample(range(len(indices)), limit))
    return [indices[k] for k in keep]
