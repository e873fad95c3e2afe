"""Ctrl-C and SIGTERM stop a run at the next batch boundary, with ``last.ckpt`` saved.

Lightning already handles SIGTERM gracefully: its signal connector sets
``trainer.received_sigterm``, the training loop raises ``SIGTERMException`` after the current
batch (all DDP ranks at the same batch), and ``PreemptionCheckpoint`` writes ``last.ckpt``.
Ctrl-C (SIGINT) used to raise ``KeyboardInterrupt`` mid-step, which Lightning turns into a
teardown without any checkpoint. :func:`stop_on_signals` routes the first SIGINT through the
same path as SIGTERM, and maps the exit status to the shell's convention:

- SIGTERM: ``last.ckpt`` at the next batch boundary, exit status 143 (128 + 15);
- SIGINT (Ctrl-C): the same, exit status 130 (128 + 2);
- a second Ctrl-C: abort at once (the checkpoint being written, if any, is dropped whole: the
  writer is atomic), exit status 130.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
SIGINT_EXIT_CODE = 128 + signal.SIGINT


class _Interrupts:
    """What happened during this fit: how many SIGINTs arrived."""

    def __init__(self) -> None:
        self.sigints = 0


@contextlib.contextmanager
def stop_on_signals(trainer: Any) -> Iterator[None]:
    """Run ``trainer.fit`` (inside the block) so that SIGINT and SIGTERM save and exit cleanly.

    Args:
        trainer: The Trainer about to fit.

    Raises:
        SystemExit: 143 after SIGTERM, 130 after Ctrl-C (one or two).
    """
    state = _Interrupts()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            state.sigints += 1
            if state.sigints == 1:
                print(
                    "\nCtrl-C: saving last.ckpt after this batch, then stopping "
                    "(press Ctrl-C again to abort at once, without saving).",
                    file=sys.stderr,
                    flush=True,
                )
                trainer._signal_connector.received_sigterm = True
                return
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third press must not interrupt us
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except SIGTERMException as err:
        code = SIGINT_EXIT_CODE if state.sigints else SIGTERM_EXIT_CODE
        name = "Ctrl-C" if state.sigints else "SIGTERM"
        log.warning("Stopped by %s; exiting with status %d.", name, code)
        raise SystemExit(code) from err
    except (KeyboardInterrupt, SystemExit) as err:
        # Lightning answers KeyboardInterrupt with teardown and sys.exit(1).
        if not state.sigints and isinstance(err, SystemExit):
            raise
        log.warning("Aborted by a second Ctrl-C; exiting with status %d.", SIGINT_EXIT_CODE)
        raise SystemExit(SIGINT_EXIT_CODE) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

