"""Fine-tune (LoRA or full) or train a Llama from scratch: ``python -m llamahome.train``.

With no arguments it fine-tunes the embedded SmolLM2-135M with LoRA on the Python reference
manual (``data=pydoc``), offline, on CPU, in a few minutes. Everything is a Hydra override:
``python -m llamahome.train model=tiny data=stdlib peft=none trainer.max_steps=200``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from llamahome.utils.cli import is_rank_zero, launch, quiet_libraries, user_errors
from llamahome.utils.sweep import in_multirun, run_sweep_job
from llamahome.utils.tracking import finish_run, redacted_config
from llamahome.utils.validation import build, check_seed

log = logging.getLogger("llamahome.train")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit in a locked run dir, with the start and the outcome in ``run_history.jsonl``.

    Args:
        cfg: The composed ``conf/train.yaml``.

    Returns:
        The metrics of :func:`fit_and_export`.
    """
    from llamahome.utils.reuse import check_reuse
    from llamahome.utils.rundir import (
        append_run_record,
        is_committed,
        is_launching_rank,
        run_dir_locked,
    )

    output_dir = Path(cfg.paths.output_dir)
    with run_dir_locked(output_dir):  # before anything is written: one live run per dir
        if is_launching_rank():  # a finished run here is resumed or overwritten, never reused
            check_reuse(output_dir, "train", cfg.get("ckpt_path"), cfg.get("overwrite", False))
        status: dict[str, Any] = {"event": "end", "status": "failed"}
        try:
            metrics = fit_and_export(cfg, status)
            status["status"] = "completed"
            return metrics
        except SystemExit as err:
            status["status"] = "interrupted" if err.code in (130, 143) else "failed"
            status["exit_code"] = err.code
            raise
        finally:
            if is_committed(output_dir):  # a run refused by its checks leaves no record
                append_run_record(output_dir, status)


