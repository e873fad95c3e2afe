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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import time
from functools import partial

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="conf/model name (random init)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
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
