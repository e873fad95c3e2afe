"""Hydra multiruns on real processes: a grid, Optuna, a failing job, the submitit launcher."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_TRAIN
from omegaconf import OmegaConf
from scaleout_helpers import cli_env
from wandb_records import config_keys, run_record

# Two optimizer steps and one validation per job: sweeps test orchestration, not learning.
JOB = (
    *TINY_TRAIN,
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "data.max_val_samples=4",
    "export=false",
    "validate_before_fit=false",
    "~callbacks.sample_generation",
)


def multirun(
    sweep_dir: Path, *args: str, job: tuple[str, ...] = JOB, timeout: int = 400, code: int = 0
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamahome.train",
            "-m",
            *job,
            *args,
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == code, (result.stdout + result.stderr)[-4000:]
    return result


def statuses(sweep_dir: Path, jobs: int) -> list[dict]:
    found = [json.loads((sweep_dir / str(n) / "job_status.json").read_text()) for n in range(jobs)]
    assert not (sweep_dir / str(jobs)).exists()
    return found


def job_overrides(job_dir: Path) -> set[str]:
    return set(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))


def test_grid_multirun_2x2_one_dir_metric_and_wandb_run_per_job(tmp_path) -> None:
    sweep = tmp_path / "grid"
    multirun(sweep, "peft=lora", "logger=wandb", "optim.lr=0.003,0.001", "peft.r=4,8")
    jobs = statuses(sweep, 4)
    grid = {
        frozenset(o for o in j["overrides"] if o.startswith(("optim.lr", "peft.r"))) for j in jobs
    }
    assert grid == {
        frozenset({f"optim.lr={lr}", f"peft.r={r}"}) for lr in ("0.003", "0.001") for r in (4, 8)
    }
    groups, names = set(), set()
    for job in jobs:
        job_dir = Path(job["dir"])
        assert job_dir.parent == sweep and job["status"] == "completed"
        assert set(job["overrides"]) <= job_overrides(job_dir)
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()
        # The value handed to the sweeper is the job's optimized_metric (val/loss).
        assert job["metric"] == "val/loss" and math.isfinite(job["value"])
        assert job["value"] == pytest.approx(job["metrics"]["val/loss"])
        # One offline W&B run per job, all in the sweep's group, tagged with the job's overrides.
        (run_dir,) = (job_dir / "wandb").glob("offline-run-*")
        log_file = next(run_dir.glob("run-*.wandb"))
        record = run_record(log_file)
        assert record.run_id == (job_dir / "wandb_run_id.txt").read_text().strip()
        assert record.job_type == "train"
        assert {o for o in job["overrides"] if o.startswith("peft.r")} <= set(record.tags)
        assert {"model", "optim", "peft", "trainer"} <= config_keys(log_file)
        groups.add(record.run_group)
        names.add(record.display_name)
    assert groups == {f"tiny-stdlib-{sweep.name}"} and len(names) == 4
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["completed"] == [0, 1, 2, 3] and summary["failed"] == []
    assert summary["best"]["value"] == min(j["value"] for j in jobs)


def test_optuna_two_trials_minimise_the_returned_metric(tmp_path) -> None:
    sweep = tmp_path / "optuna"
    # A value given on the command line pins a searched parameter: leave optim.lr to Optuna.
    job = tuple(o for o in JOB if not o.startswith("optim.lr"))
    multirun(sweep, "peft=lora", "hparams_search=optuna", "hydra.sweeper.n_trials=2", job=job)
    jobs = statuses(sweep, 2)
    values = [j["value"] for j in jobs]
    assert all(j["status"] == "completed" and math.isfinite(j["value"]) for j in jobs)
    for job in jobs:  # Optuna chose both searched parameters for every trial
        keys = {o.split("=")[0] for o in job["overrides"]}
        assert {"optim.lr", "peft.r"} <= keys
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    assert result.best_value == pytest.approx(min(values))  # what main() returned, minimised
    assert set(result.best_params) == {"optim.lr", "peft.r"}


def test_a_failing_job_is_logged_and_summarised_and_the_sweep_goes_on(tmp_path) -> None:
    sweep = tmp_path / "failing"
    result = multirun(sweep, "optim.lr=-1,3e-3", code=1)  # a job failed: the sweep exits 1
    output = result.stdout + result.stderr
    failed, completed = statuses(sweep, 2)
    assert failed["status"] == "failed" and "ConfigError" in failed["error"]
    assert "optim.lr" in failed["error"]
    assert (sweep / "0" / "error.log").read_text().startswith("Traceback")
    assert completed["status"] == "completed" and math.isfinite(completed["value"])
    assert "Job #0 failed: ConfigError" in output
    assert "Traceback" not in output  # one line in the log; the traceback is in error.log
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["failed"] == [0] and summary["completed"] == [1]
    assert "#0 FAILED: ConfigError" in output
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: 1 of 2 sweep jobs failed (#0); see {sweep / 'sweep_summary.json'}"


def test_submitit_local_launcher_isolates_a_job_that_crashes_mid_training(tmp_path) -> None:
    sweep = tmp_path / "submitit"
    result = multirun(
        sweep,
        "hydra/launcher=submitit_local",
        "+callbacks.crash._target_=scaleout_helpers.CrashAtStep",
        "+callbacks.crash.step=1,1000",  # job 0 raises after its first step, job 1 never does
        code=1,
    )
    crashed, completed = statuses(sweep, 2)
    assert crashed["status"] == "failed"
    assert crashed["error"] == "RuntimeError: crash on purpose at step 1"
    assert completed["status"] == "completed" and math.isfinite(completed["value"])
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # each job ran as its own process
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["failed"] == [0] and summary["completed"] == [1]
    assert "#0 FAILED: RuntimeError" in result.stdout + result.stderr


def test_slurm_launcher_config_runs_one_task_per_gpu(tmp_path) -> None:
    """hydra/launcher=slurm composes onto the plugin's SlurmLauncher (no cluster here)."""
    from conftest import compose

    cfg = compose("train", ("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"), tmp_path)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 4
    assert launcher["signal_delay_s"] > 0 and launcher["max_num_timeout"] == 0
