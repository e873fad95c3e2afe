"""Our cache policies against NVIDIA kvpress's presses, on the same prompts, weights and scoring.

kvpress is not a dependency: it pins an older transformers, so it lives in a venv of its own
(``python3 -m venv /work/venvs/kvpress``, then ``pip install torch==2.13.0`` first, then
``pip install kvpress==0.5.5``). This script runs in both venvs; only the ``kvpress`` step
imports kvpress, and only the ``prompts`` / ``ours`` steps import llamahome:

    # 1. our venv: the prompts (our RULER-style / passkey generators, seeded) and our policies
    .venv/bin/python scripts/bench_kvpress.py prompts --set needle --out /tmp/kvb/needle.jsonl
    .venv/bin/python scripts/bench_kvpress.py ours /tmp/kvb/needle.jsonl \\
        --policies full,keydiff,knorm,snapkv,tova,h2o --keep 0.2,0.5
    # 2. the kvpress venv: its presses on the same token ids, then the table side by side
    /work/venvs/kvpress/bin/python scripts/bench_kvpress.py kvpress /tmp/kvb/needle.jsonl \\
        --presses none,snapkv,knorm,tova,keydiff,kvzip,expected_attention --keep 0.2,0.5

Both sides see exactly the same token ids (the context and the question tokenized apart by our
``protocol.encode``, written to the JSONL), the same SmolLM2-135M weights (our converted
safetensors under ``~/.cache/llamahome/converted/``), fp32, one thread, batch 1, greedy, the
same stop tokens and answer lengths, and the same scoring (``score`` below: RULER's
``string_match_all`` for the RULER-style prompts, the first number for passkey; it mirrors
``llamahome.evaluation.ruler_data.string_match_all`` and ``passkey.is_correct``).

The protocol is kvpress's: the context is prefilled and compressed, the question follows
uncompressed. kvpress's presses compress at prefill only (the question and the answer are
appended and never evicted); ours hold the budget while decoding too (an answer token evicts a
context token). ``ours --pin-answer`` pins the answer tokens as well, which is kvpress's
semantics exactly; the harness check is our ``full`` against kvpress's ``none``.
A keep ratio k is ``cache.budget_ratio=k`` for us and ``compression_ratio=1-k`` for kvpress
(both keep ``int(k * context)`` context tokens); the achieved share of every token seen that
the cache holds at the end (``keep`` column) is measured on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_SUFFIX = {"ours": ".ours.jsonl", "kvpress": ".kvpress.jsonl"}
_NUMBER = re.compile(r"\d+")


def score(kind: str, text: str, answers: list[str]) -> float:
    """RULER's string_match_all (share of references in the answer) or passkey's first number."""
    if kind == "passkey":
        match = _NUMBER.search(text)
        return float(match is not None and match.group() == answers[0])
    if not answers:
        return 0.0
    low = text.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def converted_dir() -> Path:
    """Our converted SmolLM2 safetensors directory (made once by ``load_model('smollm2')``)."""
    root = Path(os.environ.get("LLAMAHOME_CACHE", Path.home() / ".cache" / "llamahome"))
    found = sorted((root / "converted").glob("SmolLM2-135M-Instruct*"))
    if not found:
        raise SystemExit(
            f"error: no converted SmolLM2 under {root / 'converted'}: run "
            "`.venv/bin/python -c \"import llamahome; llamahome.load_model('smollm2')\"` once."
        )
    return found[-1]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL (the directory is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---- step 1 (our venv): the prompts -------------------------------------------------------------
PROMPT_SETS = {
    # The four needle subtasks (the "needle prompts").
    "needle": ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"),
    "ruler": (
        "niah_single",
        "niah_multikey",
        "niah_multivalue",
        "niah_multiquery",
        "vt",
        "cwe",
        "fwe",
    ),
}


def make_prompts(args: argparse.Namespace) -> None:
    """Generate prompts with our seeded generators; write context and question token ids."""
    from llamahome import load_model
    from llamahome.evaluation.passkey import QUESTION, make_trials
    from llamahome.evaluation.protocol import _stop_ids as stop_ids
    from llamahome.evaluation.protocol import encode, split_prompt
    from llamahome.evaluation.ruler_data import MAX_NEW_TOKENS, make_sample, token_counter

    model, tokenizer = load_model("smollm2")
    stops = sorted(stop_ids(model, tokenizer))
    rows: list[dict[str, Any]] = []
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.set == "passkey":
        for trial in make_trials(tokenizer, lengths, (0.1, 0.5, 0.9), args.samples, 5, args.seed):
            context, question = encode(tokenizer, split_prompt(trial.prompt, QUESTION), False)
            rows.append(
                {
                    "id": f"passkey@{trial.length}_d{trial.depth:g}/{len(rows)}",
                    "kind": "passkey",
                    "subtask": "passkey",
                    "context_ids": context,
                    "question_ids": question,
                    "answers": [trial.key],
                    "max_new_tokens": 8,
                    "stop_ids": stops,
                }
            )
    else:
        count = token_counter(tokenizer)
        for subtask in PROMPT_SETS[args.set]:
            for length in lengths:
                for i in range(args.samples):
                    sample = make_sample(subtask, count, length, args.seed, i)
                    context, question = encode(tokenizer, sample.prompt, False)
                    rows.append(
                        {
                            "id": f"{subtask}@{length}/{i}",
                            "kind": "ruler",
                            "subtask": subtask,
                            "context_ids": context,
                            "question_ids": question,
                            "answers": list(sample.answers),
                            "max_new_tokens": MAX_NEW_TOKENS[subtask],
                            "stop_ids": stops,
                        }
                    )
    write_jsonl(Path(args.out), rows)
    print(f"{len(rows)} prompts -> {args.out}")


# ---- step 1b (our venv): our policies ---------------------------------------------------------
def run_ours(args: argparse.Namespace) -> None:
    """Score our policies on the prompts (batch 1, the question pinned, greedy)."""
    import torch

    from llamahome import load_model
    from llamahome.kvcache.spec import CacheSpec, keep_ratio, pinned

    torch.set_num_threads(1)
    prompts = read_jsonl(Path(args.prompts))
    # model=<a kv_scorer run> carries the scorer cache=learned needs; the weights are SmolLM2's.
    model, _ = load_model(args.model)
    model.eval()
    out = []
    for policy in args.policies.split(","):
        for keep in [1.0] if policy == "full" else [float(k) for k in args.keep.split(",")]:
            spec = CacheSpec(
                policy=policy, budget_ratio=None if policy == "full" else keep, min_tokens=0
            )
            for p in prompts:
                start = time.process_time()
                cache = spec.build(model.config, seq_len=len(p["context_ids"]))
                text = _greedy(model, cache, p, pinned, args.pin_answer)
                seconds = time.process_time() - start
                out.append(_row("ours", policy, keep, p, text, keep_ratio(cache), seconds))
            _progress(out[-len(prompts) :], policy, keep)
    path = Path(args.prompts).with_suffix(RESULTS_SUFFIX["ours"])
    write_jsonl(path, out)
    print(f"-> {path}  (load {os.getloadavg()[0]:.2f})")


def _greedy(model: Any, cache: Any, prompt: dict[str, Any], pinned: Any, pin_answer: bool) -> str:
    """Prefill the context, then the question inside ``pinned`` (ours) and decode greedily.

    ``pin_answer`` holds the answer tokens on top of the budget too (kvpress's decoding); else
    they compete for it (our protocol).
    """
    import contextlib

    import torch

    ids = torch.tensor([prompt["context_ids"]])
    question = torch.tensor([prompt["question_ids"]])
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        with pinned(cache):
            out = model(input_ids=question, cache=cache, use_cache=True, logits_to_keep=1)
        new: list[int] = []
        for _ in range(prompt["max_new_tokens"]):
            token = int(out.logits[0, -1].argmax())
            if token in prompt["stop_ids"]:
                break
            new.append(token)
            if len(new) == prompt["max_new_tokens"]:
                break
            with pinned(cache) if pin_answer else contextlib.nullcontext():
                out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
    return _decode(new)


_TOKENIZER: Any = None


def _decode(ids: list[int]) -> str:
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        _TOKENIZER = AutoTokenizer.from_pretrained(str(converted_dir()))
    return _TOKENIZER.decode(ids, skip_special_tokens=True)


def _row(
    side: str,
    method: str,
    keep: float,
    prompt: dict[str, Any],
    text: str,
    achieved: float,
    seconds: float,
) -> dict[str, Any]:
    return {
        "side": side,
        "method": method,
        "keep": keep,
        "id": prompt["id"],
        "subtask": prompt["subtask"],
        "answer": text,
        "score": score(prompt["kind"], text, prompt["answers"]),
        "achieved_keep": achieved,
        "seconds": seconds,
    }


def _progress(rows: list[dict[str, Any]], method: str, keep: float) -> None:
    mean = statistics.fmean(r["score"] for r in rows)
    secs = statistics.fmean(r["seconds"] for r in rows)
    print(f"  {method:>20} keep {keep:.0%}: {mean:.3f} ({secs:.1f} s/prompt)", flush=True)


# ---- step 2 (the kvpress venv): kvpress's presses -----------------------------------------------
def _press(name: str, compression_ratio: float) -> Any:
    import kvpress

    if name == "none":
        return None
    makers = {
        "snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r),
        "knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
        "tova": lambda r: kvpress.TOVAPress(compression_ratio=r),
        "keydiff": lambda r: kvpress.KeyDiffPress(compression_ratio=r),
        "kvzip": lambda r: kvpress.KVzipPress(compression_ratio=r),
        "expected_attention": lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r),
        "streaming_llm": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
        "pyramidkv": lambda r: kvpress.PyramidKVPress(compression_ratio=r),
        "adakv_snapkv": lambda r: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=r)),
        "adakv_expected_attention": lambda r: kvpress.AdaKVPress(
            kvpress.ExpectedAttentionPress(compression_ratio=r)
        ),
    }
    if name not in makers:
        raise SystemExit(f"error: unknown press {name!r}: choose from none, {', '.join(makers)}")
    return makers[name](compression_ratio)


def run_kvpress(args: argparse.Namespace) -> None:
    """Score kvpress's presses on the prompts, then print the table side by side with ours."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(1)
    prompts = read_jsonl(Path(args.prompts))
    model = AutoModelForCausalLM.from_pretrained(
        str(converted_dir()), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    out = []
    for name in args.presses.split(","):
        for keep in [1.0] if name == "none" else [float(k) for k in args.keep.split(",")]:
            for p in prompts:
                press = _press(name, round(1.0 - keep, 6))
                cache = DynamicCache()
                ids = torch.tensor([p["context_ids"]])
                start = time.process_time()
                with torch.no_grad():
                    with press(model) if press is not None else contextlib.nullcontext():
                        model.model(input_ids=ids, past_key_values=cache)
                    kept = cache.get_seq_length()
                    text, added = _kvpress_answer(model, cache, p)
                seconds = time.process_time() - start
                seen = len(p["context_ids"]) + added
                out.append(_row("kvpress", name, keep, p, text, (kept + added) / seen, seconds))
            _progress(out[-len(prompts) :], name, keep)
    path = Path(args.prompts).with_suffix(RESULTS_SUFFIX["kvpress"])
    write_jsonl(path, out)
    print(f"-> {path}  (load {os.getloadavg()[0]:.2f})")
    print_table(Path(args.prompts))


def _kvpress_answer(model: Any, cache: Any, prompt: dict[str, Any]) -> tuple[str, int]:
    """kvpress's ``generate_answer``: the question after the context, positions continued.

    Returns the text and the tokens added to the cache (question + answer).
    """
    import torch

    context_length = len(prompt["context_ids"])
    question = torch.tensor([prompt["question_ids"]])
    position_ids = torch.arange(context_length, context_length + question.shape[1])[None]
    out = model(
        input_ids=question, past_key_values=cache, position_ids=position_ids, logits_to_keep=1
    )
    position = position_ids[:, -1:] + 1
    new: list[int] = []
    for _ in range(prompt["max_new_tokens"]):
        token = int(out.logits[0, -1].argmax())
        if token in prompt["stop_ids"]:
            break
        new.append(token)
        if len(new) == prompt["max_new_tokens"]:
            break
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=position)
        position = position + 1
    return _decode(new), question.shape[1] + len(new)


# ---- the table ------------------------------------------------------------------------------
def print_table(prompts_path: Path) -> None:
    """Mean score per method and keep ratio, ours and kvpress's side by side (and per subtask)."""
    rows = []
    for side, suffix in RESULTS_SUFFIX.items():
        path = prompts_path.with_suffix(suffix)
        if path.is_file():
            rows += read_jsonl(path)
        else:
            print(f"({side}: no {path.name} yet)")
    if not rows:
        return
    keeps = sorted({r["keep"] for r in rows})
    cells: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["side"], r["method"], r["keep"]), []).append(r)
    methods = list(dict.fromkeys((r["side"], r["method"]) for r in rows))
    n = len({r["id"] for r in rows})
    print(
        f"\nMean score on {n} prompts ({prompts_path.name}); achieved keep in brackets, "
        "s/prompt = CPU seconds, 1 thread (noisy)"
    )
    head = "| side | method | " + " | ".join(f"keep {k:.0%}" for k in keeps) + " | s/prompt |"
    print(head)
    print("|---|---|" + "---:|" * (len(keeps) + 1))
    for side, method in methods:
        values, secs = [], []
        for k in keeps:
            got = cells.get((side, method, k))
            if not got:
                values.append("")
                continue
            mean = statistics.fmean(r["score"] for r in got)
            achieved = statistics.fmean(r["achieved_keep"] for r in got)
            values.append(f"{mean:.3f} ({achieved:.0%})")
            secs += [r["seconds"] for r in got]
        sec = f"{statistics.fmean(secs):.2f}" if secs else ""
        print(f"| {side} | {method} | " + " | ".join(values) + f" | {sec} |")
    subtasks = list(dict.fromkeys(r["subtask"] for r in rows))
    if len(subtasks) > 1:
        print("\nPer subtask (mean score):")
        print("| side | method | keep | " + " | ".join(subtasks) + " |")
        print("|---|---|---:|" + "---:|" * len(subtasks))
        for (side, method, k), got in sorted(cells.items(), key=lambda c: (c[0][2], c[0][0])):
            per = []
            for s in subtasks:
                scores = [r["score"] for r in got if r["subtask"] == s]
                per.append(f"{statistics.fmean(scores):.2f}" if scores else "")
            print(f"| {side} | {method} | {k:.0%} | " + " | ".join(per) + " |")


