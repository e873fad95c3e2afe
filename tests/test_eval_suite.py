"""The long-context suite: RULER-style tasks, the needle heat-map, both question protocols and the
smallest budget within 5% of full (tiny model, fast)."""

from __future__ import annotations

import json

import pytest
from conftest import compose

from llamahome.errors import ConfigError
from llamahome.evaluation import ruler as ruler_module
from llamahome.evaluation.base import KVMeter
from llamahome.evaluation.heatmap import draw, file_name, grid
from llamahome.evaluation.niah import NeedleHeatmap, make_trial
from llamahome.evaluation.protocol import Prompt, answer, encode, pad_batch, prefill, split_prompt
from llamahome.evaluation.results import labelled, min_budget_table, min_budgets, within
from llamahome.evaluation.ruler import Ruler
from llamahome.evaluation.ruler_data import (
    NIAH_INTRO,
    SUBTASKS,
    make_sample,
    string_match_all,
    token_counter,
)
from llamahome.kvcache.spec import POLICIES, SCORE_POLICIES, CacheSpec

FAST = ("model=tiny", "task.show_progress=false", "print_config=false")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from llamahome import load_model

    return load_model("tiny")


# ---- generation --------------------------------------------------------------------------------


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_samples_are_deterministic_fit_the_length_and_hold_their_answers(tiny, subtask):
    count = token_counter(tiny[1])
    a = make_sample(subtask, count, 384, seed=3, index=0)
    assert a == make_sample(subtask, count, 384, seed=3, index=0)
    assert a != make_sample(subtask, count, 384, seed=3, index=1)
    assert a != make_sample(subtask, count, 384, seed=4, index=0)
    n = count(a.prompt)
    assert 330 <= n <= 384, n
    assert a.answers and all(ans in a.prompt.context for ans in a.answers)
    # Nothing of the answer is in the question, except where RULER asks for it (vt's value).
    if subtask != "vt":
        assert not any(ans in a.prompt.question for ans in a.answers)
    for sentence, _ in a.needles:
        assert a.prompt.context.count(sentence) == 1


def test_multi_needle_tasks_keep_their_shapes(tiny):
    count = token_counter(tiny[1])
    key = make_sample("niah_multikey", count, 256, 0, 0)
    assert len(key.needles) == 4 and len(key.answers) == 1  # one queried among distractors
    value = make_sample("niah_multivalue", count, 256, 0, 0)
    assert len(value.answers) == 4 and len({s.split(" is: ")[0] for s, _ in value.needles}) == 1
    query = make_sample("niah_multiquery", count, 256, 0, 0)
    assert len(query.answers) == 4 and query.prompt.question.count(", and ") == 2
    vt = make_sample("vt", count, 256, 0, 0)
    chain = [s for s, _ in vt.needles]
    assert chain[0].endswith(f"= {vt.prompt.question.split('value ')[1].split()[0]}.")
    # The chain is in reading order: each variable is assigned before it is copied.
    where = [vt.prompt.context.index(s) for s in chain]
    assert where == sorted(where) and len(vt.answers) == 5
    cwe = make_sample("cwe", count, 512, 0, 0)
    listing = [line.split(". ", 1)[1] for line in cwe.prompt.context.splitlines()[1:] if line]
    common = {w: listing.count(w) for w in cwe.answers}
    rare = {w: listing.count(w) for w in set(listing) - set(cwe.answers)}
    assert min(common.values()) > max(rare.values())
    fwe = make_sample("fwe", count, 512, 0, 0)
    words = fwe.prompt.context.split()
    counts = sorted(((words.count(w), w) for w in set(words) if w.isalpha()), reverse=True)
    assert [w for _, w in counts[:3]] == list(fwe.answers) and counts[2][0] > counts[3][0]


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_the_needle_is_at_its_depth(tiny, depth):
    sample = make_trial(token_counter(tiny[1]), 384, depth, seed=0, index=0)
    (needle, at), context = sample.needles[0], sample.prompt.context
    assert at == depth and context.count(needle) == 1
    body = context[len(NIAH_INTRO) :].rstrip("\n")
    position = body.index(needle) / (len(body) - len(needle))
    assert abs(position - depth) < 0.03, (depth, position)
    assert sample.answers[0] in needle and sample.answers[0] not in sample.prompt.question


