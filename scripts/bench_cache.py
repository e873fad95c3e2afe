"""Decode speed and memory of every KV-cache policy against plain transformers, in one process.

The baseline is plain transformers: ``attn_implementation="sdpa"`` and a ``DynamicCache``, with
no llamahome code on its path. Ours is the same weights (shared tensors) with the hybrid
attention and ``make_cache(policy, ...)`` in two modes:

* ``floor``: ``budget_ratio=0.2`` of the sequence with the default floor (``min_tokens=1024``),
  what generate, chat and serve use: no eviction at 256 tokens, one-in-one-out at 1,024 kept
  from 1k on;
* ``evict``: 20% of the sequence as a count (``window_length``) and ``min_tokens=0``: the
  policy itself, evicting at prefill and at every decode step.

A round, per context length L: plain transformers prefills L tokens once (its cache is copied
for every pair); then, per mode and policy (in an order that rotates every round), ours
prefills, and the two decode ``--steps`` new tokens with their steps *interleaved* one by one
(who goes first alternates), so load on a shared machine hits both alike. The pair's figure is
median plain step / median ours step (thread CPU time by default, ``--clock wall`` for wall
time). ``--rounds`` rounds (>= 5) give each row a median and a spread (min-max over rounds);
the ``full`` rows are the control, since the full cache runs plain SDPA + ``DynamicCache`` under
our attention function: their spread is the noise of the measurement. Target: every policy
>= 0.97x plain at 256 and 1,024 tokens, both modes.

Noise-free figures beside them, from extra steps after the timed ones (round 1 only): the
aten ops of one decode step (ours / plain; a ``TorchDispatchMode`` counts them), the KV bytes
held and the prefill peak RSS (ours / plain), and the share of a decode step spent in the
policy's ``finish`` (scores + eviction).

    python scripts/bench_cache.py                 # 256, 1k; every policy; floor + evict; 5 rounds
    python scripts/bench_cache.py --quick         # full and h2o only
    python scripts/bench_cache.py --lengths 256 1024 4096 --rounds 7
    python scripts/bench_cache.py --pretrained    # the embedded SmolLM2 weights (else random)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
from llamahome.kvcache.spec import POLICIES, kv_bytes, make_cache  # noqa: E402

# Every policy benchmarked, with the extra make_cache keywords it needs beyond the budget.
# One entry per policy (a new policy in spec.POLICIES is benchmarked with no keywords).
BENCH_POLICIES: dict[str, dict[str, Any]] = {policy: {} for policy in POLICIES}
MODES = ("floor", "evict")
TARGET = 0.97
WARMUP = 2  # decode steps before timing starts (first-call allocations)
PROBE_STEPS = 6  # extra steps for the share of a step spent in `finish`

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


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run inside it: a figure no other process can disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class FinishTimer:
    """Time spent in a layer class's ``finish`` (scores + eviction), while installed."""

    def __init__(self, owner: type, clock) -> None:
        self.owner, self.clock, self.seconds = owner, clock, 0.0
        self.had_own = "finish" in owner.__dict__
        self.orig = owner.finish

    def __enter__(self) -> FinishTimer:
        orig, clock = self.orig, self.clock

        def timed(layer, *a, **k):
            t = clock()
            try:
                return orig(layer, *a, **k)
            finally:
                self.seconds += clock() - t

        self.owner.finish = timed
        return self

    def __exit__(self, *exc) -> None:
        if self.had_own:
            self.owner.finish = self.orig
        else:
            del self.owner.finish


@dataclass
class Row:
    """Everything measured for one (length, mode, policy), over the rounds."""

    length: int
    mode: str
    policy: str
    ratios: list[float] = field(default_factory=list)
    base_tok_s: list[float] = field(default_factory=list)
    tok_s: list[float] = field(default_factory=list)
    kv_ratio: float = 1.0
    peak_ratio: float = 1.0
    finish_share: float | None = None
    ops: tuple[int, int] = (0, 0)
    kept: int = 0


def cache_kwargs(policy: str, mode: str, seq_len: int, budget: float) -> dict[str, Any]:
    """make_cache keywords for one policy and mode (see the module docstring)."""
    extra = BENCH_POLICIES[policy]
    if policy == "full":
        return dict(extra)
    if mode == "floor":
        return {"budget_ratio": budget, **extra}
    return {"window_length": max(2, int(budget * seq_len)), "min_tokens": 0, **extra}


def next_token(model, tokens, cache):
    return model(tokens, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)


def prefill(model, ids, cache):
    """Prefill with the peak RSS measured; returns the next token and the peak in bytes."""
    with torch.no_grad(), PeakRSS() as mem:
        tok = next_token(model, ids, cache)
    return tok, max(1, mem.peak - mem.base)