def main(argv: list[str] | None = None) -> None:
    """Parse the step and run it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("prompts", help="our venv: write the prompts JSONL")
    p.add_argument("--set", choices=[*PROMPT_SETS, "passkey"], default="needle")
    p.add_argument("--lengths", default="1024", help="comma-separated prompt lengths (tokens)")
    p.add_argument("--samples", type=int, default=4, help="prompts per subtask and length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    o = steps.add_parser("ours", help="our venv: score our policies")
    o.add_argument("prompts")
    o.add_argument("--policies", default="full,keydiff,knorm,snapkv,tova,h2o")
    o.add_argument(
        "--model", default="smollm2",
        help="smollm2, or a `experiment=kv_scorer` run dir (for --policies ...,learned)",
    )
    o.add_argument("--keep", default="0.2,0.5", help="comma-separated keep ratios")
    o.add_argument(
        "--pin-answer",
        action="store_true",
        help="hold the answer tokens on top of the budget (kvpress's decoding)",
    )
    k = steps.add_parser("kvpress", help="the kvpress venv: score presses, print the table")
    k.add_argument("prompts")
    k.add_argument("--presses", default="none,snapkv,knorm,tova,keydiff,kvzip")
    k.add_argument("--keep", default="0.2,0.5", help="comma-separated keep ratios")
    t = steps.add_parser("table", help="print the side-by-side table of finished steps")
    t.add_argument("prompts")
    args = parser.parse_args(argv)
    if args.step == "prompts":
        make_prompts(args)
    elif args.step == "ours":
        run_ours(args)
    elif args.step == "kvpress":
        run_kvpress(args)
    else:
        print_table(Path(args.prompts))


if __name__ == "__main__":
    sys.exit(main())
