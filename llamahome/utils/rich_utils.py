"""Rich printing: the config tree at start, and tables for summaries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from llamahome.utils.secrets import redact

FIRST_GROUPS = (
    "model", "peft", "data", "cache", "optim", "scheduler", "trainer", "callbacks", "logger"
)


def print_config_tree(
    cfg: DictConfig, save_to: str | Path | None = None, echo: bool = True
) -> None:
    """Print the resolved config as a tree, one branch per group; optionally save it as text.

    Args:
        cfg: The composed Hydra config.
        save_to: A file to also write the tree to (e.g. ``<run dir>/config_tree.log``).
        echo: Print it (``False``: only save it).
    """
    tree = rich.tree.Tree("CONFIG", style="bold", guide_style="dim")
    container = redact(OmegaConf.to_container(cfg, resolve=False))
    groups = [g for g in FIRST_GROUPS if g in container] + [
        k for k in container if k not in FIRST_GROUPS and k != "hydra"
    ]
    for group in groups:
        value = container[group]
        branch = tree.add(group, style="bold cyan")
        text = OmegaConf.to_yaml(value) if isinstance(value, dict | list) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", word_wrap=True))
    if echo:
        rich.print(tree)
    if save_to is not None:
        with open(save_to, "w") as file:
            rich.print(tree, file=file)


def print_table(title: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Print rows of dicts as a rich table (columns from the first row)."""
    if not rows:
        return
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*(_fmt(v) for v in row.values()))
    rich.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
