"""One live run per run directory, a writable run directory, and the run's history.

- :func:`lock_run_dir` takes an exclusive ``flock`` on ``<run dir>/.lock`` and writes the
  holder's PID into it. A second run in the same directory fails at once, naming the directory
  and that PID. The kernel drops a ``flock`` when its process dies (even by ``kill -9``), so a
  stale lock file never blocks anybody: the next run simply takes it over.
- :class:`RunDirGuard`, a Hydra callback (``conf/hydra/default.yaml``), does both checks
  *before* Hydra writes anything into the directory (``.hydra/``, the log file), so a refused
  run cannot overwrite the live run's ``.hydra/overrides.yaml`` either.
- :func:`append_run_record` adds one JSON line per start and per end to
  ``<run dir>/run_history.jsonl``: a resumed run continues that history instead of replacing it
  (Hydra rewrites ``.hydra/*.yaml`` on every start).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamahome.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not guarded there
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
HISTORY_FILE = "run_history.jsonl"
_RANK_VARS = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")

# Run dirs this process holds, resolved path -> open lock file (the lock lives while it is open).
_HELD: dict[str, Any] = {}


def is_launching_rank() -> bool:
    """Whether this process is global rank 0 (ranks > 0 share rank 0's run dir and its lock)."""
    return all(os.environ.get(var, "0") in ("", "0") for var in _RANK_VARS)


def check_writable(run_dir: str | os.PathLike, key: str = "hydra.run.dir") -> Path:
    """Create ``run_dir`` if needed and make sure files can be written in it.

    Args:
        run_dir: The run directory.
        key: The config key to name in the error.

    Returns:
        The directory as a ``Path``.

    Raises:
        ConfigError: The directory cannot be created (a file in the way, no permission) or is
            not writable.
    """
    path = Path(run_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"{key}={run_dir} cannot be created: {err.strerror or err} "
            f"({_blocker(path)}); choose another {key}"
        ) from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={run_dir} is not writable; choose another {key}")
    return path


def _blocker(path: Path) -> str:
    for parent in (path, *path.parents):
        if parent.exists():
            kind = "a directory" if parent.is_dir() else "a file"
            return f"{parent} is {kind}" + ("" if parent.is_dir() else " in the way")
    return "no parent exists"


def lock_run_dir(run_dir: str | os.PathLike) -> bool:
    """Take this process's exclusive lock on ``run_dir`` (kept until the process exits).

    Args:
        run_dir: The run directory (created if needed).

    Returns:
        ``True`` if the lock was taken now, ``False`` if this process already held it (or
        locking is unavailable on this platform).

    Raises:
        ConfigError: Another live process holds the directory (the message gives its PID).
    """
    path = check_writable(run_dir)
    key = str(path.resolve())
    if key in _HELD or fcntl is None:
        return False
    lock_path = path / LOCK_FILE
    # "a+": never truncate the live holder's PID before we know the lock is ours.
    file = open(lock_path, "a+")  # noqa: SIM115 - held open for the life of the run
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        file.seek(0)
        holder = (file.read().strip().split() or ["unknown"])[0]
        file.close()
        raise ConfigError(
            f"run dir {path} is in use by another run (PID {holder}, lock {lock_path}): wait "
            "for it to finish, stop it, or choose another hydra.run.dir"
        ) from err
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()} {socket.gethostname()}\n")
    file.flush()
    _HELD[key] = file
    return True


def unlock_run_dir(run_dir: str | os.PathLike) -> None:
    """Release this process's lock on ``run_dir`` (no-op when not held)."""
    file = _HELD.pop(str(Path(run_dir).expanduser().resolve()), None)
    if file is None:
        return
    with contextlib.suppress(OSError):
        file.seek(0)
        file.truncate()
    file.close()  # closing the descriptor releases the flock


@contextlib.contextmanager
def run_dir_locked(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the run dir's lock for the ``with`` block (unless an outer holder already has it)."""
    taken = lock_run_dir(run_dir) if is_launching_rank() else False
    try:
        yield
    finally:
        if taken:
            unlock_run_dir(run_dir)


def append_run_record(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (with time and PID) to ``<run dir>/run_history.jsonl``."""
    if not is_launching_rank():
        return
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(), **record}
    with open(Path(run_dir) / HISTORY_FILE, "a", encoding="utf-8") as file:
        file.write(json.dumps(line, default=str) + "\n")


def read_run_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Return the records :func:`append_run_record` wrote, oldest first."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object  # type: ignore[assignment,misc]


class RunDirGuard(_HydraCallback):
    """Hydra callback: a writable run dir, locked, before Hydra writes anything into it.

    ``on_run_start`` runs before Hydra creates the run dir and writes ``.hydra/`` and the job
    log; ``on_job_start`` covers multirun jobs (each in its own dir). Failures print one
    ``error:`` line and exit with status 2, like every other user error.
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        """Check and lock ``hydra.run.dir`` (single runs)."""
        self._guard(lambda: config.hydra.run.dir, "hydra.run.dir")

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        """Check and lock the job's dir (multirun jobs; already held in single runs)."""
        self._guard(lambda: config.hydra.runtime.output_dir, "hydra.sweep.dir")

    @staticmethod
    def _guard(get_dir: Any, key: str) -> None:
        if not is_launching_rank():
            return
        try:
            run_dir = str(get_dir())
            check_writable(run_dir, key)
            lock_run_dir(run_dir)
        except ConfigError as err:
            if os.environ.get("LLAMAHOME_DEBUG"):
                raise
            print(f"error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None


def start_fields(cfg: Any) -> dict[str, Any]:
    """What the run record notes about a start: the job's overrides, ckpt_path and seed."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return {"overrides": overrides, "ckpt_path": cfg.get("ckpt_path"), "seed": cfg.get("seed")}
