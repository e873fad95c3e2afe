"""Shared fixtures: offline hub, offline W&B, and Hydra composition like the entry points do."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

# Tests never touch the network: the hub and W&B are offline by construction.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("WANDB_API_KEY", None)

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "llamahome" / "conf"

# The smallest useful run: tiny Llama, stdlib text, a handful of steps.
TINY_TRAIN = (
    "model=tiny",
    "peft=none",
    "data=stdlib",
    "data.max_seq_length=64",
    "data.batch_size=4",
    "data.max_train_samples=64",
    "data.max_val_samples=8",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=1",
    "optim.lr=3e-3",
    "callbacks.sample_generation.max_new_tokens=4",
    "print_config=false",
)


def compose(config_name: str, overrides: Sequence[str], output_dir: Path):
    """Compose a config exactly as ``@hydra.main`` would, with the run dir set to ``output_dir``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.hydra.runtime.cwd = str(REPO)
    HydraConfig.instance().set_config(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture
def compose_train(tmp_path: Path) -> Callable[..., object]:
    """``compose_train(*overrides, output_dir=None)`` → the train config for a tmp run dir."""

    def _compose(*overrides: str, output_dir: Path | None = None):
        return compose("train", overrides, output_dir or tmp_path / "run")

    return _compose


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not starve on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (model, tokenizer), loaded once per session."""
    from llamahome import load_model

    return load_model("smollm2")


def tiny_llama_config(**overrides):
    """The cache tests' tiny Llama: 2 layers, GQA 4/2, pad 0, bos 1, no eos (never stops)."""
    from transformers import LlamaConfig

    base = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=1,
    )
    return LlamaConfig(**{**base, **overrides})


def one_layer_config(kv_heads: int, groups: int, head_dim: int = 8):
    """One decoder layer, GQA ``kv_heads`` x ``groups``, with the hybrid attention: for tests that
    drive a cache layer directly, as ``LlamaAttention`` would, without a model."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=head_dim * kv_heads * groups,
        num_attention_heads=kv_heads * groups,
        num_key_value_heads=kv_heads,
        num_hidden_layers=1,
        head_dim=head_dim,
    )
    cfg._attn_implementation_internal = "llamahome_hybrid"
    return cfg

