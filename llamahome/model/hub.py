"""Calling ``from_pretrained`` on a directory or hub id, so that every failure is one clear line.

Offline is detected in under a second (the local HF cache first, then a TCP probe of the hub),
instead of transformers' retries; a missing directory, a missing hub id and a broken directory
each get a ``ModelError`` that says what was tried and what to do.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llamahome.errors import ModelError

__all__ = [
    "first_line",
    "hub_kwargs",
    "hub_reachable",
    "load_with_clear_error",
    "looks_like_path",
    "not_found_message",
]


def hub_kwargs(spec: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords a ``ModelSpec`` sets: trust_remote_code and revision."""
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    return kwargs


def load_with_clear_error(
    loader: Any, where: str, spec: Any, what: str, file: Path | None = None, **kwargs: Any
) -> Any:
    """Call a ``from_pretrained`` loader; turn every failure into one ModelError line.

    Args:
        loader: ``AutoModelForCausalLM.from_pretrained``, ``AutoTokenizer.from_pretrained``...
        where: A local directory or a hub id.
        spec: The ``ModelSpec`` (its name goes into the message).
        what: ``weights`` or ``tokenizer``, for the message.
        file: The file being read when it is one file (a GGUF), named in the message.
        **kwargs: Passed to ``loader``.

    Raises:
        ModelError: Anything failed; a local directory's failure names it (and ``file``).
    """
    is_local = Path(where).exists()
    if not is_local and looks_like_path(where):
        raise ModelError(
            f"{spec.name}: {what} directory {where!r} does not exist. "
            "Point model.pretrained at a directory with config.json and weights."
        )
    if not is_local:
        # Try the local HF cache first: no network round-trips (and no 30 s of retries offline).
        try:
            return loader(where, local_files_only=True, **kwargs)
        except (OSError, ValueError):
            pass
        if not hub_reachable():
            raise ModelError(not_found_message(spec, where, what, offline=True))
    try:
        return loader(where, **kwargs)
    except Exception as err:  # noqa: BLE001 - a damaged local file fails in any library type
        if is_local:
            source = f"{file}" if file is not None else f"{where!r}"
            raise ModelError(
                f"{spec.name}: could not load {what} from {source}: {type(err).__name__}: "
                f"{first_line(err)}. The directory needs config.json plus model.safetensors (or "
                "the GGUF file named by model.gguf_file) and tokenizer files; a damaged file is "
                "restored by downloading or exporting the model again."
            ) from err
        if not isinstance(err, OSError | ValueError | RuntimeError):
            raise  # not a hub answer: a bug, keep its traceback
        raise ModelError(not_found_message(spec, where, what, offline=False, err=err)) from err


def not_found_message(spec: Any, where: str, what: str, offline: bool, err: Any = None) -> str:
    """The one line for a model found neither locally, nor in the HF cache, nor on the hub."""
    reason = "no access to the hub (offline)" if offline else f"the hub said: {first_line(err)}"
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return (
        f"cannot load {what} for model {spec.name!r}: there is no local directory {where!r}, "
        f"it is not in the local HF cache ({cache}), and {reason}. Fix: model=/path/to/hf/dir "
        "(or a train run dir, or model.pretrained=/path), or download it once and set HF_HOME, "
        "or model.pretrained=null for random init."
    )


def looks_like_path(where: str) -> bool:
    """Whether ``where`` is meant as a directory rather than a hub id (``owner/name``)."""
    return where.startswith((".", "/", "~")) or where.count("/") > 1 or os.sep + os.sep in where


def first_line(err: BaseException | None) -> str:
    """The first line of an exception's message (its type name when empty)."""
    text = str(err).strip().splitlines() if err else []
    return text[0] if text else type(err).__name__


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub endpoint resolves and accepts a TCP connection (fast offline check)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
