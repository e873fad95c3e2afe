"""Cache-policy quality, memory and speed: ``python -m llamahome.eval``.

One run scores one model with one KV-cache policy and budget on one task and writes a row to
``<run dir>/results.jsonl`` and ``results.csv`` (metric, KV bytes held, tok/s, wall time, model,
config hash). Defaults: the embedded SmolLM2-135M-Instruct, H2O at the paper's 20% budget,
streaming perplexity on the Python reference manual.

    python -m llamahome.eval                                   # h2o 20%, streaming_ppl
    python -m llamahome.eval task=passkey cache=sink cache.budget_ratio=0.2
    python -m llamahome.eval model_path=outputs/train/runs/<time>/export task=summarization
    python -m llamahome.eval -m cache=full,h2o,window,sink cache.budget_ratio=0.1,0.2,0.5
    python -m llamahome.eval sweep=cache_budget                # the same sweep, as a config
    python -m llamahome.eval task=ruler cache=h2o cache.budget_ratio=0.2  # RULER-style suite
    python -m llamahome.eval task=niah cache=h2o               # + heatmap_*.png in the run dir

A multirun also writes the sweep's aggregate (``results.{jsonl,csv,md,png}`` in the sweep dir,
and W&B tables and plots with ``logger=wandb``): see ``llamahome/evaluation/report.py``.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from llamahome.evaluation.quality import available_options  # noqa: F401 - sweep resolvers
from llamahome.evaluation.runner import describe_budget, identical_row, job_overrides, print_row
from llamahome.utils.cli import launch, quiet_libraries, user_errors
from llamahome.utils.sweep import in_multirun, run_sweep_job
from llamahome.utils.validation import build, check_seed

log = logging.getLogger("llamahome.eval")


def model_spec(cfg: DictConfig) -> Any:
    """Return the ``ModelSpec`` to evaluate: ``model_path``, local ``model.pretrained``, ``model``.

    Raises:
        ModelError: A local directory without config or weights.
        ConfigError: A bad ``model.*`` value.
    """
    from llamahome.model.files import check_model_dir
    from llamahome.model.load import ModelSpec, resolve_location

    spec = build(cfg, "model")
    path = cfg.get("model_path")
    if path is None and spec.pretrained and not spec.pretrained.startswith("pkg://"):
        local = Path(resolve_location(spec.pretrained, spec))
        if local.is_absolute() or local.exists() or str(spec.pretrained).startswith((".", "~")):
            path = spec.pretrained  # a local directory: the same checks as model_path
    if path is None:
        return spec
    where = check_model_dir(path)
    # A run's export is a plain HF directory: its own tokenizer and config, no GGUF, no BPE.
    name = f"{where.parent.name}/{where.name}" if where.name == "export" else where.name
    return ModelSpec(
        name=name,
        pretrained=str(where),
        dtype=spec.dtype,
        attn_implementation=spec.attn_implementation,
        trust_remote_code=spec.trust_remote_code,
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score the configured model, cache and task; write and return the result row.

    Everything cheap (cache budget, task values and files, model directory) is checked before
    the model loads, so a typo fails in a second.

    Args:
        cfg: The composed ``conf/eval.yaml``.

    Returns:
        The result row (see ``llamahome.evaluation.results.COLUMNS``).
    """
    from llamahome.evaluation.results import config_hash, write_rows

    start = time.perf_counter()
    check_seed(cfg)
    cache_spec = build(cfg, "cache")
    task = build(cfg, "task")
    spec = model_spec(cfg)
    check_context = getattr(task, "check_context", None)
    if check_context is not None:  # a length past the model's context: one line, before loading
        from llamahome.model.context import model_context

        check_context(model_context(spec), cache_spec)
    from llamahome.model.scorer import check_scorer_available

    check_scorer_available(cache_spec, spec)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("print_config"):
        from llamahome.utils.rich_utils import print_config_tree

        print_config_tree(cfg, save_to=output_dir / "config_tree.log")

    digest = config_hash(cfg)
    row = identical_row(cfg, digest, task.name) if cfg.get("reuse_identical") else None
    if row is None:
        row = _run(cfg, spec, cache_spec, task, digest, start)
    write_rows([row], output_dir)
    print_row(row, output_dir)
    from llamahome.evaluation.heatmap import draw, file_name

    if (png := draw(row, output_dir / file_name(row))) is not None:
        print(f"[eval] depth x length heat-map: {png}", flush=True)
    if OmegaConf.select(cfg, "logger.wandb") is not None:
        _log_wandb(cfg, row)
    return row


def _run(
    cfg: DictConfig, spec: Any, cache_spec: Any, task: Any, digest: str, start: float
) -> dict[str, Any]:
    import torch

    from llamahome.model.load import load_model

    torch.manual_seed(int(cfg.get("seed") or 0))
    load_start = time.perf_counter()
    model, tokenizer = load_model(spec)
    load_s = time.perf_counter() - load_start
    outcome = task.run(model, tokenizer, cache_spec)
    label, ratio = describe_budget(cache_spec)
    if not outcome.evicted and cache_spec.policy != "full":
        log.info(
            "cache=%s %s kept every token: no eviction (the budget covers the text)",
            cache_spec.policy,
            label,
        )
    row: dict[str, Any] = {
        "task": task.name,
        "metric": outcome.metric,
        "value": outcome.value,
        "higher_is_better": outcome.higher_is_better,
        "policy": cache_spec.policy,
        "budget_ratio": ratio,
        "budget": label,
        "kv_bytes": outcome.kv_bytes,
        "full_kv_bytes": outcome.full_kv_bytes,
        "kv_ratio": outcome.kv_bytes / outcome.full_kv_bytes if outcome.full_kv_bytes else None,
        # The achieved share of tokens seen that the cache held (llamahome.kvcache.keep_ratio).
        "keep_ratio": outcome.keep_ratio,
        # The full cache never evicts by design; "no eviction" flags a budget >= the text.
        "note": outcome.note if cache_spec.policy != "full" else "",
        "tokens": outcome.tokens,
        "tok_s": outcome.tokens / outcome.seconds if outcome.seconds > 0 else None,
        "wall_s": time.perf_counter() - start,
        "load_s": load_s,
        "model": spec.name,
        "config_hash": digest,
        "overrides": job_overrides(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    row.update({k: v for k, v in outcome.extras.items() if k not in row})
    return row


def _log_wandb(cfg: DictConfig, row: dict[str, Any]) -> None:
    """One W&B run per eval job: the row as metrics and as a one-row table."""
    from llamahome.evaluation.report import log_wandb_rows
    from llamahome.utils.tracking import finish_run, start_run

    settings = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
    run = start_run(settings, cfg.paths.output_dir, job_type=cfg.task_name, config=cfg)
    numbers = {
        f"eval/{k}": v
        for k, v in row.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    run.log(numbers)
    log_wandb_rows(run, [row])
    run.summary.update({"eval/row": json.dumps(row, default=str)})
    finish_run()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; in a multirun a failing job is recorded and the sweep goes on."""
    quiet_libraries()
    with user_errors():
        if in_multirun():
            return run_sweep_job(evaluate, cfg, cfg.get("optimized_metric"))
        evaluate(cfg)
    return None


if __name__ == "__main__":
    launch(main, "eval")  # model=<dir|run|hub id>, one-line errors, fast --help
