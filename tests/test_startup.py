"""Start-up stays light: ``--help`` and a config error never load torch, transformers, Lightning.

Timing is the bench's job (``scripts/bench_startup.py``); these tests guard the cause without a
clock. Each command runs as a real ``python -X importtime -m llamahome.<entry>`` process, and the
modules it imported are read from that report: a heavy import slipping back into a path that
only needs the config fails here, deterministically.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR

from llamahome.utils.app_help import render_help
from llamahome.utils.preflight import group_options

# What `--help` and a typo must never pay for (torch alone is ~2 s of a 2-core machine's time).
HEAVY = ("torch", "transformers", "lightning", "peft", "datasets", "wandb", "fastapi", "uvicorn")
ENTRIES = ("train", "eval", "generate", "chat", "serve")


def run_entry(entry: str, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m llamahome.<entry> <args>``; return it and its heavy imports."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LLAMAHOME_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", f"llamahome.{entry}", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )
    imported = {
        line.rpartition("|")[2].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    return proc, imported & set(HEAVY)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]


@pytest.mark.parametrize("entry", ENTRIES)
def test_help_lists_the_groups_and_the_config_without_heavy_imports(entry, tmp_path) -> None:
    proc, heavy = run_entry(entry, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert heavy == set(), f"--help imported {sorted(heavy)}"
    out = proc.stdout
    assert out.startswith(f"python -m llamahome.{entry} [-m] [group=option ...]")
    assert f"cache: {', '.join(group_options('cache'))}\n" in out
    assert "== Config ==" in out and "\ncache:\n  _target_: llamahome.kvcache.spec.CacheSpec" in out
    assert not (tmp_path / "outputs").exists()  # help writes nothing


CONFIG_ERRORS = [
    # (entry, override, phrase of the one error line): value errors reach the job's cheap checks
    ("train", "optim.lr=-1", "ConfigError: optim.lr must be a positive number"),
    ("train", "cache.budget_ratio=2", "CacheBudgetError: cache.budget_ratio=2"),
    ("train", "trainer.max_steps=0", "ConfigError: trainer.max_steps must be > 0"),
    ("train", "chat.max_new_tokens=5", "ConfigError: chat.max_new_tokens is not a config key"),
    ("eval", "cache.budget_ratio=2", "CacheBudgetError: cache.budget_ratio=2"),
    ("generate", "max_new_tokens=0", "ConfigError: max_new_tokens=0"),
    ("chat", "cache.budget_ratio=2", "CacheBudgetError: cache.budget_ratio=2"),
    ("serve", "serve.port=-1", "ConfigError: serve.port=-1"),
]


@pytest.mark.parametrize(("entry", "override", "phrase"), CONFIG_ERRORS)
def test_config_error_is_one_line_before_any_heavy_import(entry, override, phrase, tmp_path):
    proc, heavy = run_entry(entry, override, "print_config=true", cwd=tmp_path)
    lines = error_lines(proc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines == [f"error: {lines[0].removeprefix('error: ')}"], lines
    assert phrase in lines[0], lines[0]
    assert heavy == set(), f"{entry} {override} imported {sorted(heavy)}"
    assert "CONFIG" not in proc.stdout  # the config tree prints only once the values pass


def test_help_has_hydras_sections_and_lines(tmp_path) -> None:
    """Our --help is Hydra's own app help for the same config: the same group and config lines."""
    plain_hydra = (
        "import hydra\n"
        f"@hydra.main(version_base='1.3', config_path={str(CONF_DIR)!r}, config_name='train')\n"
        "def main(cfg):\n    pass\n"
        "main()\n"
    )
    hydra_help = subprocess.run(
        [sys.executable, "-c", plain_hydra, "--help", "cache=h2o"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    ours = render_help("train", ["cache=h2o"])
    assert ours is not None
    ours_groups, ours_config = ours.split("== Config ==")
    hydra_groups, hydra_config = hydra_help.split("== Config ==")
    ours_lines = [line for line in ours_groups.splitlines() if ": " in line]
    assert ours_lines and set(ours_lines) <= set(hydra_groups.splitlines())
    # The config section is the same YAML: the composed config with the override applied.
    assert ours_config.split("\n\n", 2)[1] == hydra_config.split("\n\n", 2)[1]
    assert "policy: h2o" in ours_config


def test_help_shows_the_config_with_overrides_applied() -> None:
    text = render_help("eval", ["cache=window", "cache.budget_ratio=0.5", "task=passkey"])
    assert text is not None
    cache = text.split("\ncache:\n", 1)[1].split("\ntask:\n", 1)[0]
    assert "  policy: window\n" in cache and "  budget_ratio: 0.5\n" in cache
    assert "\ntask:\n  _target_: llamahome.evaluation.passkey.Passkey\n" in text
    # Only this config's groups: eval has a task group, no optimizer.
    assert "\ntask: " in text and "\noptim: " not in text
