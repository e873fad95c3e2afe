"""Data parallelism on real processes: trainer=ddp_sim (2 CPU ranks over gloo).

FSDP (trainer=fsdp, fsdp_sim) is tested in tests/test_fsdp.py.
"""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import REPO, TINY_TRAIN
from scaleout_helpers import cli_env


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llamahome.train", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ddp_sim_two_ranks_end_with_identical_weights(tmp_path) -> None:
    result = run_cli(
        *TINY_TRAIN,
        "trainer=ddp_sim",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "export=false",
        "validate_before_fit=false",
        "~callbacks.sample_generation",
        "+callbacks.dump._target_=scaleout_helpers.DumpWeights",
        f"hydra.run.dir={tmp_path}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # two real processes joined one gloo group

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # Each rank trained on its own shard (DistributedSampler through the resumable loader) ...
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])
    # ... and all-reduced gradients kept the replicas bit-identical.
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for name, weight in ranks[0]["state"].items():
        assert torch.equal(weight, ranks[1]["state"][name]), name
    # What rank 0 checkpointed is that same model, after 4 real optimizer steps.
    ckpt = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert ckpt["global_step"] == 4
    for name, weight in ckpt["state_dict"].items():
        assert torch.equal(weight, ranks[0]["state"][name]), name