def fit_and_export(cfg: DictConfig, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build everything the config names, fit, export; return the final metrics.

    What the config alone can tell is checked before torch, Lightning or transformers load, so
    a typo is answered in about a second; then the checks that need torch (the optimizer on a
    dummy parameter, the fine-tuning method), all before the model loads.

    Args:
        cfg: The composed ``conf/train.yaml``.
        status: The run record's end entry; ``global_step`` is added once fit returns.

    Returns:
        Metrics: the Trainer's callback metrics plus ``val/loss_first``, ``val/loss_best``,
        ``train/tokens_per_sec`` and ``time/total_s``.
    """
    from llamahome.training.checks import (
        check_learning_rate,
        check_trainer,
        resolve_ckpt_path,
        shards_model,
    )
    from llamahome.training.run_guards import (
        adapt_to_missing_validation,
        check_sequence_length,
        clamp_log_every,
    )

    start = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)

    # 1. Validate from the config alone (no torch yet): everything a typo can break fails here.
    check_trainer(cfg)
    clamp_log_every(cfg)
    adapt_to_missing_validation(cfg)
    check_learning_rate(cfg)
    check_seed(cfg)
    model_spec = build(cfg, "model")
    cache_spec = build(cfg, "cache")
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, shards=shards_model(cfg))
    check_sequence_length(cfg, model_spec)  # last: a model's config may need transformers
    if cfg.get("print_config") and is_rank_zero():
        from llamahome.utils.rich_utils import print_config_tree

        print_config_tree(cfg)  # saved in the run dir once the run commits (below)

    # 2. The checks that need torch: the optimizer on a dummy parameter, the fine-tuning method.
    import lightning as L
    import torch

    from llamahome.model.finetuning import apply_finetuning
    from llamahome.model.load import load_model, load_tokenizer
    from llamahome.model.scorer import check_scorer_available
    from llamahome.training.checks import check_finetuning, check_launchable, check_optimizer
    from llamahome.training.ckpt_check import check_checkpoint, expected_state
    from llamahome.training.loggers import remember_wandb_runs
    from llamahome.training.module import LlamaLitModule
    from llamahome.training.run_logs import finish_run_hyperparams, log_run_hyperparams
    from llamahome.training.sharded_checkpoint import check_sharded
    from llamahome.training.signals import stop_on_signals
    from llamahome.utils.reuse import commit_run
    from llamahome.utils.rich_utils import print_config_tree, print_table
    from llamahome.utils.rundir import start_fields

    check_optimizer(cfg)
    if in_multirun():
        check_launchable(cfg)
    check_scorer_available(cache_spec, model_spec)  # cache=learned: is there a scorer?
    lit_module = build(cfg, "module") or LlamaLitModule  # a partial; conf/module
    finetuning = build(cfg, "peft")
    # QLoRA without a GPU, fp16 AMP on CPU, bad levers: fail now; the 4-bit config if qlora.
    quantization = check_finetuning(cfg, finetuning)
    L.seed_everything(cfg.seed, workers=True)

    # 3. Data (tokenizer first: the data module tokenizes with it and validates its keys).
    tokenizer = load_tokenizer(model_spec)
    datamodule = build(cfg, "data", tokenizer=tokenizer)

    # 4. Model, adapters, LightningModule.
    load_start = time.perf_counter()
    model, tokenizer = load_model(model_spec, tokenizer=tokenizer, quantization=quantization)
    model = apply_finetuning(model, finetuning)
    model.train()
    log.info("Model %s ready in %.1f s", model_spec.name, time.perf_counter() - load_start)
    lit = lit_module(
        model=model,
        optimizer=build(cfg, "optim"),
        scheduler=build(cfg, "scheduler"),
        tokenizer=tokenizer,
        cache_spec=cache_spec,
        compile=cfg.get("compile", False),
    )

    if ckpt_path is not None:  # one clear line for a wrong, damaged or foreign checkpoint
        run = f"model={model_spec.name}, {'LoRA' if lit.is_peft else 'no adapters'}"
        check = check_checkpoint if Path(ckpt_path).is_file() else check_sharded
        check(ckpt_path, expected_state(lit), run)

    # Every check passed: only now does the run write into its directory (a refused command
    # leaves a run dir it shares with an earlier run byte for byte as it was).
    commit_run(output_dir, bool(cfg.get("overwrite")), start_fields(cfg))
    if cfg.get("print_config") and is_rank_zero():
        print_config_tree(cfg, save_to=output_dir / "config_tree.log", echo=False)

    # 5. Trainer with callbacks and loggers from their config groups.
    callbacks = [build(cfg, f"callbacks.{name}") for name in cfg.get("callbacks") or {}]
    loggers = [build(cfg, f"logger.{name}") for name in cfg.get("logger") or {}]
    log_run_hyperparams(loggers, redacted_config(cfg))
    trainer = build(cfg, "trainer", callbacks=[c for c in callbacks if c], logger=loggers or False)
    remember_wandb_runs(loggers)

    first_val = None
    # SIGTERM or Ctrl-C: last.ckpt at the next batch boundary, exit 143 or 130.
    with stop_on_signals(trainer):
        if cfg.get("validate_before_fit") and ckpt_path is None and not trainer.fast_dev_run:
            results = trainer.validate(lit, datamodule=datamodule, verbose=False)
            first_val = results[0].get("val/loss") if results else None
        trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
    if status is not None:
        status["global_step"] = trainer.global_step
    finish_run_hyperparams(loggers, lit.best_val_loss, trainer.global_step)

    metrics = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if torch.is_tensor(v) or isinstance(v, float)
    }
    metrics["val/loss_first"] = first_val if first_val is not None else float("nan")
    metrics["val/loss_best"] = lit.best_val_loss
    throughput = next((c for c in callbacks if hasattr(c, "tokens_per_second")), None)
    metrics["train/tokens_per_sec"] = throughput.tokens_per_second if throughput else float("nan")

    if cfg.get("export") and not trainer.fast_dev_run:
        from llamahome.model.export import export_hf
        from llamahome.training.distributed import gather_full_model

        def unsharded() -> Any:
            return apply_finetuning(load_model(model_spec, tokenizer=tokenizer)[0], finetuning)

        # FSDP: every rank sends its shards; rank 0 exports an unsharded copy.
        model = gather_full_model(lit.model, unsharded, trainer.is_global_zero)
        if trainer.is_global_zero:
            export_hf(model, tokenizer, output_dir / "export", spec=model_spec)
            if hasattr(lit, "export_to"):  # module=kv_scorer: the scorer next to the model
                lit.export_to(output_dir / "export")
    metrics["time/total_s"] = time.perf_counter() - start
    finish_run()  # one W&B run per job: the next sweep job (same process) starts its own
    if trainer.is_global_zero:
        _print_summary(metrics, trainer, output_dir, print_table)
    return metrics


def _print_summary(metrics: dict[str, float], trainer, output_dir: Path, print_table) -> None:
    keys = [
        "val/loss_first", "val/loss", "val/loss_best", "val/ppl", "val/acc",
        "train/tokens_per_sec", "time/total_s",
    ]
    rows = [{"metric": k, "value": metrics[k]} for k in keys if k in metrics]
    rows.insert(0, {"metric": "global_step", "value": trainer.global_step})
    print_table("LlamaHome run summary", rows)
    print(f"run dir: {output_dir}")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers.

    In a multirun (``-m``) a failing job is logged and recorded in its ``job_status.json`` and
    returns ``None``, so the sweep goes on (see llamahome/utils/sweep.py).
    """
    quiet_libraries()
    metric = cfg.get("optimized_metric") or None
    if in_multirun():
        return run_sweep_job(train, cfg, metric)
    with user_errors():
        metrics = train(cfg)
    value = metrics.get(metric or "")
    return None if value is None else float(value)


if __name__ == "__main__":
    launch(main, "train")  # model=<dir|run|hub id>, one-line errors, fast --help
