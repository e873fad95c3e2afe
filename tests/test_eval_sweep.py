"""A real ``python -m llamahome.eval -m ...`` sweep (tiny model, subprocess): per-job rows, the
aggregate table / markdown / plot, full-cache reuse, W&B offline runs, the training callback."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from eval_sweep import SWEEP_ARGS, tiny_sweep

from llamahome.evaluation.report import gap_closed, markdown_table
from llamahome.evaluation.report import main as report_main
from llamahome.evaluation.results import collect_rows, read_rows

POLICIES = {"full", "h2o", "window", "sink"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    sweep_dir, proc = tiny_sweep(tmp_path_factory.mktemp("eval_sweep"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, proc


def test_every_job_writes_its_row(sweep):
    sweep_dir, _ = sweep
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 8  # 4 policies x 2 budgets
    for job in jobs:
        rows = read_rows(job / "results.jsonl")
        assert len(rows) == 1 and rows[0]["task"] == "streaming_ppl"
        with (job / "results.csv").open() as file:
            assert len(list(csv.DictReader(file))) == 1
        status = json.loads((job / "job_status.json").read_text())
        assert status["status"] == "completed"


def test_aggregate_table_and_plot(sweep):
    sweep_dir, proc = sweep
    rows = read_rows(sweep_dir / "results.jsonl")
    assert len(rows) == 8 and {r["policy"] for r in rows} == POLICIES
    assert {r["budget_ratio"] for r in rows} == {0.2, 0.5}
    assert rows == sorted(
        rows,
        key=lambda r: (r["budget_ratio"], ["full", "h2o", "sink", "window"].index(r["policy"])),
    )
    for row in rows:
        assert row["model"] == "tiny" and row["kv_bytes"] > 0 and row["tok_s"] > 0
        if row["policy"] != "full":
            assert abs(row["kv_ratio"] - row["budget_ratio"]) < 0.1, row
    # The full cache ignores the budget: one run, its row reused for the other budget.
    full = [r for r in rows if r["policy"] == "full"]
    assert full[0]["value"] == full[1]["value"] and full[0]["config_hash"] == full[1]["config_hash"]
    assert sum("reused_from" in r for r in full) == 1
    with (sweep_dir / "results.csv").open() as file:
        assert len(list(csv.DictReader(file))) == 8
    markdown = (sweep_dir / "results.md").read_text()
    assert "| policy | budget | ppl | vs full |" in markdown
    assert markdown.count("| full |") == 1 and markdown.count("| h2o |") == 2
    assert "closer to full than window" in markdown
    png = (sweep_dir / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "Eval sweep aggregate" in proc.stderr + proc.stdout


def test_wandb_offline_runs_per_job_and_for_the_sweep(sweep):
    from wandb_records import history_keys

    sweep_dir, _ = sweep
    job_runs = list(sweep_dir.glob("[0-9]*/wandb/offline-run-*/run-*.wandb"))
    assert len(job_runs) == 8
    job_keys = history_keys(job_runs[0])
    assert {"eval/value", "eval/kv_bytes", "eval/tok_s", "eval/results/_type"} <= job_keys
    sweep_runs = list(sweep_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(sweep_runs) == 1
    keys = history_keys(sweep_runs[0])
    # A table, the line plot (a W&B custom chart backed by a table) and the PNG.
    for logged in ("eval/results", "eval/streaming_ppl_vs_budget_table", "eval/plot"):
        assert f"{logged}/_type" in keys, logged


def test_report_cli_rebuilds_the_aggregate(sweep, tmp_path, capsys):
    sweep_dir, _ = sweep
    copy = tmp_path / "copy"
    for row_file in sweep_dir.glob("[0-9]*/results.jsonl"):
        (copy / row_file.parent.name).mkdir(parents=True)
        (copy / row_file.parent.name / "results.jsonl").write_text(row_file.read_text())
    report_main([str(copy)])
    assert (copy / "results.png").is_file() and (copy / "results.md").is_file()
    assert "closer to full than window" in capsys.readouterr().out
    assert len(collect_rows(copy)) == 8


def test_gap_closed_arithmetic():
    rows = [
        {"task": "t", "metric": "ppl", "value": 10.0, "policy": "full", "budget_ratio": 0.2},
        {"task": "t", "metric": "ppl", "value": 11.0, "policy": "h2o", "budget_ratio": 0.2},
        {"task": "t", "metric": "ppl", "value": 20.0, "policy": "window", "budget_ratio": 0.2},
        {"task": "t", "metric": "ppl", "value": 12.0, "policy": "sink", "budget_ratio": 0.2},
    ]
    (entry,) = gap_closed(rows)
    assert entry["h2o_vs_full"] == pytest.approx(0.1) and entry["sink_vs_full"] == pytest.approx(
        0.2
    )
    assert entry["h2o_closer_than_window"] == pytest.approx(0.9)
    assert (
        "h2o +10.0% vs full, 90% closer to full than window; sink +20.0% vs full"
        in markdown_table(rows)
    )


def test_sweep_config_is_the_command_line_sweep():
    assert "cache=full,h2o,window,sink" in SWEEP_ARGS  # the sweep, smaller budgets


def test_streaming_ppl_callback_logs_at_validation(tmp_path):
    """A real (tiny) fit: the callback scores with the run's cache and logs val/streaming_ppl."""
    from functools import partial

    import lightning as L

    from llamahome import load_model
    from llamahome.kvcache.spec import CacheSpec
    from llamahome.training.eval_callbacks import StreamingPerplexityCallback
    from llamahome.training.module import LlamaLitModule

    model, tokenizer = load_model("tiny")
    model.train()
    ids = torch.randint(5, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    lit = LlamaLitModule(
        model,
        partial(torch.optim.AdamW, lr=1e-3),
        tokenizer=tokenizer,
        cache_spec=CacheSpec(policy="h2o", budget_ratio=0.2),
    )
    callback = StreamingPerplexityCallback(every_n_validations=1, length=40, prefix=8)
    trainer = L.Trainer(
        max_steps=2,
        val_check_interval=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=tmp_path,
    )
    trainer.fit(lit, train_dataloaders=loader, val_dataloaders=loader)
    assert len(callback.history) == 2 and all(h["policy"] == "h2o" for h in callback.history)
    assert "val/streaming_ppl" in trainer.callback_metrics
    assert 0.15 < float(trainer.callback_metrics["val/streaming_kv_share"]) < 0.35
    assert callback.history[0]["ppl"] != callback.history[1]["ppl"]  # it saw the model train
