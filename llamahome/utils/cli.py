"""Entry-point plumbing: user mistakes become one clear line, not a library traceback."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from llamahome.errors import LlamaHomeError

log = logging.getLogger("llamahome")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`LlamaHomeError` into ``error: <message>`` on stderr and exit status 2.

    Set ``LLAMAHOME_DEBUG=1`` (or ``HYDRA_FULL_ERROR=1``) to see the full traceback instead.
    """
    try:
        yield
    except LlamaHomeError as err:
        if os.environ.get("LLAMAHOME_DEBUG") or os.environ.get("HYDRA_FULL_ERROR"):
            raise
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def quiet_libraries() -> None:
    """Silence chatty third-party loggers and warnings that say nothing a user can act on."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers.modeling_utils", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


def is_rank_zero() -> bool:
    """Whether this process is rank 0, read from the launcher's environment as Lightning does.

    Entry points and sweep bookkeeping write files and print tables on rank 0 only; this reads
    the same variables as ``lightning.fabric.utilities.rank_zero._get_rank`` without importing
    Lightning, so eval, generate and serve stay free of it.
    """
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        rank = os.environ.get(key)
        if rank is not None:
            return int(rank) == 0
    return True
