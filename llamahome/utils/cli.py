"""Entry-point plumbing: user mistakes become one clear line, not a library traceback."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llamahome.errors import ConfigError, LlamaHomeError
from llamahome.utils.paths import CONF_DIR, model_name

log = logging.getLogger("llamahome")


def launch(hydra_main: Callable[[], Any], config_name: str) -> None:
    """Run an entry point's ``@hydra.main`` function on ``sys.argv``, LlamaHome's way.

    Before Hydra: ``model=<dir|run|hub id>`` is rewritten (:func:`model_argument`); ``--help`` is
    answered from one composition (``utils/app_help.py``: under a second, Hydra's takes several);
    and the command line is checked (``utils/preflight.py``): an argument that is not UTF-8, an
    override that does not parse, a group option or a key that does not exist is one ``error:``
    line with exit status 2, like every user error. After Hydra: a multirun in which a job
    failed exits with status 1, after its summary.

    Args:
        hydra_main: The ``@hydra.main``-decorated function (Hydra reads ``sys.argv``).
        config_name: Its primary config (``train``, ``eval`` ...).
    """
    from llamahome.utils.preflight import (
        check_argument_text,
        check_command_line,
        parse_hydra_args,
    )

    with user_errors():
        check_argument_text(sys.argv[1:])
    model_argument()
    with user_errors():
        args = parse_hydra_args(sys.argv[1:])
        name = args.config_name or config_name
        if args.help and not args.hydra_only:
            from llamahome.utils.app_help import render_help

            text = render_help(name, args.overrides, resolve=args.resolve)
            if text is not None:
                _print_help(text)
                return
        elif not args.hydra_only:
            check_command_line(name, args.overrides, multirun=args.multirun)
    hydra_main()

    from llamahome.utils.sweep import failed_jobs_line

    if (failed := failed_jobs_line()) is not None:
        print(f"error: {failed}", file=sys.stderr, flush=True)
        raise SystemExit(1)


def _print_help(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `--help | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`LlamaHomeError` into ``error: <message>`` on stderr and exit status 2.

    Set ``LLAMAHOME_DEBUG=1`` (or ``HYDRA_FULL_ERROR=1``) to see the full traceback instead.
    """
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (LlamaHomeError, OmegaConfBaseException) as err:
        if os.environ.get("LLAMAHOME_DEBUG") or os.environ.get("HYDRA_FULL_ERROR"):
            raise
        if isinstance(err, OmegaConfBaseException):
            err = config_error(err)
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        # Ctrl-C outside training (loading, generating): nothing to save, no traceback.
        if os.environ.get("LLAMAHOME_DEBUG"):
            raise
        print("Interrupted (Ctrl-C).", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def config_error(err: Exception) -> LlamaHomeError:
    """Turn an OmegaConf error met while reading the config into a ConfigError naming the key.

    ``???`` values (``data.path`` of ``data=alpaca``) raise ``MissingMandatoryValue`` only when
    read, deep inside whatever reads them; the user needs the key, not that place.
    """
    from omegaconf.errors import MissingMandatoryValue

    from llamahome.errors import ConfigError

    key = getattr(err, "full_key", None) or "a config value"
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(
            f"{key} is required and has no value: give {key}=... on the command line"
        )
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ConfigError(f"{key}: {first}")


def quiet_libraries() -> None:
    """Silence chatty third-party loggers and warnings that say nothing a user can act on."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # tensor_parallel lists unsharded layers on every load, even on one CPU: nothing to act on.
    quiet = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")
    for name in (*quiet, "httpx", "urllib3"):
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


# owner/name on the hub: letters, digits, '.', '_', '-' (no spaces, one slash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def model_argument(argv: list[str] | None = None) -> list[str]:
    """Let ``model=`` name a directory, a train run or a hub id, not only a ``conf/model`` option.

    Hydra accepts only group options for ``model=``. Each entry point calls this on
    ``sys.argv`` before Hydra parses it: ``model=<dir|run dir|hub id>`` becomes
    ``model=hf model.pretrained=<value> model.name=<its name>`` (``conf/model/hf.yaml``); a
    ``conf/model`` option, a sweep list (``a,b``) and every other argument pass unchanged.
    A value that is none of these ends the program with one ``error:`` line (exit status 2).

    Args:
        argv: The argument list to rewrite in place; ``sys.argv`` when ``None``.

    Returns:
        The rewritten list (the same object).
    """
    argv = sys.argv if argv is None else argv
    with user_errors():
        rewritten = [argv[0]] if argv else []
        for arg in argv[1:]:
            if arg.startswith("model=") and "," not in arg:
                rewritten.extend(_model_overrides(arg.removeprefix("model=")))
            else:
                rewritten.append(arg)
        argv[:] = rewritten
    return argv


def _model_overrides(value: str) -> list[str]:
    options = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    if value in options or not value:
        return [f"model={value}"]
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"model={value} is a file: give a Hugging Face model directory (config.json + "
                "weights + tokenizer), a train run directory or its export/."
            )
        value = str(path.resolve())
    elif not _HUB_ID.match(value):
        close = difflib.get_close_matches(value, options, n=1)
        hint = f" Did you mean model={close[0]}?" if close else ""
        raise ConfigError(
            f"model={value} is not a conf/model option ({', '.join(options)}), not an existing "
            f"directory, and not a hub id (owner/name).{hint} Check the spelling or the path."
        )
    return [
        "model=hf",
        f"model.pretrained={_quote(value)}",
        f"model.name={_quote(model_name(value))}",
    ]


def _quote(value: str) -> str:
    """Quote a value for Hydra's override grammar (paths may hold '=', ',', spaces...)."""
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
