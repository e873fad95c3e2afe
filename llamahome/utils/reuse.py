"""A run directory that already holds a run: refused, resumed or started over, never damaged.

A fresh ``train`` into a finished run's directory used to overwrite it (``last.ckpt``,
``export/``, ``metrics.csv`` restarted at step 0) and exit 0: what a user gets who types the
resume command and forgets ``ckpt_path=last``. And a refused resume (a bad override) still
rewrote ``.hydra/config.yaml`` and ``overrides.yaml`` with the refused command.

- :func:`check_reuse`: a directory holding a finished or interrupted run (checkpoints, an
  export, metrics; ``run_history.jsonl`` says which) is refused unless the command resumes it
  (``ckpt_path=last``, or a checkpoint inside it) or says ``overwrite=true``; another entry
  point (eval, generate, chat, serve) is refused in a train run's directory.
- Commit: a command allowed into such a directory writes nothing there until its checks pass.
  ``RunDirGuard`` (``utils/rundir.py``) tells Hydra not to write ``.hydra/`` and holds the job
  log's records in memory (:class:`DeferredFileHandler`); :func:`commit_run`, called by train
  once every check has passed, clears the old run (``overwrite=true``), writes ``.hydra/``,
  releases the log and records the start in the run history. A command refused before that
  leaves every file in the directory byte for byte as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamahome.errors import ConfigError
from llamahome.utils.rundir import (
    append_run_record,
    is_launching_rank,
    mark_committed,
    read_run_history,
)

__all__ = [
    "DeferredFileHandler",
    "check_reuse",
    "commit_run",
    "defer_writes",
    "previous_run",
]

log = logging.getLogger("llamahome.train")

# What `overwrite=true` removes: everything a new run would overwrite or mix with its own.
# Kept: run_history.jsonl (continued), train.log (appended), wandb/ (offline runs may not be
# synced yet; the new run gets a new id because wandb_run_id.txt goes).
CLEARED_BY_OVERWRITE = (
    "checkpoints",
    "export",
    "metrics.csv",
    "hparams.yaml",
    "tensorboard",
    "wandb_run_id.txt",
    "config_tree.log",
)


def previous_run(run_dir: str | os.PathLike) -> str | None:
    """Describe the run ``run_dir`` holds (``a finished run (global step 12; last.ckpt, ...)``).

    Returns:
        ``None`` when the directory holds no run worth keeping: no checkpoint, export or
        metrics (a run refused by its checks, or killed before its first step, leaves none;
        a requeued SLURM job that died that early simply starts again).
    """
    path = Path(run_dir)
    found = []
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        last = checkpoints / "last.ckpt"
        found.append("last.ckpt" if last.exists() else "checkpoints/")
    if (path / "export").is_dir():
        found.append("export/")
    if (path / "metrics.csv").is_file() and (path / "metrics.csv").stat().st_size:
        found.append("metrics.csv")
    if not found:
        return None
    state, step = _last_state(read_run_history(path))
    details = ", ".join(found)
    return f"{state} ({details if step is None else f'global step {step}; {details}'})"


def _last_state(history: list[dict[str, Any]]) -> tuple[str, int | None]:
    """("a finished run" | "an interrupted run" | ..., its last global step) from the history."""
    if not history:
        return "a run", None
    last = history[-1]
    step = next((r.get("global_step") for r in reversed(history) if "global_step" in r), None)
    if last.get("event") == "start":
        return "an interrupted run (it never recorded an end: killed?)", step
    status = last.get("status")
    if status == "completed":
        return "a finished run", step
    if status == "interrupted":
        return f"an interrupted run (exit status {last.get('exit_code')})", step
    return "a failed run", step


def _resumes(ckpt_path: Any, run_dir: Path) -> bool:
    """Whether ``ckpt_path`` continues the run in ``run_dir`` (``last`` or a file inside it)."""
    if ckpt_path in (None, ""):
        return False
    if ckpt_path == "last":
        return True
    try:
        Path(str(ckpt_path)).expanduser().resolve().relative_to(run_dir.resolve())
    except ValueError:
        return False
    return True


def check_reuse(
    run_dir: str | os.PathLike,
    task: str,
    ckpt_path: Any = None,
    overwrite: Any = False,
    key: str = "hydra.run.dir",
    label: str | None = None,
) -> str | None:
    """Refuse a command into a directory that holds a run it would damage.

    Args:
        run_dir: The command's run directory.
        task: The entry point (``train``, ``eval``...: ``task_name``).
        ckpt_path: The command's ``ckpt_path`` (train).
        overwrite: The command's ``overwrite`` (train).
        key: The config key naming the directory, for the message.
        label: How the message names the directory (default ``<key>=<run_dir>``).

    Returns:
        The description of the run the directory holds when the command may go on with it
        (a resume, or ``overwrite=true``), else ``None`` (a fresh directory).

    Raises:
        ConfigError: The directory holds a run and the command neither resumes it nor says
            ``overwrite=true`` (the message says both); ``overwrite`` is not true/false; or
            ``overwrite=true`` comes with a resume.
    """
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite={overwrite!r} must be true or false.")
    path = Path(run_dir).expanduser()
    held = previous_run(path) if path.is_dir() else None
    if held is None:
        return None
    label = label or f"{key}={run_dir}"
    if task != "train":
        raise ConfigError(
            f"{label} is a train run's directory ({held}): `{task}` would write its own files "
            f"over that run's (.hydra/, logs). Choose another {key}; to use the run's model, "
            f"pass model={run_dir}"
        )
    resumes = _resumes(ckpt_path, path)
    if resumes and overwrite:
        raise ConfigError(
            f"ckpt_path={ckpt_path} resumes the run in {run_dir} but overwrite=true would remove "
            "it: give one of the two"
        )
    if not resumes and not overwrite:
        cleared = ", ".join(n for n in CLEARED_BY_OVERWRITE if (path / n).exists())
        raise ConfigError(
            f"{label} holds {held}. Resume it with ckpt_path=last, or start over in it with "
            f"overwrite=true (removes {cleared or 'its outputs'}), or choose another {key}"
        )
    return held


@dataclass
class _Deferred:
    """What Hydra would have written into a reused run dir, held until the run commits."""

    output_subdir: str
    files: dict[str, str] = field(default_factory=dict)  # name in output_subdir -> YAML text
    log_handler_class: str | None = None  # the job log's handler class before the swap


# Reused run dirs of this process (resolved path -> what is held back), set by RunDirGuard.
_DEFERRED: dict[str, _Deferred] = {}


def defer_writes(config: Any) -> None:
    """Keep Hydra from writing into the run dir before the run commits (``on_run_start``).

    ``.hydra/`` is written by :func:`commit_run` instead, and the job log's records wait in
    memory (:class:`DeferredFileHandler`), so a command refused by its checks changes nothing.

    Args:
        config: Hydra's composed config (with its ``hydra`` node), changed in place.
    """
    from omegaconf import OmegaConf, open_dict, read_write

    run_dir = str(Path(str(config.hydra.run.dir)).expanduser().resolve())
    subdir = config.hydra.output_subdir
    held = _Deferred(output_subdir=str(subdir)) if subdir is not None else None
    if held is not None:
        task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        held.files["config.yaml"] = OmegaConf.to_yaml(task)
        held.files["overrides.yaml"] = OmegaConf.to_yaml(config.hydra.overrides.task)
    held = held or _Deferred(output_subdir="")
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.output_subdir = None
        file_handler = OmegaConf.select(config, "hydra.job_logging.handlers.file")
        if file_handler is not None:
            held.log_handler_class = file_handler.get("class")
            file_handler["class"] = f"{__name__}.DeferredFileHandler"
    _DEFERRED[run_dir] = held


def commit_run(run_dir: str | os.PathLike, overwrite: bool, start: dict[str, Any]) -> None:
    """The run's checks passed: clear the old run (``overwrite``), write what was held back.

    Args:
        run_dir: The run directory.
        overwrite: Remove the previous run's outputs first (``CLEARED_BY_OVERWRITE``).
        start: The start record for ``run_history.jsonl``.
    """
    path = Path(run_dir)
    if not is_launching_rank():
        return
    held = _DEFERRED.pop(str(path.expanduser().resolve()), None)
    # Rendered before anything is removed: nothing that can fail comes after the removal.
    files = _hydra_files(held) if held is not None and held.output_subdir else {}
    if overwrite and previous_run(path) is not None:
        removed = [name for name in CLEARED_BY_OVERWRITE if (path / name).exists()]
        for name in removed:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        log.warning("overwrite=true: removed the previous run's %s in %s", ", ".join(removed), path)
        start = {**start, "overwrote": True}
    if files:
        from llamahome.utils.paths import atomic_write

        (path / held.output_subdir).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            with atomic_write(path / held.output_subdir / name, "w", encoding="utf-8") as file:
                file.write(text)
    DeferredFileHandler.write_held()
    mark_committed(path)
    append_run_record(path, {"event": "start", **start})


def _hydra_files(held: _Deferred) -> dict[str, str]:
    """``.hydra/``'s files as Hydra would have written them: config, overrides, hydra."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    files = dict(held.files)
    if HydraConfig.initialized():
        hydra_cfg = OmegaConf.masked_copy(HydraConfig.instance().cfg, "hydra")
        hydra_cfg = OmegaConf.create(OmegaConf.to_container(hydra_cfg, resolve=False))
        hydra_cfg.hydra.output_subdir = held.output_subdir  # as Hydra would have saved it
        if held.log_handler_class is not None:
            hydra_cfg.hydra.job_logging.handlers.file["class"] = held.log_handler_class
        files["hydra.yaml"] = OmegaConf.to_yaml(hydra_cfg)
    return files


