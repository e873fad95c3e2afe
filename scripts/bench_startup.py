"""Start-up: how long ``--help`` and a config error take, against ``import torch`` and Hydra.

Every command runs as a fresh ``python`` process (what a user waits for), from a temporary
directory (a config error may create its run dir there, never in the repo). The rounds are
interleaved: each round runs every command once, so load from other processes hits all alike.
Reported: the median wall time over rounds, its spread (min-max), the median CPU time of the
process (user + sys: start-up is single-threaded, so on a busy machine this is close to what the
wall time would be on a quiet one), and the target (issue #18), judged on wall time:

- ``--help`` of every entry point <= 1.0 s;
- a config error (``optim.lr=-1``, ``cache.budget_ratio=2``, an unknown key) <= 2.0 s;
- floor: ``python -c "import torch"``, which none of these should pay;
- baseline: Hydra's own ``--help`` on the same config (a plain ``@hydra.main`` app).

    python scripts/bench_startup.py               # 5 rounds
    python scripts/bench_startup.py --rounds 9
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELP_TARGET_S = 1.0
ERROR_TARGET_S = 2.0
CONF_DIR = Path(__file__).resolve().parents[1] / "llamahome" / "conf"

# Hydra's own app help for conf/train.yaml: what a plain @hydra.main entry point prints.
PLAIN_HYDRA_HELP = f"""
import hydra

@hydra.main(version_base="1.3", config_path={str(CONF_DIR)!r}, config_name="train")
def main(cfg):
    pass

main()
"""


def commands() -> list[tuple[str, list[str], float | None, int]]:
    """(label, argv, target seconds or None, expected exit status)."""
    py = sys.executable
    rows: list[tuple[str, list[str], float | None, int]] = [
        ('floor: python -c "import torch"', [py, "-c", "import torch"], None, 0),
        ("baseline: Hydra's own train --help", [py, "-c", PLAIN_HYDRA_HELP, "--help"], None, 0),
    ]
    for entry in ("train", "eval", "generate", "chat", "serve"):
        rows.append((f"{entry} --help", [py, "-m", f"llamahome.{entry}", "--help"],
                     HELP_TARGET_S, 0))
    for label, entry, override in (
        ("train optim.lr=-1", "train", "optim.lr=-1"),
        ("train cache.budget_ratio=2", "train", "cache.budget_ratio=2"),
        ("train optim.lrr=1 (unknown key)", "train", "optim.lrr=1"),
        ("generate cache.budget_ratio=2", "generate", "cache.budget_ratio=2"),
        ("eval cache=nosuch (unknown option)", "eval", "cache=nosuch"),
    ):
        rows.append((label, [py, "-m", f"llamahome.{entry}", override], ERROR_TARGET_S, 2))
    return rows


def run_once(argv: list[str], cwd: str, expected: int) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh process; its exit status must be the expected one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LLAMAHOME_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != expected:
        raise SystemExit(
            f"{' '.join(argv[-2:])} exited {proc.returncode}, expected {expected}:\n"
            f"{proc.stderr[-2000:]}"
        )
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    args = parser.parse_args()

    rows = commands()
    wall: dict[str, list[float]] = {label: [] for label, *_ in rows}
    cpu: dict[str, list[float]] = {label: [] for label, *_ in rows}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as cwd:
        for _label, argv, _target, code in rows:  # warm the page cache and .pyc files
            run_once(argv, cwd, code)
        for round_ in range(args.rounds):
            for label, argv, _target, code in rows:
                seconds, cpu_seconds = run_once(argv, cwd, code)
                wall[label].append(seconds)
                cpu[label].append(cpu_seconds)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    floor = statistics.median(wall[rows[0][0]])
    width = max(len(label) for label, *_ in rows)
    print(f"\n{'command':<{width}}  wall s  min-max s  cpu s  x torch import  target     met")
    for label, _argv, target, _code in rows:
        median = statistics.median(wall[label])
        spread = f"{min(wall[label]):.2f}-{max(wall[label]):.2f}"
        goal = f"<= {target:.1f}" if target is not None else "-"
        met = "-" if target is None else ("met" if median <= target else "MISSED")
        print(f"{label:<{width}}  {median:6.2f}  {spread:>9}  {statistics.median(cpu[label]):5.2f}"
              f"  {median / floor:14.2f}  {goal:>6}  {met:>6}")
    print(f"\nmedian of {args.rounds} interleaved rounds, fresh processes; load average "
          f"{' '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{' '.join(f'{x:.2f}' for x in load_after)} after ({os.cpu_count()} cores)")

if __name__ == "__main__":
    main()
