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
from llamahome.kvcache.kv_scorer import KVScorer

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
            # count), from 0, read before the sink bookkeeping advances it.
            self._positions = self.real_ranks(bsz, q, new_valid, device)[1] - 1
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
