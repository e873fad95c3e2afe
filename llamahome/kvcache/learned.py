"""A learned KV scorer (``cache=learned``): a tiny per-layer model predicts each pair's KVzip score.

Paper: Jegou et al., 2026, "KVzap" (arXiv 2601.07891; kvpress ``KVzapPress``): a linear layer or
a two-layer MLP per decoder layer reads the hidden state that enters the layer's attention and
predicts, for every KV head, the log of the KVzip score the pair would get (``kvzip.py``). It
needs no attention weights and no second pass, so it scores every token as it enters the cache,
at prefill *and* at every decode step, with plain SDPA / flash attention (``needs_scores=False``).

Protocol (the serving engine relies on these names):

* `attach_scorer(model, scorer)` puts a forward pre-hook on each decoder layer's attention
  module. Before the attention runs (so before ``cache.update``), the hook finds the cache layer
  of that layer index and, if it has ``observe_hidden(hidden_states)``, calls it. A cache-layer
  wrapper that holds several rows forwards ``observe_hidden`` row by row.
* A `LearnedLayer` turns the hidden states into scores with its layer of the scorer, and gives
  them to the new slots; eviction then keeps the best per head (``head_budget.py``: uniform,
  AdaKV-style per layer, KVzip-style global, or a threshold on the predicted log score, as KVzap
  does with DMS).
* The scorer is found from the model's config (`scorer_for`): ``CacheSpec.build(model.config)``
  builds the layers with it, and a model without one is a `CacheError` that names the command
  training one (``python -m llamahome.train experiment=kv_scorer``).

Cost per token and layer: one (hidden x kv_heads) product (linear) or two small ones (MLP); for
SmolLM2 (576 x 3 per layer) well under 1% of the layer's own projections.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from llamahome.errors import CacheError
from llamahome.kvcache.head_budget import HeadBudgetLayer

__all__ = [
    "KVScorer",
    "LearnedLayer",
    "ScorerPreHook",
    "attach_scorer",
    "attention_inputs",
    "require_scorer",
    "scorer_for",
]

TRAIN_COMMAND = "python -m llamahome.train experiment=kv_scorer"
_PRE_HOOKS_ATTR = "_llamahome_scorer_hooks"
# id(model config) -> (weak reference to the config, scorer); see `scorer_for`.
_SCORERS: dict[int, tuple[weakref.ref, KVScorer]] = {}


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


class ScorerInputs:
    """What a cache layer needs to score its new tokens with a `KVScorer` (a mixin).

    ``observe_hidden`` (from the model's pre-hook) keeps the attention's input, ``update`` the
    new keys and values, ``_new_meta`` the tokens' positions (their rank among the row's real
    tokens); `_predicted` turns them into scores when the slots are written. The layer sets
    ``scorer`` (None: nothing to score with) and ``layer_idx``.
    """

    scorer: KVScorer | None = None
    layer_idx: int = 0
    _observed: torch.Tensor | None = None
    _positions: torch.Tensor | None = None
    _new_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe_hidden(self, hidden_states: torch.Tensor) -> None:
        """Keep the input of the tokens about to enter (the model's hook calls it before update).

        They are scored, with their positions, keys and values, when their slots are written.

        Args:
            hidden_states: (batch, tokens, hidden_size), the attention's input.
        """
        if self.scorer is not None:
            self._observed = hidden_states

    def update(self, key_states, value_states, *args: Any, **kwargs: Any):  # noqa: D102
        if self.scorer is not None:
            self._new_kv = (key_states, value_states)  # their norms are scorer inputs
        return super().update(key_states, value_states, *args, **kwargs)

    def _new_meta(self, bsz, kv_heads, q, new_valid, position_ids, device):  # noqa: D102
        if self.scorer is not None:
            # A token is scored at its rank among the row's real tokens (padding does not
            # count), read before the sink bookkeeping advances it.
            before = self._real_seen
            if before is None or before.shape[0] != bsz:
                before = torch.zeros(bsz, dtype=torch.long, device=device)
            valid = (
                new_valid
                if new_valid is not None
                else torch.ones(bsz, q, dtype=torch.bool, device=device)
            )
            self._positions = valid.long().cumsum(-1) - 1 + before[:, None]
        return super()._new_meta(bsz, kv_heads, q, new_valid, position_ids, device)

    def _predicted(self, bsz: int, kv_heads: int, q: int, device: torch.device) -> torch.Tensor:
        """The scorer's (batch, kv_heads, q) scores of the new tokens.

        Raises:
            CacheError: No hidden states arrived (no hook), or the scorer fits another model.
        """
        hidden, self._observed = self._observed, None
        keys, values = self._new_kv if self._new_kv is not None else (None, None)
        self._new_kv = None
        if hidden is None:
            raise CacheError(
                f"cache.policy={self.policy}: no hidden states reached the cache, so the scorer "
                "is not attached to this model: load it with llamahome.load_model (a model "
                "directory with kv_scorer/), or call "
                "llamahome.kvcache.learned.attach_scorer(model, scorer)."
            )
        with torch.no_grad():
            scores = self.scorer.score(self.layer_idx, hidden, self._positions, keys, values)
        if scores.shape != (bsz, kv_heads, q):
            raise CacheError(
                f"cache.policy={self.policy}: the scorer gave {tuple(scores.shape)} scores for "
                f"{q} tokens of {bsz} rows x {kv_heads} KV heads: it was trained for another model."
            )
        return scores.to(device)

    def _forget_inputs(self) -> None:
        self._observed = self._new_kv = self._positions = None


class LearnedLayer(ScorerInputs, HeadBudgetLayer):
    """Slots scored by the learned scorer as they enter (prefill and decode)."""

    policy = "learned"

    def __init__(
        self, *args: Any, scorer: KVScorer, layer_idx: int = 0, **kwargs: Any
    ) -> None:
        """See `HeadBudgetLayer`.

        Args:
            *args: The budget (and ``inv_freq``).
            scorer: The model's scorer.
            layer_idx: This layer's index in the model.
            **kwargs: ``threshold``, ``head_budgets``.
        """
        super().__init__(*args, **kwargs)
        self.scorer = scorer
        self.layer_idx = layer_idx

    def _entry_score(self, bsz: int, kv_heads: int, q: int, device: torch.device) -> Any:
        return self._predicted(bsz, kv_heads, q, device)

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self._forget_inputs()

    def _map_state(self, fn: Any) -> None:
        super()._map_state(fn)
        self._forget_inputs()


def scorer_for(config: Any) -> KVScorer | None:
    """The scorer attached to the model whose config this is, or None."""
    entry = _SCORERS.get(id(config))
    if entry is None or entry[0]() is not config:
        return None
    return entry[1]


def require_scorer(config: Any) -> KVScorer:
    """`scorer_for(config)`, or a `CacheError` that names the command training one."""
    scorer = scorer_for(config)
    if scorer is None:
        name = getattr(config, "_name_or_path", "") or "<model>"
        raise CacheError(
            f"cache.policy=learned needs a KV scorer trained for this model ({name}) and it has "
            f"none: train one with `{TRAIN_COMMAND} model=<model>`, then use model=<that run dir> "
            "(its export/ carries the scorer in kv_scorer/)."
        )
    return scorer


class ScorerPreHook:
    """Forward pre-hook on an attention module: hand its input to the cache layer's scorer."""

    def __init__(self, layer_idx: int) -> None:
        """Hook for decoder layer `layer_idx`."""
        self.layer_idx = layer_idx

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Call ``observe_hidden`` of this layer's cache layer, if it has one."""
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        layers = getattr(cache, "layers", None)
        if layers is None or self.layer_idx >= len(layers):
            return
        observe = getattr(layers[self.layer_idx], "observe_hidden", None)
        if observe is not None:
            hidden = kwargs.get("hidden_states")
            observe(hidden if hidden is not None else args[0])


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    from llamahome.kvcache.model_hooks import decoder_of

    return [layer.self_attn for layer in decoder_of(model).layers]


def attach_scorer(model: nn.Module, scorer: KVScorer) -> nn.Module:
    """Attach `scorer` to `model`: pre-hooks on its attention, found by ``cache=learned``.

    Idempotent: a second call replaces the scorer. The scorer is not a submodule of the model,
    so the model's state dict, checkpoints and exports are unchanged.

    Args:
        model: A transformers causal LM (or its PEFT wrapper).
        scorer: A scorer with one layer per decoder layer.

    Returns:
        The same model.

    Raises:
        CacheError: The scorer's shape does not fit the model.
    """
    from llamahome.kvcache.model_hooks import enable_cache_hooks

    modules = _attention_modules(model)
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if scorer.num_layers != len(modules) or scorer.kv_heads != kv_heads:
        raise CacheError(
            f"the KV scorer has {scorer.num_layers} layers x {scorer.kv_heads} KV heads but the "
            f"model has {len(modules)} x {kv_heads}: it was trained for another model; train one "
            f"for this model with `{TRAIN_COMMAND}`."
        )
    for module in modules:
        if not getattr(module, _PRE_HOOKS_ATTR, None):
            handle = module.register_forward_pre_hook(
                ScorerPreHook(int(module.layer_idx)), with_kwargs=True
            )
            setattr(module, _PRE_HOOKS_ATTR, handle)
    _SCORERS[id(config)] = (weakref.ref(config), scorer)
    weakref.finalize(config, _SCORERS.pop, id(config), None)
    enable_cache_hooks(model)  # global head budgets settle after the prefill
    return model


@contextmanager
def attention_inputs(model: nn.Module) -> Iterator[list[torch.Tensor | None]]:
    """Capture what enters each attention module on its first call inside the block.

    Yields:
        A list with one slot per decoder layer, filled with (batch, tokens, hidden) tensors:
        the hidden states a scorer reads, from the first forward (the prefill) only.
    """
    modules = _attention_modules(model)
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def hook_for(i: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if captured[i] is None:
                hidden = kwargs.get("hidden_states")
                captured[i] = (hidden if hidden is not None else args[0]).detach()

        return hook

    handles = [
        m.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, m in enumerate(modules)
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
