"""The quality preset (``sweep=quality``): its configs, its one table and plot, progress, resume.

The end-to-end test runs the real preset (``python -m llamahome.eval sweep=quality_quick``, a
Hydra multirun in a subprocess) on the tiny model with small sizes, then checks the table against
the job rows; the table arithmetic (shares of full, the smallest budget within 5%) is checked on
hand-made rows.
"""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
from conftest import CONF_DIR, compose
from eval_sweep import run_eval
from hydra.utils import instantiate

from llamahome.evaluation.quality_table import build_table, markdown, write_quality_report
from llamahome.evaluation.results import collect_rows

# The preset on the tiny model, small: 4 tasks x (full + h2o) at 50% = 8 jobs (the compressed
# suite reuses the full cache's row); "duo" is listed but has no cache config: skipped.
QUICK = (
    "sweep=quality_quick",
    "model=tiny",
    "quality.policies=[full,h2o,duo]",
    "quality.budgets=[0.5]",
    "quality.ruler.lengths=[128,192]",
    "quality.ruler.subtasks=[niah_single,vt]",
    "quality.passkey.lengths=[128]",
    "quality.streaming_ppl.length=64",
    "quality.streaming_ppl.prefix=16",
    "task.show_progress=false",
)
JOBS = 8


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("quality") / "sweep"
    proc = run_eval(*QUICK, f"hydra.sweep.dir={sweep_dir}", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, proc.stdout + proc.stderr


def _job_rows(sweep_dir: Path) -> list[dict]:
    return collect_rows(sweep_dir)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_preset_writes_one_table_with_every_task_length_and_protocol(preset):
    sweep_dir, output = preset
    text = (sweep_dir / "quality.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| policy |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == [
        "policy",
        "budget",
        "keep",
        "ppl",
        "ruler QP 128",
        "ruler QP 192",
        "ruler QP all",
        "ruler QC 128",
        "ruler QC 192",
        "ruler QC all",
        "passkey QP",
        "time vs full",
        "smallest budget within 5% of full",
    ]
    body = [line for line in text.split(header)[1].splitlines()[1:] if line.startswith("| ")]
    assert [tuple(c.strip() for c in line.strip("|").split("|")[:2]) for line in body[:2]] == [
        ("full", "all"),
        ("h2o", "50%"),
    ]
    # The listed policy without a cache config is skipped, said so, and the sweep went on.
    assert "sweep: cache=duo is skipped" in output
    assert "- duo: no row" in text
    assert f"[sweep] job 1/{JOBS}:" in output and f"[sweep] job {JOBS}/{JOBS}:" in output
    assert "### Quality against the full cache" in output  # the table is printed too


def test_table_cells_are_the_job_rows(preset):
    sweep_dir, _ = preset
    rows = _job_rows(sweep_dir)
    assert len(rows) == JOBS
    with (sweep_dir / "quality.csv").open() as file:
        table = list(csv.DictReader(file))
    assert [(r["policy"], r["budget_ratio"]) for r in table] == [("full", ""), ("h2o", "0.5")]

    def job(task, policy, budget, protocol=None):
        return next(
            r
            for r in rows
            if r["task"] == task
            and r["policy"] == policy
            and (policy == "full" or r["budget_ratio"] == budget)
            and (protocol is None or r.get("protocol") == protocol)
        )

    full_ppl = job("streaming_ppl", "full", None)["value"]
    for line in table[1:]:
        budget = float(line["budget_ratio"])
        ppl = job("streaming_ppl", "h2o", budget)
        assert float(line["streaming_ppl"]) == pytest.approx(ppl["value"])
        assert float(line["streaming_ppl_vs_full"]) == pytest.approx(
            (ppl["value"] - full_ppl) / full_ppl
        )
        qp = job("ruler", "h2o", budget, "question_protected")
        assert float(line["ruler_qp"]) == pytest.approx(qp["value"])
        assert float(line["ruler_qp@192"]) == pytest.approx(qp["recall@192"])
        qc = job("ruler", "h2o", budget, "question_compressed")
        assert float(line["ruler_qc"]) == pytest.approx(qc["value"])
        mine = [r for r in rows if r["policy"] == "h2o" and r["budget_ratio"] == budget]
        assert len(mine) == 4  # one job per task: ppl, ruler both protocols, passkey
        mean_keep = sum(r["keep_ratio"] for r in mine) / 4
        assert float(line["keep_ratio"]) == pytest.approx(mean_keep)
        # The achieved keep ratio is recorded in each row: perplexity holds the budget's share.
        assert ppl["keep_ratio"] == pytest.approx(budget, abs=0.05)
        assert budget < qp["keep_ratio"] < 1  # + the pinned question, held on top
    assert float(table[0]["keep_ratio"]) == 1.0 and float(table[0]["time_vs_full"]) == 1.0


def test_plot_has_a_panel_per_task_and_protocol(preset):
    sweep_dir, _ = preset
    width, height = _png_size(sweep_dir / "quality.png")
    # 4 panels (ppl, ruler QP, ruler QC, passkey QP): 3 per line, 2 lines.
    assert width == 3 * 572 and height == 2 * 440
    assert (sweep_dir / "quality.png").stat().st_size > 30_000


def test_rerun_in_the_sweep_dir_resumes(tmp_path):
    """A job whose own directory holds its row keeps it (a resumed sweep); a twin's is copied."""
    from hydra.core.hydra_config import HydraConfig

    from llamahome.evaluation.results import config_hash, write_rows
    from llamahome.evaluation.runner import identical_row

    sweep_dir = tmp_path / "sweep"
    overrides = ["sweep=quality_quick", "quality_task=ruler_protected", "cache=h2o"]
    overrides += ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep_dir}"]
    cfg = compose("eval", overrides, sweep_dir / "3")
    assert HydraConfig.get().sweep.dir == str(sweep_dir)
    digest = config_hash(cfg)
    row = {"task": "ruler", "config_hash": digest, "value": 0.5, "time": "t0"}
    assert identical_row(cfg, digest, "ruler") is None  # nothing ran yet: run it
    write_rows([row], sweep_dir / "3")  # this job finished before the sweep was stopped
    assert identical_row(cfg, digest, "ruler") == row  # kept as it is, not recomputed
    assert identical_row(cfg, "another-hash", "ruler") is None
    (sweep_dir / "3" / "results.jsonl").unlink()
    write_rows([row], sweep_dir / "0")  # a twin job (the full cache at another budget)
    copied = identical_row(cfg, digest, "ruler")
    assert copied["reused_from"] == "0" and copied["value"] == 0.5
    assert copied["protocol"] == "question_protected"