# ---- scoring -------------------------------------------------------------------------------------


def test_string_match_all():
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1
    assert string_match_all("only 1234567", ("1234567", "7654321")) == 0.5
    assert string_match_all("ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    assert string_match_all("123456", ["1234567"]) == 0 and string_match_all("x", []) == 0


def test_ruler_recall_is_averaged_per_subtask(tiny, monkeypatch):
    """An oracle that answers the needle tasks right and the others wrong."""
    samples = {}

    def oracle(model, tokenizer, prompts, cache_spec, max_new, chat, protected, meter):
        assert protected is False and max_new > 0
        out = []
        for prompt in prompts:
            sample = samples[prompt]
            half = sample.answers[: max(1, len(sample.answers) // 2)]
            out.append(" ".join(half) if sample.subtask.startswith("niah") else "no idea")
        return out, 10 * len(prompts)

    task = Ruler(
        subtasks=["niah_single", "niah_multivalue", "vt"],
        lengths=[128, 192],
        samples=2,
        question_protected=False,
        show_progress=False,
    )
    samples.update({s.prompt: s for s in task.make_samples(tiny[1])})
    monkeypatch.setattr(ruler_module, "answer", oracle)
    outcome = task.run(*tiny, CacheSpec(policy="full"))
    assert outcome.metric == "recall" and outcome.higher_is_better
    assert outcome.extras["recall:niah_single"] == 1.0
    assert outcome.extras["recall:niah_multivalue@192"] == 0.5  # two of four values
    assert outcome.extras["recall:vt"] == 0.0
    assert outcome.value == pytest.approx((1 + 0.5 + 0) / 3)
    assert outcome.extras["recall@128"] == pytest.approx(0.5)
    assert outcome.extras["protocol"] == "question_compressed" and outcome.tokens == 10 * 12


def test_bad_suite_config_is_one_clear_error(tiny):
    with pytest.raises(ConfigError, match="task.subtasks"):
        Ruler(subtasks=["niah_single", "qa"])
    with pytest.raises(ConfigError, match="task.question_protected"):
        NeedleHeatmap(question_protected="yes")
    with pytest.raises(ConfigError, match="model's context is 2048"):
        Ruler(lengths=[4096], show_progress=False).run(*tiny, CacheSpec(policy="full"))


# ---- the two protocols -------------------------------------------------------------------------


def _needle_batch(tiny):
    count = token_counter(tiny[1])
    prompts = [make_trial(count, n, 0.5, 0, i).prompt for i, n in enumerate((200, 230))]
    return prompts, pad_batch([encode(tiny[1], p, chat=False) for p in prompts], 0)


def test_split_prompt_moves_the_space_to_the_question():
    split = split_prompt("filler. What is the key? The key is", "What is the key?")
    assert split == Prompt("filler.", " What is the key? The key is")
    with pytest.raises(ValueError):
        split_prompt("no question here", "What?")


def test_question_protected_keeps_every_question_token(tiny):
    model = tiny[0]
    _, batch = _needle_batch(tiny)
    width, total = batch.context_width, batch.ids.shape[1]
    question = set(range(width, total))
    spec = CacheSpec(policy="h2o", budget_ratio=0.2, min_tokens=0)
    cache, _, _ = prefill(model, batch, spec, question_protected=True)
    for layer in cache.layers:
        kept = layer.positions
        for row in range(kept.shape[0]):
            for head in range(kept.shape[1]):
                held = set(kept[row, head].tolist())
                assert question <= held  # the whole question, in every row and head
                assert len(held - question) == int(0.2 * width)  # 20% of the context
    # Compressed together, the budget is 20% of the whole prompt and questions get evicted.
    cache, _, _ = prefill(model, batch, spec, question_protected=False)
    sizes = {layer.positions.shape[-1] for layer in cache.layers}
    assert sizes == {int(0.2 * total)}
    assert any(not question <= set(layer.positions[0, 0].tolist()) for layer in cache.layers)


def test_both_protocols_agree_with_the_full_cache(tiny):
    prompts, _ = _needle_batch(tiny)
    full = CacheSpec(policy="full")
    runs = [
        answer(*tiny, prompts, full, 6, False, protected, KVMeter()) for protected in (True, False)
    ]
    assert runs[0] == runs[1] and runs[0][1] > sum(len(p.context) // 20 for p in prompts)


# ---- heat-map, CLI, report --------------------------------------------------------------------


def test_heatmap_png_from_a_row(tmp_path):
    row = {"task": "niah", "policy": "h2o", "budget": "20%", "protocol": "question_protected"}
    row.update({f"accuracy@{n}_d{d:g}": d * n / 2048 for n in (1024, 2048) for d in (0, 0.5, 1)})
    lengths, depths, values = grid(row)
    assert lengths == [1024, 2048] and depths == [0, 0.5, 1] and values[2] == [0.5, 1.0]
    assert file_name(row) == "heatmap_niah_question_protected_h2o_20.png"
    path = draw(row, tmp_path / file_name(row))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert draw({"task": "streaming_ppl", "value": 1.0}, tmp_path / "none.png") is None


def test_niah_from_the_command_line_writes_its_heatmap(tmp_path, capsys):
    from llamahome.eval import evaluate

    cfg = compose(
        "eval",
        [
            *FAST,
            "task=niah",
            "task.lengths=[128,192]",
            "task.depths=[0.0,1.0]",
            "task.trials=1",
            "cache=window",
            "cache.budget_ratio=0.5",
        ],
        tmp_path / "run",
    )
    row = evaluate(cfg)
    assert row["task"] == "niah" and row["protocol"] == "question_protected"
    assert {"accuracy@128_d0", "accuracy@192_d1"} <= set(row) and 0 < row["kv_ratio"] < 1
    png = tmp_path / "run" / file_name(row)
    assert png.is_file() and str(png) in capsys.readouterr().out


def test_ruler_runs_from_the_command_line_on_an_export(tiny, tmp_path):
    from llamahome.eval import evaluate
    from llamahome.model.export import export_hf

    export_hf(tiny[0], tiny[1], tmp_path / "model")
    overrides = ["task=ruler", "task.subtasks=[niah_single,fwe]", "task.lengths=[128]"]
    cfg = compose(
        "eval",
        [*FAST, f"model_path={tmp_path / 'model'}", *overrides, "task.question_protected=false"],
        tmp_path / "run",
    )
    row = evaluate(cfg)
    assert row["model"] == "model" and row["protocol"] == "question_compressed"
    assert {"recall:niah_single", "recall:fwe@128"} <= set(row) and 0 <= row["value"] <= 1
    assert json.loads((tmp_path / "run" / "results.jsonl").read_text())["task"] == "ruler"


def _rows(policy, values, task="passkey", protocol="question_protected", higher=True):
    return [
        {
            "task": task,
            "protocol": protocol,
            "policy": policy,
            "budget_ratio": b,
            "value": v,
            "higher_is_better": higher,
            "model": "m",
        }
        for b, v in values.items()
    ]


def test_smallest_budget_within_five_percent_of_full():
    rows = (
        _rows("full", {0.1: 0.8, 0.5: 0.8})  # the full cache at every budget: same value
        + _rows("h2o", {0.1: 0.2, 0.2: 0.77, 0.5: 0.79})  # 0.77 >= 0.95 * 0.8 = 0.76
        + _rows("window", {0.1: 0.78, 0.2: 0.5, 0.5: 0.8})  # lucky at 10%: stays only from 50%
        + _rows("sink", {0.2: 0.6, 0.5: 0.7})  # never within
        + _rows("full", {0.2: 10.0}, task="ppl", higher=False)
        + _rows("h2o", {0.1: 11.0, 0.2: 10.4, 0.5: 10.1}, task="ppl", higher=False)
        + _rows("full", {0.2: 0.5}, protocol="question_compressed")
        + _rows("h2o", {0.1: 0.49, 0.2: 0.1}, protocol="question_compressed")
    )
    found = {(r["task"], r["policy"]): r for r in min_budgets(rows)}
    protected, compressed = "passkey [question protected]", "passkey [question compressed]"
    assert found[(protected, "h2o")]["min_budget"] == 0.2
    assert found[(protected, "h2o")]["value"] == 0.77 and found[(protected, "h2o")]["full"] == 0.8
    assert found[(protected, "window")]["min_budget"] == 0.5
    assert found[(protected, "sink")]["min_budget"] is None
    assert found[("ppl [question protected]", "h2o")]["min_budget"] == 0.2  # 10.4 <= 10.5
    assert found[(compressed, "h2o")]["min_budget"] is None  # 0.2 breaks it
    assert (protected, "full") not in found and len(found) == 5
    assert within(0.5, 0.0, True) and not within(-0.1, 0.0, True)
    table = "\n".join(min_budget_table(rows))
    assert "| passkey [question protected] | m | h2o | 20% | 0.77 | 0.8 | 10%, 20%, 50% |" in table
    assert {r["task"] for r in labelled(rows)} == {
        protected,
        compressed,
        "ppl [question protected]",
    }


@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in ("full", *SCORE_POLICIES)])
def test_every_policy_keeps_the_question_and_a_fifth_of_the_context(tiny, policy):
    _, batch = _needle_batch(tiny)
    width, total = batch.context_width, batch.ids.shape[1]
    spec = CacheSpec(policy=policy, budget_ratio=0.2, min_tokens=0)
    cache, out, _ = prefill(tiny[0], batch, spec, question_protected=True)
    assert out.logits.isfinite().all()
    for layer in cache.layers:
        kept = layer.positions
        assert kept.shape[-1] == int(0.2 * width) + total - width
        assert (kept >= width).sum(-1).eq(total - width).all()  # every question token, row, head


def test_sweep_report_tables_protocols_apart_and_draws_a_heatmap_per_policy(tmp_path):
    from llamahome.evaluation.report import write_report

    rows = []
    for protocol in ("question_protected", "question_compressed"):
        for policy, budget, value in (("full", None, 1.0), ("h2o", 0.2, 0.5), ("h2o", 0.5, 0.98)):
            row = _rows(policy, {budget: value}, task="niah", protocol=protocol)[0]
            row.update(
                budget="all" if policy == "full" else f"{budget:.0%}",
                metric="accuracy",
                config_hash=f"{policy}{budget}{protocol}",
                **{f"accuracy@1024_d{d:g}": value for d in (0, 0.5, 1)},
            )
            rows.append(row)
    paths = write_report(tmp_path, rows)
    text = paths["markdown"].read_text()
    assert "### niah [question protected]" in text and "### niah [question compressed]" in text
    assert "| niah [question compressed] | m | h2o | 50% | 0.98 | 1 | 20%, 50% |" in text
    pngs = sorted(p.name for p in tmp_path.glob("heatmap_*.png"))
    assert len(pngs) == 6 and "heatmap_niah_question_compressed_h2o_20.png" in pngs


def test_protocol_sweep_from_the_command_line(tmp_path):
    """A real multirun: both protocols, full + h2o; full runs once, the report tables both."""
    from eval_sweep import run_eval

    sweep_dir = tmp_path / "sweep"
    proc = run_eval(
        "-m",
        "model=tiny",
        "task=niah",
        "task.lengths=[128]",
        "task.depths=[0.0,1.0]",
        "task.trials=1",
        "task.show_progress=false",
        "task.question_protected=true,false",
        "cache=full,h2o",
        "cache.budget_ratio=0.5",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (sweep_dir / "results.jsonl").read_text().splitlines()]
    assert sorted((r["policy"], r["protocol"]) for r in rows) == [
        ("full", "question_compressed"),
        ("full", "question_protected"),
        ("h2o", "question_compressed"),
        ("h2o", "question_protected"),
    ]
    full = [r for r in rows if r["policy"] == "full"]
    assert sum("reused_from" in r for r in full) == 1 and full[0]["value"] == full[1]["value"]
    text = (sweep_dir / "results.md").read_text()
    assert "### niah [question compressed]" in text and "Smallest KV budget" in text
    assert "Smallest budget within 5% of full" in proc.stdout
    assert len(list(sweep_dir.glob("heatmap_niah_*.png"))) == 4
