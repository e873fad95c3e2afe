"""Decode speed and memory of the KV-cache policies against plain transformers, in one process.

The baseline is plain transformers: ``attn_implementation="sdpa"`` and a ``DynamicCache``, with
no llamahome code on its path. Ours is the same weights (shared tensors) with the hybrid
attention and ``make_cache(policy, budget_ratio=..., min_tokens=0, seq_len=L + steps)``: the
H2O paper's budget (a share of the sequence, fixed once), no floor, so the policy is measured.

For each context length L and policy: both prefill L tokens (peak RSS above the start level),
then their decode steps are *interleaved* one by one (1 torch thread), so load on a shared
machine hits both alike; tok/s = 1 / median step time (thread CPU time by default: robust to
other processes; ``--clock wall`` for wall time). Printed: decode tok/s ratio (ours / plain),
KV bytes ratio (held / plain), prefill peak ratio, and the eviction share of a decode step
(time in ``EvictingLayer.finish``; "scores" is the h2o scoring, ``add_decode_scores``).

    python scripts/bench_cache.py --quick        # 256, 1k, 4k; full and h2o; ~3 min on 1 core
    python scripts/bench_cache.py                # + window, sink and every registered policy
    python scripts/bench_cache.py --pretrained   # the embedded SmolLM2 weights (else random)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import torch

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: the peak is still sampled, only less precise
    _LIBC = None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def malloc_for_measuring(on: bool) -> None:
    """glibc: while measuring a prefill, mmap blocks >= 1 MiB so freed tensors leave the RSS."""
    if _LIBC is None:
        return
    _LIBC.mallopt(M_MMAP_THRESHOLD, (1 << 20) if on else (32 << 20))
    _LIBC.mallopt(M_TRIM_THRESHOLD, (1 << 20) if on else (512 << 20))
    _LIBC.malloc_trim(0)


from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from llamahome.kvcache import attention as attn  # noqa: E402
from llamahome.kvcache import layers as cache_layers  # noqa: E402
from llamahome.kvcache.spec import POLICIES, kv_bytes, make_cache  # noqa: E402

MODELS = {
    # SmolLM2-135M: GQA with 3 KV heads, so its KV cache is small next to its weights.
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=16384,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # A 42M-parameter Llama-2-style MHA model (every head has its own K/V, as in Llama-2 7B/13B):
    # the shape where the KV cache, not the weights, dominates a long-context decode step.
    "mha42m": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=16384,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Context manager: peak RSS above the entry level, sampled by a background thread."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        malloc_for_measuring(True)
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.0002)

    def __exit__(self, *exc) -> None:
        self.peak = max(self.peak, rss())
        self._stop.set()
        self._thread.join()
        malloc_for_measuring(False)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


class Timer:
    """Accumulates the time spent inside a wrapped method (for the shares of a step)."""

    def __init__(self, clock) -> None:
        self.clock, self.seconds = clock, 0.0

    def wrap(self, owner, name: str):
        orig = getattr(owner, name)

        def timed(*a, **k):
            t = self.clock()
            try:
                return orig(*a, **k)
            finally:
                self.seconds += self.clock() - t

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, orig)


@dataclass
class Row:
    policy: str
    length: int
    base_tok_s: float
    tok_s: float
    kv_ratio: float
    peak_ratio: float
    evict_share: float | None
    score_share: float | None


def prefill(model, ids, cache):
    """Prefill with the peak RSS measured; returns the next token and the peak in bytes."""
    with torch.no_grad(), PeakRSS() as mem:
        out = model(ids, cache=cache, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1), max(1, mem.peak - mem.base)


def bench_pair(base, ours, policy, length, steps, budget, clock) -> Row:
    """Prefill both, then interleave their decode steps; medians of the step times."""
    ids = torch.randint(
        0, base.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length)
    )
    plain = DynamicCache(config=base.config)
    kw = {} if policy == "full" else {"budget_ratio": budget, "min_tokens": 0}
    cache = make_cache(policy, ours.config, seq_len=length + steps + 2, **kw)
    tok_b, peak_b = prefill(base, ids, plain)
    tok_o, peak_o = prefill(ours, ids, cache)
    evict, score = Timer(clock), Timer(clock)
    undo = [evict.wrap(cache_layers.EvictingLayer, "finish")]
    layer0 = cache.layers[0]
    if hasattr(layer0, "add_decode_scores"):
        undo.append(score.wrap(type(layer0), "add_decode_scores"))
    times_b, times_o, ev, sc = [], [], [], []
    try:
        with torch.no_grad():
            for i in range(steps + 2):
                order = ("b", "o") if i % 2 else ("o", "b")
                for who in order:
                    evict.seconds = score.seconds = 0.0
                    t = clock()
                    if who == "b":
                        tok_b = base(tok_b, cache=plain, logits_to_keep=1).logits[:, -1:].argmax(-1)
                    else:
                        tok_o = ours(tok_o, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
                    dt = clock() - t
                    if i < 2:
                        continue  # warm-up steps
                    if who == "b":
                        times_b.append(dt)
                    else:
                        times_o.append(dt)
                        ev.append(evict.seconds / dt)
                        sc.append(score.seconds / dt)
    finally:
        for u in undo:
            u()
    tb, to = statistics.median(times_b), statistics.median(times_o)
    kv_plain = sum(layer.keys.nbytes + layer.values.nbytes for layer in plain.layers)
    evicting = policy != "full"
    return Row(
        policy,
        length,
        1 / tb,
        1 / to,
        kv_bytes(cache) / kv_plain,
        peak_o / peak_b,
        statistics.median(ev) if evicting else None,
        # None when the scoring is fused into the attention (h2o's `attend_decode`).
        (statistics.median(sc) or None)
        if evicting and hasattr(layer0, "add_decode_scores")
        else None,
    )


def build_models(pretrained: bool):
    """The plain SDPA model and ours, sharing the same weight tensors."""
    torch.manual_seed(0)
    if pretrained:
        from llamahome import load_model

        ours, _ = load_model("smollm2")
        config = ours.config
    else:
        config = LlamaConfig(**MODELS["smollm2"])
        ours = LlamaForCausalLM(config)
    base = LlamaForCausalLM(LlamaConfig(**config.to_dict()))
    base.load_state_dict(ours.state_dict(), assign=True)  # shared tensors, no copy
    base.set_attn_implementation("sdpa")
    attn.enable_hybrid_attention(ours)
    attach_policy_hooks(ours, pretrained)
    return base.eval(), ours.eval()


def attach_policy_hooks(model, pretrained: bool) -> None:
    """kvzip's settle hook (load_model installs it) and, if none, a random cache=learned scorer.

    An untrained scorer costs what a trained one does: the speed figures hold for both.
    """
    from llamahome.kvcache.kvzip import RepeatPrompt
    from llamahome.kvcache.learned import KVScorer, attach_scorer, scorer_for
    from llamahome.kvcache.model_hooks import enable_cache_hooks

    if not pretrained:  # no tokenizer: any ids make a prompt for random weights
        enable_cache_hooks(model, prompt=RepeatPrompt((198, 198), (198, 198), (198,)))
    if scorer_for(model.config) is None:
        cfg = model.config
        attach_scorer(model, KVScorer(cfg.num_hidden_layers, cfg.hidden_size,
                                      cfg.num_key_value_heads))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="256, 1k, 4k; full and h2o; 16 steps")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per pair")
    p.add_argument("--budget", type=float, default=0.2, help="cache.budget_ratio")
    p.add_argument("--policies", nargs="+", default=None, help="default: every policy")
    p.add_argument("--pretrained", action="store_true", help="the embedded SmolLM2 weights")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = p.parse_args(argv)
    policies = args.policies or (["full", "h2o"] if args.quick else list(POLICIES))
    if args.quick:
        args.steps = 16
    torch.set_num_threads(1)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    base, ours = build_models(args.pretrained)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# python scripts/bench_cache.py {command}")
    print(
        f"# SmolLM2-135M architecture ({'embedded' if args.pretrained else 'random'} weights), "
        f"torch {torch.__version__}, 1 thread, fp32, batch 1, budget_ratio={args.budget} of "
        f"L + steps, min_tokens=0; {args.steps} decode steps interleaved, {args.clock} clock"
    )
    rows = []
    for length in args.lengths:
        for policy in policies:
            row = bench_pair(base, ours, policy, length, args.steps, args.budget, clock)
            rows.append(row)
            print(f"  L={length} {policy}: {row.tok_s / row.base_tok_s:.2f}x", flush=True)
            gc.collect()
    print(
        "\n| context | policy | plain tok/s | ours tok/s | decode vs plain | KV vs plain "
        "| prefill peak vs plain | evict / step | scores / step |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ev = "-" if r.evict_share is None else f"{r.evict_share:.1%}"
        sc = "-" if r.score_share is None else f"{r.score_share:.1%}"
        print(
            f"| {r.length} | {r.policy} | {r.base_tok_s:.1f} | {r.tok_s:.1f} "
            f"| {r.tok_s / r.base_tok_s:.2f}x | {r.kv_ratio:.2f}x | {r.peak_ratio:.2f}x "
            f"| {ev} | {sc} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
