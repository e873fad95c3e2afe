"""Check a checkpoint before Lightning resumes from it, and say in one line what is wrong.

Lightning's own failures on a bad ``ckpt_path`` are tracebacks of up to a hundred lines, and
for a file that is not plain tensors torch even advises ``weights_only=False``, which would run
whatever code the file carries. Here the file is opened with ``weights_only=True`` (always) and
memory-mapped (only the header is read), and compared with the run it is meant to continue:
Lightning format, model (parameter names and shapes), fine-tuning method (LoRA or full).
"""

from __future__ import annotations

import errno
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llamahome.errors import ConfigError

_LIGHTNING_KEYS = ("state_dict", "global_step")
_ADAPTER = re.compile(r"lora_|modules_to_save")


def load_checkpoint_safely(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, every failure one ConfigError naming the file.

    Args:
        path: The checkpoint file.

    Returns:
        The checkpoint dict.

    Raises:
        ConfigError: Missing, unreadable, truncated, not a torch file, or holding objects that
            safe loading refuses.
    """
    file = Path(path)
    where = f"ckpt_path={path}"
    if not file.exists():
        raise ConfigError(f"{where}: no such file")
    if file.is_dir():
        raise ConfigError(f"{where}: is a directory; give the .ckpt file inside it")
    size = file.stat().st_size
    if size == 0:
        raise ConfigError(f"{where}: the file is empty (0 bytes): an interrupted copy?")
    try:
        mmap = zipfile.is_zipfile(file)
        with warnings.catch_warnings():
            # On a damaged file torch also warns about odd pickle protocols ("please file an
            # issue"): noise next to the one line that says what is wrong.
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, which would run the file's code: never
        # repeat it. Keep only the unpickler's own reason.
        match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))
        found = match.group(1).split(". Please")[0].strip() if match else "unreadable pickle"
        if "global" not in found.lower():  # random bytes, a text file...: not a pickle at all
            raise ConfigError(
                f"{where}: is not a PyTorch checkpoint ({size} bytes; {found[:80]})"
            ) from None
        raise ConfigError(
            f"{where}: holds Python objects that safe loading (weights_only=True) refuses "
            f"({found[:160]}); it is not a LlamaHome/Lightning checkpoint. Resume only from "
            "checkpoints this project wrote"
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure to read a user's file is one line
        # A damaged file reaches torch's unpickler in arbitrary states: besides the errors above
        # it raises IndexError, KeyError, UnicodeDecodeError, struct.error, MemoryError... (about
        # 9% of random byte strings). Whatever it is, the user gets one line naming the file.
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError(f"{where}: cannot be read: {err.strerror}") from None
        what = (
            "is truncated or damaged (an interrupted copy?)"
            if _looks_like_zip(file)
            else "is not a PyTorch checkpoint (not a zip archive from torch.save)"
        )
        raise ConfigError(f"{where}: {what}, {size} bytes: {_reason(err)}") from None
    _check_layout(state, where)
    return dict(state)


def _check_layout(state: Any, where: str) -> None:
    """A Lightning checkpoint: a dict with an int ``global_step`` and a ``state_dict`` of tensors.

    A file can unpickle cleanly and still hold something else (plain weights, a damaged dict):
    say what it holds instead of failing later on a missing key or a non-tensor.
    """
    if not isinstance(state, Mapping) or not all(k in state for k in _LIGHTNING_KEYS):
        held = (
            f"a dict with keys {sorted(map(str, state))[:6]}"
            if isinstance(state, Mapping)
            else type(state).__name__
        )
        raise ConfigError(
            f"{where}: holds {held}, not a Lightning checkpoint (expected 'state_dict' and "
            "'global_step', as in <run dir>/checkpoints/*.ckpt). Plain weights go to "
            "model.pretrained instead"
        )
    tensors = state["state_dict"]
    bad = (
        "state_dict is not a dict"
        if not isinstance(tensors, Mapping)
        else next(
            (
                f"state_dict[{str(k)[:60]!r}] is a {type(v).__name__}, not a tensor"
                for k, v in tensors.items()
                if not isinstance(k, str) or not isinstance(v, torch.Tensor)
            ),
            None,
        )
    )
    step = state["global_step"]
    if bad is None and (isinstance(step, bool) or not isinstance(step, int)):
        bad = f"global_step is {step!r:.40}, not an integer"
    if bad is not None:
        raise ConfigError(
            f"{where}: is damaged or not written by Lightning ({bad}); resume from a "
            "checkpoint this project wrote (<run dir>/checkpoints/last.ckpt)"
        )


def _looks_like_zip(file: Path) -> bool:
    try:
        with open(file, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _reason(err: BaseException) -> str:
    """The first line of ``err`` with its type, without torch's advice to unpickle unsafely."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    for advice in ("weights_only", "Please", "please"):
        text = text.split(advice)[0]
    text = text.strip(" .;:(")
    return f"{type(err).__name__}: {text}"[:120] if text else type(err).__name__


def check_checkpoint(path: str | Path, expected: Mapping[str, torch.Tensor], run: str) -> int:
    """Check that the checkpoint at ``path`` can resume a run whose state is ``expected``.

    Args:
        path: The checkpoint file.
        expected: What the run's LightningModule would save: ``{name: tensor}`` (for PEFT runs
            only the trainable tensors).
        run: How to name the run in messages, e.g. ``model=tiny peft=lora``.

    Returns:
        The checkpoint's global step.

    Raises:
        ConfigError: Naming the file, what it holds and what the run expects.
    """
    state = load_checkpoint_safely(path)
    compare_with_run(state["state_dict"], expected, f"ckpt_path={path}", run)
    return int(state["global_step"])


def compare_with_run(
    saved: Mapping[str, Any], expected: Mapping[str, Any], where: str, run: str
) -> None:
    """Raise a ConfigError naming what ``saved`` holds unlike ``expected`` (anything with .shape).

    Shared by single-file and sharded (FSDP) checkpoints (``training/sharded_checkpoint.py``).
    """
    saved_adapter = any(_ADAPTER.search(k) for k in saved)
    run_adapter = any(_ADAPTER.search(k) for k in expected)
    if saved_adapter != run_adapter:
        held = "LoRA adapters" if saved_adapter else "a full model (no LoRA adapters)"
        wants = "LoRA adapters" if run_adapter else "full weights (no adapters)"
        raise ConfigError(
            f"{where}: holds {held} ({len(saved)} tensors) but this run ({run}) trains {wants}: "
            "resume with the peft setting the checkpoint was trained with"
        )
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ConfigError(
            f"{where}: holds a different model than this run ({run}): {len(missing)} tensors "
            f"missing, {len(unexpected)} unexpected (e.g. {example!r}); resume with the model "
            "and peft settings the checkpoint was trained with"
        )
    for name, tensor in expected.items():
        got = tuple(saved[name].shape)
        if got != tuple(tensor.shape):
            raise ConfigError(
                f"{where}: holds a different model than this run ({run}): {name!r} is "
                f"{list(got)} in the checkpoint, {list(tensor.shape)} in the run; resume with "
                "the model and peft settings (e.g. peft.r) the checkpoint was trained with"
            )


def expected_state(lit: Any) -> dict[str, torch.Tensor]:
    """Return what ``lit`` would write as ``state_dict`` in a checkpoint (PEFT: trainable only)."""
    state = lit.state_dict()
    if getattr(lit, "is_peft", False):
        trainable = {f"model.{n}" for n, p in lit.model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    return state
