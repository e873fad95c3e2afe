"""The model-level hook that finishes a deferred eviction: kvzip's reconstruction, global budgets.

Most policies evict inside each layer's attention step. Two things cannot: KVzip's scores come
from a second pass through the whole model (the reconstruction), and a global head budget ranks
the slots of every layer at once. Their layers *defer* a prefill (keep it whole) and this hook,
a forward hook on the model's decoder, settles them right after the forward that deferred them:

    model(...) / model.generate(...)
      decoder forward (prefill)            layers keep the new tokens, marked deferred
      CacheSettleHook (after it)           kvzip: reconstruct (``kvzip.reconstruct``);
                                           then evict (``head_budget.settle``)
      lm_head, sampling, decode steps ...  as usual

So the policies work through any plain ``model(...)`` or ``model.generate(..., cache=cache)``, in
every entry point: ``llamahome.load_model`` installs the hook (with the tokenizer's
reconstruction prompt), and so does ``enable_cache_hooks(model, tokenizer)`` for a model built in
code. The hook is a picklable object (spawned DDP workers unpickle the model with it).
"""

from __future__ import annotations

from typing import Any

import torch

from llamahome.kvcache.head_budget import settle
from llamahome.kvcache.reconstruction import RepeatPrompt, reconstruct, repeat_prompt

__all__ = ["CacheSettleHook", "decoder_of", "enable_cache_hooks", "settle_cache"]

_HOOK_ATTR = "_llamahome_settle_hook"


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a causal LM (``model.model`` for Llama), unwrapping PEFT."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
        if decoder is not None:
            return decoder
    return getattr(base, "model", base)


def _cache_of(args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    for key in ("cache", "past_key_values"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    for key in ("cache", "past_key_values"):
        found = getattr(output, key, None)
        if found is not None:
            return found
    return None


def settle_cache(
    decoder: torch.nn.Module,
    cache: Any,
    prompt: RepeatPrompt | None,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
) -> None:
    """Finish the deferred eviction of `cache` after `decoder` prefilled it.

    Args:
        decoder: The decoder that ran the prefill.
        cache: The cache it used.
        prompt: KVzip's reconstruction prompt (None: no kvzip layer may be pending).
        args: The prefill call's positional arguments.
        kwargs: The prefill call's keyword arguments.
    """
    layers = [layer for layer in getattr(cache, "layers", ()) if getattr(layer, "_deferred", 0)]
    if not layers or getattr(cache, "_llamahome_settling", False):
        return
    cache._llamahome_settling = True  # the reconstruction calls the decoder (and this) again
    try:
        with torch.no_grad():
            kvzip = [layer for layer in layers if layer.needs_reconstruction]
            if kvzip:
                reconstruct(decoder, cache, kvzip, prompt, args, kwargs or {})
            settle(layers)
    finally:
        cache._llamahome_settling = False


class CacheSettleHook:
    """Forward hook on a decoder: settle the cache's deferred layers after each forward.

    Attributes:
        prompt: KVzip's reconstruction prompt in the model's tokenizer (None without one).
    """

    def __init__(self, prompt: RepeatPrompt | None = None) -> None:
        """Create the hook (``enable_cache_hooks`` registers it)."""
        self.prompt = prompt

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Settle the cache of this forward, if it holds deferred layers."""
        cache = _cache_of(args, kwargs, output)
        if cache is not None:
            settle_cache(module, cache, self.prompt, args, kwargs)


def enable_cache_hooks(
    model: torch.nn.Module, tokenizer: Any = None, prompt: RepeatPrompt | None = None
) -> torch.nn.Module:
    """Install the settle hook on `model`'s decoder (idempotent); the tokenizer sets the prompt.

    Args:
        model: A transformers causal LM (or a PEFT wrapper of one).
        tokenizer: Its tokenizer, for KVzip's reconstruction prompt.
        prompt: The prompt's token ids directly (tests, models without a tokenizer).

    Returns:
        The same model.
    """
    decoder = decoder_of(model)
    if prompt is None and tokenizer is not None:
        prompt = repeat_prompt(tokenizer)
    hook = getattr(decoder, _HOOK_ATTR, None)
    if hook is None:
        hook = CacheSettleHook(prompt)
        decoder.register_forward_hook(hook, with_kwargs=True)
        setattr(decoder, _HOOK_ATTR, hook)
    elif prompt is not None:
        hook.prompt = prompt
    return model
