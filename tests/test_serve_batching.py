"""Continuous batching on a real server with the official ``openai`` client: rows with different
caches share decode steps and answer as they do alone, a request joining mid-generation changes
nobody's text, the KV pool is never exceeded (requests wait instead), 429 comes only from a full
wait queue, and ``/metrics`` is Prometheus text that ``prometheus_client`` parses.

Overlaps are made by construction, not by timing: ``engine.hold()`` queues requests so they are
admitted in the same engine step, and a long prompt prefills in several chunks while a short one
already decodes. ``ignore_eos`` keeps every answer at exactly ``max_tokens`` tokens.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import KEY, LONG, PROMPT, build, running, wait_until
from serve_helpers import save_tiny_model as _save

from llamahome.serving.app import ServeSettings, create_app
from llamahome.serving.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = [
    {"policy": "full"},
    {"policy": "h2o", "budget": 0.2, "min_tokens": 0},
    {"policy": "window", "budget": 48, "min_tokens": 0},
    {"policy": "sink", "budget": 0.3, "min_tokens": 0},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base_url, engine, app, model_dir) of a tiny model served with prefill chunks of 64."""
    model_dir = _save(tmp_path_factory.mktemp("tiny-hf"))
    app, engine, _ = build(model_dir, tmp_path_factory.mktemp("run"), f"serve.api_key={KEY}")
    with running(app) as url:
        yield url, engine, app, model_dir
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, prompt: str, max_tokens: int, kv_cache: dict | None = None) -> tuple[str, dict]:
    extra = {"ignore_eos": True, **({"kv_cache": kv_cache} if kv_cache else {})}
    out = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra
    )
    return out.choices[0].text, out.usage.model_extra["kv_cache"]


def together(engine, calls) -> list:
    """Run `calls` (thunks) concurrently, all admitted in the same engine step."""
    with ThreadPoolExecutor(len(calls)) as pool:
        with engine.hold():
            futures = [pool.submit(call) for call in calls]
            wait_until(lambda: engine.queued == len(calls), "every request queued")
        return [f.result() for f in futures]


def test_mixed_policies_in_one_batch_answer_as_alone(server, client):
    engine = server[1]
    prompts = [LONG[i * 7 :] for i in range(len(MIXED))]  # four different long prompts
    alone = [ask(client, p, 24, kv) for p, kv in zip(prompts, MIXED, strict=True)]
    engine.peak_decode_rows = 0
    jobs = zip(prompts, MIXED, strict=True)
    batched = together(engine, [lambda p=p, kv=kv: ask(client, p, 24, kv) for p, kv in jobs])
    assert [text for text, _ in batched] == [text for text, _ in alone]
    assert [kv["policy"] for _, kv in batched] == ["full", "h2o", "window", "sink"]
    assert engine.peak_decode_rows == 4  # all four rows in one forward at some step
    held = [kv["bytes_held"] for _, kv in batched]
    assert held[1] < held[0] / 3 and held[2] < held[0] / 3  # each evicted to its own budget
    assert [kv["keep_ratio"] for _, kv in batched] == [kv["keep_ratio"] for _, kv in alone]


def test_a_joining_request_does_not_change_the_running_rows(server, client):
    """A short prompt decodes first; a long one joins mid-way, after its prefill chunks."""
    engine = server[1]
    short_alone = ask(client, PROMPT, 30)[0]
    long_alone = ask(client, LONG, 8, {"policy": "h2o", "budget": 0.3, "min_tokens": 0})[0]
    engine.peak_decode_rows = 0
    short, long = together(engine, [
        lambda: ask(client, PROMPT, 30),
        lambda: ask(client, LONG, 8, {"policy": "h2o", "budget": 0.3, "min_tokens": 0}),
    ])
    assert short[0] == short_alone and long[0] == long_alone
    assert engine.peak_decode_rows == 2  # the long one joined while the short one decoded


def test_the_kv_pool_is_never_exceeded(server, client):
    """Room for two full-cache requests: six wait their turn (no 429); h2o fits more at once."""
    base, engine, app, _ = server
    from llamahome.kvcache import CacheSpec

    prompt_tokens = len(engine.tokenizer(LONG)["input_ids"])
    full = engine.worst_case(CacheSpec("full"), prompt_tokens, 16)
    small = Engine(
        engine.model, engine.tokenizer, engine.build_cache, max_queue=8,
        kv_memory=2 * full + engine.pool.headroom, prefill_chunk=engine.prefill_chunk,
    )
    settings = ServeSettings(**{**app.state.settings.__dict__, "api_key": None})
    small.start()
    try:
        with running(create_app(small, settings)) as url:
            tight = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
            samples = []

            def watch() -> bool:
                samples.append(httpx.get(url + "/health").json()["kv_cache"])
                return small.requests >= 6

            with ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(ask, tight, LONG[i:], 16) for i in range(6)]
                wait_until(watch, "six answers")  # sampling /health all along
                answers = [f.result() for f in futures]
            assert small.peak_decode_rows == 2  # the pool held two full caches at a time
            h2o = {"policy": "h2o", "budget": 0.2, "min_tokens": 0}
            small.peak_decode_rows = 0
            # Long enough answers that the first is still decoding when the sixth has prefilled.
            together(small, [lambda i=i: ask(tight, LONG[i:], 32, h2o) for i in range(6)])
            assert small.peak_decode_rows == 6  # a fifth of the memory: all six at once
            pool_bytes = small.pool.pool
            assert small.peak_bytes_held <= small.pool.capacity <= pool_bytes
            for sample in samples:
                assert sample["bytes_held"] <= sample["bytes_reserved"] <= pool_bytes
            for _, kv in answers:
                assert kv["bytes_held"] <= kv["bytes_reserved"] and kv["bytes_pool"] == pool_bytes
            # A request that could never fit is refused at once, naming the pool.
            with pytest.raises(openai.BadRequestError) as err:
                tight.completions.create(model="tiny", prompt=LONG, max_tokens=1500)
            assert err.value.body["code"] == "kv_memory_exceeded"
            assert "serve.kv_memory" in err.value.body["message"]
    finally:
        small.stop()