# ---- the table's arithmetic, on hand-made rows ------------------------------------------------
def _row(task, policy, budget, value, protocol=None, keep=None, **extra):
    row = {
        "task": task,
        "metric": "ppl" if task == "streaming_ppl" else "recall",
        "higher_is_better": task != "streaming_ppl",
        "policy": policy,
        "budget_ratio": budget,
        "value": value,
        "keep_ratio": keep if keep is not None else (1.0 if policy == "full" else budget),
        "tokens": 100,
        "tok_s": 10.0 if policy == "full" else 20.0,
        "model": "m",
    }
    if protocol:
        row["protocol"] = protocol
    row.update(extra)
    return row


def _rows():
    qp = "question_protected"
    return [
        _row("streaming_ppl", "full", 0.1, 10.0),
        _row("ruler", "full", 0.1, 0.8, qp, **{"recall@1024": 0.9, "recall@2048": 0.7}),
        # a: within 5% at 50% only; its lucky 10% is followed by a worse 25%.
        _row("streaming_ppl", "a", 0.1, 10.2),
        _row("ruler", "a", 0.1, 0.8, qp, **{"recall@1024": 0.9, "recall@2048": 0.7}),
        _row("streaming_ppl", "a", 0.25, 11.0),
        _row("ruler", "a", 0.25, 0.79, qp, **{"recall@1024": 0.88, "recall@2048": 0.7}),
        _row("streaming_ppl", "a", 0.5, 10.4),
        _row("ruler", "a", 0.5, 0.77, qp, **{"recall@1024": 0.85, "recall@2048": 0.69}),
        # b: never within 5% on ruler.
        _row("streaming_ppl", "b", 0.5, 10.0),
        _row("ruler", "b", 0.5, 0.4, qp, **{"recall@1024": 0.5, "recall@2048": 0.3}),
    ]


