"""Hugging Face exports: a PEFT adapter and a merged full model, safetensors, tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Write what ``from_pretrained`` (transformers, peft, vLLM) loads, with no LlamaHome import.

    Layout::

        out_dir/            merged full model: config.json, model.safetensors,
                            generation_config.json, tokenizer files
        out_dir/adapter/    (PEFT runs) adapter_config.json + adapter_model.safetensors

    The merge happens in place, so call this when training is over.

    Args:
        model: The trained model, ``PeftModel`` or plain ``PreTrainedModel``.
        tokenizer: Its tokenizer.
        out_dir: Target directory.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(out / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    make_portable(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("HF export written to %s", out)
    return out


def make_portable(model: torch.nn.Module) -> None:
    """Strip load-time details that would stop plain transformers from reading the export."""
    config = model.config
    # A GGUF source leaves a quantization_config although the weights are de-quantised tensors.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    # Our attention name is registered only when llamahome is imported: save the SDPA default.
    if getattr(config, "_attn_implementation", None) not in (None, "sdpa", "eager", "flash_attention_2"):
        model.set_attn_implementation("sdpa")
    config.use_cache = True
