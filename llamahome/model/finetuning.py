"""What trains and how: LoRA / QLoRA adapters (peft), frozen lower layers, or every parameter.

The ``peft`` config group builds one of:

- ``peft.LoraConfig`` (``peft=lora``): adapters on a full-precision base;
- :class:`QLoRA` (``peft=qlora``): the same adapters on a 4-bit NF4 base (bitsandbytes, CUDA);
- :class:`FreezeLayers` (``peft=freeze_layers``): full fine-tuning of the top layers only;
- nothing (``peft=none``): full fine-tuning.

``llamahome.training.checks.check_finetuning`` validates the choice together with the
memory/speed levers (precision, accumulation, clipping, compile) before anything heavy loads.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

from llamahome.errors import ConfigError

log = logging.getLogger(__name__)

_QUANT_TYPES = ("nf4", "fp4")
_COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
# Lightning precisions whose kernels need CUDA; Lightning would silently swap in bf16 on CPU.
GPU_ONLY_PRECISIONS = ("16-mixed", "16", 16)


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


class QLoRA:
    """LoRA adapters on a base model loaded in 4 bits by bitsandbytes (Dettmers et al., 2023).

    The keys mirror ``transformers.BitsAndBytesConfig`` for the base and ``peft.LoraConfig``
    for the adapters, so ``peft.r=16`` means the same for ``peft=lora`` and ``peft=qlora``.

    Args:
        bnb_4bit_quant_type: ``nf4`` (QLoRA's NormalFloat4) or ``fp4``.
        bnb_4bit_compute_dtype: dtype of the de-quantised matmuls: bfloat16, float16 or float32.
        bnb_4bit_use_double_quant: Also quantise the quantisation constants (~0.4 bit/param).
        **lora: ``peft.LoraConfig`` keyword arguments (``r``, ``lora_alpha``, ...).

    Raises:
        ConfigError: A value is not one of the accepted ones, or a LoRA key is unknown.
    """

    def __init__(
        self,
        bnb_4bit_quant_type: str = "nf4",
        bnb_4bit_compute_dtype: str = "bfloat16",
        bnb_4bit_use_double_quant: bool = True,
        **lora: Any,
    ) -> None:
        from peft import LoraConfig

        if bnb_4bit_quant_type not in _QUANT_TYPES:
            raise ConfigError(
                f"peft.bnb_4bit_quant_type={bnb_4bit_quant_type!r} is not one of {_QUANT_TYPES}."
            )
        if bnb_4bit_compute_dtype not in _COMPUTE_DTYPES:
            raise ConfigError(
                f"peft.bnb_4bit_compute_dtype={bnb_4bit_compute_dtype!r} is not one of "
                f"{_COMPUTE_DTYPES}."
            )
        self.quant_type = bnb_4bit_quant_type
        self.compute_dtype = bnb_4bit_compute_dtype
        self.double_quant = bool(bnb_4bit_use_double_quant)
        try:
            self.lora = LoraConfig(**lora)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"peft: {err}") from err

    def quantization_config(self):
        """Build the ``transformers.BitsAndBytesConfig`` that loads the base in 4 bits."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_use_double_quant=self.double_quant,
        )


def require_qlora_support(accelerator: str | None = None) -> None:
    """Raise unless 4-bit loading can work here: a CUDA GPU and bitsandbytes installed.

    Called before the model loads (by the training checks and ``load_model``), so
    ``peft=qlora`` on a laptop fails in a second instead of after a long download.

    Args:
        accelerator: ``trainer.accelerator`` (``cpu`` rules QLoRA out even with a GPU present).

    Raises:
        ConfigError: No CUDA device, ``trainer.accelerator=cpu``, or no bitsandbytes.
    """
    if accelerator == "cpu" or not torch.cuda.is_available():
        where = (
            "trainer.accelerator=cpu" if accelerator == "cpu" else "this machine has no CUDA GPU"
        )
        raise ConfigError(
            f"peft=qlora loads the base in 4 bits with bitsandbytes CUDA kernels, but {where}; "
            "use peft=lora on CPU (optionally with model.dtype=bfloat16)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "peft=qlora needs bitsandbytes, which is not installed: "
            "pip install 'llamahome[qlora]' (or pip install bitsandbytes)."
        )


def compile_backend(value: Any) -> str | None:
    """Map the ``compile`` key onto a ``torch.compile`` backend name (``None`` = off).

    ``compile=true`` is inductor (generated kernels: the speed-up, minutes of compile on CPU);
    ``compile=aot_eager`` (or any registered backend) traces the same graphs without codegen,
    which is how the tests check the wiring in seconds.

    Raises:
        ConfigError: Not a bool and not a registered backend name.
    """
    if value in (None, False):
        return None
    if value is True:
        return "inductor"
    if isinstance(value, str):
        from torch._dynamo import list_backends

        known = {"inductor", *list_backends(exclude_tags=())}
        if value in known:
            return value
    raise ConfigError(
        f"compile must be true, false or a torch.compile backend name, got {value!r}."
    )


def apply_finetuning(model: torch.nn.Module, method: Any) -> torch.nn.Module:
    """Wrap or freeze ``model`` according to the ``peft`` config group.

    Args:
        model: A causal LM (loaded in 4 bits for :class:`QLoRA`).
        method: A ``peft.PeftConfig`` (LoRA), a :class:`QLoRA`, a :class:`FreezeLayers`, or
            ``None``/empty for full fine-tuning.

    Returns:
        The model to train (a ``PeftModel`` for adapters).

    Raises:
        ConfigError: A target module does not exist in the model, or QLoRA got a model that
            was not loaded in 4 bits.
    """
    if not method:
        model.requires_grad_(True)
        return model
    if isinstance(method, FreezeLayers):
        return _freeze_lower_layers(model, method.num_trainable_layers)
    from peft import PeftConfig, get_peft_model

    if isinstance(method, QLoRA):
        if not getattr(model, "is_loaded_in_4bit", False):
            raise ConfigError(
                "peft=qlora needs the model loaded in 4 bits: "
                "load_model(..., quantization=qlora.quantization_config())."
            )
        method = method.lora
    if not isinstance(method, PeftConfig):
        raise ConfigError(
            f"peft must be a peft.PeftConfig, QLoRA, FreezeLayers or empty, got {type(method)}."
        )
    _check_target_modules(model, getattr(method, "target_modules", None))
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        # Upcasts norms to fp32 and lets inputs carry grads; keeps the user's checkpointing
        # choice (peft would otherwise switch reentrant checkpointing on unconditionally).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=is_checkpointing(model),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    peft_model = get_peft_model(model, method)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info(
        "LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total
    )
    return peft_model


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on, under either transformers name."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _check_target_modules(model: torch.nn.Module, targets: Any) -> None:
    """Fail early, naming peft.target_modules, when a target matches no module of the model."""
    if not targets or isinstance(targets, str):  # a regex or "all-linear": peft validates those
        return
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - leaf_names)
    if missing:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
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
