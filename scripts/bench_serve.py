"""Benchmark ``python -m llamahome.serve`` against ``transformers serve`` and today's server.

Every server is a real subprocess on 127.0.0.1 (a free port, one torch thread), called with the
official openai client; servers that are compared run in the same process run, interleaved
round by round. Workloads (``--workloads``, all by default) and their targets (issue #16):

  w1     8 concurrent ~600-token chats, 48 new tokens, greedy: output tokens/s >= 1.0x
         ``transformers serve --continuous-batching``; greedy text identical to one at a time.
  w4     8 chats arriving 0.5 s apart, 64 new tokens: mean latency <= 0.7x today's server (the
         engine before continuous batching, run from git ``--today-ref``) and <= the peer's.
  fixed  serve.kv_memory = what 4 full-cache 2k-token requests need; 16 such requests with the
         full cache, then with h2o at 20%: peak concurrency >= 4x, aggregate tokens/s >= 3x,
         peak RSS of each server.
  ttft   time to first token of a short chat sent while a 4k-token prompt prefills, vs alone:
         <= 2x.

    python scripts/bench_serve.py                        # smollm2, every workload
    python scripts/bench_serve.py --workloads w1,w4      # some of them
    python scripts/bench_serve.py --quick                # tiny random model, small sizes
    python scripts/bench_serve.py --no-peer --today-ref none

The peer runs when ``transformers serve`` is installed (it ships with transformers 5.x; it needs
fastapi and uvicorn, which LlamaHome installs). Machine load is printed beside the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
TODAY_REF = "155867d"  # main before continuous batching (issue #16): the W4 baseline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess: started, asked, measured (peak RSS), stopped."""

    def __init__(self, name: str, cmd: list[str], env: dict, port: int) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited: {self.proc.stderr.read().decode()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            self.stop()
            raise SystemExit(f"{name} did not start within 600 s")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                                    timeout=3600)
        self.model = self.client.models.list().data[0].id

    def peak_rss_mib(self) -> float:
        """VmHWM: the process's peak resident memory."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def env_for(threads: int, pythonpath: Path = REPO) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env.pop("LLAMAHOME_API_KEY", None)
    return env


def ours(args, *overrides: str, code: Path = REPO, name: str = "llamahome") -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "llamahome.serve", f"model={args.model_dir}", "cache=full",
           f"serve.port={port}", "serve.max_queue=256", "serve.log_level=warning",
           "print_config=false", f"hydra.run.dir={tempfile.mkdtemp(prefix='bench_serve')}",
           *overrides]
    return Server(name, cmd, env_for(args.threads, code), port)


def today(args) -> Server | None:
    """The server as it was at ``--today-ref`` (its code extracted from git into a temp dir)."""
    if args.today_ref == "none":
        return None
    target = Path(tempfile.mkdtemp(prefix="llamahome-today"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.today_ref, "llamahome"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return ours(args, "serve.max_batch_size=8", code=target, name=f"today ({args.today_ref})")


def peer(args) -> Server | None:
    """``transformers serve --continuous-batching`` on the same weights, or None if absent."""
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which(
        "transformers")
    if args.no_peer or exe is None:
        print("  (peer skipped: transformers serve not found or --no-peer)")
        return None
    port = free_port()
    cmd = [exe, "serve", "--continuous-batching", "--device", "cpu", "--attn-implementation",
           "sdpa", "--port", str(port), "--host", "127.0.0.1", "--log-level", "warning",
           "--cb-num-blocks", str(args.peer_blocks), str(args.model_dir)]
    return Server("transformers serve", cmd, env_for(args.threads), port)


def prompt_text(chars: int, i: int) -> str:
    """A long, deterministic request, different for each i (stdlib docs as the text)."""
    import json
    import textwrap

    text = textwrap.dedent((json.__doc__ or "") + (textwrap.__doc__ or "") + (os.__doc__ or ""))
    text = (text * (1 + chars // max(1, len(text))))[i * 37 :]
    return f"Request {i}. Summarise this text in one sentence.\n\n{text[:chars]}"


def prompt_tokens(args, tokens: int, i: int) -> str:
    """A prompt of about `tokens` tokens for the served model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    ids = tok(prompt_text(tokens * 8, i), add_special_tokens=False)["input_ids"][:tokens]
    return tok.decode(ids)


