"""cache=kvzip and per-head budgets: the paper's scores, the model hook, caps that always hold.

The reference below recomputes KVzip's rule (Kim et al. 2025, arXiv 2505.23416; kvpress
``KVzipPress``) without any LlamaHome code: one plain forward over ``context + repeat prompt +
chunk``, queries and keys re-derived from the hidden states that enter each attention, a softmax
over the sinks, the chunk and the repeat (causal), the maximum over the repeat's queries and each
KV head's query heads.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llamahome.errors import CacheError
from llamahome.kvcache.attention import enable_hybrid_attention
from llamahome.kvcache.kvzip import RepeatPrompt
from llamahome.kvcache.learned import KVScorer, attach_scorer
from llamahome.kvcache.model_hooks import enable_cache_hooks
from llamahome.kvcache.spec import CacheSpec, keep_ratio, kv_bytes, make_cache
from llamahome.kvcache.teacher import kvzip_scores

PROMPT = RepeatPrompt(first=(5, 6, 7), next=(8, 9), suffix=(10,), tail=3)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return enable_hybrid_attention(
        LlamaForCausalLM(tiny_llama_config(max_position_embeddings=1024)).eval()
    )


@pytest.fixture(scope="module")
def model():
    """The tiny model with kvzip's hook and a (random) learned scorer attached."""
    model = enable_cache_hooks(_model(), prompt=PROMPT)
    attach_scorer(model, _random_scorer(model))
    return model


@pytest.fixture(scope="module")
def no_scorer():
    """The same weights with kvzip's hook only."""
    return enable_cache_hooks(_model(), prompt=PROMPT)


def _random_scorer(model) -> KVScorer:
    torch.manual_seed(1)
    cfg = model.config
    return KVScorer(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads)


