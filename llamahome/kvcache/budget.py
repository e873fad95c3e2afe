"""How many tokens an evicting cache layer keeps: llama-recipes counts or H2O-paper ratios."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Budget"]


@dataclass(frozen=True)
class Budget:
    """How many tokens a layer keeps once it has seen `seen` tokens.

    Either counts (llama-recipes: ``heavy`` + ``recent`` fixed) or ratios of the current length
    (H2O paper: ``heavy_ratio * seen`` + ``recent_ratio * seen``). ``sink`` is always a count.

    Attributes:
        sink: Attention-sink tokens kept forever (policy sink).
        heavy: Heavy-hitter slots (counts mode).
        recent: Recent-window slots (counts mode).
        heavy_ratio: Heavy-hitter share of the current length (ratio mode).
        recent_ratio: Recent share of the current length (ratio mode; for sink, the total).
    """

    sink: int = 0
    heavy: int = 0
    recent: int = 0
    heavy_ratio: float | None = None
    recent_ratio: float | None = None

    @property
    def is_ratio(self) -> bool:
        """Whether the budget grows with the length (ratio mode)."""
        return self.recent_ratio is not None

    def sizes(self, seen: int) -> tuple[int, int, int]:
        """(sink, heavy, recent) slot counts after `seen` tokens (before capping at `seen`)."""
        if not self.is_ratio:
            return self.sink, self.heavy, self.recent
        # Floor of the *summed* ratio (as the H2O code's int()), so 0.5 + 0.5 keeps everything;
        # the epsilon absorbs float error such as 0.7 + 0.3 * seen landing just below an integer.
        share = (self.heavy_ratio or 0.0) + self.recent_ratio
        total = math.floor(share * seen + 1e-9)
        # At least one recent slot, so a short context never ends with an empty cache.
        recent = max(1, math.floor(self.recent_ratio * seen + 1e-9) - self.sink)
        heavy = max(0, total - self.sink - recent) if self.heavy_ratio else 0
        return self.sink, heavy, recent

    def total(self, seen: int) -> int:
        """Slots kept after `seen` tokens."""
        return min(seen, sum(self.sizes(seen)))

    @property
    def max_total(self) -> int | None:
        """Upper bound on kept slots (None in ratio mode)."""
        return None if self.is_ratio else self.sink + self.heavy + self.recent