def test_smallest_budget_needs_every_task_at_every_larger_budget():
    table = build_table(_rows(), policies=["full", "b", "a", "learned"])
    by = {(r["policy"], r["budget_ratio"]): r for r in table.rows}
    assert [r["policy"] for r in table.rows] == ["full", "b", "a", "a", "a"]  # the list's order
    assert by["a", 0.1]["min_budget"] == 0.5  # not 10%: 25% is 10% worse on ppl
    assert by["b", 0.5]["min_budget"] is None
    assert by["a", 0.25]["streaming_ppl_vs_full"] == pytest.approx(0.1)
    assert by["a", 0.5]["ruler_qp_vs_full"] == pytest.approx(0.77 / 0.8)
    assert by["a", 0.5]["ruler_qp@2048_vs_full"] == pytest.approx(0.69 / 0.7)
    assert by["a", 0.5]["time_vs_full"] == pytest.approx(0.5)  # twice the tok/s
    assert table.missing == ["learned"]
    text = markdown(table, ["job #7 (cache=learned) failed: ModelError: no scorer"])
    assert "| a | 50% | 50% | 10.4 (+4.0%) | 0.85 (94%) | 0.69 (99%) | 0.77 (96%) |" in text
    assert "| a | 25% |" in text and "ppl | ruler QP 1k | ruler QP 2k | ruler QP all" in text
    per_task = text.split("per task")[1]
    assert "| a | 50% | 10% | 50% |" in per_task  # ppl from 50% (25% misses), ruler from 10%
    assert "- learned: no row" in text and "no scorer" in text


def test_report_lists_failed_jobs(tmp_path):
    job = tmp_path / "3"
    job.mkdir()
    (job / "job_status.json").write_text(
        json.dumps({"num": 3, "status": "failed", "overrides": ["cache=learned"], "error": "E: x"})
    )
    ok = tmp_path / "0"
    ok.mkdir()
    (ok / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    paths = write_quality_report(tmp_path, policies=["full", "a", "b"])
    text = paths["markdown"].read_text()
    assert "job #3 (cache=learned) failed: E: x" in text
    assert _png_size(paths["plot"])[0] > 0


# ---- configs ---------------------------------------------------------------------------------
def test_preset_composes_each_task_with_the_preset_sizes(tmp_path):
    for option, target in [
        ("streaming_ppl", "StreamingPerplexity"),
        ("ruler_protected", "Ruler"),
        ("ruler_compressed", "Ruler"),
        ("passkey", "Passkey"),
    ]:
        cfg = compose("eval", ["sweep=quality", f"quality_task={option}"], tmp_path / option)
        task = instantiate(cfg.task)
        assert type(task).__name__ == target
        if target == "Ruler":
            assert task.lengths == [1024, 2048] and task.samples >= 8
            assert task.question_protected is (option == "ruler_protected")
            assert len(task.subtasks) == 7
        if target == "Passkey":
            assert task.lengths == [1024, 2048]
    assert cfg.hydra.mode.name == "MULTIRUN"
    quick = compose("eval", ["sweep=quality_quick", "quality_task=ruler_protected"], tmp_path / "q")
    assert instantiate(quick.task).lengths == [1024] and quick.quality.policies[0] == "full"


def test_sweep_lists_skip_missing_options_and_count_the_grid(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from llamahome.evaluation.quality import sweep_options, sweep_values
    from llamahome.utils.sweep import grid_size

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert sweep_options("cache", ["full", "nope", "h2o"]) == "full,h2o"
        with pytest.raises(ValueError, match="none of"):
            sweep_options("cache", ["nope"])
        cfg = hydra_compose(
            "eval", ["sweep=quality", "quality.budgets=[0.1,0.5]"], return_hydra_config=True
        )
        params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
        # A listed policy without a cache config (a policy not yet shipped) is left out.
        listed = list(cfg.quality.policies)
        installed = [p for p in listed if (CONF_DIR / "cache" / f"{p}.yaml").is_file()]
        assert params["cache"] == ",".join(installed) and installed[:2] == ["full", "h2o"]
        assert params["cache.budget_ratio"] == "0.1,0.5"
        policies = len(params["cache"].split(","))
        assert grid_size(cfg) == 4 * policies * 2
    assert sweep_values([0.25, 0.5]) == "0.25,0.5"
