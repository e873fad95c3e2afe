"""One way to name a model: conf name, HF directory, train run (or its export/), hub id."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose

from llamahome import ConfigError, ModelError, load_model
from llamahome.utils.cli import model_argument

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fake train run: ``<run>/export`` holds the tiny model, its BPE tokenizer and config."""
    from llamahome.model.export import export_hf

    model, tokenizer = load_model("tiny")
    run = tmp_path_factory.mktemp("runs") / "2026-01-01_00-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    export_hf(model, tokenizer, run / "export")
    return run


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("def main():\n    return 0", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


# ---- the command-line rewrite ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["tiny", "smollm2", "hf"])
def test_conf_options_pass_unchanged(value):
    argv = ["prog", f"model={value}", "cache=full"]
    assert model_argument(argv) == ["prog", f"model={value}", "cache=full"]


def test_a_directory_becomes_model_hf_with_an_absolute_path(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir.parent)
    argv = model_argument(["prog", "cache=full", f"model={run_dir.name}/export", "seed=1"])
    assert argv == [
        "prog",
        "cache=full",
        "model=hf",
        f"model.pretrained='{run_dir / 'export'}'",
        f"model.name='{run_dir.name}-export'",
        "seed=1",
    ]


def test_a_hub_id_becomes_model_hf_and_a_sweep_list_is_left_to_hydra():
    argv = model_argument(["prog", "model=HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert argv[1:] == [
        "model=hf",
        "model.pretrained='HuggingFaceTB/SmolLM2-135M-Instruct'",
        "model.name='SmolLM2-135M-Instruct'",
    ]
    assert model_argument(["prog", "model=tiny,smollm2"]) == ["prog", "model=tiny,smollm2"]


@pytest.mark.parametrize("value", ["tinyy", "./no/such/dir", "a b/c"])
def test_neither_option_path_nor_hub_id_is_one_error_line(value, capsys):
    with pytest.raises(SystemExit) as info:
        model_argument(["prog", f"model={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: ConfigError: model={value} is not a conf/model option (")
    assert "tiny" in err and "hub id" in err and "\n" not in err


def test_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"0")
    with pytest.raises(SystemExit):
        model_argument(["prog", f"model={path}"])
    assert "is a file" in capsys.readouterr().err


def test_model_hf_composes_with_the_name_following_the_path(run_dir, tmp_path):
    from llamahome.utils.validation import build

    argv = model_argument(["prog", f"model={run_dir}"])
    cfg = compose("generate", argv[1:], tmp_path)
    spec = build(cfg, "model")
    assert spec.name == run_dir.name and spec.pretrained == str(run_dir)
    assert spec.gguf_file is None and spec.tokenizer is None
    # Without model.name, the name still follows the path.
    cfg = compose("generate", ["model=hf", f"model.pretrained={run_dir}/export"], tmp_path)
    assert build(cfg, "model").name == f"{run_dir.name}-export"


# ---- load_model -----------------------------------------------------------------------------


def test_run_dir_and_export_load_the_trained_weights(run_dir):
    reference = _logits(*load_model("tiny"))
    for source in (run_dir, run_dir / "export"):
        model, tokenizer = load_model(str(source))
        assert torch.allclose(_logits(model, tokenizer), reference, atol=1e-5)


def test_pretrained_export_under_the_gguf_default_loads_the_export(run_dir):
    # model=smollm2 model.pretrained=<run>/export: the export has no GGUF file; load it as HF.
    reference = _logits(*load_model("tiny"))
    model, tokenizer = load_model("smollm2", pretrained=str(run_dir / "export"))
    assert model.config.hidden_size == 128
    assert torch.allclose(_logits(model, tokenizer), reference, atol=1e-5)
    # model=tiny (tokenizer: bpe) model.pretrained=<run>: the run's own tokenizer is used.
    model, tokenizer = load_model("tiny", pretrained=str(run_dir))
    assert torch.allclose(_logits(model, tokenizer), reference, atol=1e-5)


def test_a_run_without_export_names_the_path(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    with pytest.raises(ModelError, match=r"train run with no export yet \(.*export has no config"):
        load_model(str(run))
    with pytest.raises(ModelError, match="no export yet"):
        load_model("smollm2", pretrained=str(run))


def test_a_directory_that_is_no_model_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match="has no config.json, so it is not a Hugging Face model"):
        load_model(str(tmp_path))


def test_unknown_hub_id_says_no_local_dir_and_no_hub_access():
    with pytest.raises(ModelError) as info:
        load_model("no/such")
    message = str(info.value)
    assert message.startswith("cannot load ")
    assert "no local directory 'no/such'" in message and "no access to the hub" in message


def test_dtype_accepts_torch_dtypes():
    from llamahome.model.load import resolve_spec

    assert resolve_spec("tiny", dtype=torch.bfloat16).dtype == "bfloat16"
    model, _ = load_model("tiny", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="model.dtype"):
        resolve_spec("tiny", dtype=torch.int8)


# ---- the entry points, as a user types them -------------------------------------------------


def _run(module: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args, f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_and_eval_take_a_run_dir(run_dir, tmp_path):
    proc = _run(
        "llamahome.generate", f"model={run_dir}", "cache=full", "max_new_tokens=4",
        "prompt=def", "print_config=false", tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("[generate] prompt ")
    proc = _run(
        "llamahome.eval", f"model={run_dir}", "task.length=40", "task.prefix=8",
        "task.show_progress=false", tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"| {run_dir.name}/export |" in proc.stdout


def test_a_typo_is_one_error_line_from_the_entry_point(tmp_path):
    proc = _run("llamahome.generate", "model=tinyy", tmp_path=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ConfigError: model=tinyy is not a conf/model")


def test_train_fine_tunes_from_a_run_dir(run_dir, tmp_path):
    from conftest import TINY_TRAIN

    from llamahome.train import train

    argv = model_argument(["prog", *TINY_TRAIN, f"model={run_dir}"])
    argv = [a for a in argv[1:] if a != "model=tiny"]
    overrides = [*argv, "trainer.max_steps=2", "trainer.val_check_interval=2", "export=false"]
    cfg = compose("train", overrides, tmp_path / "run")
    assert cfg.model.pretrained == str(run_dir)
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss_first"]) and math.isfinite(metrics["val/loss"])
