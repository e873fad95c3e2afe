"""FSDP wrapping policies for Llama decoders, full fine-tuning and LoRA alike.

``conf/trainer/fsdp.yaml`` hands these to Lightning's ``FSDPStrategy``:

- :func:`fsdp_wrap_policy` makes every ``LlamaDecoderLayer`` one FSDP unit (its parameters,
  gradients and optimizer state sharded across ranks, gathered one layer at a time). When the
  model mixes frozen and trainable parameters (LoRA), each trainable leaf module (``lora_A``,
  ``lora_B``) becomes its own unit too: FSDP allocates one gradient buffer per flat parameter,
  so a unit holding both a frozen base weight and its adapter would carry a gradient for the
  frozen weight as well. Separate units keep frozen weights out of gradient memory.
- :func:`layer_policy` selects the decoder layers for activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy

DECODER_LAYERS = ("transformers.models.llama.modeling_llama.LlamaDecoderLayer",)


def _classes(paths: Sequence[str | type]) -> tuple[type, ...]:
    from hydra.utils import get_class

    return tuple(p if isinstance(p, type) else get_class(p) for p in paths)


class LoraAwareWrapPolicy(CustomPolicy):
    """Wrap decoder layers; with frozen parameters present, wrap trainable leaves separately.

    Args:
        layer_classes: Module classes that each become one FSDP unit.
    """

    def __init__(self, layer_classes: Sequence[type]) -> None:
        self.layer_classes = tuple(layer_classes)
        self._split_trainable = False
        super().__init__(self._should_wrap)

    def _run_policy(self, root_module: nn.Module, ignored_modules: set, root_kwargs: dict) -> Any:
        # Decided once per model: in a full fine-tune every leaf is trainable, and wrapping each
        # one would only fragment communication.
        flags = {p.requires_grad for p in root_module.parameters()}
        self._split_trainable = flags == {True, False}
        return super()._run_policy(root_module, ignored_modules, root_kwargs)

    def _should_wrap(self, module: nn.Module) -> bool:
        if isinstance(module, self.layer_classes):
            return True
        if not self._split_trainable or next(module.children(), None) is not None:
            return False
        params = list(module.parameters(recurse=False))
        return bool(params) and all(p.requires_grad for p in params)


def fsdp_wrap_policy(layers: Sequence[str | type] = DECODER_LAYERS) -> LoraAwareWrapPolicy:
    """Build the FSDP ``auto_wrap_policy`` of ``conf/trainer/fsdp.yaml``.

    Args:
        layers: Classes (or import paths) of the transformer blocks.

    Returns:
        A policy wrapping each block, plus each trainable leaf when some weights are frozen.
    """
    return LoraAwareWrapPolicy(_classes(layers))


def layer_policy(layers: Sequence[str | type] = DECODER_LAYERS) -> ModuleWrapPolicy:
    """Select the decoder layers, e.g. for ``activation_checkpointing_policy``.

    Args:
        layers: Classes (or import paths) of the transformer blocks.

    Returns:
        ``ModuleWrapPolicy`` over those classes.
    """
    return ModuleWrapPolicy(set(_classes(layers)))
