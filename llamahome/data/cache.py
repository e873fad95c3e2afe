"""Where LlamaHome keeps what it builds (tokenizers, tokenized data) and how it names it.

Everything built is content-addressed: the directory name is a hash of what went into it, so a
changed input never reuses a stale artefact and an unchanged one is never rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_ENV = "LLAMAHOME_CACHE"


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


def build_dir_atomically(target: Path, build: Callable[[Path], None]) -> Path:
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
