"""Benchmark the KV-cache policies in one process: full vs h2o vs window (+ eager-scoring H2O).

For each context length: prefill time and peak memory, decode tokens/s, KV bytes held, and the
H2O bookkeeping share of a decode step; then ratios against the full cache (SDPA, no eviction)
measured in the same run, on the same model and inputs.

    python scripts/bench_cache.py --quick            # 1k and 4k context, a few minutes on 2 cores
    python scripts/bench_cache.py                    # 1k, 2k, 4k, 8k
    python scripts/bench_cache.py --models smollm2 --pretrained   # embedded SmolLM2 weights

Models (random init: speed and memory do not depend on the weights): ``smollm2``, the
SmolLM2-135M architecture (30 layers, 9 query / 3 KV heads, hidden 576), and ``mha42m``, a
42M-parameter Llama-2-style multi-head model (8 layers, 8 heads, hidden 512). "h2o-eager" is the
llama-recipes / original-H2O approach: eager attention whose L x L probability matrix gives the
scores, hence O(L^2) prefill memory.

Peak memory is the process RSS above the level before the prefill, sampled every 0.2 ms by a
thread; during the prefill glibc mmaps every block >= 1 MiB so freed tensors leave the RSS at
once (and goes back to heap allocation for the timed decode steps).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: the peak is still sampled, only less precise
    _LIBC = None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def malloc_for_measuring(on: bool) -> None:
    """glibc: while measuring, mmap every block >= 1 MiB so a freed tensor leaves the RSS at once.

    Outside measurements, big blocks come from the heap again: per-step mmap/munmap (and its page
    faults) would otherwise tax whichever policy allocates most per decode step, i.e. the
    full cache's torch.cat, and skew the speed comparison.
    """
    if _LIBC is None:
        return
    _LIBC.mallopt(M_MMAP_THRESHOLD, (1 << 20) if on else (32 << 20))
    _LIBC.mallopt(M_TRIM_THRESHOLD, (1 << 20) if on else (512 << 20))
    _LIBC.malloc_trim(0)


from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from llamahome.kvcache import attention as attn  # noqa: E402
from llamahome.kvcache import layers as cache_layers  # noqa: E402
from llamahome.kvcache.spec import full_kv_bytes, kv_bytes, make_cache  # noqa: E402

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


class Stopwatch:
    """Accumulates the time spent inside wrapped functions (the H2O bookkeeping)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t

        return timed


