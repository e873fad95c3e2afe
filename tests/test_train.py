"""The training entry point on real parts: tiny Llama, real Trainer, real checkpoints and exports."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TRAIN
from wandb_records import config_keys, history_keys, run_record

from llamahome import ConfigError
from llamahome.train import train


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as file:
        return list(csv.DictReader(file))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_tiny_trains_and_loss_falls(compose_train, tmp_path) -> None:
    cfg = compose_train(*TINY_TRAIN)
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    rows = read_metrics(run)
    train_loss = column(rows, "train/loss")
    val_loss = column(rows, "val/loss")
    assert train_loss[-1] < train_loss[0] - 0.5, train_loss
    assert len(val_loss) == 3  # before fit, then every 6 steps
    assert val_loss[-1] < val_loss[0], val_loss
    assert metrics["val/loss"] == pytest.approx(val_loss[-1], rel=1e-5)
    assert metrics["train/tokens_per_sec"] > 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    best = [p for p in (run / "checkpoints").glob("step*.ckpt")]
    assert len(best) == 1
    assert (run / "config_tree.log").exists() is False  # print_config=false
    assert (run / "export" / "model.safetensors").is_file()


def test_resume_from_last_checkpoint_continues_the_global_step(compose_train, tmp_path) -> None:
    run = tmp_path / "resume"
    first = compose_train(*TINY_TRAIN, "trainer.max_steps=6", "export=false", output_dir=run)
    train(first)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 6
    resumed = compose_train(*TINY_TRAIN, "ckpt_path=last", "export=false", output_dir=run)
    train(resumed)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 12
    steps = [int(r["step"]) for r in read_metrics(run) if r.get("train/loss")]
    assert max(steps) == 11 and 6 in steps  # the second run logged steps 6..11, not 0..5 again


def test_lora_export_reloads_with_identical_logits(compose_train) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamahome import load_model

    cfg = compose_train(*TINY_TRAIN, "peft=lora", "trainer.max_steps=4", "optim.lr=1e-2")
    train(cfg)
    export = Path(cfg.paths.output_dir) / "export"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    assert (export / "adapter" / "adapter_config.json").is_file()
    assert (export / "adapter" / "adapter_model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(export)
    merged = AutoModelForCausalLM.from_pretrained(export).eval()
    base, _ = load_model("tiny", attn_implementation="sdpa")
    adapter = PeftModel.from_pretrained(base, export / "adapter").eval()
    ids = tokenizer(["for i in range(10):\n    print(i)"], return_tensors="pt")
    with torch.no_grad():
        merged_logits = merged(**ids).logits
        adapter_logits = adapter(**ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)
    with adapter.disable_adapter(), torch.no_grad():
        base_logits = adapter(**ids).logits
    assert not torch.allclose(base_logits, merged_logits, atol=1e-4)  # the adapter did learn


def test_negative_learning_rate_fails_before_the_model_loads(compose_train, monkeypatch) -> None:
    import llamahome.model.load as model_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("model loaded before config validation")

    monkeypatch.setattr(model_module, "build_or_load_model", must_not_load)
    with pytest.raises(ConfigError, match="optim.lr"):
        train(compose_train(*TINY_TRAIN, "optim.lr=-1e-3"))


def test_wandb_offline_writes_a_run_with_metrics(compose_train) -> None:
    cfg = compose_train(*TINY_TRAIN, "trainer.max_steps=4", "logger=wandb", "export=false")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    assert run_id in offline_runs[0].name
    log_file = next(offline_runs[0].glob("run-*.wandb"))
    assert {"train/loss", "val/loss", "val/ppl", "trainer/global_step"} <= history_keys(log_file)
    run_info = run_record(log_file)
    assert run_info.run_id == run_id and run_info.job_type == "train"
    assert run_info.run_group == cfg.run_name
    assert {"model", "data", "optim", "trainer"} <= config_keys(log_file)


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "llamahome.train", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_cli_missing_weights_is_one_line(tmp_path) -> None:
    result = run_cli("model=llama7b", f"hydra.run.dir={tmp_path}", "print_config=false")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ModelError" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_cli_unknown_key_fails_fast(tmp_path) -> None:
    result = run_cli("optim.not_a_key=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "not_a_key" in result.stderr and "Traceback" not in result.stderr


def test_constant_schedule_and_gradient_checkpointing_train(compose_train, tmp_path) -> None:
    """Every shipped option trains: ``scheduler=constant`` (no num_training_steps) holds the LR,
    and ``model.gradient_checkpointing=true`` gives the loss of the plain run."""
    losses = []
    for i, extra in enumerate(((), ("model.gradient_checkpointing=true",))):
        cfg = compose_train(*TINY_TRAIN, "scheduler=constant", "trainer.max_steps=4",
                            "export=false", "validate_before_fit=false", *extra,
                            output_dir=tmp_path / f"run{i}")
        train(cfg)
        rows = read_metrics(Path(cfg.paths.output_dir))
        lrs = {float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")}
        assert lrs == {cfg.optim.lr}, lrs
        losses.append(column(rows, "train/loss"))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
