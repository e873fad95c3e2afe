"""The learned KV scorer itself: one small model per decoder layer (KVzap, arXiv 2601.07891).

`KVScorer` maps what a cache layer knows about a token as it enters (the hidden state entering
the attention, the token's position, the norms of its key and value) to one score per KV head:
a prediction of the log KVzip score the pair would get (``kvzip.py``). ``learned.py`` applies it
inside the cache; ``training/scorer_module.py`` fits it; ``model/scorer.py`` saves and loads it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["KVScorer"]


class KVScorer(nn.Module):
    """One small model per decoder layer: hidden state (+ position) -> one score per KV head.

    The input is the hidden state entering the layer's attention and, with
    ``position_features``, two features of the token's position p (``log(1 + p)`` and
    ``1 / (1 + p)``): KVzip's scores trend with the position in the context, and on SmolLM2 they
    lift the held-out rank correlation of a linear scorer from ~0.72 to ~0.80 (docs/h2o.md).
    With ``kv_norm_features`` it also reads the log norm of the token's key and value in each KV
    head (what KVzip+ weighs attention by, and a quadratic function of the hidden state a linear
    scorer cannot form): the cache layer has them at no cost, since the attention computed them
    (a rotation keeps a key's norm). Inputs are standardised per layer (``mean``, ``scale``
    buffers, set from the first training batch by `set_normalization`): SmolLM2's outlier
    dimensions would otherwise make the fit ill-conditioned.

    Args:
        num_layers: Decoder layers.
        hidden_size: The model's hidden size (the attention's input).
        kv_heads: KV heads per layer (one score each).
        hidden_dim: None for a linear scorer, else the MLP's hidden width (GELU in between).
        position_features: Also read the token's position.
        kv_norm_features: Also read the log norms of the token's keys and values.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        kv_heads: int,
        hidden_dim: int | None = None,
        position_features: bool = True,
        kv_norm_features: bool = True,
    ) -> None:
        super().__init__()
        self.num_layers, self.hidden_size, self.kv_heads = num_layers, hidden_size, kv_heads
        self.hidden_dim, self.position_features = hidden_dim, position_features
        self.kv_norm_features = kv_norm_features
        width = hidden_size + (2 if position_features else 0)
        width += 2 * kv_heads if kv_norm_features else 0
        self.register_buffer("mean", torch.zeros(num_layers, width))
        self.register_buffer("scale", torch.ones(num_layers, width))

        def one() -> nn.Module:
            if hidden_dim is None:
                return nn.Linear(width, kv_heads)
            return nn.Sequential(
                nn.Linear(width, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, kv_heads)
            )

        self.layers = nn.ModuleList(one() for _ in range(num_layers))

    @property
    def config(self) -> dict[str, Any]:
        """What rebuilds this scorer (``KVScorer(**config)``)."""
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "kv_heads": self.kv_heads,
            "hidden_dim": self.hidden_dim,
            "position_features": self.position_features,
            "kv_norm_features": self.kv_norm_features,
        }

    def features(
        self,
        layer_idx: int,
        hidden_states: torch.Tensor,
        positions: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The standardised input of layer `layer_idx`, (batch, tokens, width) float32.

        Raises:
            ValueError: The scorer reads key and value norms but none were given.
        """
        x = hidden_states.to(self.mean.device, torch.float32)
        parts = [x]
        if self.position_features:
            if positions is None:
                positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            pos = positions.to(x.device, torch.float32).clamp(min=0)[..., None]
            parts += [torch.log1p(pos), 1.0 / (1.0 + pos)]
        if self.kv_norm_features:
            if keys is None or values is None:
                raise ValueError("this KV scorer reads the tokens' key and value norms")
            for t in (keys, values):  # (b, kv_heads, tokens, d) -> (b, tokens, kv_heads)
                norm = t.to(x.device, torch.float32).norm(dim=-1).clamp(min=1e-6).log()
                parts.append(norm.transpose(1, 2))
        if len(parts) > 1:
            x = torch.cat(parts, dim=-1)
        return (x - self.mean[layer_idx]) / self.scale[layer_idx]

    def score(
        self,
        layer_idx: int,
        hidden_states: torch.Tensor,
        positions: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores of layer `layer_idx`'s tokens, (batch, kv_heads, tokens) float32.

        Args:
            layer_idx: The decoder layer.
            hidden_states: (batch, tokens, hidden_size), the attention's input.
            positions: (batch, tokens) positions of the tokens (None: 0, 1, 2, ...).
            keys: (batch, kv_heads, tokens, head_dim), the tokens' keys (rotated or not).
            values: (batch, kv_heads, tokens, head_dim), their values.
        """
        x = self.features(layer_idx, hidden_states, positions, keys, values)
        return self.layers[layer_idx](x).float().transpose(1, 2)

    def forward(
        self,
        hidden_states: list[torch.Tensor],
        positions: torch.Tensor | None = None,
        keys: list[torch.Tensor] | None = None,
        values: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Scores of every layer: one (batch, kv_heads, tokens) tensor per layer."""
        keys = keys or [None] * len(hidden_states)
        values = values or [None] * len(hidden_states)
        return [
            self.score(i, h, positions, k, v)
            for i, (h, k, v) in enumerate(zip(hidden_states, keys, values, strict=True))
        ]

    @torch.no_grad()
    def set_normalization(
        self,
        hidden_states: list[torch.Tensor],
        positions: torch.Tensor | None,
        valid: torch.Tensor,
        targets: list[torch.Tensor] | None = None,
        keys: list[torch.Tensor] | None = None,
        values: list[torch.Tensor] | None = None,
    ) -> None:
        """Standardise inputs by a batch's statistics; start the output at the targets' mean.

        Args:
            hidden_states: One (batch, tokens, hidden) tensor per layer.
            positions: (batch, tokens) positions.
            valid: (batch, tokens) bool, the real tokens.
            targets: One (batch, kv_heads, tokens) tensor per layer (the output bias starts at
                their mean), or None.
            keys: One (batch, kv_heads, tokens, head_dim) tensor per layer (key norms).
            values: Likewise, the values.
        """
        self.mean.zero_()
        self.scale.fill_(1.0)
        for i, hidden in enumerate(hidden_states):
            k = keys[i] if keys is not None else None
            v = values[i] if values is not None else None
            x = self.features(i, hidden, positions, k, v)[valid]
            self.mean[i] = x.mean(dim=0)
            self.scale[i] = x.std(dim=0).clamp(min=1e-4) if x.shape[0] > 1 else 1.0
            if targets is not None:
                last = self.layers[i] if self.hidden_dim is None else self.layers[i][-1]
                last.bias.copy_(targets[i].transpose(1, 2)[valid].mean(dim=0))