def chat(server: Server, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    """One streamed chat; returns latency, time to first token, tokens and text."""
    start = time.perf_counter()
    first, pieces, usage = None, [], None
    stream = server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra or None,
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage else len(pieces)
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens,
            "text": "".join(pieces)}


def concurrent(server: Server, jobs: list[tuple[float, str, int, dict | None]]) -> dict:
    """Send (delay, prompt, max_tokens, extra) jobs at their delays; aggregate the answers."""
    start = time.perf_counter()

    def run(job):
        delay, prompt, max_tokens, extra = job
        time.sleep(max(0.0, start + delay - time.perf_counter()))
        return chat(server, prompt, max_tokens, extra)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    wall = time.perf_counter() - start
    return {"wall": wall, "results": results, "tok_s": sum(r["tokens"] for r in results) / wall,
            "latency": statistics.mean(r["latency"] for r in results),
            "ttft": statistics.mean(r["ttft"] for r in results)}


def verdict(ratio: float, target: float, higher: bool) -> str:
    met = ratio >= target if higher else ratio <= target
    sign = ">=" if higher else "<="
    return f"{ratio:.2f}x (target {sign} {target}x: {'met' if met else 'MISSED'})"


def load() -> str:
    return "load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


# ---- workloads ---------------------------------------------------------------------------------
def w1(args) -> None:
    jobs = [(0.0, prompt_text(args.w1_chars, i), args.w1_tokens, None) for i in range(8)]
    servers = [s for s in (ours(args), peer(args)) if s]
    try:
        alone = [chat(servers[0], p, n)["text"] for _, p, n, _ in jobs]
        runs = {s.name: [] for s in servers}
        for _ in range(args.rounds):
            for s in servers:  # interleaved
                runs[s.name].append(concurrent(s, jobs))
                r = runs[s.name][-1]
                print(f"  w1 {s.name}: {r['tok_s']:.2f} tok/s, mean TTFT {r['ttft']:.1f} s, "
                      f"wall {r['wall']:.1f} s | {load()}", flush=True)
    finally:
        for s in servers:
            s.stop()
    print(f"\nW1: 8 concurrent chats of ~{args.w1_chars // 4} tokens, {args.w1_tokens} new, "
          "greedy")
    print(f"{'server':<22} {'tok/s':>7} {'mean TTFT s':>12} {'mean latency s':>15}")
    best = {}
    for name, rs in runs.items():
        best[name] = statistics.median(r["tok_s"] for r in rs)
        print(f"{name:<22} {best[name]:7.2f} {statistics.median(r['ttft'] for r in rs):12.1f} "
              f"{statistics.median(r['latency'] for r in rs):15.1f}")
    batched = [r["text"] for r in runs["llamahome"][0]["results"]]
    same = sum(a == b for a, b in zip(alone, batched, strict=True))
    print(f"greedy text identical to one at a time: {same}/8 "
          f"({'met' if same == 8 else 'MISSED'})")
    if "transformers serve" in best:
        ratio = best["llamahome"] / best["transformers serve"]
        print(f"W1 tokens/s llamahome / transformers serve = {verdict(ratio, 1.0, True)}")


