"""Chat in the terminal with a bounded KV cache: ``python -m llamahome.chat``.

Answers stream as they are generated; a status line follows each one (tokens, tok/s, KV held
vs what a full cache would hold, and whether the cache of the earlier turns was reused).
Commands: ``/reset``, ``/cache <policy> [budget]`` (e.g. ``/cache h2o 0.2``, ``/cache full``),
``/help``, ``/exit`` (or Ctrl-D). Ctrl-C stops an answer.

    python -m llamahome.chat                              # SmolLM2-135M-Instruct, h2o cache
    python -m llamahome.chat model=outputs/train/runs/<time> cache=full
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from llamahome.errors import LlamaHomeError
from llamahome.utils.cli import launch, quiet_libraries, user_errors
from llamahome.utils.validation import build

REPLACEMENT = "\ufffd"
_UNDECODED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of undecodable bytes

HELP = (
    "commands: /reset (forget the conversation) | /cache <policy> [ratio|tokens] "
    "(e.g. /cache h2o 0.2, /cache full) | /cache (show) | /help | /exit (or Ctrl-D)"
)


def describe(spec: Any) -> str:
    """``h2o budget 20%`` / ``window 256 tokens`` / ``full``, for the terminal."""
    if spec.policy == "full":
        return "full"
    floor = getattr(spec, "min_tokens", 0)
    floor = f", no eviction up to {floor} tokens" if floor else ""
    if spec.budget_ratio is not None:
        return f"{spec.policy} budget {spec.budget_ratio:.0%}{floor}"
    if spec.window_length is not None:
        return f"{spec.policy} {spec.window_length} tokens"  # a count has no floor
    return f"{spec.policy}{floor}"


def handle_command(line: str, session: Any) -> bool:
    """Run one ``/command``; return False when the chat should end."""
    from llamahome.model.chat import cache_spec_from_command

    word, *args = line.split()
    if word in ("/exit", "/quit"):
        return False
    if word == "/reset":
        session.reset()
        print("[chat] conversation cleared")
    elif word == "/cache" and not args:
        print(f"[chat] cache={describe(session.cache_spec)}")
    elif word == "/cache":
        try:
            session.set_cache(cache_spec_from_command(args, session.cache_spec))
        except LlamaHomeError as err:
            print(f"error: {err}")
        else:
            print(f"[chat] cache={describe(session.cache_spec)} (the history is prefilled again)")
    elif word == "/help":
        print(HELP)
    else:
        print(f"unknown command {word}; {HELP}")
    return True


def tolerate_bad_bytes() -> None:
    """Let stdin bytes that are not UTF-8, and output stdout cannot encode, never end the chat.

    Undecodable input bytes come through as lone surrogates (``surrogateescape``), which
    :func:`clean_input` replaces and reports; stdout replaces what its encoding lacks.
    """
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "replace")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)


def clean_input(line: str) -> tuple[str, int]:
    """Replace the bytes ``surrogateescape`` could not decode (U+DC80-U+DCFF) with U+FFFD.

    Returns:
        The text, safe for any tokenizer, and how many bytes were replaced.
    """
    bad = _UNDECODED.findall(line)
    return (_UNDECODED.sub(REPLACEMENT, line), len(bad)) if bad else (line, 0)


def repl(session: Any, read=input) -> None:
    """Read messages and commands until /exit or end of input.

    A line with bytes that are not UTF-8 is answered with them replaced (and one line saying
    so); an unexpected failure of one answer prints one ``error:`` line and the chat goes on
    with its history (``LLAMAHOME_DEBUG=1`` raises it instead).
    """
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # at the prompt: a fresh line, like a shell
            print()
            continue
        except UnicodeDecodeError as err:  # a stream not set up by tolerate_bad_bytes()
            print(f"[chat] input is not UTF-8 (byte {err.start}); type the message again")
            continue
        line, replaced = clean_input(line)
        if replaced:
            print(
                f"[chat] {replaced} byte(s) of the input were not UTF-8 and were replaced with "
                f"{REPLACEMENT}",
                flush=True,
            )
        if not line:
            continue
        if line.startswith("/"):
            if not handle_command(line, session):
                return
            continue
        try:
            _, stats = session.send(line, on_text=lambda text: print(text, end="", flush=True))
        except KeyboardInterrupt:
            print("\n[chat] answer interrupted")
            continue
        except LlamaHomeError as err:
            print(f"error: {type(err).__name__}: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - one failed answer must not end the session
            if os.environ.get("LLAMAHOME_DEBUG"):
                raise
            first = (str(err).strip().splitlines() or [""])[0][:200]
            print(f"\nerror: {type(err).__name__}: {first} (the conversation goes on)")
            continue
        print()
        print(stats.status_line(), flush=True)


def chat(cfg: DictConfig) -> None:
    """Compose, load, and run the chat loop."""
    from llamahome.model.generation import SAMPLING_KEYS, sampling_kwargs

    cache_spec = build(cfg, "cache")
    model_spec = build(cfg, "model")
    gen_kwargs = sampling_kwargs(**{key: cfg.get(key) for key in SAMPLING_KEYS})
    from llamahome.model.scorer import check_scorer_available

    check_scorer_available(cache_spec, model_spec)
    if cfg.get("print_config"):
        from llamahome.utils.rich_utils import print_config_tree

        print_config_tree(cfg)

    import torch
    from transformers.utils import logging as hf_logging

    from llamahome.model.chat import ChatSession
    from llamahome.model.context import check_length, model_context
    from llamahome.model.load import load_model

    # max_new_tokens is kept free in the context on every turn: it must leave room for a message.
    max_new = gen_kwargs["max_new_tokens"]
    check_length(
        f"max_new_tokens={max_new}", max_new, model_context(model_spec), 1, "a message",
        hint="lower max_new_tokens",
    )
    hf_logging.disable_progress_bar()  # no loading bars in a terminal conversation
    torch.manual_seed(int(cfg.get("seed") or 0))
    model, tokenizer = load_model(model_spec)
    session = ChatSession(model, tokenizer, cache_spec, gen_kwargs, cfg.get("system_prompt"))
    template = "" if session.has_template else " | no chat template: plain User:/Assistant: text"
    print(
        f"[chat] model {model_spec.name} | cache={describe(cache_spec)}{template} | "
        "/help for commands, /exit or Ctrl-D to quit",
        flush=True,
    )
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    tolerate_bad_bytes()
    repl(session)


@hydra.main(version_base="1.3", config_path="conf", config_name="chat")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    quiet_libraries()
    with user_errors():
        chat(cfg)


if __name__ == "__main__":
    launch(main, "chat")  # model=<dir|run|hub id>, one-line errors, fast --help
