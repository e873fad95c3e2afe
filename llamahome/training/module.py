"""The LightningModule: a Hugging Face causal LM, its optimizer, scheduler and metrics."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from llamahome.data import IGNORE_INDEX
from llamahome.kvcache.attention import register_hybrid_attention
from llamahome.training.schedules import make_schedule

# A spawned worker (ddp_spawn, DataLoader workers) unpickles this module without ever calling
# load_model: register the hybrid attention name here so the unpickled model can run.
register_hybrid_attention()


_MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")


class CheapMaskDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose CPU mask is ``rand >= p`` rather than ``bernoulli_``: same law.

    Each element is kept with probability 1 - p and scaled by 1 / (1 - p), as in
    ``nn.Dropout``. torch draws a CPU ``bernoulli_`` one element at a time; ``rand`` is about
    twice as fast, and LoRA draws a mask over the input of every adapted linear (7 per block):
    on SmolLM2 with LoRA the masks were ~10% of a CPU training step. On GPUs the fused kernel
    of ``nn.Dropout`` is kept.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop and rescale in training; the identity in eval mode."""
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand(x.shape, dtype=torch.float32, device=x.device) >= self.p
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


def use_cheap_dropout_masks(model: torch.nn.Module) -> int:
    """Swap the LoRA dropouts of a PEFT model for `CheapMaskDropout`; return how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout and dropout.p > 0 and not dropout.inplace:
                dropouts[name] = CheapMaskDropout(dropout.p)
                swapped += 1
    return swapped


class LlamaLitModule(L.LightningModule):
    """Trains a (PEFT-wrapped or full) ``LlamaForCausalLM`` on tokenized batches.

    Batches are dicts with ``input_ids``, ``attention_mask``, ``labels`` (-100 where no loss
    is taken) and optionally ``position_ids`` (packed sequences).

    Args:
        model: The causal LM (a ``PeftModel`` for LoRA runs).
        optimizer: A partial that takes the trainable parameters (``_partial_: true``).
        scheduler: A partial that takes ``(optimizer, num_training_steps=...)``, or ``None``.
        tokenizer: Kept for sample generation and export; never checkpointed.
        cache_spec: KV-cache policy used wherever this module generates (sample callbacks).
        compile: ``torch.compile`` the model's forward at fit start: ``True`` (inductor), a
            backend name (``aot_eager``: graphs without codegen, seconds to compile), or
            ``False``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        tokenizer: Any = None,
        cache_spec: Any = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cache_spec = cache_spec
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.compile = compile
        self._compiled_forward: Callable[..., Any] | None = None
        # PEFT checkpoints hold only the trainable tensors; the frozen base comes from the
        # pretrained weights on resume, so loading must tolerate the missing keys.
        self.is_peft = hasattr(model, "peft_config")
        self.strict_loading = not self.is_peft
        if self.is_peft:
            use_cheap_dropout_masks(model)  # no state: checkpoints and exports are unchanged
        vocab = model.config.vocab_size
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_accuracy = MulticlassAccuracy(
            num_classes=vocab, ignore_index=IGNORE_INDEX, average="micro", validate_args=False
        )
        self.best_val_loss = math.inf
        self.num_params = sum(p.numel() for p in model.parameters())
        # nanoGPT/PaLM estimate: 6 FLOPs per parameter per token (forward + backward); the
        # throughput callback adds attention (training.callbacks.batch_flops).
        self.flops_per_token = 6 * self.num_params

    def forward(self, batch: dict[str, torch.Tensor]):
        """Run the HF model on the batch's model inputs (extra collate keys are ignored)."""
        inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
        if self._compiled_forward is not None:
            return self._compiled_forward(**inputs)
        return self.model(**inputs)

    def configure_model(self) -> None:
        """Shard (trainer=fsdp|fsdp_sim), then compile lazily: Lightning's hook for both."""
        from llamahome.model.finetuning import compile_backend

        parallelize = getattr(self.trainer.strategy, "parallelize", None)
        if parallelize is not None:  # FSDP2Strategy (llamahome/training/distributed.py)
            parallelize(self.model)

        backend = compile_backend(self.compile)
        if backend and self._compiled_forward is None:
            # The forward, not the module: state-dict keys keep no `_orig_mod.` (checkpoints
            # resume with or without compile, exports need no unwrapping), and generate() in
            # the sample callback, with its ever-growing cache shapes, stays eager.
            self._compiled_forward = torch.compile(self.model.forward, backend=backend)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimisation step's loss; logs train/loss and tokens seen."""
        loss = self(batch).loss
        tokens = self._loss_tokens(batch)
        self.train_loss(loss.detach(), tokens)
        self.log("train/loss", self.train_loss, on_step=True, prog_bar=True, batch_size=tokens)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Token-weighted loss and next-token accuracy on the validation set."""
        out = self(batch)
        tokens = self._loss_tokens(batch)
        self.val_loss(out.loss.detach(), tokens)
        preds = out.logits[:, :-1].argmax(-1)
        self.val_accuracy(preds.reshape(-1), batch["labels"][:, 1:].reshape(-1))

    def on_validation_epoch_end(self) -> None:
        """Log val/loss, val/ppl and val/acc, aggregated across ranks by torchmetrics."""
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss.clamp(max=20)))
        self.log("val/acc", self.val_accuracy.compute())
        self.val_loss.reset()
        self.val_accuracy.reset()
        if not self.trainer.sanity_checking:
            self.best_val_loss = min(self.best_val_loss, float(loss))

    def configure_optimizers(self):
        """AdamW (or any partial) over trainable params, with a per-step scheduler."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = make_schedule(self.scheduler_factory, optimizer, total)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop frozen base weights from PEFT checkpoints: they are megabytes, not gigabytes."""
        if not self.is_peft:
            return
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}

    @staticmethod
    def _loss_tokens(batch: dict[str, torch.Tensor]) -> int:
        # HF shifts labels by one: the first position never carries loss.
        return max(1, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))

