"""Where LlamaHome finds its Hydra configs and keeps its caches."""

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PACKAGE_DIR.parent / "conf"


def cache_dir() -> Path:
    """The directory for derived artefacts (BPE tokenizer, tokenized data): ``$LLAMAHOME_CACHE``."""
    path = Path(os.environ.get("LLAMAHOME_CACHE", Path.home() / ".cache" / "llamahome"))
    path.mkdir(parents=True, exist_ok=True)
    return path


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
