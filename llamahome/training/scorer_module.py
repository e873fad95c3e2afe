"""The LightningModule that trains a KV scorer for a frozen model (``experiment=kv_scorer``).

KVzap (arXiv 2601.07891) on our pipeline: for each batch of the DataModule's text, the frozen
model computes its teacher, the KVzip reconstruction scores of every token per layer and KV
head (``kvcache/teacher.py``: one prefill + one reconstruction pass, no gradients), and the
hidden states entering each attention come from the same prefill. The scorer (``KVScorer``: a
linear layer or a small MLP per decoder layer, on the hidden state and the token's position)
learns to predict log(score), by least squares over the real tokens. Validation reports the loss
and ``val/spearman``, the rank correlation of predicted and teacher scores per (row, layer,
head), averaged: what a per-head top-k eviction depends on.

How each kind is fitted (one optimizer step per batch, so ``trainer.max_steps`` counts batches):

* linear (the default, as KVzap's ``Ridge``): exactly. The module keeps the normal equations of
  every token seen so far (``X^T X`` and ``X^T y`` per layer, float64) and each step moves the
  weights to their ridge solution: a Newton step on the least-squares objective, applied by
  plain SGD with learning rate 1 (``configure_optimizers``). No learning rate to tune, and the
  teacher, which costs about three forward passes of the model per batch, is used to the full;
* MLP (``module.hidden_dim``): gradient steps of the ``optim`` group (AdamW) on each batch.

``train/loss`` is measured on each batch *before* the scorer learns from it (an out-of-sample
figure). The first batch sets the scorer's input standardisation and output bias. Checkpoints
hold the scorer and its statistics only (the model comes from its weights again on resume); at
the end ``export_to`` writes the scorer into ``export/kv_scorer/`` next to the unchanged model,
so ``model=<run> cache=learned`` finds both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric
from torchmetrics.functional import spearman_corrcoef

from llamahome.kvcache.attention import register_hybrid_attention
from llamahome.kvcache.kvzip import DEFAULT_CHUNK_SIZE, repeat_prompt
from llamahome.kvcache.learned import KVScorer
from llamahome.kvcache.teacher import kvzip_scores
from llamahome.training.schedules import make_schedule

register_hybrid_attention()  # spawned workers unpickle the model without load_model

__all__ = ["KVScorerModule", "rank_correlation"]


def rank_correlation(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> float:
    """Spearman correlation per (row, head) over the valid tokens, averaged.

    Args:
        pred: (batch, kv_heads, tokens) predicted scores.
        target: (batch, kv_heads, tokens) teacher scores (log or not: ranks are the same).
        valid: (batch, tokens) bool, the real tokens.

    Returns:
        The mean correlation (nan when no row has three real tokens).
    """
    values = []
    for row in range(pred.shape[0]):
        keep = valid[row]
        if int(keep.sum()) < 3:
            continue
        p, t = pred[row][:, keep].T.float(), target[row][:, keep].T.float()  # (tokens, heads)
        values.append(spearman_corrcoef(p, t).reshape(-1))
    if not values:
        return math.nan
    return float(torch.cat(values).nanmean())


class KVScorerModule(L.LightningModule):
    """Trains a `KVScorer` on KVzip scores of a frozen causal LM.

    Args:
        model: The causal LM (frozen here; its weights never change).
        optimizer: A partial taking the scorer's parameters (used by the MLP scorer).
        scheduler: A partial taking ``(optimizer, num_training_steps=...)`` (MLP), or ``None``.
        tokenizer: The model's tokenizer (the reconstruction prompt is in its ids).
        cache_spec: Unused (accepted like ``LlamaLitModule``'s).
        compile: Unused (the teacher runs eager).
        hidden_dim: None for a linear scorer per layer (fitted exactly), else the MLP's width.
        position_features: The scorer also reads the token's position.
        kv_norm_features: The scorer also reads the log norms of the token's keys and values.
        ridge_alpha: The linear fit's L2 penalty, on standardised inputs.
        chunk_size: The teacher's reconstruction chunk, in tokens.
        sinks: The teacher's attention sinks.
        gradient_clip: The MLP's gradient-norm clip (None: none).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        tokenizer: Any = None,
        cache_spec: Any = None,
        compile: bool | str = False,
        hidden_dim: int | None = None,
        position_features: bool = True,
        kv_norm_features: bool = True,
        ridge_alpha: float = 100.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        sinks: int = 4,
        gradient_clip: float | None = 1.0,
    ) -> None:
        super().__init__()
        if tokenizer is None:
            from llamahome.errors import ConfigError

            raise ConfigError("module=kv_scorer needs the model's tokenizer (the teacher prompt).")
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.cache_spec = cache_spec
        text = model.config.get_text_config(decoder=True)
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.scorer = KVScorer(
            text.num_hidden_layers,
            text.hidden_size,
            kv_heads,
            hidden_dim,
            position_features,
            kv_norm_features,
        )
        # Whether the scorer's standardisation was set (saved with it, so a resume keeps it).
        self.register_buffer("normalized", torch.zeros((), dtype=torch.bool))
        self.linear = hidden_dim is None
        if self.linear:  # the normal equations of every token seen, per layer (+ bias column)
            width = self.scorer.mean.shape[1] + 1
            layers = text.num_hidden_layers
            f64 = torch.float64
            self.register_buffer("gram", torch.zeros(layers, width, width, dtype=f64))
            self.register_buffer("moment", torch.zeros(layers, width, kv_heads, dtype=f64))
        self.ridge_alpha = float(ridge_alpha)
        self.prompt = repeat_prompt(tokenizer)
        self.chunk_size, self.sinks = chunk_size, sinks
        self.gradient_clip = gradient_clip
        self.automatic_optimization = False  # the linear fit is a Newton step, not a gradient
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.is_peft = False
        self.strict_loading = False  # checkpoints hold the scorer only
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.val_spearman = MeanMetric()
        self.best_val_loss = math.inf
        self.last_val_spearman = math.nan
        # The throughput callback's FLOPs: the frozen model's forward passes dominate a step.
        self.num_params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = 6 * self.num_params

    def train(self, mode: bool = True) -> KVScorerModule:
        """Train the scorer; the frozen model stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    # ---- the teacher -----------------------------------------------------------------------
    def teacher(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], list, torch.Tensor]:
        """The scorer's inputs, the log-score targets per layer and the real tokens of a batch.

        Each row is one text: positions count its real tokens (packed documents included).
        """
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        out = kvzip_scores(
            self.model,
            ids,
            self.prompt,
            attention_mask=None if mask is None or bool(valid.all()) else mask,
            chunk_size=self.chunk_size,
            sinks=self.sinks,
            with_hidden=True,
        )
        inputs = {
            "hidden_states": out.hidden,
            "positions": (valid.long().cumsum(-1) - 1).clamp(min=0),
            "keys": out.keys,
            "values": out.values,
        }
        return inputs, out.scores, valid

    def _loss(self, inputs, targets, valid) -> tuple[torch.Tensor, list[torch.Tensor]]:
        preds = self.scorer(**inputs)
        weight = valid[:, None, :].float()  # (b, 1, tokens)
        total = sum(((p - t).square() * weight).sum() for p, t in zip(preds, targets, strict=True))
        count = weight.sum() * preds[0].shape[1] * len(preds)
        return total / count.clamp(min=1), preds

    # ---- fitting ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The teacher's scores (no grad), then one fitting step of the scorer."""
        inputs, targets, valid = self.teacher(batch)
        if not bool(self.normalized):
            self.scorer.set_normalization(valid=valid, targets=targets, **inputs)
            self.normalized.fill_(True)
        optimizer = self.optimizers()
        if self.linear:
            with torch.no_grad():
                loss, _ = self._loss(inputs, targets, valid)  # before it learns from the batch
                self._accumulate(inputs, targets, valid)
                optimizer.zero_grad()
                self._newton_direction()
            optimizer.step()  # SGD, lr 1: the weights become the ridge solution
        else:
            loss, _ = self._loss(inputs, targets, valid)
            optimizer.zero_grad()
            self.manual_backward(loss)
            if self.gradient_clip:
                self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip)
            optimizer.step()
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        tokens = int(valid.sum())
        self.train_loss(loss.detach(), tokens)
        self.log("train/loss", self.train_loss, on_step=True, prog_bar=True, batch_size=tokens)
        return loss.detach()

    def _accumulate(self, inputs, targets, valid) -> None:
        for i, t in enumerate(targets):
            x = self.scorer.features(
                i, inputs["hidden_states"][i], inputs["positions"], inputs["keys"][i],
                inputs["values"][i],
            )[valid].double()
            x = torch.cat((x, torch.ones_like(x[:, :1])), dim=1)
            self.gram[i] += x.T @ x
            self.moment[i] += x.T @ t.transpose(1, 2)[valid].double()

    def _newton_direction(self) -> None:
        """Set each linear layer's gradient to (current - ridge solution)."""
        eye = torch.eye(self.gram.shape[-1], dtype=torch.float64, device=self.gram.device)
        eye[-1, -1] = 0.0  # the bias is not penalised
        for i, layer in enumerate(self.scorer.layers):
            solution = torch.linalg.solve(self.gram[i] + self.ridge_alpha * eye, self.moment[i])
            weight, bias = solution[:-1].T.float(), solution[-1].float()
            layer.weight.grad = layer.weight.detach() - weight
            layer.bias.grad = layer.bias.detach() - bias

    def configure_optimizers(self):
        """Linear: SGD with lr 1 applies the Newton step; MLP: the ``optim`` group's optimizer."""
        if self.linear:
            return torch.optim.SGD(self.scorer.parameters(), lr=1.0)
        optimizer = self.optimizer_factory(list(self.scorer.parameters()))
        if self.scheduler_factory is None:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = make_schedule(self.scheduler_factory, optimizer, total)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    # ---- validation ------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Loss and the rank correlation with the teacher on held-out text."""
        inputs, targets, valid = self.teacher(batch)
        with torch.no_grad():
            loss, preds = self._loss(inputs, targets, valid)
        tokens = int(valid.sum())
        self.val_loss(loss.detach(), tokens)
        rho = [rank_correlation(p, t, valid) for p, t in zip(preds, targets, strict=True)]
        rho = [r for r in rho if not math.isnan(r)]
        if rho:
            self.val_spearman(torch.tensor(sum(rho) / len(rho)), tokens)

    def on_validation_epoch_end(self) -> None:
        """Log val/loss and val/spearman."""
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True)
        if self.val_spearman.update_count:
            rho = self.val_spearman.compute()
            self.log("val/spearman", rho, prog_bar=True)
            self.last_val_spearman = float(rho)
        self.val_loss.reset()
        self.val_spearman.reset()
        if not self.trainer.sanity_checking:
            self.best_val_loss = min(self.best_val_loss, float(loss))

    # ---- checkpoints and export ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the scorer and its fit: the frozen model is its own weights."""
        state = checkpoint["state_dict"]
        keep = ("scorer.", "normalized", "gram", "moment")
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k.startswith(keep)}

    def export_to(self, out_dir: Any) -> None:
        """Write the scorer into the export (``<out_dir>/kv_scorer``), with how it was trained."""
        from llamahome.model.scorer import save_scorer

        info = {
            "teacher": {"method": "kvzip", "chunk_size": self.chunk_size, "sinks": self.sinks},
            "target": "log(kvzip score)",
            "fit": "ridge" if self.linear else "gradient",
            "val_loss_best": self.best_val_loss,
            "val_spearman": self.last_val_spearman,
            "steps": int(self.trainer.global_step) if self._trainer is not None else None,
        }
        save_scorer(self.scorer, out_dir, info)
