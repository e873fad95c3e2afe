"""Use what you trained: generate's default cache on short inputs, bad prompts, a round trip."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_TRAIN, compose

from llamahome.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama and its BPE tokenizer, saved as a Hugging Face directory.

    Its matrices are drawn with std 0.2: with the default init (0.02) the answer is one token
    repeated whatever the context, so a cache that drops context could not change it.
    """
    import torch

    from llamahome import load_model
    from llamahome.model.export import export_hf

    model, tokenizer = load_model("tiny")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    path = tmp_path_factory.mktemp("usage") / "tiny"
    export_hf(model, tokenizer, path)
    return path


LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d ")


def run(module: str, *args: str, tmp_path: Path, stdin: str | None = None, timeout=300):
    """``python -m <module> *args`` from the repo root, offline, in a tmp run dir."""
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / f"out-{module.rsplit('.', 1)[-1]}-{len(list(tmp_path.iterdir()))}"
    return subprocess.run(
        [sys.executable, "-m", module, *args, f"hydra.run.dir={out}"],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def answer(proc: subprocess.CompletedProcess) -> tuple[str, str]:
    """The generated text and the summary line of ``python -m llamahome.generate``."""
    assert proc.returncode == 0, proc.stderr[-2000:]
    text, _, summary = proc.stdout.rpartition("[generate] prompt ")
    # Log lines (timestamped, from Hydra's console handler) are not the answer.
    text = "\n".join(line for line in text.splitlines() if not LOG_LINE.match(line))
    return text, summary


# ---- generate: the default cache never hurts a short input ----------------------------------


def test_default_cache_on_a_short_prompt_is_exactly_the_full_cache(tiny_dir, tmp_path):
    common = (f"model={tiny_dir}", f"prompt='{SHORT}'", "max_new_tokens=24", "print_config=false")
    default, d_summary = answer(run("llamahome.generate", *common, tmp_path=tmp_path))
    full, f_summary = answer(run("llamahome.generate", *common, "cache=full", tmp_path=tmp_path))
    assert "cache=h2o" in d_summary and "cache=full" in f_summary
    assert default == full and "new 24 tokens" in d_summary
    # The floor is what makes them equal: without it the 20% budget evicts and the answer changes.
    from llamahome.generate import generate

    fast = ("model=hf", f"model.pretrained={tiny_dir}", f"prompt='{SHORT}'", "stream=false")
    full = generate(_compose(tmp_path / "a", *fast, "max_new_tokens=24", "cache=full"))
    no_floor = generate(_compose(tmp_path / "b", *fast, "max_new_tokens=24", "cache.min_tokens=0"))
    assert full["text"] != no_floor["text"] and no_floor["kv_bytes"] < full["kv_bytes"]


def _compose(tmp_path: Path, *overrides: str):
    return compose("generate", ["print_config=false", "max_new_tokens=4", *overrides], tmp_path)


def test_prompt_longer_than_the_context_is_one_error(tiny_dir, tmp_path):
    from llamahome.generate import generate

    long_file = tmp_path / "long.txt"
    long_file.write_text("import os\n" * 1500, encoding="utf-8")  # > 2048 tokens
    with pytest.raises(ConfigError, match=r"prompt_file=.*long.txt is \d+ tokens \(\+ 1 for the "
                       r"answer\) but the model's context is 2048 tokens"):
        generate(_compose(tmp_path, "model=hf", f"model.pretrained={tiny_dir}",
                          f"prompt_file={long_file}", "cache=full"))


def test_prompt_filling_most_of_the_context_gets_a_shorter_answer(tiny_dir, tmp_path):
    from llamahome.generate import generate

    near = tmp_path / "near.txt"
    near.write_text("x = 1\n" * 500, encoding="utf-8")
    result = generate(_compose(tmp_path / "r", "model=hf", f"model.pretrained={tiny_dir}",
                               f"prompt_file={near}", "max_new_tokens=4000", "stream=false"))
    assert result["prompt_tokens"] + result["new_tokens"] <= 2048


def test_prompt_file_that_is_not_utf8_is_one_error_line(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café, naïve\n".encode("latin-1"))
    proc = run("llamahome.generate", f"prompt_file={bad}", tmp_path=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: ConfigError: prompt_file='{bad}' is not UTF-8 text (byte 3: invalid "
        "continuation byte): save it as UTF-8."
    ]


# ---- train, then generate, chat and eval the run --------------------------------------------


@pytest.mark.slow
def test_train_then_generate_chat_and_eval_the_run(tmp_path):
    fast = [o for o in TINY_TRAIN if not o.startswith(("trainer.max_steps", "trainer.val_check"))]
    proc = run(
        "llamahome.train", *fast, "trainer.max_steps=2", "trainer.val_check_interval=2",
        "validate_before_fit=false", "logger=csv", tmp_path=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.split("run dir: ")[-1].strip().splitlines()[0])
    assert (run_dir / "export" / "config.json").is_file()

    text, summary = answer(run(
        "llamahome.generate", f"model={run_dir}", "prompt=import", "max_new_tokens=8",
        "print_config=false", tmp_path=tmp_path,
    ))
    assert "new 8 tokens" in summary and "cache=h2o" in summary

    chat = run(
        "llamahome.chat", f"model={run_dir}/export", "max_new_tokens=6",
        stdin="def main():\n/cache full\nprint(1)\n", tmp_path=tmp_path,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert f"model {run_dir.name}-export" in chat.stdout
    assert chat.stdout.count("[chat] 6 tokens") == 2

    proc = run(
        "llamahome.eval", f"model={run_dir}", "task.length=40", "task.prefix=8",
        "task.show_progress=false", tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[eval] streaming_ppl ppl=" in proc.stdout and f"{run_dir.name}/export" in proc.stdout
