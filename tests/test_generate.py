"""``python -m llamahome.generate``: Hydra config, streaming, summary line, fail-fast checks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, compose

from llamahome.errors import ConfigError
from llamahome.generate import generate

FAST = ("max_new_tokens=6", "print_config=false", "prompt=Name three colours.")


@pytest.fixture
def compose_generate(tmp_path):
    def _compose(*overrides: str):
        return compose("generate", [*FAST, *overrides], tmp_path / "run")

    return _compose


def test_defaults_are_smollm2_and_h2o(compose_generate):
    cfg = compose_generate()
    assert cfg.model.name == "smollm2" and cfg.cache.policy == "h2o"
    assert cfg.chat_template == "auto" and cfg.stream is True


@pytest.mark.parametrize(("policy", "floor"), [("h2o", 0), ("h2o", 1024), ("full", 1024)])
def test_streams_and_summarises(compose_generate, capsys, policy, floor):
    result = generate(compose_generate(f"cache={policy}", f"cache.min_tokens={floor}"))
    out = capsys.readouterr().out
    assert result["policy"] == policy and 1 <= result["new_tokens"] <= 6
    assert result["text"].strip() and result["text"].strip()[:10] in out  # streamed
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("[generate] prompt ") and f"cache={policy}" in summary
    assert "tok/s" in summary and "MiB held vs" in summary
    if policy == "full" or floor:
        # The default floor: a short prompt is never evicted (exactly the full cache).
        assert result["kv_bytes"] == result["full_kv_bytes"]
    else:
        assert result["kv_bytes"] < result["full_kv_bytes"]


def test_prompt_file_and_no_stream(compose_generate, tmp_path, capsys):
    path = tmp_path / "q.txt"
    path.write_text("Count to five:", encoding="utf-8")
    result = generate(
        compose_generate(
            f"prompt_file={path}",
            "stream=false",
            "chat_template=false",
            "cache=window",
            "cache.window_length=16",
        )
    )
    assert result["policy"] == "window"
    assert result["text"] in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("cache.window_length=0", "cache.window_length"),
        ("cache.heavy_ratio=1.5", "cache.heavy_ratio"),
        ("max_new_tokens=0", "max_new_tokens"),
        ("prompt_file=/nonexistent/q.txt", "prompt_file"),
        ("prompt=' '", "prompt"),
        ("chat_template=maybe", "chat_template"),
    ],
)
def test_bad_values_fail_before_loading_the_model(compose_generate, override, key, monkeypatch):
    import llamahome.model.load as model_module

    def no_load(*a, **k):
        raise AssertionError("the model must not load for a bad value")

    monkeypatch.setattr(model_module, "load_model", no_load)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        generate(compose_generate(override))


def test_module_entry_point(tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamahome.generate",
            "cache=h2o",
            *FAST,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("[generate] prompt ")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamahome.generate",
            "cache.window_length=-1",
            *FAST,
            f"hydra.run.dir={tmp_path / 'bad'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "cache.window_length" in bad.stderr
    assert "Traceback" not in bad.stderr
