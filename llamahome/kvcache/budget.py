"""How many tokens an evicting cache layer keeps: llama-recipes counts or H2O-paper ratios.

Ratios, two bases (``ratio_basis``; see docs/h2o.md):

* ``"sequence"`` (the default, the H2O paper's code): kept = ``int(ratio * L)``, fixed once, where
  L is the sequence length the cache is built for (``seq_len``: prompt + max_new_tokens in
  generation, the scored length in eval) or else the length of the first update (the prefill);
* ``"running"``: a share of the tokens seen so far, so the budget grows with the text.

A floor (``floor``) comes on top of both: a layer never keeps fewer than ``floor`` tokens, so it
never evicts while it holds no more than that. `CacheSpec` sets it to ``cache.min_tokens`` for
ratio budgets only; counts are the user's budget and keep no floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

__all__ = ["RATIO_BASES", "Budget"]

RATIO_BASES = ("sequence", "running")


@dataclass
class Budget:
    """How many tokens a layer keeps once it has seen `seen` tokens.

    Either counts (llama-recipes: ``heavy`` + ``recent`` fixed) or ratios (H2O paper:
    ``heavy_ratio * L`` + ``recent_ratio * L``, L per `basis`). ``sink`` is always a count.
    A `CacheSpec` holds a template; every cache gets its own copy (`for_cache`), because the
    sequence length L is fixed per cache.

    Attributes:
        sink: Attention-sink tokens kept forever (policy sink).
        heavy: Heavy-hitter slots (counts mode).
        recent: Recent-window slots (counts mode).
        heavy_ratio: Heavy-hitter share (ratio mode).
        recent_ratio: Recent share (ratio mode; for sink, the total).
        floor: Never keep fewer tokens than this (``cache.min_tokens``); 0 = no floor.
        basis: ``"sequence"`` (ratios of L, fixed once) or ``"running"`` (of the tokens seen).
        seq_len: L as given when the cache was built (None: the prefill's length).
        length: L in use (``seq_len``, or set by `fix` at the first update).
    """

    sink: int = 0
    heavy: int = 0
    recent: int = 0
    heavy_ratio: float | None = None
    recent_ratio: float | None = None
    floor: int = 0
    basis: str = "sequence"
    seq_len: int | None = field(default=None, compare=False)
    length: int | None = field(default=None, compare=False)
    # (seen, length, sizes) of the last call: every layer asks the same at each step.
    _memo: tuple = field(default=(None, None, None), compare=False, repr=False)

    @property
    def is_ratio(self) -> bool:
        """Whether the budget is a share of a length (ratio mode)."""
        return self.recent_ratio is not None

    @property
    def grows(self) -> bool:
        """Whether the kept count still depends on the tokens seen (running ratios, or L unset)."""
        return self.is_ratio and (self.basis == "running" or self.length is None)

    def for_cache(self, seq_len: int | None = None) -> Budget:
        """Return a fresh copy for one cache, with L = `seq_len` when given."""
        return replace(self, seq_len=seq_len, length=seq_len)

    def fix(self, prefill_len: int) -> None:
        """Fix L at the first update when no ``seq_len`` was given (idempotent)."""
        if self.length is None:
            self.length = prefill_len

    def reset(self) -> None:
        """Forget an L taken from a prefill (the cache is reused for another sequence)."""
        self.length = self.seq_len

    def sizes(self, seen: int) -> tuple[int, int, int]:
        """(sink, heavy, recent) slot counts after `seen` tokens (before the floor and the cap)."""
        if self.recent_ratio is None:
            return self.sink, self.heavy, self.recent
        memo = self._memo
        if memo[0] == seen and memo[1] == self.length:
            return memo[2]
        basis = seen if self.basis == "running" or self.length is None else self.length
        # Floor of the *summed* ratio (as the H2O code's int()), so 0.5 + 0.5 keeps everything;
        # the epsilon absorbs float error such as 0.7 + 0.3 * L landing just below an integer.
        share = (self.heavy_ratio or 0.0) + self.recent_ratio
        total = math.floor(share * basis + 1e-9)
        # At least one recent slot, so a short context never ends with an empty cache.
        recent = max(1, math.floor(self.recent_ratio * basis + 1e-9) - self.sink)
        heavy = max(0, total - self.sink - recent) if self.heavy_ratio else 0
        self._memo = (seen, self.length, (self.sink, heavy, recent))
        return self._memo[2]

    def total(self, seen: int) -> int:
        """Slots kept after `seen` tokens: the budget, at least the floor, at most `seen`."""
        return min(seen, max(self.floor, sum(self.sizes(seen))))

    @property
    def max_total(self) -> int | None:
        """Upper bound on kept slots (None while the budget still grows with the length)."""
        if self.grows:
            return None
        return max(self.floor, sum(self.sizes(0)))