@dataclass
class Row:
    model: str
    policy: str
    length: int
    prefill_s: float = 0.0
    prefill_peak_mib: float = 0.0
    decode_tok_s: float = 0.0
    kv_mib: float = 0.0
    full_kv_mib: float = 0.0
    evict_share: float | None = None
    score_share: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def run_policy(model, tag: str, policy: str, length: int, steps: int, budget: float) -> Row:
    row = Row(tag, policy, length)
    impl = attn.HYBRID_EAGER_ATTENTION if policy == "h2o-eager" else attn.HYBRID_ATTENTION
    attn.enable_hybrid_attention(model, impl)
    name = "h2o" if policy == "h2o-eager" else policy
    cache = (
        make_cache(name, model.config)
        if name == "full"
        else make_cache(name, model.config, budget_ratio=budget)
    )
    ids = torch.randint(
        0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        with PeakRSS() as mem:
            t = time.perf_counter()
            out = model(ids, cache=cache, logits_to_keep=1)
            row.prefill_s = time.perf_counter() - t
        row.prefill_peak_mib = mem.mib
        token = out.logits[:, -1:].argmax(-1)
        del out
        # Time the eviction (EvictingLayer.finish) and the H2O scoring inside the decode steps.
        evict, score = Stopwatch(), Stopwatch()
        orig_sums, orig_finish = attn.attention_column_sums, cache_layers.EvictingLayer.finish
        attn.attention_column_sums = score.wrap(orig_sums)
        cache_layers.EvictingLayer.finish = evict.wrap(orig_finish)
        times, evict_shares, score_shares = [], [], []
        try:
            model(token, cache=cache, logits_to_keep=1)  # warm-up step, not timed
            for _ in range(steps):
                evict.seconds = score.seconds = 0.0
                t = time.perf_counter()
                token = model(token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - t)
                evict_shares.append(evict.seconds / times[-1])
                score_shares.append(score.seconds / times[-1])
        finally:
            attn.attention_column_sums, cache_layers.EvictingLayer.finish = orig_sums, orig_finish
    # Medians: on a shared machine single steps can stall for a second; the median cannot.
    row.decode_tok_s = 1.0 / statistics.median(times)
    if name != "full":
        row.evict_share = statistics.median(evict_shares)
        row.score_share = (
            statistics.median(score_shares) if name == "h2o" and policy == "h2o" else None
        )
    row.kv_mib = kv_bytes(cache) / 2**20
    row.full_kv_mib = full_kv_bytes(cache) / 2**20
    del cache
    gc.collect()
    return row


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1k and 4k context, 16 decode steps")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    p.add_argument("--budget", type=float, default=0.2, help="budget_ratio for h2o and window")
    p.add_argument("--policies", nargs="+", default=["full", "h2o", "window", "h2o-eager"])
    p.add_argument("--eager-max-length", type=int, default=4096, help="skip h2o-eager above this")
    p.add_argument("--models", nargs="+", default=["mha42m", "smollm2"], choices=list(MODELS))
    p.add_argument("--pretrained", action="store_true", help="smollm2: the embedded weights")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.steps = [1024, 4096], 16
    torch.set_num_threads(args.threads)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# python scripts/bench_cache.py {command}")
    print(
        f"# torch {torch.__version__}, {args.threads} threads, fp32, batch 1; "
        f"budget_ratio={args.budget}; decode tok/s = 1 / median of {args.steps} steps"
    )
    rows: list[Row] = []
    for tag in args.models:
        rows += bench_model(tag, args)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


def bench_model(tag: str, args: argparse.Namespace) -> list[Row]:
    torch.manual_seed(0)
    if args.pretrained and tag == "smollm2":
        from llamahome import load_model

        model, _ = load_model("smollm2")
        what = "SmolLM2-135M-Instruct, embedded weights"
    else:
        model = LlamaForCausalLM(LlamaConfig(**MODELS[tag]))
        what = "random init"
    model.eval()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"## {tag}: {n_params:.0f}M parameters, {what}", flush=True)
    rows: list[Row] = []
    for length in args.lengths:
        for policy in args.policies:
            if policy == "h2o-eager" and length > args.eager_max_length:
                need = 2 * model.config.num_attention_heads * length**2 * 4 / 2**30
                rows.append(
                    Row(tag, policy, length, note=f"skipped: ~{need:.1f} GiB of L x L per layer")
                )
                continue
            row = run_policy(model, tag, policy, length, args.steps, args.budget)
            rows.append(row)
            share = "" if row.evict_share is None else f" evict {row.evict_share:.1%}"
            share += "" if row.score_share is None else f" scores {row.score_share:.1%}"
            print(
                f"  {policy:9s} L={length:5d} prefill {row.prefill_s:6.2f}s "
                f"peak {row.prefill_peak_mib:7.0f} MiB | decode {row.decode_tok_s:6.2f} tok/s | "
                f"KV {row.kv_mib:6.1f} / {row.full_kv_mib:6.1f} MiB{share}",
                flush=True,
            )
    del model
    gc.collect()
    return rows


def print_table(rows: list[Row]) -> None:
    print(
        "\n| model | context | policy | prefill s | prefill peak MiB | decode tok/s | KV MiB "
        "| KV vs full | decode vs full | prefill peak vs full | evict / step | scores / step |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        full = next(
            (r for r in rows if (r.model, r.length, r.policy) == (row.model, row.length, "full")),
            None,
        )
        if row.note:
            print(f"| {row.model} | {row.length} | {row.policy} | {row.note} |||||||||")
            continue
        kv = fmt_ratio(row.kv_mib, full.kv_mib) if full else "-"
        dec = fmt_ratio(row.decode_tok_s, full.decode_tok_s) if full else "-"
        peak = fmt_ratio(row.prefill_peak_mib, full.prefill_peak_mib) if full else "-"
        ev = "-" if row.evict_share is None else f"{row.evict_share:.1%}"
        sc = "-" if row.score_share is None else f"{row.score_share:.1%}"
        print(
            f"| {row.model} | {row.length} | {row.policy} | {row.prefill_s:.2f} "
            f"| {row.prefill_peak_mib:.0f} "
            f"| {row.decode_tok_s:.2f} | {row.kv_mib:.1f} | {kv} | {dec} | {peak} | {ev} | {sc} |"
        )
    for r in rows:
        if r.policy != "h2o-eager" or r.note:
            continue
        ours = next(
            (x for x in rows if (x.model, x.length, x.policy) == (r.model, r.length, "h2o")), None
        )
        if ours:
            print(
                f"# {r.model} L={r.length}: eager-scoring H2O prefill peak "
                f"{fmt_ratio(r.prefill_peak_mib, ours.prefill_peak_mib)} of ours, "
                f"prefill time {fmt_ratio(r.prefill_s, ours.prefill_s)}"
            )


if __name__ == "__main__":
    raise SystemExit(main())
