"""Check a command line before Hydra runs it, so a mistake in it is one ``error:`` line.

Hydra answers a bad override (``cache=nosuch``, ``optim.lrr=1``, ``optim.lr=[1``) with its own
multi-line message and exit status 1, before any of our code runs. :func:`check_command_line`
looks first, with Hydra's own parser and compose API: an argument that is not UTF-8, an override
that does not parse, a group option that does not exist (every value of a sweep) or a key the
config does not have becomes a :class:`ConfigError` naming the override and listing what is
valid, like every other user error (``user_errors``: one line, exit status 2).

Composing costs ~0.15 s; Hydra composes again (twice) when it runs the job.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llamahome.errors import ConfigError
from llamahome.utils.paths import CONF_DIR

__all__ = [
    "HydraArgs",
    "check_argument_text",
    "check_command_line",
    "compose_config",
    "group_options",
    "parse_hydra_args",
]

_GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


@dataclass(frozen=True)
class HydraArgs:
    """What Hydra's command line asks for, as far as the checks before Hydra care."""

    overrides: list[str]
    help: bool
    resolve: bool
    multirun: bool
    config_name: str | None
    # --config-path/--config-dir change where configs come from, --info/--hydra-help/
    # --shell-completion/--experimental-rerun are Hydra's own: Hydra handles those alone.
    hydra_only: bool


def parse_hydra_args(args: Sequence[str]) -> HydraArgs:
    """Parse ``args`` (``sys.argv[1:]``) with Hydra's own argument parser.

    Raises:
        ConfigError: An option Hydra does not know (``--nosuch``), or ``--resolve`` alone.
    """
    from hydra._internal.utils import get_args_parser  # what @hydra.main parses sys.argv with

    parser = get_args_parser()
    parsed, unknown = parser.parse_known_args(list(args))
    if unknown:
        flags = sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--")})
        raise ConfigError(
            f"unknown option {unknown[0]!r}: overrides are key=value or group=option; "
            f"the options are {', '.join(flags)}."
        )
    if parsed.resolve and not (parsed.help or parsed.cfg):
        raise ConfigError("--resolve goes with --help or --cfg job|hydra|all (what to print).")
    return HydraArgs(
        overrides=list(parsed.overrides),
        help=parsed.help,
        resolve=parsed.resolve,
        multirun=parsed.multirun,
        config_name=parsed.config_name,
        hydra_only=bool(
            parsed.config_path or parsed.config_dir or parsed.info or parsed.hydra_help
            or parsed.shell_completion or parsed.experimental_rerun
        ),
    )


def check_argument_text(args: Iterable[str]) -> None:
    r"""Refuse an argument that is not UTF-8 text.

    Python hands such bytes over as lone surrogates (``surrogateescape``); Hydra's parser then
    fails on them with a lexer message, and printing them fails again.

    Raises:
        ConfigError: Naming the argument (undecodable bytes shown as ``\xNN``) and the byte.
    """
    for arg in args:
        bad = next((ch for ch in arg if 0xDC80 <= ord(ch) <= 0xDCFF), None)
        if bad is not None:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise ConfigError(
                f"the argument '{shown}' is not UTF-8 text (byte 0x{ord(bad) - 0xDC00:02x}): "
                "retype it, or set a UTF-8 locale in the terminal (e.g. LANG=C.UTF-8)."
            )


