"""Data parallelism on real processes: trainer=ddp_sim (2 CPU ranks over gloo); FSDP."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_TRAIN, compose
from scaleout_helpers import cli_env

from llamahome import ConfigError
from llamahome.utils.validation import build


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


def test_fsdp_config_wraps_decoder_layers_and_trainable_leaves(tmp_path) -> None:
    """trainer=fsdp composes into FSDPStrategy with our LoRA-aware wrap policy (CPU: no Trainer)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = compose("train", (*TINY_TRAIN, "trainer=fsdp", "peft=lora"), tmp_path)
    strategy = build(cfg, "trainer.strategy")
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    assert LlamaDecoderLayer in policy.layer_classes
    if not torch.cuda.is_available():
        # Lightning refuses FSDP without CUDA; the entry point reports it as one config error.
        with pytest.raises(ConfigError, match="trainer: .*gpu"):
            build(cfg, "trainer")
        cpu = compose("train", (*TINY_TRAIN, "trainer=fsdp", "trainer.accelerator=cpu"), tmp_path)
        with pytest.raises(ConfigError, match="trainer: .*requires a GPU accelerator"):
            build(cpu, "trainer")


def test_fsdp_lora_units_keep_frozen_weights_out_of_gradient_memory(tmp_path) -> None:
    """Every FSDP unit our policy forms is all-trainable or all-frozen (checked without CUDA).

    FSDP flattens the parameters a unit owns (not those of nested units) into one FlatParameter
    with one gradient buffer; torch's FSDP refuses CPU, so this checks the partition itself.
    """
    from llamahome.model.finetuning import apply_finetuning
    from llamahome.model.load import load_model
    from llamahome.training.distributed import fsdp_wrap_policy

    def units(model, policy):
        wrapped = set(policy._run_policy(model, set(), {})) | {model}
        owned = {}
        for unit in wrapped:
            nested = {
                id(p)
                for m in unit.modules()
                if m is not unit and m in wrapped
                for p in m.parameters()
            }
            owned[unit] = [p for p in unit.parameters() if id(p) not in nested]
        return {u: ps for u, ps in owned.items() if ps}

    cfg = compose("train", (*TINY_TRAIN, "peft=lora"), tmp_path)
    lora = apply_finetuning(load_model(build(cfg, "model"))[0], build(cfg, "peft"))
    lora_units = units(lora, fsdp_wrap_policy())
    for unit, params in lora_units.items():
        assert len({p.requires_grad for p in params}) == 1, type(unit).__name__
    adapters = {id(p) for n, p in lora.named_parameters() if "lora_" in n}
    trainable = [ps for ps in lora_units.values() if ps[0].requires_grad]
    assert {id(p) for ps in trainable for p in ps} == adapters  # exactly the LoRA weights
    # A full fine-tune has nothing frozen: only the decoder layers (+ root) become units.
    full = load_model(build(cfg, "model"))[0]
    assert len(units(full, fsdp_wrap_policy())) == full.config.num_hidden_layers + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP in Lightning needs CUDA")
def test_fsdp_lora_trains_and_resumes_on_gpu(tmp_path) -> None:
    args = (
        *TINY_TRAIN,
        "peft=lora",
        "trainer=fsdp",
        "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.strategy.activation_checkpointing_policy={_target_:llamahome.training.distributed.layer_policy}",
        "trainer.strategy.cpu_offload=true",
        "export=false",
        "~callbacks.sample_generation",
        f"hydra.run.dir={tmp_path}",
    )
    result = run_cli(*args)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    ckpt = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert ckpt["global_step"] == 4
    assert any("lora_" in k for k in ckpt["state_dict"])
    result = run_cli(*args, "trainer.max_steps=6", "ckpt_path=last")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    ckpt = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert ckpt["global_step"] == 6
