"""Faults that must lose nothing: resume, a busy run dir, Ctrl-C, a full disk.

Every test checks what survived: the rows of ``metrics.csv``, the step in ``last.ckpt``, the
exit status, and that the user saw one ``error:`` line and no traceback.
"""

from __future__ import annotations

import csv
import errno
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TRAIN, compose
from scaleout_helpers import cli_env
from test_resume import pause_at, start, wait_for, wait_for_pause

from llamahome.errors import ConfigError
from llamahome.train import train
from llamahome.utils.cli import user_errors
from llamahome.utils.rundir import LOCK_FILE, lock_run_dir, read_run_history, unlock_run_dir

RUN = (*TINY_TRAIN, "export=false", "validate_before_fit=false", "~callbacks.sample_generation")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def train_steps(run: Path) -> list[int]:
    return [int(r["step"]) for r in rows(run) if r.get("train/loss")]


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# ------------------------------------------------------------------------------ resume
def test_resume_appends_metrics_tensorboard_wandb_and_the_run_record(tmp_path) -> None:
    run = tmp_path / "run"
    first = (*RUN, "logger=many", "trainer.max_steps=6")
    train(compose("train", first, run))
    before = rows(run)
    assert train_steps(run) == list(range(6))
    wandb_id = (run / "wandb_run_id.txt").read_text().strip()

    # New metric keys appear after the resume (validate_before_fit adds none; val rows exist):
    # the header widens, the old rows keep their values.
    train(compose("train", (*RUN, "logger=many", "ckpt_path=last"), run))
    after = rows(run)
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 12
    assert train_steps(run) == list(range(12))  # 0..5 kept, 6..11 appended: continuous
    assert len(after) > len(before)
    for old, new in zip(before, after, strict=False):
        assert {k: v for k, v in old.items() if v} == {k: v for k, v in new.items() if v}
    # TensorBoard: one log dir (version ""), both runs' event files in it.
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) >= 2
    # W&B: the resumed run attached to the same run id.
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(wandb_id in p.name for p in offline)
    history = read_run_history(run)
    assert [h["event"] for h in history] == ["start", "end", "start", "end"]
    assert [h.get("global_step") for h in history if h["event"] == "end"] == [6, 12]
    assert history[2]["ckpt_path"] == "last"


# ------------------------------------------------------------------------------ lock
def _hold_lock(run: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from llamahome.utils.rundir import lock_run_dir; "
        "lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(300)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=cli_env()
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_in_a_busy_dir_fails_at_once_naming_the_pid(tmp_path) -> None:
    run = tmp_path / "busy"
    holder = _hold_lock(run)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another run \(PID {holder.pid}"):
            train(compose("train", RUN, run))
        result = subprocess.run(
            [sys.executable, "-m", "llamahome.train", f"hydra.run.dir={run}", "model=tiny"],
            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 2
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(run) in errors[0] and f"PID {holder.pid}" in errors[0]
        assert "Traceback" not in result.stderr
        assert not (run / ".hydra").exists()  # refused before Hydra wrote anything
        assert not (run / "metrics.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    # kill -9 leaves the lock file with the dead PID; the next run takes it over.
    assert str(holder.pid) in (run / LOCK_FILE).read_text()
    assert lock_run_dir(run) is True
    unlock_run_dir(run)


# ------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_saves_last_ckpt_at_that_step_and_exits_130(tmp_path) -> None:
    proc = start(tmp_path, *pause_at(3))
    wait_for_pause(proc, 3)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]
    assert ckpt_step(tmp_path / "checkpoints" / "last.ckpt") == 3, output[-3000:]
    assert "Traceback" not in output
    assert train_steps(tmp_path) == list(range(3))  # every finished step was logged
    # and the run continues from there, appending to its history
    train(compose("train", (*RUN, "ckpt_path=last"), tmp_path))
    assert train_steps(tmp_path) == list(range(12))


def test_second_ctrl_c_aborts_at_once_without_a_partial_checkpoint(tmp_path) -> None:
    # The first Ctrl-C's checkpoint write stalls for 600 s (SlowCheckpointIO); the second must
    # abort it: a run that waited for the write would still be running at the timeout.
    proc = start(
        tmp_path,
        "trainer.plugins=[{_target_:scaleout_helpers.SlowCheckpointIO,hold_on:1}]",
        *pause_at(2),
    )
    try:
        wait_for_pause(proc, 2)
        proc.send_signal(signal.SIGINT)
        wait_for(proc, "SCALEOUT-TEST writing")
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    checkpoints = tmp_path / "checkpoints"
    assert not (checkpoints / "last.ckpt").exists()  # never a half-written last.ckpt
    assert not list(checkpoints.glob(".last.ckpt.*.tmp"))


# ------------------------------------------------------------------------------ full disk
def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_ckpt(
    tmp_path, monkeypatch, capsys
) -> None:
    from llamahome.training.checkpointing import AtomicCheckpointIO

    original = AtomicCheckpointIO._write
    writes = {"last": 0}

    def fill_disk(self, checkpoint, file, target):
        if target.name == "last.ckpt":
            writes["last"] += 1
            if writes["last"] == 2:  # step 12: the disk is full halfway through
                file.write(b"x" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device")
        original(self, checkpoint, file, target)

    monkeypatch.setattr(AtomicCheckpointIO, "_write", fill_disk)
    run = tmp_path / "full"
    with pytest.raises(SystemExit) as exit_info, user_errors():
        train(compose("train", RUN, run))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "StorageError" in lines[0] and "last.ckpt" in lines[0]
    assert "No space left" in lines[0] and "Traceback" not in err
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 6  # the previous one, whole
    assert not list((run / "checkpoints").glob(".last.ckpt.*.tmp"))
    assert train_steps(run) == list(range(12))  # nothing logged was lost
    assert read_run_history(run)[-1]["status"] == "failed"


# ------------------------------------------------------------------------------ no validation
def test_val_fraction_zero_trains_without_validation_and_still_checkpoints(
    tmp_path, caplog
) -> None:
    run = tmp_path / "noval"
    cfg = compose(
        "train", (*TINY_TRAIN, "export=false", "~callbacks.sample_generation",
                  "data.val_fraction=0"), run,
    )
    with caplog.at_level("WARNING", logger="llamahome.train"):
        metrics = train(cfg)
    warnings = [r for r in caplog.records if "no validation" in r.getMessage()]
    assert len(warnings) == 1 and "data.val_fraction=0" in warnings[0].getMessage()
    assert not [r for r in rows(run) if r.get("val/loss")]
    assert train_steps(run) == list(range(12))
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 12  # resume still works
    assert metrics["val/loss_first"] != metrics["val/loss_first"]  # NaN: never validated


def test_a_split_that_leaves_validation_empty_names_val_fraction_and_counts(tmp_path) -> None:
    from llamahome.errors import DataError

    data = tmp_path / "one.jsonl"
    data.write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n')
    cfg = compose(
        "train", (*RUN, "data=alpaca", f"data.path={data}", "data.val_fraction=0.2"),
        tmp_path / "run",
    )
    with pytest.raises(DataError, match=r"data.val_fraction=0.2 .*\(1 train, 0 validation\)"):
        train(cfg)
