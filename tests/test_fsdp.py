"""FSDP proven without a GPU: ``trainer=fsdp_sim`` (FSDP2 on two CPU processes over gloo).

One launch of ``tests/fsdp_sim_worker.py`` runs a LoRA fine-tune (with activation
checkpointing) and a full fine-tune, each 4 steps with a sharded checkpoint written at step 2,
and a resume from it to step 4. The reference is one process (``trainer=cpu``, no activation
checkpointing) on the same global batches (per-rank batch 2 x 2 ranks = batch 4).

Tolerance: 1e-4 absolute on the loss (about 1e-5 relative at a loss near 9). Both sides run
the same arithmetic on the same rows; only float re-association differs (two half batches whose
losses are averaged over gloo, instead of one batch): measured 1e-6 or less at every step. What
a broken run would show, measured on the single-process side: another global batch (one rank's
data only, or a lost data position) moves the step-4 loss by 3e-2 to 6e-2; a warm-up schedule
off by two steps (a scheduler restored wrongly) by 3e-3 to 7e-3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TRAIN, compose
from fsdp_sim_worker import CASES, EXPORTS, RUN
from scaleout_helpers import TESTS, cli_env, torch_threads

from llamahome import ConfigError
from llamahome.utils.validation import build

TOLERANCE = 1e-4
SHARD_FILES = {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"}


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), steps  # each step once: the resume did not restart
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(FSDP runs, single-process runs): both cases each way.

    The FSDP side is one launch of ``tests/fsdp_sim_worker.py`` (two ranks, all four fits); the
    single-process references run here meanwhile, on the core that rank 1's start-up leaves.
    """
    from llamahome.train import train

    fsdp, single = tmp_path_factory.mktemp("fsdp_sim"), tmp_path_factory.mktemp("single")
    log = fsdp / "worker.log"
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while the references run
        worker = subprocess.Popen(
            [sys.executable, str(TESTS / "fsdp_sim_worker.py"), str(fsdp)],
            cwd=REPO,
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # rank 1 is its child: a kill of the group ends both
        )
        try:
            with torch_threads(1):  # as the ranks run: same kernels
                for name, extra in CASES.items():
                    args = (*RUN, *extra, "trainer=cpu", "data.batch_size=4")
                    train(compose("train", (*args, f"export={EXPORTS[name]}"), single / name))
            returncode = worker.wait(timeout=600)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
    output = log.read_text()
    assert returncode == 0, output[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # two real processes joined one gloo group
    return fsdp, single


@pytest.fixture(scope="module")
def fsdp_runs(runs: tuple[Path, Path]) -> Path:
    return runs[0]


@pytest.fixture(scope="module")
def single_process(runs: tuple[Path, Path]) -> Path:
    return runs[1]


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_sim_resumes_a_sharded_checkpoint_and_matches_one_process(
    case: str, fsdp_runs: Path, single_process: Path
) -> None:
    from llamahome.training.sharded_checkpoint import is_sharded, saved_shapes

    sharded, reference = losses(fsdp_runs / case), losses(single_process / case)
    assert list(sharded) == list(reference) == [1, 2, 3, 4]
    for step, loss in reference.items():
        assert abs(sharded[step] - loss) < TOLERANCE, (step, sharded[step], loss)
    # The second fit started from the step-2 directory: its record says so, and it logged
    # steps 3 and 4 only (checked above: no step twice).
    history = [json.loads(line) for line in (fsdp_runs / case / "run_history.jsonl").open()]
    starts = [r for r in history if r["event"] == "start"]
    assert [r.get("ckpt_path") for r in starts] == [None, "last"]

    last = fsdp_runs / case / "checkpoints" / "last.ckpt"
    assert is_sharded(last) and {p.name for p in last.iterdir()} == SHARD_FILES
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 4
    saved = saved_shapes(last)
    single = torch.load(single_process / case / "checkpoints" / "last.ckpt", weights_only=True)
    # The same tensors as the single-process checkpoint: LoRA adapters only, or every weight.
    assert saved == {k: v.shape for k, v in single["state_dict"].items()}
    assert all("lora_" in k for k in saved) == (case == "lora")
    assert not list(last.parent.glob(".*"))  # no temporary or set-aside directory left


def test_fsdp_sim_shards_every_layer_and_frozen_weights_get_no_gradient(fsdp_runs: Path) -> None:
    for case in CASES:
        layouts = [json.loads((fsdp_runs / case / f"layout{r}.json").read_text()) for r in (0, 1)]
        assert [x["world_size"] for x in layouts] == [2, 2]
        params = layouts[0]["params"]
        assert all(p["class"] == "DTensor" for p in params.values())
        for name, p in params.items():
            # Each rank holds its half of dim 0 (FSDP2's Shard(0)); together the whole tensor.
            rows = [x["params"][name]["local"][0] for x in layouts]
            assert sum(rows) == p["global"][0] and max(rows) <= -(-p["global"][0] // 2), name
            assert p["grad"] == p["trainable"], name  # frozen base weights: no gradient at all
        frozen = [n for n, p in params.items() if not p["trainable"]]
        assert bool(frozen) == (case == "lora")


def test_fsdp_sim_export_gathers_the_same_weights_as_one_process(
    fsdp_runs: Path, single_process: Path
) -> None:
    from safetensors.torch import load_file

    sharded = load_file(fsdp_runs / "full" / "export" / "model.safetensors")
    single = load_file(single_process / "full" / "export" / "model.safetensors")
    assert sharded.keys() == single.keys()
    for name, weight in single.items():
        torch.testing.assert_close(sharded[name], weight, atol=1e-5, rtol=1e-4, msg=name)


def test_a_sharded_checkpoint_is_checked_before_use_in_one_line(fsdp_runs, tmp_path) -> None:
    from llamahome.training.sharded_checkpoint import check_sharded, saved_shapes

    full_ckpt, lora_ckpt = (fsdp_runs / c / "checkpoints" / "last.ckpt" for c in ("full", "lora"))
    # What a full fine-tune of this model saves (as ckpt_check.expected_state builds it).
    full_run = {k: torch.empty(s, device="meta") for k, s in saved_shapes(full_ckpt).items()}
    assert check_sharded(full_ckpt, full_run, "model=tiny, no adapters") == 4
    with pytest.raises(ConfigError, match="holds LoRA adapters .* trains full weights"):
        check_sharded(lora_ckpt, full_run, "model=tiny, no adapters")
    damaged = tmp_path / "damaged.ckpt"
    damaged.mkdir()
    shutil.copy(full_ckpt / "meta.pt", damaged / "meta.pt")
    (damaged / ".metadata").write_bytes(b"\x80\x04 cut short")
    with pytest.raises(ConfigError, match=r"shard index \(.metadata\) is missing or damaged"):
        check_sharded(damaged, full_run, "model=tiny, no adapters")


# ------------------------------------------------------------------------------ resume paths
def _sharded_dir(path: Path, marker: str) -> Path:
    path.mkdir(parents=True)
    (path / "meta.pt").write_text(marker)
    return path


def test_ckpt_path_last_may_be_a_sharded_directory_and_only_fsdp_reads_it(tmp_path) -> None:
    from llamahome.training.checks import resolve_ckpt_path

    last = _sharded_dir(tmp_path / "checkpoints" / "last.ckpt", "step 4")
    assert resolve_ckpt_path("last", tmp_path, shards=True) == str(last)
    assert resolve_ckpt_path(str(last), tmp_path, shards=True) == str(last)
    with pytest.raises(ConfigError, match="sharded checkpoint .* trainer=fsdp or fsdp_sim"):
        resolve_ckpt_path("last", tmp_path, shards=False)
    (last / "meta.pt").unlink()
    with pytest.raises(ConfigError, match="is a directory but not a sharded checkpoint"):
        resolve_ckpt_path("last", tmp_path, shards=True)


def test_a_kill_between_the_renames_of_a_sharded_save_keeps_the_previous_one(
    tmp_path, monkeypatch
) -> None:
    """replace_dir's only window (old moved aside, new not yet in): resume restores the old."""
    from llamahome.training.checks import resolve_ckpt_path
    from llamahome.utils.paths import replace_dir

    last = _sharded_dir(tmp_path / "checkpoints" / "last.ckpt", "step 2")
    new = _sharded_dir(tmp_path / "checkpoints" / ".last.ckpt.x.tmpdir", "step 4")
    real_rename, renames = os.rename, []

    def killed_at_second_rename(src, dst) -> None:
        renames.append(src)
        if len(renames) == 2:
            raise KeyboardInterrupt  # the process dies here
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_at_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, last)
    monkeypatch.undo()
    assert not last.exists()
    assert resolve_ckpt_path("last", tmp_path, shards=True) == str(last)
    assert (last / "meta.pt").read_text() == "step 2"  # the previous checkpoint, whole
    replace_dir(new, last)  # the next save goes through and leaves nothing aside
    assert (last / "meta.pt").read_text() == "step 4"
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


# ------------------------------------------------------------------------------ configuration
def test_fsdp_and_fsdp_sim_build_the_same_fsdp2_strategy(tmp_path) -> None:
    from llamahome.training.distributed import FSDP2Strategy

    gpu = compose("train", (*TINY_TRAIN, "trainer=fsdp"), tmp_path / "gpu")
    sim = compose("train", (*TINY_TRAIN, "trainer=fsdp_sim"), tmp_path / "sim")
    assert gpu.trainer.strategy == sim.trainer.strategy  # one code path, CPU or GPU
    strategy = build(sim, "trainer.strategy")
    assert isinstance(strategy, FSDP2Strategy) and strategy._save_distributed_checkpoint
    trainer = build(sim, "trainer", logger=False)
    assert trainer.strategy.root_device.type == "cpu" and trainer.num_devices == 2
    if not torch.cuda.is_available():
        # trainer=fsdp asks for GPUs: one config error on a machine without them.
        with pytest.raises(ConfigError, match="trainer: "):
            build(gpu, "trainer")


def test_fsdp_sim_cannot_start_inside_a_local_multirun(tmp_path) -> None:
    from llamahome.training.checks import check_launchable

    cfg = compose("train", (*TINY_TRAIN, "trainer=fsdp_sim"), tmp_path)
    with pytest.raises(ConfigError, match="FSDP2Strategy with trainer.devices=2 cannot run"):
        check_launchable(cfg)


@pytest.mark.parametrize(
    ("override", "phrase"),
    [("compile=aot_eager", "compile=aot_eager with an FSDP"), ("peft=qlora", "qlora with an FSDP")],
)
def test_compile_or_qlora_with_fsdp_is_one_config_error(override, phrase, tmp_path) -> None:
    from llamahome.training.checks import check_finetuning

    cfg = compose("train", (*TINY_TRAIN, "trainer=fsdp_sim", override), tmp_path)
    with pytest.raises(ConfigError, match=phrase):
        check_finetuning(cfg, build(cfg, "peft"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="trainer=fsdp needs CUDA")
def test_fsdp_lora_trains_and_resumes_on_gpu(tmp_path) -> None:
    def run_cli(*overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "llamahome.train", *overrides]
        return subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True)

    args = (
        *TINY_TRAIN,
        "peft=lora",
        "trainer=fsdp",
        "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.strategy.cpu_offload=true",
        "model.gradient_checkpointing=true",
        "~callbacks.sample_generation",
        f"hydra.run.dir={tmp_path}",
    )
    result = run_cli(*args)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 4
    result = run_cli(*args, "trainer.max_steps=6", "ckpt_path=last", "export=false")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 6
    assert (tmp_path / "export" / "adapter" / "adapter_model.safetensors").is_file()
