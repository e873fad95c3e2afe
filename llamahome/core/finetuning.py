"""What trains: LoRA adapters (peft), frozen lower layers, or every parameter."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from llamahome.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class FreezeLayers:
    """Full fine-tuning of the top layers only: embeddings and the lower layers stay frozen.

    Attributes:
        num_trainable_layers: How many of the last decoder layers train (plus norm and head).
    """

    num_trainable_layers: int = 2

    def __post_init__(self) -> None:
        """Reject a non-positive count up front."""
        if self.num_trainable_layers <= 0:
            raise ConfigError(
                f"peft.num_trainable_layers must be > 0, got {self.num_trainable_layers}."
            )


def apply_finetuning(model: torch.nn.Module, method: Any) -> torch.nn.Module:
    """Wrap or freeze ``model`` according to the ``peft`` config group.

    Args:
        model: A causal LM.
        method: A ``peft.PeftConfig`` (LoRA, QLoRA), a :class:`FreezeLayers`, or ``None``/empty
            for full fine-tuning.

    Returns:
        The model to train (a ``PeftModel`` for adapters).

    Raises:
        ConfigError: A target module does not exist in the model.
    """
    if not method:
        model.requires_grad_(True)
        return model
    if isinstance(method, FreezeLayers):
        return _freeze_lower_layers(model, method.num_trainable_layers)
    from peft import PeftConfig, get_peft_model

    if not isinstance(method, PeftConfig):
        raise ConfigError(f"peft must be a peft.PeftConfig, FreezeLayers or empty, got {type(method)}.")
    _check_target_modules(model, getattr(method, "target_modules", None))
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    peft_model = get_peft_model(model, method)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    return peft_model


def _check_target_modules(model: torch.nn.Module, targets: Any) -> None:
    """Fail early, naming peft.target_modules, when a target matches no module of the model."""
    if not targets or isinstance(targets, str):  # a regex or "all-linear": peft validates those
        return
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - leaf_names)
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            f"peft.target_modules {missing} not found in the model; its linear layers are {linear}."
        )


def _freeze_lower_layers(model: torch.nn.Module, num_trainable: int) -> torch.nn.Module:
    layers = model.model.layers
    if num_trainable > len(layers):
        raise ConfigError(
            f"peft.num_trainable_layers={num_trainable} exceeds the model's {len(layers)} layers."
        )
    model.requires_grad_(False)
    for layer in layers[-num_trainable:]:
        layer.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    if not model.config.tie_word_embeddings:
        model.lm_head.requires_grad_(True)
    return model
