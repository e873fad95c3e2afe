"""Training-loop overhead: LlamaLitModule + Lightning Trainer against a bare PyTorch loop.

Both loops train the same model (restored to the same initial weights before every run) on the
same batches with the same optimizer (AdamW), precision and number of steps, in one process.
Each is timed from the start of step ``--warmup`` to the end of the last step (batch fetch, hooks,
logging and optimizer included; Trainer construction and the first steps excluded), and the two
alternate for ``--rounds`` rounds so that load from other processes hits both alike. The figure
is the median over rounds of Lightning tokens/s over bare tokens/s, each round's two runs back to
back (target >= 0.97). Tokens/s of a run come from its median step time, which another process
grabbing the core for a moment does not move; the same ratio from total times is printed too.

One torch thread by default: on a shared 2-core machine, OpenMP threads that spin-wait while
another process holds a core make step times swing several-fold, which drowns a few-percent
difference (``--threads 0`` keeps torch's default).

    python scripts/bench_train.py                       # tiny Llama, 8 x 256 tokens, fp32
    python scripts/bench_train.py --precision bf16-mixed --rounds 5

``--peer litgpt``: ``python -m llamahome.train`` (the real entry point: Hydra config, Lightning
Trainer with the default callbacks and CSV logger) against ``litgpt finetune_lora``, both a
subprocess, on the embedded SmolLM2-135M (our converted safetensors, turned into litgpt's format
by litgpt's own ``convert_to_litgpt``), LoRA r=8 / alpha 16 / dropout 0.05 on every linear of the
blocks, the same alpaca JSON (pydoc answers long enough that every row is cut to the sequence
length: 4 x 160 and 4 x 512 tokens a step), fp32, 1 thread (``OMP_NUM_THREADS=1``), no data
workers, alternating for ``--rounds`` rounds (3). Ours is timed from batch start to batch start
(all the loop does: hooks, callbacks, logging, progress bar, optimizer), litgpt by its own
``iter time`` (batch fetch to loss, optimizer included). Both clocks are the process CPU time
(``--clock wall``: wall time), robust to other jobs on a shared machine. litgpt lives in its own
virtualenv (``--litgpt-venv``, default ``/work/venvs/litgpt`` or ``$LITGPT_VENV``):

    python3 -m venv /work/venvs/litgpt
    /work/venvs/litgpt/bin/pip install torch==2.13.0      # first: the CPU wheel, never CUDA
    /work/venvs/litgpt/bin/pip install litgpt requests
    python scripts/bench_train.py --peer litgpt           # 4 x 160 and 4 x 512, 3 rounds

When that virtualenv is missing the script says so and skips the peer.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def make_batches(vocab: int, steps: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """Fixed random token batches (seeded), the same for both loops."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (batch, seq), generator=gen)
        out.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        )
    return out


def loader_for(batches: list[dict[str, torch.Tensor]]) -> torch.utils.data.DataLoader:
    """A DataLoader over ready-made batches (``batch_size=None``: no re-collation)."""
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """What Lightning's precision plugin does around the forward, for the bare loop."""
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bare_loop(model, batches, optimizer_factory, precision: str, warmup: int) -> list[float]:
    """Plain PyTorch: forward, backward, step, zero_grad.

    Returns:
        Timestamps: the start of every step from ``warmup`` on, then the end of the last step.
    """
    model.train()
    optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
    stamps = []
    for index, batch in enumerate(loader_for(batches)):
        if index >= warmup:
            stamps.append(time.perf_counter())
        with autocast(precision):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    stamps.append(time.perf_counter())
    return stamps


def lightning_loop(model, batches, optimizer_factory, precision: str, warmup: int) -> list[float]:
    """LlamaLitModule.fit with a Trainer stripped of I/O (no logger, checkpoints, bars).

    Returns:
        Timestamps as ``bare_loop`` (from Lightning's batch-start and batch-end hooks).
    """
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from llamahome.training.module import LlamaLitModule

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.end = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx >= warmup:
                self.stamps.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.end = time.perf_counter()

    timer = StepTimer()
    lit = LlamaLitModule(model, optimizer=optimizer_factory, scheduler=None)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(lit, train_dataloaders=loader_for(batches))
    return [*timer.stamps, timer.end]