def group_options(group: str) -> list[str]:
    """The options of a config group shipped in ``llamahome/conf`` (``cache`` -> full, h2o ...)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_command_line(config_name: str, overrides: Sequence[str], multirun: bool) -> None:
    """Check every override of a command line against the config it composes.

    Args:
        config_name: The primary config (``train``, ``eval`` ...).
        overrides: The overrides as typed (after ``model=<dir>`` is rewritten).
        multirun: ``-m``: a comma list sweeps, so each of its values is checked; the config is
            composed with the first value of each sweep.

    Raises:
        ConfigError: One line naming the first bad override and what is valid.
    """
    parsed = _parse(overrides)
    if not multirun:
        compose_config(config_name, overrides)
        return
    job: list[str] = []
    for override in parsed:
        if not override.is_sweep_override():
            job.append(override.input_line)
            continue
        if not override.is_discrete_sweep():
            continue  # interval(...): the sweeper (Optuna) picks its values
        try:
            values = list(override.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - glob(...) needs Hydra's loader; Hydra checks it
            continue
        group = override.key_or_group
        if not group.startswith("hydra") and (CONF_DIR / group).is_dir():
            options = group_options(group)
            for value in values:
                if value not in options:
                    raise ConfigError(_not_an_option(group, value, options))
        if values:
            job.append(f"{override.get_key_element()}={values[0]}")
    compose_config(config_name, job)


def compose_config(config_name: str, overrides: Sequence[str]) -> Any:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` as Hydra would (hydra node included).

    Raises:
        ConfigError: Whatever Hydra refuses, as one line (see :func:`composition_error`).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                config_name,
                overrides=[*overrides, f"hydra.job.name={config_name}"],
                return_hydra_config=True,
            )
    except (HydraException, OmegaConfBaseException) as err:
        raise composition_error(err, config_name) from err
    except ValueError as err:  # Hydra's defaults list raises plain ValueErrors (group=null)
        raise ConfigError(
            f"{_one_line(err)}: a config group takes an option name (~group removes the group)"
        ) from err


def composition_error(err: Exception, config_name: str) -> ConfigError:
    """Turn what Hydra raises while composing into one line naming the override and the fix."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    first = _first_line(err)
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        where = first.removeprefix("In '").partition("'")[0]
        asked_by = "" if where in ("", config_name) or where.startswith("hydra") else where
        return ConfigError(
            _not_an_option(group, option, list(err.options))
            + (f" (asked for by {asked_by})" if asked_by else "")
        )
    if isinstance(cause, ConfigKeyError | ConfigAttributeError):
        return _unknown_key(first, cause, config_name)
    if first.startswith("Ambiguous value for argument"):
        override = first.partition("'")[2].rpartition("'")[0]
        return ConfigError(
            f"{override}: a comma-separated value is a sweep; add -m (--multirun) to run one job "
            "per value, or write key=[a,b] for a list or key='a,b' for a string."
        )
    if first.startswith("Multiple values for "):  # +cache=h2o when cache is already chosen
        group = first.removeprefix("Multiple values for ").partition(".")[0]
        return ConfigError(
            f"+{group}=... adds the group {group} again, but the config already has it: write "
            f"{group}=<option> to choose another option ({', '.join(group_options(group))})."
        )
    reason = f": {_first_line(cause)}" if cause is not None else ""
    return ConfigError(_one_line(err) + reason)


def _parse(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:  # one at a time, so the error can name the one that fails
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as err:
            reason = next(
                (line for line in str(err).splitlines()
                 if line.strip() and not line.startswith(("Error parsing", "See "))),
                "it does not parse",
            )
            raise ConfigError(
                f"cannot parse the override {text!r} ({reason.strip()}): write key=value or "
                "group=option, and quote a value with spaces or special characters "
                f"(key='a b,c'); see {_GRAMMAR}"
            ) from err
    return parsed


def _not_an_option(group: str, option: str, options: list[str]) -> str:
    close = difflib.get_close_matches(option, options, n=1)
    hint = f" (did you mean {group}={close[0]}?)" if close else ""
    choices = ", ".join(options)
    return f"{group}={option} is not an option of {group}: choose one of {choices}{hint}."


def _unknown_key(first: str, cause: Any, config_name: str) -> ConfigError:
    """``optim.lrr=1`` -> which key is missing, the keys that exist there, the closest one."""
    from omegaconf import DictConfig, OmegaConf

    override = first.partition("'")[2].rpartition("'")[0] or str(cause.full_key)
    missing = str(cause.full_key or override)
    parent_key, _, name = missing.rpartition(".")
    node = getattr(cause, "parent_node", None)
    root = node._get_root() if node is not None else None
    parent = OmegaConf.select(root, parent_key) if root is not None and parent_key else root
    keys = [] if not isinstance(parent, DictConfig) else [
        str(k) for k in parent.keys() if not str(k).startswith("_") and k != "hydra"
    ]
    if not keys:  # seed.x=1: seed is a value
        return ConfigError(f"{override} is not a config key: {parent_key} is a value, not keys.")
    where = parent_key or f"the {config_name} config"
    close = _closest_key(override, root)
    hint = f" Did you mean {close}?" if close else ""
    return ConfigError(
        f"{override} is not a config key: {where} has no {name!r}; its keys are "
        f"{', '.join(keys)}.{hint} (+{override}=... adds a new key.)"
    )


def _closest_key(override: str, root: Any) -> str | None:
    """The config key most like ``override``: the same last name elsewhere, else a close one."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(root, resolve=False, throw_on_missing=False)
    paths = [
        p for p in _key_paths(tree)
        if not p.startswith("hydra") and not override.startswith(f"{p}.")  # not its own parents
    ]
    last = override.rpartition(".")[2]
    same_name = [p for p in paths if p.rpartition(".")[2] == last]
    if same_name:
        return min(same_name, key=len)
    close = difflib.get_close_matches(override, paths, n=1, cutoff=0.75)
    return close[0] if close else None


def _key_paths(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return []
    paths = []
    for key, value in tree.items():
        if str(key).startswith("_"):
            continue
        path = f"{prefix}{key}"
        paths.append(path)
        paths.extend(_key_paths(value, f"{path}."))
    return paths


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _one_line(err: BaseException) -> str:
    """Hydra's message in one line, without the config search path it appends."""
    text = str(err).split("\nConfig search path", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__
