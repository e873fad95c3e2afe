"""KVzip scores of a batch without evicting anything: the teacher of the learned scorer.

``kvzip_scores(model, input_ids)`` prefills the text into a score-only kvzip cache, runs the
reconstruction pass (``kvzip.reconstruct``) and returns every layer's scores, per KV head and
token, with the keys and values the cache held and (optionally) the hidden states that entered
each attention during the prefill: the (input, target) pairs a KVzap-style scorer is trained on
(``training/scorer_module.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llamahome.kvcache.budget import Budget
from llamahome.kvcache.kvzip import KVzipLayer
from llamahome.kvcache.learned import attention_inputs
from llamahome.kvcache.model_hooks import decoder_of, settle_cache
from llamahome.kvcache.reconstruction import DEFAULT_CHUNK_SIZE, RepeatPrompt, cache_keyword

__all__ = ["TeacherOutput", "kvzip_scores"]


@dataclass
class TeacherOutput:
    """What `kvzip_scores` returns, one tensor per layer in each list.

    Attributes:
        scores: float32 (batch, kv_heads, tokens) log KVzip scores (``kvzip.log_scores``).
        keys: (batch, kv_heads, tokens, head_dim), rotated, as the cache held them.
        values: (batch, kv_heads, tokens, head_dim).
        hidden: (batch, tokens, hidden) attention inputs, or None (``with_hidden=False``).
    """

    scores: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: list[torch.Tensor] | None = None


@torch.no_grad()
def kvzip_scores(
    model: Any,
    input_ids: torch.Tensor,
    prompt: RepeatPrompt,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sinks: int = 4,
    with_hidden: bool = False,
) -> TeacherOutput:
    """KVzip reconstruction scores (log) of every token of `input_ids`, nothing evicted.

    Args:
        model: A causal LM on the hybrid attention (``llamahome.load_model``).
        input_ids: (batch, tokens).
        prompt: The reconstruction prompt (``kvzip.repeat_prompt(tokenizer)``).
        attention_mask: (batch, tokens) padding mask; None = no padding.
        chunk_size: Tokens per reconstruction pass.
        sinks: Attention sinks outside a chunk that its softmax includes (kvpress: 4).
        with_hidden: Also return the hidden states that entered each attention.

    Returns:
        The scores, keys and values of every layer, and the hidden states if asked.
    """
    from llamahome.kvcache.spec import PolicyCache, _use_hybrid_attention

    _use_hybrid_attention(model.config, "kvzip")
    text = model.config.get_text_config(decoder=True)
    layers = [
        KVzipLayer(Budget(sink=sinks, heavy=0, recent=1), layer_idx=i, chunk_size=chunk_size,
                   score_only=True)
        for i in range(text.num_hidden_layers)
    ]
    cache = PolicyCache(layers, "kvzip")
    decoder = decoder_of(model)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True}
    keyword = cache_keyword(decoder)
    if attention_mask is not None:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = None
    # The model's own settle hook (if any) stands aside: the reconstruction below uses `prompt`.
    cache._llamahome_settling = True
    try:
        if with_hidden:
            with attention_inputs(model) as hidden:
                decoder(**kwargs, **{keyword: cache})
        else:
            decoder(**kwargs, **{keyword: cache})
    finally:
        cache._llamahome_settling = False
    settle_cache(decoder, cache, prompt, (), kwargs)
    return TeacherOutput(
        scores=[layer.scores for layer in layers],
        keys=[layer.keys for layer in layers],
        values=[layer.values for layer in layers],
        hidden=hidden,
    )
