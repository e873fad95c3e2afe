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
