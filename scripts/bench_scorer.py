"""What the score policies cost: the learned scorer per decode step, kvzip per prefill.

Against plain transformers (``attn_implementation="sdpa"`` + ``DynamicCache``, the same weights,
no llamahome code), in one process, 1 torch thread (``bench_cache.py``'s models and meters):

* decode: plain and ``cache=learned`` steps interleaved one by one after an L-token prefill;
  tok/s = 1 / median step (thread CPU time), and the scorer's share of a learned step (time in
  its pre-hooks and in ``KVScorer.score``, which a cache without a scorer would not spend);
* prefill: wall time and peak RSS above the start of plain, ``cache=h2o`` and ``cache=kvzip``
  (its reconstruction pass included; chunks of ``--chunk`` tokens).

    python scripts/bench_scorer.py                     # 256, 1k, 4k; random SmolLM2 weights
    python scripts/bench_scorer.py --lengths 1024 --pretrained
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cache import PeakRSS, build_models  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from llamahome.kvcache import learned  # noqa: E402
from llamahome.kvcache.spec import keep_ratio, make_cache  # noqa: E402


class Timer:
    """Accumulates the time spent inside wrapped methods (the scorer's share of a step)."""

    def __init__(self, clock) -> None:
        self.clock, self.seconds = clock, 0.0

    def wrap(self, owner, name: str):
        """Time ``owner.name`` from now on; returns the undo."""
        orig = getattr(owner, name)

        def timed(*a, **k):
            t = self.clock()
            try:
                return orig(*a, **k)
            finally:
                self.seconds += self.clock() - t

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, orig)


def decode(base, ours, length: int, steps: int, budget: float, clock) -> tuple[float, float, float]:
    """(plain tok/s, learned tok/s, the scorer's share of a learned step)."""
    ids = torch.randint(0, base.config.vocab_size, (1, length),
                        generator=torch.Generator().manual_seed(length))
    plain = DynamicCache(config=base.config)
    cache = make_cache("learned", ours.config, budget_ratio=budget, min_tokens=0,
                       seq_len=length + steps + 2)
    with torch.no_grad():
        tok_b = base(ids, cache=plain, logits_to_keep=1).logits[:, -1:].argmax(-1)
        tok_o = ours(ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    timer = Timer(clock)
    undo = [timer.wrap(learned.KVScorer, "score"), timer.wrap(learned.ScorerPreHook, "__call__")]
    times_b, times_o, share = [], [], []
    try:
        with torch.no_grad():
            for i in range(steps + 2):
                for who in ("b", "o") if i % 2 else ("o", "b"):
                    timer.seconds = 0.0
                    t = clock()
                    if who == "b":
                        tok_b = base(tok_b, cache=plain, logits_to_keep=1).logits[:, -1:].argmax(-1)
                    else:
                        tok_o = ours(tok_o, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
                    dt = clock() - t
                    if i >= 2:
                        (times_b if who == "b" else times_o).append(dt)
                        if who == "o":
                            share.append(timer.seconds / dt)
    finally:
        for u in undo:
            u()
    assert abs(keep_ratio(cache) - budget) < 0.05, keep_ratio(cache)
    return 1 / statistics.median(times_b), 1 / statistics.median(times_o), statistics.median(share)


def prefill(model, ids, cache) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB above the start) of one prefill."""
    with torch.no_grad(), PeakRSS() as mem:
        t = time.perf_counter()
        model(ids, cache=cache, logits_to_keep=1)
        seconds = time.perf_counter() - t
    return seconds, (mem.peak - mem.base) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--chunk", type=int, nargs="+", default=[2048, 1024])
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base, ours = build_models(args.pretrained)
    print(f"# python scripts/bench_scorer.py {' '.join(argv or sys.argv[1:])}")
    print(f"# load average {os.getloadavg()}; 1 thread; budget_ratio={args.budget}, min_tokens=0")
    if not args.skip_decode:
        print("\n| context | plain tok/s | learned tok/s | learned vs plain | scorer / step |")
        print("|---:|---:|---:|---:|---:|")
    for length in [] if args.skip_decode else args.lengths:
        b, o, share = decode(base, ours, length, args.steps, args.budget, time.thread_time)
        print(f"| {length} | {b:.1f} | {o:.1f} | {o / b:.2f}x | {share:.1%} |", flush=True)
    if args.skip_prefill:
        return 0
    print("\n| context | cache | prefill s | vs plain | peak MiB | vs plain |")
    print("|---:|---|---:|---:|---:|---:|")
    for length in args.lengths:
        ids = torch.randint(0, base.config.vocab_size, (1, length),
                            generator=torch.Generator().manual_seed(1))
        plain_s, plain_mib = prefill(base, ids, DynamicCache(config=base.config))
        rows = [("plain", plain_s, plain_mib)]
        specs = [("h2o", {})] + [(f"kvzip chunk {c}", {"chunk_size": c}) for c in args.chunk]
        for name, extra in specs:
            policy = name.split()[0]
            cache = make_cache(policy, ours.config, budget_ratio=args.budget, min_tokens=0,
                               seq_len=length, **extra)
            rows.append((name, *prefill(ours, ids, cache)))
        for name, seconds, mib in rows:
            print(f"| {length} | {name} | {seconds:.2f} | {seconds / plain_s:.2f}x | {mib:.0f} "
                  f"| {mib / max(plain_mib, 1e-9):.2f}x |", flush=True)
    print(f"# load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
