"""What reaches the loggers: loss and LR even in short runs, FLOPs and MFU, hparams, samples."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, compose

from llamahome.train import train


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def test_short_run_logs_loss_lr_flops_mfu_hparams_and_samples(tmp_path, caplog) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    overrides = (
        *TINY_TRAIN,
        "export=false",
        "logger=[csv,tensorboard]",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=50",  # above max_steps: clamped, with one warning
        "callbacks.throughput.peak_flops=1e12",  # CPU: Lightning knows no peak, so give one
    )
    with caplog.at_level("WARNING", logger="llamahome.train"):
        train(compose("train", overrides, run))
    assert len([r for r in caplog.records if "log_every_n_steps" in r.getMessage()]) == 1
    with open(run / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["step"] for r in rows if r.get("train/loss")] == ["5"]
    assert any(r.get("lr-AdamW") for r in rows)
    flops = [float(r[k]) for r in rows if r.get(k := "train/device/flops_per_sec")]
    mfu = [float(r["train/device/mfu"]) for r in rows if r.get("train/device/mfu")]
    assert flops and flops[0] > 0 and mfu and 0 < mfu[0] < 1

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    plugins = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins  # the HPARAMS tab has this run
    start_info = plugins["_hparams_/session_start_info"]
    assert b"optim/lr" in start_info and b"model/name" in start_info
    assert "hp/val_loss_best" in events.Tags()["scalars"]
    assert "samples/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "What does the `with` statement do?" in text
    assert (Path(run) / "hparams.yaml").is_file()


def test_csv_logger_appends_across_restarts_and_widens_the_header(tmp_path) -> None:
    from llamahome.training.run_logs import AppendingCSVLogger

    first = AppendingCSVLogger(save_dir=str(tmp_path), name="", version="")
    first.log_metrics({"train/loss": 2.0}, step=0)
    first.log_metrics({"train/loss": 1.5}, step=1)
    first.save()
    # A resumed run: a new logger on the same dir, with a metric the first run never logged.
    second = AppendingCSVLogger(save_dir=str(tmp_path), name="", version="")
    second.log_metrics({"train/loss": 1.0, "val/loss": 1.2}, step=2)
    second.save()
    second.log_metrics({"train/loss": 0.9}, step=3)
    second.save()
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["train/loss"] for r in rows] == ["2.0", "1.5", "1.0", "0.9"]
    assert [r["val/loss"] for r in rows] == ["", "", "1.2", ""]
    assert not list(tmp_path.glob("*.tmp"))
