"""Benchmark ``python -m llamahome.serve``: full vs h2o cache, batched vs one request at a time.

Starts the real server (a subprocess on 127.0.0.1, a free port), fires waves of N concurrent
chat requests with the official openai client, and prints per configuration: requests/s,
generated tokens/s, p50/p95 latency, then the ratios h2o/full and batched/one-by-one. The
cache is chosen per request (``kv_cache``), so full and h2o run on the same server, in
alternating waves. The number of requests is bounded; the script stops by itself.

    python scripts/bench_serve.py                 # smollm2, 8 concurrent, ~600-token prompts
    python scripts/bench_serve.py --quick         # tiny random model, 8 x ~150-token prompts
    python scripts/bench_serve.py --model outputs/train/runs/<time> --budget 0.1
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    """Start the server; return the process and its base URL once /health answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    env.pop("LLAMAHOME_API_KEY", None)
    args = [
        sys.executable, "-m", "llamahome.serve", f"model={model}", "cache=full",
        f"serve.port={port}", f"serve.max_batch_size={batch}", "serve.max_queue=256",
        "serve.log_level=warning", "print_config=false", "hydra.run.dir=/tmp/bench_serve",
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def prompt_text(chars: int, i: int) -> str:
    """A long, deterministic prompt (the stdlib's json docs), different for each request."""
    import json

    text = (json.__doc__ or "") * (1 + chars // max(1, len(json.__doc__ or "x")))
    return f"Request {i}. Summarise this text in one sentence.\n\n{text[:chars]}"


def wave(client, model: str, kv_cache: dict, n: int, args) -> tuple[float, list, int]:
    """N concurrent chat requests; returns (wall seconds, latencies, generated tokens)."""

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt_text(args.prompt_chars, i)}],
            max_tokens=args.max_tokens, temperature=0, extra_body={"kv_cache": kv_cache},
        )
        return time.perf_counter() - start, out.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    return time.perf_counter() - start, [r[0] for r in results], sum(r[1] for r in results)


def bench(args, batch: int) -> dict[str, dict[str, float]]:
    """Waves of full and h2o requests, interleaved, on one server with max_batch_size=batch."""
    proc, url = start_server(args.model, batch, args.threads)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        caches = {
            "full": {"policy": "full"},
            "h2o": {"policy": "h2o", "budget": args.budget, "min_tokens": args.min_tokens},
        }
        for kv in caches.values():  # warm-up: first calls allocate and compile kernels
            wave(client, model, kv, 1, args)
        totals = {name: {"wall": 0.0, "lat": [], "tokens": 0} for name in caches}
        for _ in range(args.rounds):
            for name, kv in caches.items():
                wall, lat, tokens = wave(client, model, kv, args.concurrency, args)
                print(f"  batch<={batch} {name}: {len(lat)} requests, {tokens} tokens in "
                      f"{wall:.1f} s", flush=True)
                totals[name]["wall"] += wall
                totals[name]["lat"] += lat
                totals[name]["tokens"] += tokens
        return {
            name: {
                "req_s": len(t["lat"]) / t["wall"],
                "tok_s": t["tokens"] / t["wall"],
                "p50": statistics.median(t["lat"]),
                "p95": sorted(t["lat"])[max(0, int(round(0.95 * len(t["lat"]))) - 1)],
            }
            for name, t in totals.items()
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="any model= value (conf, dir, run)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests per wave")
    parser.add_argument("--rounds", type=int, default=2, help="waves per cache policy")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=2400, help="~4 characters a token")
    parser.add_argument("--budget", type=float, default=0.2, help="h2o ratio of the sequence")
    parser.add_argument("--min-tokens", type=int, default=0, help="h2o floor (0: always evict)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--no-unbatched", action="store_true", help="skip the batch=1 server")
    parser.add_argument("--quick", action="store_true", help="tiny model, small waves")
    args = parser.parse_args()
    if args.quick:
        args.model, args.concurrency, args.rounds = "tiny", 8, 2
        args.max_tokens, args.prompt_chars = 32, 600

    runs = {f"batch<={args.concurrency}": bench(args, args.concurrency)}
    if not args.no_unbatched:
        runs["batch=1"] = bench(args, 1)
    print(
        f"\nmodel={args.model} | {args.concurrency} concurrent x {args.rounds} rounds | "
        f"~{args.prompt_chars // 4} prompt tokens, max_tokens={args.max_tokens} | "
        f"h2o budget={args.budget} min_tokens={args.min_tokens} | threads={args.threads}"
    )
    print(f"{'server':<12} {'cache':<6} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7}")
    for run, rows in runs.items():
        for name, r in rows.items():
            print(
                f"{run:<12} {name:<6} {r['req_s']:7.2f} {r['tok_s']:8.1f} "
                f"{r['p50']:7.2f} {r['p95']:7.2f}"
            )
    for run, rows in runs.items():
        print(f"{run}: h2o/full tok/s = {rows['h2o']['tok_s'] / rows['full']['tok_s']:.2f}x")
    if "batch=1" in runs:
        batched, single = runs[f"batch<={args.concurrency}"], runs["batch=1"]
        for name in ("full", "h2o"):
            ratio = batched[name]["tok_s"] / single[name]["tok_s"]
            print(f"{name}: batched/one-by-one tok/s = {ratio:.2f}x")


if __name__ == "__main__":
    main()
