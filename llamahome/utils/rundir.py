"""One live run per run directory, a writable run directory, and the run's history.

- :func:`lock_run_dir` takes an exclusive ``flock`` on ``<run dir>/.lock`` and writes the
  holder's PID into it. A second run in the same directory fails at once, naming the directory
  and that PID. The kernel drops a ``flock`` when its process dies (even by ``kill -9``), so a
  stale lock file never blocks anybody: the next run simply takes it over. Until the run
  commits (:func:`mark_committed`) the lock file's earlier text is put back on release, so a
  refused command leaves it as it was.
- :class:`RunDirGuard`, a Hydra callback (``conf/hydra/default.yaml``), does these checks, and
  refuses a directory that holds a run the command would damage (``utils/reuse.py``), *before*
  Hydra writes anything into the directory (``.hydra/``, the log file).
- :func:`append_run_record` adds one JSON line per start and per end to
  ``<run dir>/run_history.jsonl``: a resumed run continues that history instead of replacing it.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class _Held:
    """A run dir lock this process holds (the flock lives while ``file`` is open)."""

    file: Any
    previous: str  # the lock file's text before we wrote our PID: put back if we never commit
    committed: bool = False


# Run dirs this process holds, by resolved path.
_HELD: dict[str, _Held] = {}


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


def _in_use(path: Path, lock_path: Path, holder: str) -> ConfigError:
    return ConfigError(
        f"run dir {path} is in use by another run (PID {holder}, lock {lock_path}): wait "
        "for it to finish, stop it, or choose another hydra.run.dir"
    )


def check_not_busy(run_dir: str | os.PathLike) -> None:
    """Fail if a live process holds ``run_dir``'s lock, without taking it or writing anything.

    Raises:
        ConfigError: The directory is in use (the message gives the holder's PID).
    """
    path = Path(run_dir).expanduser()
    lock_path = path / LOCK_FILE
    if fcntl is None or not lock_path.is_file() or str(path.resolve()) in _HELD:
        return
    with open(lock_path) as file:  # read-only: the probe must change nothing
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = (file.read().strip().split() or ["unknown"])[0]
            raise _in_use(path, lock_path, holder) from err
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)


def lock_run_dir(run_dir: str | os.PathLike) -> bool:
    """Take this process's exclusive lock on ``run_dir`` (kept until the process exits).

    The lock file then holds this process's PID. Until the run commits
    (:func:`mark_committed`) the file's earlier text is kept, and put back when the lock is
    released, so a command refused after taking the lock leaves the directory as it found it.

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
        raise _in_use(path, lock_path, holder) from err
    file.seek(0)
    previous = file.read()
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()} {socket.gethostname()}\n")
    file.flush()
    if not _HELD:
        atexit.register(_release_all)  # SystemExit included: the lock file is tidied up
    _HELD[key] = _Held(file, previous)
    return True


def mark_committed(run_dir: str | os.PathLike) -> None:
    """Record that the run in ``run_dir`` started for real: its lock file is now its own."""
    held = _HELD.get(str(Path(run_dir).expanduser().resolve()))
    if held is not None:
        held.committed = True


def is_committed(run_dir: str | os.PathLike) -> bool:
    """Whether this process's run in ``run_dir`` has committed (see :func:`mark_committed`)."""
    held = _HELD.get(str(Path(run_dir).expanduser().resolve()))
    return held is not None and held.committed


def unlock_run_dir(run_dir: str | os.PathLike) -> None:
    """Release this process's lock on ``run_dir`` (no-op when not held).

    A committed run leaves an empty lock file; a refused one puts back what was there.
    """
    held = _HELD.pop(str(Path(run_dir).expanduser().resolve()), None)
    if held is None:
        return
    with contextlib.suppress(OSError):
        held.file.seek(0)
        held.file.truncate()
        if not held.committed:
            held.file.write(held.previous)
        held.file.flush()
    held.file.close()  # closing the descriptor releases the flock


def _release_all() -> None:
    for key in list(_HELD):
        unlock_run_dir(key)


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
    """Return the records :func:`append_run_record` wrote, oldest first.

    A line cut short (``kill -9`` mid-write, a full disk) is skipped, not fatal.
    """
    try:
        lines = (Path(run_dir) / HISTORY_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    records = []
    for line in lines.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object  # type: ignore[assignment,misc]


class RunDirGuard(_HydraCallback):
    """Hydra callback: a writable, free run dir whose earlier run is safe, before Hydra writes.

    ``on_run_start`` runs before Hydra creates the run dir and writes ``.hydra/`` and the job
    log: the dir must be writable and not in use, and a dir that holds a run is refused unless
    the command resumes it or says ``overwrite=true`` (``utils/reuse.py``); when it goes on,
    Hydra's own writes are held back until the run commits. ``on_multirun_start`` refuses a
    sweep dir whose job dirs hold runs the same way; ``on_job_start`` locks each job's dir.
    Failures print one ``error:`` line and exit with status 2, like every other user error.
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        """Check, lock and (when it holds a run being resumed) defer writes to hydra.run.dir."""
        from llamahome.utils.reuse import check_reuse, defer_writes

        def guard() -> None:
            run_dir = str(config.hydra.run.dir)
            check_writable(run_dir, "hydra.run.dir")
            check_not_busy(run_dir)
            held = check_reuse(
                run_dir, str(config.get("task_name")), config.get("ckpt_path"),
                config.get("overwrite", False),
            )
            lock_run_dir(run_dir)
            if held is not None:
                defer_writes(config)

        self._guard(guard)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        """Refuse a sweep dir whose job dirs hold runs the sweep would overwrite."""
        from llamahome.utils.reuse import check_reuse

        def guard() -> None:
            sweep_dir = Path(str(config.hydra.sweep.dir)).expanduser()
            if not sweep_dir.is_dir():
                return
            for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
                check_reuse(
                    job, str(config.get("task_name")), config.get("ckpt_path"),
                    config.get("overwrite", False), key="hydra.sweep.dir",
                    label=f"hydra.sweep.dir={sweep_dir}: job dir {job.name}",
                )

        self._guard(guard)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        """Check and lock the job's dir (multirun jobs; already held in single runs)."""

        def guard() -> None:
            run_dir = str(config.hydra.runtime.output_dir)
            check_writable(run_dir, "hydra.sweep.dir")
            lock_run_dir(run_dir)

        self._guard(guard)

    @staticmethod
    def _guard(check: Any) -> None:
        if not is_launching_rank():
            return
        try:
            check()
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