class DeferredFileHandler(logging.FileHandler):
    """A ``logging.FileHandler`` that holds its records until the run commits.

    Hydra builds it from ``hydra.job_logging`` when :func:`defer_writes` swapped it in for a
    reused run dir. The file is not even opened before :meth:`release_all`; a run refused
    earlier leaves it untouched (the records were on the console).
    (``Handler.release`` is the handler's lock: the methods here have other names.)
    """

    _instances: list[DeferredFileHandler] = []

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None,
                 delay: bool = True, errors: str | None = None) -> None:
        """Same arguments as ``logging.FileHandler`` (always delayed)."""
        super().__init__(filename, mode, encoding, delay=True, errors=errors)
        self._held: list[logging.LogRecord] | None = []
        DeferredFileHandler._instances.append(self)

    def emit(self, record: logging.LogRecord) -> None:
        """Hold the record until the run commits, then write as a ``FileHandler`` does."""
        if self._held is not None:
            self._held.append(record)
        else:
            super().emit(record)

    def write_through(self) -> None:
        """Write the held records, and every record directly from now on."""
        held, self._held = self._held, None
        for record in held or []:
            super().emit(record)

    @classmethod
    def write_held(cls) -> None:
        """Let every deferred handler of this process write (``release`` is the lock's name)."""
        for handler in cls._instances:
            handler.write_through()
