"""Every config composes; every model config has the published shape."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF_DIR

from llamahome.model.load import resolve_spec

ENTRY_POINTS = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in {"hydra"})
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONF_DIR / group).glob("*.yaml"))]


def entry_point_for(group: str) -> str:
    """The first entry-point config whose defaults list names ``group`` (train before eval)."""
    from omegaconf import OmegaConf

    for name in sorted(ENTRY_POINTS, key=lambda n: n != "train"):
        defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml")).get("defaults", [])
        if any(isinstance(d, dict) and group in d for d in defaults):
            return name
    raise AssertionError(f"no entry point uses conf/{group}")


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(tmp_path, group: str, option: str) -> None:
    from conftest import compose

    cfg = compose(entry_point_for(group), [f"{group}={option}"], tmp_path)
    assert cfg.task_name


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_config_composes(tmp_path, name: str) -> None:
    from conftest import compose

    cfg = compose(name, [], tmp_path)
    assert "model" in cfg


PUBLISHED = {
    "llama7b": 6.74e9,
    "llama13b": 13.0e9,
    "llama70b": 69.0e9,
    "llama3_8b": 8.03e9,
    "llama3_2_1b": 1.24e9,
    "smollm2": 134.5e6,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_config_has_published_parameter_count(name: str) -> None:
    from transformers import LlamaForCausalLM

    spec = resolve_spec(name)
    with torch.device("meta"):
        model = LlamaForCausalLM(spec.llama_config())
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / PUBLISHED[name] - 1) < 0.005, f"{name}: {count / 1e9:.3f}B"


def test_large_models_name_hub_ids() -> None:
    for name in ("llama7b", "llama13b", "llama70b", "llama3_8b", "llama3_2_1b"):
        spec = resolve_spec(name)
        assert spec.hub_id and spec.pretrained == spec.hub_id
        assert spec.trust_remote_code is False
    assert resolve_spec("llama70b").config["num_key_value_heads"] == 8