def _ids(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(11, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_scores(model, context: torch.Tensor, prompt: RepeatPrompt, chunk: int, sinks=4):
    """KVzip's scores of one row, (kv_heads, n) per layer, from plain forwards (see the doc)."""
    n = context.shape[1]
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    groups = heads // kv_heads
    out = [torch.zeros(kv_heads, n) for _ in range(cfg.num_hidden_layers)]
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        head = list(prompt.first) if lo == 0 else [
            *prompt.next, *context[0, max(0, lo - prompt.tail) : lo].tolist()
        ]
        repeat = [*head, *prompt.suffix, *context[0, lo:hi].tolist()]
        seen = {}
        hooks = [
            layer.self_attn.register_forward_pre_hook(
                lambda mod, args, kw, i=i: seen.__setitem__(
                    i, (kw["hidden_states"], kw["position_embeddings"])
                ),
                with_kwargs=True,
            )
            for i, layer in enumerate(model.model.layers)
        ]
        with torch.no_grad():
            model(torch.cat([context, torch.tensor([repeat])], dim=1), use_cache=False)
        for hook in hooks:
            hook.remove()
        r = len(repeat)
        for i, layer in enumerate(model.model.layers):
            hidden, (cos, sin) = seen[i]
            attn = layer.self_attn
            d = attn.head_dim
            q = attn.q_proj(hidden).view(1, -1, heads, d).transpose(1, 2)
            k = attn.k_proj(hidden).view(1, -1, kv_heads, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            sink = [t for t in range(min(sinks, n)) if not lo <= t < hi]
            cols = [*sink, *range(lo, hi), *range(n, n + r)]
            fixed = len(sink) + hi - lo
            causal = torch.ones(r, r, dtype=torch.bool).tril()
            for kv in range(kv_heads):
                keys = k[0, kv, cols]
                for g in range(groups):
                    logits = q[0, kv * groups + g, n:] @ keys.T / math.sqrt(d)
                    logits[:, fixed:] = logits[:, fixed:].masked_fill(~causal, float("-inf"))
                    probs = logits.softmax(-1)[:, len(sink) : fixed]
                    out[i][kv, lo:hi] = torch.maximum(out[i][kv, lo:hi], probs.amax(0))
    return [o.detach() for o in out]


# ---- the scores -------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [64, 16, 7])
def test_scores_match_a_plain_reference_of_the_papers_rule(model, chunk):
    context = _ids(40, seed=3)
    ours = kvzip_scores(model, context, PROMPT, chunk_size=chunk).scores
    ref = reference_scores(model, context, PROMPT, chunk)
    for layer_ours, layer_ref in zip(ours, ref, strict=True):
        torch.testing.assert_close(layer_ours[0].exp(), layer_ref, atol=1e-6, rtol=1e-5)


def test_padded_rows_score_as_they_would_alone(model):
    long, short = _ids(36, seed=4), _ids(25, seed=5)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 11, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    batch = kvzip_scores(model, ids, PROMPT, attention_mask=mask, chunk_size=64).scores
    alone_long = kvzip_scores(model, long, PROMPT, chunk_size=64).scores
    alone_short = kvzip_scores(model, short, PROMPT, chunk_size=64).scores
    for b, one, two in zip(batch, alone_long, alone_short, strict=True):
        torch.testing.assert_close(b[0], one[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b[1, :, 11:], two[0], atol=1e-5, rtol=1e-4)


# ---- through plain model(...) / generate() ------------------------------------------------
def test_prefill_logits_are_the_full_caches_and_generate_evicts(model):
    ids = _ids(80, seed=6)
    full = make_cache("full", model.config)
    cache = make_cache("kvzip", model.config, budget_ratio=0.25, min_tokens=0)
    with torch.no_grad():
        want = model(ids, cache=full).logits
        got = model(ids, cache=cache).logits
    torch.testing.assert_close(got, want)  # nothing is evicted before the prefill's logits
    kept = [layer.valid.sum(-1) for layer in cache.layers]
    assert sum(int(k.sum()) for k in kept) == 2 * 2 * 20  # layers x kv heads x 25% of 80
    assert all(bool((layer.scores[layer.valid] <= 0).all()) for layer in cache.layers)  # log p
    out = model.generate(ids, cache=make_cache("kvzip", model.config, budget_ratio=0.25,
                                                min_tokens=0, seq_len=100),
                         max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 100)


def test_without_a_scorer_decoded_tokens_pass_through_the_window(no_scorer):
    model = no_scorer
    ids = _ids(120, seed=7)
    cache = make_cache("kvzip", model.config, budget_ratio=0.2, min_tokens=0, seq_len=120)
    recent = cache.layers[0].budget.sizes(120)[2]
    with torch.no_grad():
        out = model(ids, cache=cache)
        context = [layer.positions[layer.valid].sort().values for layer in cache.layers]
        for _ in range(3 * recent):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache)
    seen = cache.get_seq_length()
    for layer, before in zip(cache.layers, context, strict=True):
        pos = layer.positions[layer.valid].sort().values
        decoded = pos[pos >= 120]
        # The decoded tokens kept are exactly the recent window's (per row and head)...
        assert decoded.numel() == recent * 2 and int(decoded.min()) >= seen - recent
        # ... and the context kept at prefill stays, but for one token per head for each slot
        # of the window the prefill's last tokens held (they left it for the first decode steps).
        kept_context = pos[pos < 120]
        assert set(kept_context.tolist()) <= set(before.tolist())
        assert kept_context.numel() == before.numel() - recent * 2


def test_a_model_without_the_hook_is_one_clear_error():
    bare = _model()
    cache = make_cache("kvzip", bare.config, budget_ratio=0.25, min_tokens=0)
    with torch.no_grad():
        out = bare(_ids(40), cache=cache)
        with pytest.raises(CacheError, match="enable_cache_hooks"):
            bare(out.logits[:, -1:].argmax(-1), cache=cache)


# ---- per-head budgets: caps that hold at prefill and at every decode step --------------------
CASES = [
    ("kvzip", "uniform", None), ("kvzip", "layer", None), ("kvzip", "global", None),
    ("kvzip", "global", -3.9), ("learned", "uniform", None), ("learned", "layer", None),
    ("learned", "global", None), ("learned", "global", 0.0),
]


@pytest.mark.parametrize(("policy", "head_budgets", "threshold"), CASES)
def test_no_head_layer_or_cache_exceeds_its_cap(model, policy, head_budgets, threshold):
    spec = CacheSpec(policy=policy, budget_ratio=0.25, min_tokens=0, head_budgets=head_budgets,
                     threshold=threshold)
    cache = spec.build(model.config, seq_len=100)
    ids = torch.cat([_ids(70, seed=8), _ids(70, seed=9)])
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding: never kept over a real token, never counted as kept
    cap = spec.budget.for_cache(100).total(100)  # 25 per head
    layers, heads = len(cache.layers), model.config.num_key_value_heads
    counts = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache)
        for step in range(31):
            real = torch.stack([layer.valid.sum(-1) for layer in cache.layers])  # (L, b, kvh)
            seen = cache.get_seq_length()
            assert bool((real <= seen).all())
            if threshold is not None or head_budgets == "uniform":
                assert int(real.max()) <= cap
            if head_budgets == "layer":
                assert int(real.sum(-1).max()) <= heads * cap
            assert int(real.sum((0, 2)).max()) <= layers * heads * cap
            if threshold is None:  # the budget is spent whole, however it is shared
                assert real.sum((0, 2)).tolist() == [layers * heads * cap] * 2
            for layer in cache.layers:  # allocated bytes cover what is really held
                assert layer.kv_bytes() >= 2 * layer.keys[0, 0, 0].nbytes * int(real.max())
            kept = sum(int(layer.valid.sum()) for layer in cache.layers)
            assert keep_ratio(cache) == pytest.approx(kept / (layers * 2 * heads * seen))
            counts.append(real)
            if threshold is not None:
                for layer in cache.layers:
                    prio = layer.priority({k: getattr(layer, n) for k, n in (
                        ("score", "scores"), ("pos", "positions"), ("valid", "valid"))} | {
                        "sink": layer._live("sink")}, seen)
                    assert bool((prio[layer.valid] >= threshold).all())
            if step < 30:
                token = out.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                out = model(token, attention_mask=mask, cache=cache)
    if threshold is None:  # a full budget: each head keeps its count, one in, one out
        assert all(torch.equal(c, counts[0]) for c in counts)
    assert kv_bytes(cache) > 0


def test_threshold_alone_keeps_what_scores_above_it(model):
    cache = make_cache("kvzip", model.config, threshold=-3.0, min_tokens=0)
    with torch.no_grad():
        model(_ids(90, seed=10), cache=cache)
    window = cache.layers[0].budget.sizes(90)[2]
    for layer in cache.layers:
        pos, score = layer.positions[layer.valid], layer.scores[layer.valid]
        protected = (pos < 4) | (pos >= 90 - window)
        assert bool((score[~protected] >= -3.0).all())
    reference = kvzip_scores(model, _ids(90, seed=10), PROMPT).scores
    for layer, ref in zip(cache.layers, reference, strict=True):
        above = int(((ref[0] >= -3.0)[:, 4 : 90 - window]).sum())
        assert int(layer.valid.sum()) == above + 2 * (4 + window)


@pytest.mark.parametrize("policy", ["kvzip", "learned"])
def test_short_inputs_equal_the_full_cache_under_the_floor(model, policy):
    ids = _ids(40, seed=11, batch=2)
    kw = dict(max_new_tokens=30, do_sample=False, min_new_tokens=30, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, cache=make_cache("full", model.config), **kw)
        cache = make_cache(policy, model.config, budget_ratio=0.05, seq_len=70)
        got = model.generate(ids, cache=cache, **kw)
    assert torch.equal(ref, got)


@pytest.mark.parametrize("policy", ["kvzip", "learned"])
def test_the_question_protected_protocol_keeps_every_question_token(model, policy):
    from llamahome.evaluation.protocol import pad_batch, prefill

    pairs = [(_ids(60, seed=12)[0].tolist(), [20, 21, 22, 23, 24]),
             (_ids(47, seed=13)[0].tolist(), [30, 31, 32])]
    batch = pad_batch(pairs, pad_id=0)
    spec = CacheSpec(policy=policy, budget_ratio=0.2, min_tokens=0)
    cache, out, _ = prefill(model, batch, spec, question_protected=True)
    assert out.logits.isfinite().all()
    width = batch.context_width
    for layer in cache.layers:
        pos, valid = layer.positions, layer.valid
        for row, (_, question) in enumerate(pairs):
            start = batch.ids.shape[1] - len(question)
            for head in range(pos.shape[1]):
                kept = set(pos[row, head][valid[row, head]].tolist())
                assert set(range(start, batch.ids.shape[1])) <= kept
    real = sum(int(layer.valid.sum()) for layer in cache.layers)
    questions = sum(len(q) for _, q in pairs) * 2 * 2  # rows' questions x layers x kv heads
    assert real == questions + 2 * 2 * 2 * int(0.2 * width)  # + 20% of the context per head


def test_a_head_may_keep_every_token_while_the_others_keep_few():
    model = enable_cache_hooks(_model(), prompt=PROMPT)
    scorer = _random_scorer(model)
    with torch.no_grad():
        scorer.layers[0].bias[0] = 1e4  # layer 0, KV head 0 outranks every other slot
    attach_scorer(model, scorer)
    cache = make_cache("learned", model.config, budget_ratio=0.5, min_tokens=0, seq_len=60,
                       head_budgets="global")
    with torch.no_grad():
        model(_ids(60, seed=14), cache=cache)
    counts = torch.stack([layer.valid.sum(-1)[0] for layer in cache.layers])  # (layers, kv heads)
    assert int(counts[0, 0]) == 60  # the whole context in one head ...
    assert int(counts.sum()) == 2 * 2 * 30  # ... and the cache still holds its budget
    assert cache.layers[0].keys.shape[-2] == 60 and keep_ratio(cache) == pytest.approx(0.5)


def test_with_a_scorer_decoded_tokens_get_its_prediction(model):
    from llamahome.kvcache.learned import attention_inputs, scorer_for

    cache = make_cache("kvzip", model.config, budget_ratio=0.2, min_tokens=0, seq_len=80)
    with torch.no_grad():
        out = model(_ids(60, seed=15), cache=cache)
        token = out.logits[:, -1:].argmax(-1)
        with attention_inputs(model) as hidden:
            model(token, cache=cache)
    scorer = scorer_for(model.config)
    for i, layer in enumerate(cache.layers):
        slot = layer.positions == 60  # the decoded token, in every head
        want = scorer.score(i, hidden[i], torch.tensor([[60]]), layer.keys[slot].view(1, 2, 1, -1),
                            layer.values[slot].view(1, 2, 1, -1))
        torch.testing.assert_close(layer.scores[slot].view(1, 2, 1), want)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"policy": "kvzip", "head_budgets": "random"}, "cache.head_budgets='random'"),
        ({"policy": "h2o", "threshold": -4.0}, "cache.threshold is used by cache.policy=kvzip"),
        ({"policy": "learned", "chunk_size": 512}, "cache.chunk_size is used by"),
        ({"policy": "kvzip", "chunk_size": 4}, "cache.chunk_size=4"),
        ({"policy": "kvzip", "threshold": "high"}, "cache.threshold='high'"),
        ({"policy": "kvzip", "window_length": 4}, "cache.window_length=4 leaves no recent slot"),
    ],
)
def test_bad_score_policy_keys_are_one_line_naming_the_key(kwargs, phrase):
    with pytest.raises(CacheError) as info:
        CacheSpec(**kwargs)
    assert phrase in str(info.value) and len(str(info.value).splitlines()) == 1
