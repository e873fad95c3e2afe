"""One tiny ``python -m llamahome.eval -m`` sweep per test session, shared by the eval tests and
the notebook test (a real Hydra multirun in a subprocess: per-job rows + the sweep aggregate)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

# Small on purpose: tiny random Llama, 48 tokens (16 prefilled), 2 policies x 2 budgets + full.
SWEEP_ARGS = (
    "model=tiny",
    "task.length=48",
    "task.prefix=16",
    "task.show_progress=false",
    "cache=full,h2o,window,sink",
    "cache.budget_ratio=0.2,0.5",
)
_SWEEPS: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}


def subprocess_env() -> dict[str, str]:
    """The test environment for child processes: offline, one BLAS thread (2 shared cores)."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
    )
    env.pop("WANDB_API_KEY", None)
    return env


def run_eval(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m llamahome.eval <args>`` in the repo, captured."""
    return subprocess.run(
        [sys.executable, "-m", "llamahome.eval", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_sweep(root: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the tiny sweep once per session (under `root` the first time); return its dir."""
    if "tiny" not in _SWEEPS:
        sweep_dir = root / "sweep"
        proc = run_eval("-m", *SWEEP_ARGS, "logger=wandb", f"hydra.sweep.dir={sweep_dir}")
        _SWEEPS["tiny"] = (sweep_dir, proc)
    return _SWEEPS["tiny"]
