"""``python -m llamahome.chat``: typed at a pseudo-terminal, as a person would (tiny model)."""

from __future__ import annotations

import os
import re
import signal
import sys

import pytest
from conftest import REPO

from llamahome.errors import CacheError
from llamahome.kvcache.spec import CacheSpec

pexpect = pytest.importorskip("pexpect")

pytestmark = pytest.mark.usefixtures("one_thread")

# A ChatML-like template in the tokenizer's own special tokens.
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
STATUS = re.compile(
    r"\[chat\] (\d+) tokens, ([\d.]+) tok/s \| KV ([\d.]+) MiB held vs ([\d.]+) MiB full"
    r"(?: \(\d+%\))?, (\d+) of (\d+) tokens, keep \d+% \| cache=(\w+) \| ([^\r\n]*)"
)
PROMPT = "\r\n> "
LONG = " ".join(f"word{i} and" for i in range(60))  # ~200 tokens: past the floor below


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny random Llama with its BPE tokenizer and a chat template, saved as HF files."""
    from llamahome import load_model
    from llamahome.model.export import export_hf

    model, tokenizer = load_model("tiny")
    tokenizer.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("chat") / "tiny"
    export_hf(model, tokenizer, path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from llamahome import load_model

    return load_model(str(tiny_dir))


def _default_ctrl_c() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and an ignored
    # signal stays ignored across exec: under `make test &` or `nohup`, the chat would inherit
    # that and Ctrl-C would do nothing. A person at a terminal has the default; so does the test.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(tmp_path, *args: str):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llamahome.chat", *args, f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=str(REPO),
        env=env,
        encoding="utf-8",
        timeout=180,
        dimensions=(50, 400),
        preexec_fn=_default_ctrl_c,
    )
    child.expect(r"\[chat\] model .*/help for commands")
    child.expect_exact("> ")
    return child


def say(child, text: str) -> re.Match:
    """Type a message, wait for its status line and the next prompt; return the status match."""
    child.sendline(text)
    child.expect(STATUS)
    status = child.match
    child.expect_exact(PROMPT)
    return status


def command(child, text: str) -> str:
    """Type a /command; return what it printed."""
    child.sendline(text)
    child.expect_exact(PROMPT)
    return child.before


def test_answers_stream_reset_and_eof(tiny_dir, tmp_path):
    child = spawn(tmp_path, f"model={tiny_dir}", "cache=full", "max_new_tokens=12")
    child.sendline("Hello there, what is a list?")
    child.expect(STATUS)
    answer_and_status = child.before
    first = child.match
    child.expect_exact(PROMPT)
    assert int(first.group(1)) == 12 and first.group(7) == "full"
    assert "prefilled" in first.group(8) and "new conversation" in first.group(8)
    assert answer_and_status.strip(), "the answer is printed before the status line"

    second = say(child, "And a dict?")  # history: the first turn comes from the cache
    assert second.group(8).startswith("reused "), second.group(8)
    assert int(second.group(6)) > int(first.group(6))  # the conversation grew

    assert "conversation cleared" in command(child, "/reset")
    again = say(child, "Hello there, what is a list?")
    assert again.group(8) == first.group(8)  # same prefill as a fresh conversation
    assert again.group(6) == first.group(6)

    out = command(child, "/bogus")
    assert "unknown command /bogus" in out and "/reset" in out and "/cache" in out
    assert "/exit" in command(child, "/help")

    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_cache_switch_and_smaller_kv_for_h2o(tiny_dir, tmp_path):
    child = spawn(
        tmp_path, f"model={tiny_dir}", "cache=h2o", "cache.min_tokens=32", "max_new_tokens=8"
    )
    assert "cache=full" in command(child, "/cache full")
    full = say(child, LONG)
    assert full.group(7) == "full" and full.group(3) == full.group(4)

    out = command(child, "/cache h2o 0.2")
    assert "cache=h2o budget 20%" in out
    h2o = say(child, LONG)
    assert h2o.group(7) == "h2o" and "cache switched" in h2o.group(8)
    held, full_mib = float(h2o.group(3)), float(h2o.group(4))
    held_tokens, seen = int(h2o.group(5)), int(h2o.group(6))
    assert held < full_mib and held_tokens < seen
    assert held_tokens <= max(32, 0.2 * seen) + 8  # the budget (+ the answer's tokens)

    assert "error:" in command(child, "/cache h2o 7.5")
    assert "unknown cache policy" in command(child, "/cache lru")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(tiny_dir, tmp_path):
    child = spawn(tmp_path, f"model={tiny_dir}", "cache=full", "max_new_tokens=1500")
    child.sendline("Tell me everything.")
    child.expect_exact("Tell me everything.\r\n")  # the terminal's echo
    child.expect(r"\S")  # the answer has started streaming
    child.sendintr()
    child.expect_exact("[chat] answer interrupted")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# ---- the session, in process ----------------------------------------------------------------


def test_reused_cache_gives_the_tokens_of_a_fresh_prefill(tiny):
    from llamahome.model.chat import ChatSession

    model, tokenizer = tiny
    kwargs = {"max_new_tokens": 10, "do_sample": False}
    session = ChatSession(model, tokenizer, CacheSpec(policy="full"), kwargs)
    pieces: list[str] = []
    first, stats1 = session.send("What is a tuple?", on_text=pieces.append)
    assert "".join(pieces) == first and len(pieces) >= 1
    assert stats1.reused == 0 and stats1.new_tokens == 10
    second, stats2 = session.send("And a set?")
    assert stats2.reused > 0 and stats2.prefilled < stats2.prompt_tokens

    fresh = ChatSession(model, tokenizer, CacheSpec(policy="full"), kwargs)
    fresh.messages = session.messages[:-2]
    again, stats3 = fresh.send("And a set?")
    assert stats3.reused == 0 and again == second


def test_cache_command_parsing():
    from llamahome.model.chat import cache_spec_from_command

    current = CacheSpec(policy="h2o", min_tokens=16)
    spec = cache_spec_from_command(["h2o", "0.2"], current)
    assert spec.policy == "h2o" and spec.budget_ratio == 0.2 and spec.min_tokens == 16
    full = cache_spec_from_command(["full"], current)
    assert cache_spec_from_command(["sink", "0.5"], full).min_tokens == 16  # the floor travels
    assert cache_spec_from_command(["window", "64"], current).window_length == 64
    assert cache_spec_from_command(["full"], current).policy == "full"
    for bad in (["lru"], ["h2o", "x"], ["h2o", "-1"], ["full", "0.5"], []):
        with pytest.raises(CacheError):
            cache_spec_from_command(bad, current)


def test_message_longer_than_the_context_is_one_error(tiny):
    from llamahome.errors import ConfigError
    from llamahome.model.chat import ChatSession

    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, CacheSpec(policy="full"), {"max_new_tokens": 4})
    session.context = 64
    with pytest.raises(ConfigError, match="context is 64 tokens"):
        session.send(LONG)
    assert session.messages == []  # the refused message is not in the history


def test_an_evicting_cache_lives_across_turns(smollm2):
    """SmolLM2 re-tokenizes its own answers exactly: the h2o cache continues, bounded."""
    from llamahome.model.chat import ChatSession

    model, tokenizer = smollm2
    spec = CacheSpec(policy="h2o", budget_ratio=0.5, min_tokens=16)
    session = ChatSession(model, tokenizer, spec, {"max_new_tokens": 6, "do_sample": False})
    _, first = session.send("What is a Python list?")
    assert first.kv_tokens < first.seen_tokens  # it evicted
    _, second = session.send("And a tuple?")
    assert second.reused == first.seen_tokens and second.prefilled < 20
    assert second.kv_tokens == first.kv_tokens < second.seen_tokens  # bounded, not re-built
