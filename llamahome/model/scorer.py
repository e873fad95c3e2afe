"""A model's learned KV scorer on disk, next to its weights: ``<model dir>/kv_scorer/``.

``python -m llamahome.train experiment=kv_scorer`` writes it into the run's ``export/``
(``config.json`` + ``model.safetensors``), so the export stays one self-contained model
directory: ``model=<run>`` (or its export) loads the language model and, through
`attach_saved_scorer` (called by ``load_model``), the scorer that ``cache=learned`` uses, in
train, eval, generate, chat and serve. Plain ``from_pretrained`` ignores the subdirectory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llamahome.errors import CacheError, ModelError
from llamahome.kvcache.learned import TRAIN_COMMAND, KVScorer, attach_scorer

__all__ = [
    "SCORER_DIR",
    "attach_saved_scorer",
    "check_scorer_available",
    "enable_cache_policies",
    "load_scorer",
    "save_scorer",
    "scorer_dir",
]

SCORER_DIR = "kv_scorer"
FORMAT = "llamahome-kv-scorer"
_CONFIG_KEYS = (
    "num_layers", "hidden_size", "kv_heads", "hidden_dim", "position_features", "kv_norm_features"
)


def save_scorer(
    scorer: KVScorer, model_dir: str | Path, info: dict[str, Any] | None = None
) -> Path:
    """Write `scorer` into ``<model_dir>/kv_scorer/`` (safetensors + config.json).

    Args:
        scorer: The trained scorer.
        model_dir: The model directory (a run's ``export/``).
        info: What else to record in config.json (teacher, target, metrics).

    Returns:
        The scorer directory.
    """
    from safetensors.torch import save_file

    from llamahome.utils.paths import atomic_write

    out = Path(model_dir) / SCORER_DIR
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in scorer.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    config = {"format": FORMAT, **scorer.config, **(info or {})}
    with atomic_write(out / "config.json", "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, sort_keys=True, default=str)
    return out


def load_scorer(directory: str | Path) -> KVScorer:
    """Read a scorer written by `save_scorer`.

    Raises:
        ModelError: Missing or malformed files (names the file).
    """
    from safetensors.torch import load_file

    where = Path(directory)
    config_file, weights = where / "config.json", where / "model.safetensors"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{config_file}: cannot read the KV scorer's config ({err}).") from err
    if config.get("format") != FORMAT or any(k not in config for k in _CONFIG_KEYS):
        raise ModelError(f"{config_file}: not a LlamaHome KV scorer config.")
    scorer = KVScorer(**{k: config[k] for k in _CONFIG_KEYS})
    try:
        scorer.load_state_dict(load_file(str(weights)))
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelError(f"{weights}: cannot load the KV scorer's weights ({err}).") from err
    return scorer.eval().requires_grad_(False)


def scorer_dir(location: str | Path | None) -> Path | None:
    """``<dir>/kv_scorer`` of a local model directory or train run, if it holds one."""
    if not location:
        return None
    path = Path(str(location)).expanduser()
    for candidate in (path, path / "export"):
        if (candidate / SCORER_DIR / "config.json").is_file():
            return candidate / SCORER_DIR
    return None


def attach_saved_scorer(model: Any, location: str | Path | None) -> KVScorer | None:
    """Attach the scorer saved with the weights at `location` (if any) to `model`.

    Args:
        model: The loaded model.
        location: The directory its weights came from (None or a hub id: nothing to attach).

    Returns:
        The scorer, or None when the directory has none.
    """
    where = scorer_dir(location)
    if where is None:
        return None
    scorer = load_scorer(where).to(next(model.parameters()).device)
    attach_scorer(model, scorer)
    return scorer


def enable_cache_policies(model: Any, tokenizer: Any, location: str | Path | None) -> None:
    """What ``load_model`` does for the model-bound cache policies (kvzip, learned).

    Installs the decoder hook that settles deferred evictions, with KVzip's reconstruction
    prompt in `tokenizer`, and attaches the scorer saved next to the weights, if any.

    Args:
        model: The loaded model (hybrid attention).
        tokenizer: Its tokenizer.
        location: The local directory its weights came from (None: not local).
    """
    from llamahome.kvcache.model_hooks import enable_cache_hooks

    enable_cache_hooks(model, tokenizer)
    attach_saved_scorer(model, location)


def check_scorer_available(cache_spec: Any, model_spec: Any) -> None:
    """Fail before loading anything when ``cache=learned`` meets a model with no scorer.

    Args:
        cache_spec: The run's ``CacheSpec``.
        model_spec: The run's ``ModelSpec``.

    Raises:
        CacheError: One line that gives the command training a scorer for this model.
    """
    if getattr(cache_spec, "policy", None) != "learned":
        return
    pretrained = getattr(model_spec, "pretrained", None)
    if scorer_dir(pretrained) is not None:
        return
    name = getattr(model_spec, "name", None) or "<model>"
    local = pretrained and "://" not in str(pretrained)
    where = f"model={pretrained}" if local else f"model={name}"
    raise CacheError(
        f"cache=learned needs a KV scorer trained for this model, and {where} has none "
        f"({SCORER_DIR}/ next to its weights): train one with `{TRAIN_COMMAND} {where}`, "
        "then pass model=<that run dir>."
    )
