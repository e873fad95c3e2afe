"""The quality preset's plumbing: its sweep lists, and the report written when it ends.

``python -m llamahome.eval sweep=quality`` (``conf/sweep/quality.yaml``) is a Hydra multirun
over ``quality_task`` x ``cache`` x ``cache.budget_ratio``, taken from the preset's lists
(``quality.tasks``, ``quality.policies``, ``quality.budgets``) by two OmegaConf resolvers
registered here (``llamahome.eval`` imports this module before Hydra composes):

* ``${sweep_options:<group>,<list>}``: the list as a sweep (``full,h2o,...``), without the names
  that have no option in that config group (a policy whose ``conf/cache/<name>.yaml`` is not
  installed is skipped with one warning, instead of failing the whole sweep at composition);
* ``${sweep_values:<list>}``: a list of values as a sweep (``0.1,0.25,0.5``).

:class:`QualityReport`, a Hydra callback of the preset, writes ``quality.md``, ``quality.csv``
and ``quality.png`` into the sweep directory when the sweep ends (``quality_table.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("llamahome.eval")
_WARNED: set[tuple[str, str]] = set()

__all__ = ["QualityReport", "available_options", "sweep_options", "sweep_values"]


def available_options(group: str) -> list[str] | None:
    """The options of a config group in the running Hydra's search path (None outside Hydra)."""
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance()
    if not hydra.is_initialized():
        return None
    return list(hydra.config_loader().get_group_options(group))


def sweep_options(group: str, names: Sequence[Any]) -> str:
    """``names`` that are options of `group`, joined as a Hydra sweep (``a,b,c``).

    A name without a config is left out with a warning: the rest of the sweep still runs.

    Raises:
        ValueError: No name is left (the sweep would be empty).
    """
    names = [str(n) for n in _as_list(names)]
    known = available_options(group)
    kept = [n for n in names if known is None or n in known]
    for name in names:
        if name not in kept and (group, name) not in _WARNED:
            _WARNED.add((group, name))  # Hydra resolves the sweep list more than once
            log.warning(
                "sweep: %s=%s is skipped: no conf/%s/%s.yaml is installed (options: %s)",
                group,
                name,
                group,
                name,
                ", ".join(known or []),
            )
    if not kept:
        raise ValueError(f"none of {names} is an option of conf/{group}")
    return ",".join(kept)


def sweep_values(values: Sequence[Any]) -> str:
    """A list of values joined as a Hydra sweep (``0.1,0.25,0.5``)."""
    return ",".join(str(v) for v in _as_list(values))


def _as_list(values: Any) -> list[Any]:
    if OmegaConf.is_config(values):
        values = OmegaConf.to_container(values, resolve=True)
    return list(values) if isinstance(values, list | tuple) else [values]


def _register() -> None:
    for name, fn in (("sweep_options", sweep_options), ("sweep_values", sweep_values)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register()


class QualityReport(Callback):
    """Hydra callback: after ``sweep=quality``, write and print the one quality table."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """``quality.{md,csv,png}`` in the sweep dir from every job's rows (and failures)."""
        from llamahome.evaluation.quality_table import write_quality_report

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        settings = OmegaConf.select(config, "quality", default=None)
        settings = OmegaConf.to_container(settings, resolve=True) if settings is not None else {}
        paths = write_quality_report(
            sweep_dir,
            policies=settings.get("policies"),
            tolerance=float(settings.get("tolerance", 0.05)),
        )
        if not paths:
            log.warning(
                "Quality preset %s: no job wrote a row (see sweep_summary.json).", sweep_dir
            )
            return
        print(paths["markdown"].read_text(encoding="utf-8"), flush=True)
        log.info("Quality table: %s, %s, %s", paths["markdown"], paths["csv"], paths["plot"])