def run_pair(base, ours, plain_state, row: Row, steps: int, budget: float, clock, probe: bool):
    """Ours prefills; then plain (from its copied prefill) and ours decode, interleaved."""
    length, policy = row.length, row.policy
    ids, tok_b, plain_template, peak_b = plain_state
    plain = copy.deepcopy(plain_template)
    seq_len = length + WARMUP + steps
    kw = cache_kwargs(policy, row.mode, seq_len, budget)
    cache = make_cache(policy, ours.config, seq_len=seq_len, **kw)
    tok_o, peak_o = prefill(ours, ids, cache)
    times_b, times_o = [], []
    with torch.no_grad():
        for i in range(WARMUP + steps):
            for who in ("o", "b") if i % 2 else ("b", "o"):
                t = clock()
                if who == "b":
                    tok_b = next_token(base, tok_b, plain)
                else:
                    tok_o = next_token(ours, tok_o, cache)
                dt = clock() - t
                if i >= WARMUP:
                    (times_b if who == "b" else times_o).append(dt)
        tb, to = statistics.median(times_b), statistics.median(times_o)
        row.ratios.append(tb / to)
        row.base_tok_s.append(1 / tb)
        row.tok_s.append(1 / to)
        if not probe:
            return
        kv_plain = sum(layer.keys.nbytes + layer.values.nbytes for layer in plain.layers)
        row.kv_ratio = kv_bytes(cache) / kv_plain
        row.peak_ratio = peak_o / peak_b
        row.kept = cache.layers[0].keys.shape[2]
        counts = []
        for model, tok, kv in ((base, tok_b, plain), (ours, tok_o, cache)):
            with OpCounter() as counter:
                next_token(model, tok, kv)
            counts.append(counter.total)
        row.ops = (counts[1], counts[0])
        if policy != "full":
            with FinishTimer(type(cache.layers[0]), clock) as timer:
                shares = []
                for _ in range(PROBE_STEPS):
                    timer.seconds = 0.0
                    t = clock()
                    tok_o = next_token(ours, tok_o, cache)
                    shares.append(timer.seconds / (clock() - t))
            row.finish_share = statistics.median(shares)


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


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def verdict(row: Row, control: Row | None) -> str:
    """met / MISSED against TARGET, saying when the control's noise is as large as the gap."""
    median = statistics.median(row.ratios)
    if median >= TARGET:
        return "met" if min(row.ratios) >= TARGET else "met (spread crosses)"
    if control is not None and control is not row and min(control.ratios) <= median:
        return "MISSED (within the control's noise)"
    return "MISSED"


def print_table(rows: list[Row]) -> None:
    controls = {(r.length, r.mode): r for r in rows if r.policy == "full"}
    print(
        "\n| context | mode | policy | kept | plain tok/s | ours tok/s | ours / plain (median) "
        "| spread (min-max) | KV vs plain | prefill peak vs plain | finish / step "
        "| aten ops / step (ours / plain) | >= 0.97x |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        share = "-" if r.finish_share is None else f"{r.finish_share:.1%}"
        print(
            f"| {r.length} | {r.mode} | {r.policy} | {r.kept} "
            f"| {statistics.median(r.base_tok_s):.1f} | {statistics.median(r.tok_s):.1f} "
            f"| **{statistics.median(r.ratios):.2f}x** | {spread(r.ratios)} "
            f"| {r.kv_ratio:.2f}x | {r.peak_ratio:.2f}x | {share} "
            f"| {r.ops[0]} / {r.ops[1]} | {verdict(r, controls.get((r.length, r.mode)))} |"
        )
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
    p.add_argument("--quick", action="store_true", help="full and h2o only")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per pair")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5 for a spread)")
    p.add_argument("--budget", type=float, default=0.2, help="share of the sequence kept")
    p.add_argument("--policies", nargs="+", default=None, choices=list(BENCH_POLICIES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--pretrained", action="store_true", help="the embedded SmolLM2 weights")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = p.parse_args(argv)
    policies = args.policies or (["full", "h2o"] if args.quick else list(BENCH_POLICIES))
    torch.set_num_threads(1)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    base, ours = build_models(args.pretrained)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# python scripts/bench_cache.py {command}")
    print(
        f"# SmolLM2-135M architecture ({'embedded' if args.pretrained else 'random'} weights), "
        f"torch {torch.__version__}, 1 thread, fp32, batch 1; {args.steps} new tokens timed "
        f"(+{WARMUP} warm-up) per pair, {args.rounds} rounds, {args.clock} clock; floor = "
        f"budget_ratio={args.budget} + default min_tokens, evict = {args.budget:.0%} of the "
        f"sequence as window_length + min_tokens=0"
    )
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    pairs = [(mode, policy) for mode in args.modes for policy in policies]
    rows = {
        (length, mode, policy): Row(length, mode, policy)
        for length in args.lengths
        for mode, policy in pairs
    }
    started = time.perf_counter()
    for round_ in range(args.rounds):
        for length in args.lengths:
            gen = torch.Generator().manual_seed(length)
            ids = torch.randint(0, base.config.vocab_size, (1, length), generator=gen)
            plain = DynamicCache(config=base.config)
            tok_b, peak_b = prefill(base, ids, plain)
            state = (ids, tok_b, plain, peak_b)
            shift = round_ % len(pairs)  # a different pair goes first every round
            for mode, policy in pairs[shift:] + pairs[:shift]:
                row = rows[(length, mode, policy)]
                run_pair(base, ours, state, row, args.steps, args.budget, clock, round_ == 0)
                print(f"    {length} {mode} {policy}: {row.ratios[-1]:.2f}x", flush=True)
                gc.collect()
            del plain, state
            gc.collect()
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"  round {round_ + 1}/{args.rounds} done after {time.perf_counter() - started:.0f} s"
            f" (load {load}): "
            + ", ".join(f"{k[0]} {k[1]} {k[2]} {v.ratios[-1]:.2f}x" for k, v in rows.items()),
            flush=True,
        )
    print_table(list(rows.values()))
    print(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