def w4(args) -> None:
    jobs = [(0.5 * i, prompt_text(args.w4_chars, i), args.w4_tokens, None) for i in range(8)]
    servers = [s for s in (ours(args), today(args), peer(args)) if s]
    runs = {s.name: [] for s in servers}
    try:
        for s in servers:
            chat(s, prompt_text(200, 99), 2)  # warm-up
        for _ in range(args.rounds):
            for s in servers:
                runs[s.name].append(concurrent(s, jobs))
                r = runs[s.name][-1]
                print(f"  w4 {s.name}: mean latency {r['latency']:.1f} s, {r['tok_s']:.2f} "
                      f"tok/s | {load()}", flush=True)
    finally:
        for s in servers:
            s.stop()
    print(f"\nW4: 8 chats of ~{args.w4_chars // 4} tokens arriving 0.5 s apart, "
          f"{args.w4_tokens} new")
    print(f"{'server':<22} {'mean latency s':>15} {'mean TTFT s':>12} {'tok/s':>7}")
    lat = {}
    for name, rs in runs.items():
        lat[name] = statistics.median(r["latency"] for r in rs)
        print(f"{name:<22} {lat[name]:15.1f} {statistics.median(r['ttft'] for r in rs):12.1f} "
              f"{statistics.median(r['tok_s'] for r in rs):7.2f}")
    for name, target in ((f"today ({args.today_ref})", 0.7), ("transformers serve", 1.0)):
        if name in lat:
            ratio = lat["llamahome"] / lat[name]
            print(f"W4 mean latency llamahome / {name} = {verdict(ratio, target, False)}")


def fixed(args) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    pool = 4 * per_token * args.fixed_len + per_token * args.prefill_chunk
    text = prompt_tokens(args, args.fixed_len - args.fixed_tokens - 40, 0)  # 40: the template
    caches = {"full": {"policy": "full"},
              "h2o 20%": {"policy": "h2o", "budget": 0.2, "min_tokens": 0}}
    rows = {}
    for name, kv in caches.items():
        server = ours(args, f"serve.kv_memory={pool}", f"serve.prefill_chunk={args.prefill_chunk}",
                      "serve.max_batch_size=64")
        peak = {"running": 0, "decoding": 0, "held": 0}
        done = threading.Event()

        def watch(server=server, peak=peak, done=done):
            while not done.wait(0.2):
                h = server.health()
                peak["running"] = max(peak["running"], h["running"])
                peak["decoding"] = max(peak["decoding"], h.get("decoding", 0))
                peak["held"] = max(peak["held"], h["kv_cache"]["peak_bytes_held"])

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            jobs = [(0.0, f"{i}. {text}", args.fixed_tokens, {"kv_cache": kv, "ignore_eos": True})
                    for i in range(args.fixed_requests)]
            r = concurrent(server, jobs)
        finally:
            done.set()
            thread.join()
            rows[name] = {**peak, "tok_s": r["tok_s"], "wall": r["wall"],
                          "rss": server.peak_rss_mib()}
            server.stop()
        print(f"  fixed {name}: {rows[name]} | {load()}", flush=True)
    print(f"\nFixed memory: pool {pool / 2**20:.0f} MiB (4 full-cache {args.fixed_len}-token "
          f"requests), {args.fixed_requests} requests, {args.fixed_tokens} new tokens each")
    print(f"{'cache':<9} {'peak admitted':>13} {'peak decoding':>13} {'tok/s':>7} {'wall s':>7} "
          f"{'peak KV MiB':>11} {'peak RSS MiB':>12}")
    for name, r in rows.items():
        print(f"{name:<9} {r['running']:13d} {r['decoding']:13d} {r['tok_s']:7.2f} "
              f"{r['wall']:7.1f} {r['held'] / 2**20:11.1f} {r['rss']:12.0f}")
    full, h2o = rows["full"], rows["h2o 20%"]
    more = h2o["running"] / max(1, full["running"])
    print(f"fixed memory: concurrency h2o/full = {verdict(more, 4.0, True)}")
    print(f"fixed memory: tokens/s h2o/full = {verdict(h2o['tok_s'] / full['tok_s'], 3.0, True)}")