def test_429_only_when_the_wait_queue_is_full(server):
    base, engine, app, _ = server
    small = Engine(engine.model, engine.tokenizer, engine.build_cache, max_queue=2,
                   kv_memory=64 * 2**20, prefill_chunk=64)
    settings = ServeSettings(**{**app.state.settings.__dict__, "api_key": None})
    small.start()
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    try:
        with running(create_app(small, settings)) as url, ThreadPoolExecutor(2) as pool:
            with small.hold():  # nothing is admitted: requests stay in the wait queue
                first = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=120)
                         for _ in range(2)]
                wait_until(lambda: small.queued == 2, "two waiting requests")
                refused = httpx.post(url + "/v1/completions", json=body, timeout=120)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert [f.result().status_code for f in first] == [200, 200]
            metrics = httpx.get(url + "/metrics").text
            assert 'llamahome:requests_rejected_total{reason="queue_full"} 1.0' in metrics
    finally:
        small.stop()


def test_metrics_parse_with_prometheus_client(server, client):
    base, engine, _, _ = server
    ask(client, PROMPT, 5)
    answer = httpx.get(base + "/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    for name in (
        "llamahome:num_requests_running", "llamahome:num_requests_waiting",
        "llamahome:kv_cache_bytes_held", "llamahome:kv_cache_bytes_pool",
        "llamahome:generation_tokens_per_second", "llamahome:generation_tokens",
        "llamahome:time_to_first_token_seconds", "llamahome:inter_token_latency_seconds",
        "llamahome:kv_cache_evicted_tokens", "llamahome:requests_rejected",
    ):
        assert name in families, sorted(families)

    def value(name: str, suffix: str = "") -> float:
        return next(s.value for s in families[name].samples if s.name == name + suffix)

    assert value("llamahome:kv_cache_bytes_pool") == engine.pool.pool
    assert value("llamahome:generation_tokens", "_total") == engine.tokens
    assert value("llamahome:time_to_first_token_seconds", "_count") >= engine.requests >= 1
    assert value("llamahome:num_requests_running") == 0
    assert families["llamahome:time_to_first_token_seconds"].type == "histogram"


@pytest.mark.parametrize("policy", ["kvzip", "learned"])
def test_a_score_policy_row_scores_its_whole_prompt_as_generate_does(server, client, policy):
    """kvzip (and learned's global head budget) rank a prompt as a whole: the server feeds it in
    one forward, not in chunks of 64 each scored alone, so the row answers as ``generate`` does
    with the same cache, and the pool reserves its whole length (it holds the prompt while it
    scores it)."""
    import torch

    from llamahome.kvcache.learned import KVScorer, attach_scorer, scorer_for
    from llamahome.kvcache.spec import make_cache

    engine = server[1]
    model, tokenizer = engine.model, engine.tokenizer
    if policy == "learned" and scorer_for(model.config) is None:  # an untrained one will do
        torch.manual_seed(0)
        cfg = model.config
        attach_scorer(model, KVScorer(cfg.num_hidden_layers, cfg.hidden_size,
                                      cfg.num_key_value_heads))
    spec = {"policy": policy, "budget": 0.25, "min_tokens": 0}
    text, kv = ask(client, LONG, 16, spec)
    enc = tokenizer(LONG, return_tensors="pt")
    assert enc.input_ids.shape[1] > engine.prefill_chunk  # chunked, were it not a score policy
    cache = make_cache(policy, model.config, budget_ratio=0.25, min_tokens=0,
                       seq_len=enc.input_ids.shape[1] + 16)
    with torch.no_grad():
        out = model.generate(**enc, cache=cache, max_new_tokens=16, min_new_tokens=16,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    want = tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert text == want
    assert kv["policy"] == policy and kv["keep_ratio"] < 0.5
    assert engine.worst_case(engine_spec(policy), enc.input_ids.shape[1], 16) == (
        engine.pool.bytes_per_token * (enc.input_ids.shape[1] + 16)
    )


def engine_spec(policy: str):
    from llamahome.kvcache.spec import CacheSpec

    return CacheSpec(policy=policy, budget_ratio=0.25, min_tokens=0)
