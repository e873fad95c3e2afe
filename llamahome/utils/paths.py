"""Where LlamaHome keeps what it builds, how it names it, and how it writes it.

One helper for each piece of plumbing: :func:`cache_root` is the only place that knows the cache
directory, :func:`atomic_write`, :func:`atomic_dir` and :func:`replace_dir` the only places that
write by temporary name and rename. Everything built is content-addressed (:func:`fingerprint`):
a changed input never reuses a stale artefact and an unchanged one is never rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# Hydra configs ship inside the package, so a wheel install finds them (never the repo's tree).
CONF_DIR = PACKAGE_DIR / "conf"
CACHE_ENV = "LLAMAHOME_CACHE"
TEMP_SUFFIX = ".tmp"

__all__ = [
    "CACHE_ENV",
    "CONF_DIR",
    "PACKAGE_DIR",
    "atomic_dir",
    "atomic_write",
    "cache_root",
    "fingerprint",
    "model_name",
    "replace_dir",
    "restore_replaced_dir",
]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Return the cache root: ``cache_dir``, else ``$LLAMAHOME_CACHE``, else ``~/.cache/llamahome``.

    Args:
        cache_dir: An explicit directory; wins over the environment.

    Returns:
        The directory (not created here).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llamahome"


def fingerprint(*parts: Any) -> str:
    """Hash JSON-serialisable parts (str/bytes hashed as-is) into a short stable hex key.

    Args:
        *parts: Values that together identify an artefact.

    Returns:
        16 hex characters of a SHA-256.
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            data = part
        elif isinstance(part, str):
            data = part.encode("utf-8")
        else:
            data = json.dumps(part, sort_keys=True, default=str).encode("utf-8")
        # Length-prefix each part so ("ab", "c") and ("a", "bc") hash differently.
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success fsync it and rename it over.

    A reader never sees a half-written file, a crash or full disk leaves the previous file intact,
    and when several processes (DDP ranks) write the same path the last rename wins whole.

    Args:
        path: The final file.
        mode: A write mode for :func:`open` (``"wb"`` or ``"w"``).
        **open_kwargs: Passed to :func:`open` (``encoding=...``).

    Yields:
        The open temporary file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        os.chmod(temp, 0o666 & ~_UMASK)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(target.parent)


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete temporaries that a writer killed mid-file left next to ``path``."""
    target = Path(path)
    for stale in target.parent.glob(f".{target.name}.*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def atomic_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Create ``target`` by running ``build`` in a temporary sibling and renaming it into place.

    A crash never leaves a half-written ``target``, and when several processes (DDP ranks) race,
    the first rename wins and the others discard their copy.

    Args:
        target: The final directory.
        build: Writes the artefact into the directory it is given.

    Returns:
        ``target``.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # a real failure, not a lost race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def replace_dir(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the complete directory ``source`` to ``target``, replacing whatever is there.

    POSIX cannot rename a directory over a non-empty one, so the old ``target`` first moves
    aside (``.<name>.old``) and is deleted once the new one is in place. At every moment
    ``target`` is the old or the new directory, whole, except between the two renames; a crash
    there leaves the old one aside, which :func:`restore_replaced_dir` puts back.

    Args:
        source: A finished directory on the same filesystem (a temporary sibling of ``target``).
        target: The directory (or file) to replace.
    """
    source, target = Path(source), Path(target)
    restore_replaced_dir(target)
    aside = _aside(target)
    _remove_path(aside)  # a previous swap's leftover, if its last step was interrupted
    if target.exists() or target.is_symlink():
        os.rename(target, aside)
    os.rename(source, target)
    _fsync_dir(target.parent)
    _remove_path(aside)


def restore_replaced_dir(target: str | os.PathLike) -> bool:
    """Undo a :func:`replace_dir` that a crash stopped between its two renames.

    Args:
        target: The directory that :func:`replace_dir` was replacing.

    Returns:
        Whether ``target`` was missing and the previous version was moved back.
    """
    target = Path(target)
    aside = _aside(target)
    if target.exists() or not aside.exists():
        return False
    with contextlib.suppress(FileNotFoundError):  # another rank restored it first
        os.rename(aside, target)
    return True


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is; some filesystems refuse this.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def model_name(location: str) -> str:
    """Return a short name for a directory or hub id: a run's ``export/`` is named after its run.

    Args:
        location: A local directory, a train run directory, or a hub id (``owner/name``).

    Returns:
        ``<run>-export`` for a run's export, the last path component otherwise.
    """
    path = Path(str(location).rstrip("/\\") or str(location))
    if path.name == "export" and path.parent.name:
        return f"{path.parent.name}-export"
    return path.name or str(location)