# ---- --peer litgpt ------------------------------------------------------------------------------
LITGPT_MODEL = "SmolLM2-135M-Instruct"
# litgpt's LoRA on what peft's target_modules (conf/peft/lora.yaml) cover: q, k, v (litgpt's fused
# qkv), o (projection) and the MLP; not the head.
LITGPT_LORA = (
    "--lora_r 8 --lora_alpha 16 --lora_dropout 0.05 --lora_query true --lora_key true "
    "--lora_value true --lora_projection true --lora_mlp true --lora_head false"
).split()
# Run inside the litgpt virtualenv: litgpt's CLI, with its iteration clock switched to process
# CPU time when asked (it times iterations with time.perf_counter).
LITGPT_DRIVER = """
import sys, time, types
import litgpt.finetune.lora as lora
if sys.argv.pop(1) == "cpu":
    lora.time = types.SimpleNamespace(perf_counter=time.process_time)
from litgpt.__main__ import main
sys.argv[0] = "litgpt"
main()
"""
ITER_TIME = re.compile(r"\| iter (\d+) step \d+ \|.*iter time: ([\d.]+) ms")


def step_times(path: str, clock: str = "cpu"):
    """A Lightning callback (built by Hydra in the train subprocess) that records step times.

    At fit end it writes the clock at every training batch start, then at the end of the last
    batch, to ``path`` as JSON. A factory, so importing this script does not import Lightning.

    Args:
        path: The JSON file to write.
        clock: ``cpu`` (process CPU time) or ``wall``.
    """
    from lightning.pytorch.callbacks import Callback

    now = time.process_time if clock == "cpu" else time.perf_counter

    class StepTimes(Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.end = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.stamps.append(now())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.end = now()

        def on_fit_end(self, trainer, pl_module) -> None:
            Path(path).write_text(json.dumps([*self.stamps, self.end]))

    return StepTimes()


def write_dataset(path: Path, records: int = 96) -> None:
    """Alpaca records with short instructions and long answers (Python's reference manual)."""
    from pydoc_data.topics import topics

    texts = [text for _, text in sorted(topics.items()) if len(text) >= 4000]
    rows = [
        {
            "instruction": f"Explain part {i // len(texts) + 1} of this Python topic.",
            "input": "",
            "output": texts[i % len(texts)][(i // len(texts)) * 500 :][:6000],
        }
        for i in range(records)
    ]
    path.write_text(json.dumps(rows))
    # Ours splits by file: a few validation records of their own (litgpt splits the main file).
    val = [{**row, "instruction": f"Summarise this topic ({i})."} for i, row in enumerate(rows[:4])]
    path.with_suffix(".val.json").write_text(json.dumps(val))


def litgpt_checkpoint(python: Path, work: Path) -> Path:
    """Our converted SmolLM2 safetensors, converted to litgpt's format by litgpt (once)."""
    from llamahome.model.load import resolve_spec, weights_location
    from llamahome.utils.paths import cache_root

    source = Path(weights_location(resolve_spec("smollm2")))
    target = cache_root() / "litgpt" / source.name
    if (target / "lit_model.pth").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(dir=cache_root()))
    for item in source.iterdir():
        (tmp / item.name).symlink_to(item)
    cmd = [str(python), "-m", "litgpt", "convert_to_litgpt", str(tmp), "--model_name", LITGPT_MODEL]
    subprocess.run(cmd, check=True, capture_output=True, cwd=work)
    (tmp / "model.safetensors").unlink()  # litgpt reads lit_model.pth; the rest are small links
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
    return target


def single_thread_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("LLAMAHOME_DEBUG", None)
    return env


def run_ours(args, seq: int, data: Path, work: Path) -> list[float]:
    """``python -m llamahome.train`` on the dataset; per-step times from `step_times`."""
    out = work / f"ours-{seq}-{time.monotonic_ns()}"
    stamps = out / "steps.json"
    steps = args.warmup + args.steps
    overrides = [
        "data=alpaca",
        f"data.path={data}",
        f"data.val_path={data.with_suffix('.val.json')}",
        f"data.max_seq_length={seq}",
        "data.batch_size=4",
        "data.max_val_samples=4",
        "peft.r=8",
        "trainer.accelerator=cpu",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "validate_before_fit=false",
        "export=false",
        "print_config=false",
        "~callbacks.sample_generation",
        f"hydra.run.dir={out}",
        "+callbacks.step_times._target_=bench_train.step_times",
        f"+callbacks.step_times.path={stamps}",
        f"+callbacks.step_times.clock={args.clock}",
    ]
    env = single_thread_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "llamahome.train", *overrides],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not stamps.is_file():
        sys.exit(f"llamahome.train failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    times = json.loads(stamps.read_text())
    shutil.rmtree(out, ignore_errors=True)
    return [b - a for a, b in zip(times, times[1:], strict=False)][args.warmup :]


def run_litgpt(args, python: Path, ckpt: Path, seq: int, data: Path, work: Path) -> list[float]:
    """``litgpt finetune_lora`` on the dataset; per-step times from its ``iter time`` lines."""
    out = work / f"litgpt-{seq}-{time.monotonic_ns()}"
    steps = args.warmup + args.steps
    cmd = [
        str(python),
        "-c",
        LITGPT_DRIVER,
        args.clock,
        "finetune_lora",
        str(ckpt),
        "--out_dir",
        str(out),
        "--precision",
        "32-true",
        *LITGPT_LORA,
        "--data",
        "JSON",
        "--data.json_path",
        str(data),
        "--data.val_split_fraction",
        "0.1",
        "--data.num_workers",
        "0",
        "--train.max_seq_length",
        str(seq),
        "--train.micro_batch_size",
        "4",
        "--train.global_batch_size",
        "4",
        "--train.max_steps",
        str(steps),
        "--train.log_interval",
        "1",
        "--train.epochs",
        "100",
        "--train.lr_warmup_steps",
        "1",
        "--train.save_interval",
        "100000",
        "--eval.interval",
        "100000",
        "--eval.max_iters",
        "1",
        "--eval.initial_validation",
        "false",
        "--eval.final_validation",
        "false",
        "--logger_name",
        "csv",
        "--seed",
        "42",
    ]
    done = subprocess.run(cmd, env=single_thread_env(), capture_output=True, text=True, cwd=work)
    found = {int(i): float(ms) / 1000 for i, ms in ITER_TIME.findall(done.stdout + done.stderr)}
    if done.returncode != 0 or len(found) < steps:
        sys.exit(f"litgpt failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return [found[i] for i in sorted(found)][args.warmup : steps]


def peer_main(args) -> None:
    """Ours (``python -m llamahome.train``) against litgpt's LoRA finetune, interleaved."""
    venv = Path(args.litgpt_venv)
    python = venv / "bin" / "python"
    check = subprocess.run([str(python), "-c", "import litgpt"], capture_output=True)
    if not python.is_file() or check.returncode != 0:
        print(
            f"litgpt is not installed in {venv}: skipping the peer. Install it in its own "
            f"virtualenv (torch first, so pip keeps the CPU wheel):\n  python3 -m venv {venv}\n"
            f"  {venv}/bin/pip install torch==2.13.0\n  {venv}/bin/pip install litgpt requests"
        )
        return
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        peer_rounds(args, python, venv, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def peer_rounds(args, python: Path, venv: Path, work: Path) -> None:
    """The interleaved rounds of `peer_main`, in the scratch directory `work`."""
    data = work / "pydoc_alpaca.json"
    write_dataset(data)
    ckpt = litgpt_checkpoint(python, work)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"# python scripts/bench_train.py --peer litgpt: SmolLM2-135M-Instruct, LoRA r=8 on every "
        f"block linear, fp32, batch 4, 1 thread, {args.steps} steps timed after {args.warmup} "
        f"warm-up, {args.rounds} rounds, {args.clock} clock; litgpt from {venv}; load {load}",
        flush=True,
    )
    results: dict[tuple[int, str], list[float]] = {}
    runners = {
        "ours": lambda seq: run_ours(args, seq, data, work),
        "litgpt": lambda seq: run_litgpt(args, python, ckpt, seq, data, work),
    }
    for round_ in range(args.rounds):
        for seq in args.seqs:
            order = ("ours", "litgpt") if (round_ + seq) % 2 == 0 else ("litgpt", "ours")
            for name in order:
                steps = runners[name](seq)
                rate = 4 * seq / statistics.median(steps)
                results.setdefault((seq, name), []).append(rate)
                load = " ".join(f"{x:.2f}" for x in os.getloadavg())
                print(
                    f"round {round_ + 1} 4x{seq} {name:6s} {rate:8.1f} tokens/s (median of "
                    f"{len(steps)} steps; load {load})",
                    flush=True,
                )
    shutil.rmtree(work, ignore_errors=True)
    print(
        "\n| batch x seq | litgpt tokens/s | ours tokens/s | ours / litgpt | per round | >= 1.0x |"
    )
    print("|---|---:|---:|---:|---|---|")
    for seq in args.seqs:
        ours, peer = results[(seq, "ours")], results[(seq, "litgpt")]
        ratios = [a / b for a, b in zip(ours, peer, strict=True)]
        median = statistics.median(ratios)
        print(
            f"| 4 x {seq} | {statistics.median(peer):.1f} | {statistics.median(ours):.1f} "
            f"| **{median:.3f}x** | {' '.join(f'{r:.3f}' for r in ratios)} "
            f"| {'met' if median >= 1.0 else 'MISSED'} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="conf/model name (random init)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--peer", choices=["litgpt"], help="compare python -m llamahome.train")
    parser.add_argument("--seqs", type=int, nargs="+", default=[160, 512], help="--peer lengths")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="--peer clock")
    parser.add_argument(
        "--litgpt-venv",
        default=os.environ.get("LITGPT_VENV", "/work/venvs/litgpt"),
        help="the virtualenv litgpt is installed in",
    )
    args = parser.parse_args()
    if args.peer:
        if args.rounds == parser.get_default("rounds"):
            args.rounds = 3
        if args.steps == parser.get_default("steps"):
            args.steps, args.warmup = 4, 2
        peer_main(args)
        return
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners
    if args.threads:
        torch.set_num_threads(args.threads)

    import lightning as L

    from llamahome.model.load import load_model

    L.seed_everything(0, verbose=False)
    model, _ = load_model(args.model, pretrained=None, dtype="float32")
    initial = copy.deepcopy(model.state_dict())
    batches = make_batches(model.config.vocab_size, args.steps, args.batch, args.seq)
    optimizer = partial(torch.optim.AdamW, lr=args.lr)
    tokens = (args.steps - args.warmup) * args.batch * args.seq
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"model={args.model} ({params:.1f}M params) batch={args.batch} seq={args.seq} "
        f"steps={args.steps} (timed {args.steps - args.warmup}) precision={args.precision} "
        f"threads={torch.get_num_threads()} rounds={args.rounds}",
        flush=True,
    )
    step_tokens = args.batch * args.seq
    rates: dict[str, list[float]] = {"bare": [], "lightning": []}  # by median step time
    totals: dict[str, list[float]] = {"bare": [], "lightning": []}  # by total timed time
    loops = {"bare": bare_loop, "lightning": lightning_loop}
    for round_ in range(args.rounds):
        # Alternate the order each round: neither loop always runs on a warmer machine.
        order = ("bare", "lightning") if round_ % 2 == 0 else ("lightning", "bare")
        for name in order:
            model.load_state_dict(initial)  # the same starting weights for every run
            stamps = loops[name](model, batches, optimizer, args.precision, args.warmup)
            steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            # The median step is robust to another process taking the core for a moment; the
            # total (all timed steps) is printed beside it.
            rates[name].append(step_tokens / statistics.median(steps))
            totals[name].append(tokens / (stamps[-1] - stamps[0]))
            print(
                f"round {round_ + 1} {name:9s} {rates[name][-1]:10.1f} tokens/s "
                f"(median step), {totals[name][-1]:10.1f} tokens/s (total)",
                flush=True,
            )
    bare, lightning = (statistics.median(rates[k]) for k in ("bare", "lightning"))
    per_round = [lit / raw for lit, raw in zip(rates["lightning"], rates["bare"], strict=True)]
    per_total = [lit / raw for lit, raw in zip(totals["lightning"], totals["bare"], strict=True)]
    print(f"bare PyTorch loop      {bare:10.1f} tokens/s (median step, median of {args.rounds})")
    print(
        f"LlamaLitModule+Trainer {lightning:10.1f} tokens/s (median step, median of {args.rounds})"
    )
    print(f"per-round ratios       {' '.join(f'{r:.3f}' for r in per_round)}")
    print(f"total-time ratios      {' '.join(f'{r:.3f}' for r in per_total)}")
    print(f"ratio by total time    {statistics.median(per_total):10.3f}  (median per round)")
    print(
        f"ratio lightning/bare   {statistics.median(per_round):10.3f}  "
        "(median of the per-round ratios; target >= 0.97)"
    )


if __name__ == "__main__":
    main()
