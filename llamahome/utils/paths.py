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
