"""The running interpreter's standard-library sources: real text every Python install carries."""

from __future__ import annotations

import sysconfig
from pathlib import Path

# Test suites and vendored trees are large, repetitive and not representative of library code.
_SKIP_PARTS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


def stdlib_dir() -> Path:
    """Return the directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(top_level_only: bool = False, max_bytes: int | None = None) -> list[Path]:
    """List standard-library ``.py`` files in a deterministic (sorted) order.

    Args:
        top_level_only: Only modules directly in the stdlib directory (``os.py``, ``json`` is not).
        max_bytes: Stop once the listed files add up to this many bytes (a bounded subset).

    Returns:
        Paths sorted by their path relative to the stdlib directory.
    """
    root = stdlib_dir()
    pattern = root.glob("*.py") if top_level_only else root.rglob("*.py")
    files = sorted(
        (p for p in pattern if not _SKIP_PARTS.intersection(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if max_bytes is None:
        return files
    chosen: list[Path] = []
    total = 0
    for path in files:
        size = path.stat().st_size
        if chosen and total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def read_source(path: Path) -> str:
    """Read a stdlib source file as text; the odd non-UTF-8 byte is replaced, not fatal.

    Args:
        path: A ``.py`` file.

    Returns:
        Its text.
    """
    return path.read_text(encoding="utf-8", errors="replace")