def ttft(args) -> None:
    long_prompt = prompt_tokens(args, args.ttft_long - 40, 1)  # 40: the chat template
    short = "What is a Python list? Answer in one sentence."
    chunk = f"serve.prefill_chunk={args.prefill_chunk}"
    # Ours twice: with the full cache (as the peer), and with the server's default cache
    # (h2o, floor min_tokens=1024), whose long prompt never holds more than ~1k tokens.
    servers = [ours(args, chunk), ours(args, chunk, "cache=h2o", name="llamahome cache=h2o"),
               peer(args)]
    out = {}
    try:
        for s in [s for s in servers if s]:
            chat(s, short, 2)  # warm-up
            alone = [chat(s, short, 4)["ttft"] for _ in range(3)]
            prefill = chat(s, long_prompt, 1)["ttft"]  # the long prompt's prefill, alone
            behind = []
            for at in (0.25, 0.5, 0.75):  # early, middle and late in the long prefill
                with ThreadPoolExecutor(1) as pool:
                    first = pool.submit(chat, s, long_prompt, 4)
                    time.sleep(at * prefill)
                    behind.append(chat(s, short, 4)["ttft"])
                    first.result()
            out[s.name] = (statistics.median(alone), statistics.median(behind))
            print(f"  ttft {s.name}: alone {[round(a, 2) for a in alone]}, behind "
                  f"{[round(b, 2) for b in behind]} | {load()}", flush=True)
    finally:
        for s in [s for s in servers if s]:
            s.stop()
    print(f"\nTTFT of a short chat behind a ~{args.ttft_long}-token prefill "
          f"(prefill_chunk={args.prefill_chunk})")
    print(f"{'server':<22} {'alone s':>8} {'behind s':>9} {'ratio':>6}")
    for name, (a, b) in out.items():
        print(f"{name:<22} {a:8.2f} {b:9.2f} {b / a:6.2f}")
    for name in ("llamahome", "llamahome cache=h2o"):
        a, b = out[name]
        print(f"TTFT behind a long prefill / alone, {name} = {verdict(b / a, 2.0, False)}")


def model_dir(args) -> Path:
    """A Hugging Face directory both servers load (smollm2: the converted GGUF)."""
    if args.quick:
        from llamahome import load_model

        path = Path(tempfile.mkdtemp(prefix="bench-tiny"))
        model, tokenizer = load_model("tiny", attn_implementation="sdpa")
        tokenizer.chat_template = (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}"
        )
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path
    if Path(args.model).is_dir():
        return Path(args.model)
    from llamahome.model.gguf import converted_gguf_dir
    from llamahome.model.load import resolve_location, resolve_spec

    spec = resolve_spec(args.model)
    where = resolve_location(spec.pretrained, spec)
    return Path(converted_gguf_dir(where, spec) if spec.gguf_file else where)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="conf/model name or HF directory")
    parser.add_argument("--workloads", default="w1,w4,fixed,ttft")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per workload")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    parser.add_argument("--today-ref", default=TODAY_REF, help="git ref of today's server, or none")
    parser.add_argument("--peer-blocks", type=int, default=64, help="peer KV blocks (256 tokens)")
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny random model, small sizes")
    args = parser.parse_args()
    sizes = dict(w1_chars=2400, w1_tokens=48, w4_chars=300, w4_tokens=64, fixed_len=2048,
                 fixed_tokens=32, fixed_requests=16, ttft_long=4096)
    if args.quick:
        sizes.update(w1_chars=600, fixed_len=512, ttft_long=1500)
    for key, value in sizes.items():
        setattr(args, key, value)
    args.model_dir = model_dir(args)
    print(f"model {args.model_dir} | threads {args.threads} | {load()}", flush=True)
    workloads = {"w1": w1, "w4": w4, "fixed": fixed, "ttft": ttft}
    for name in args.workloads.split(","):
        workloads[name.strip()](args)


if __name__ == "__main__":
    main()
