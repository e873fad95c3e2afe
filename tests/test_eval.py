"""``python -m llamahome.eval``: task numerics, result rows, fail-fast errors (tiny models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose

from llamahome.errors import ConfigError, DataError, ModelError
from llamahome.evaluation import passkey as passkey_module
from llamahome.evaluation.passkey import Passkey, build_prompt, is_correct
from llamahome.evaluation.streaming_ppl import (
    StreamingPerplexity,
    default_text,
    plain_perplexity,
    streaming_perplexity,
    token_segments,
)
from llamahome.evaluation.summarization import Summarization, load_records, rouge
from llamahome.kvcache.spec import CacheSpec

FIXTURES = REPO / "tests" / "fixtures" / "eval"
FAST = ("model=tiny", "task.show_progress=false", "print_config=false")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Llama (fp32, hybrid attention) and its local BPE tokenizer."""
    from llamahome import load_model

    return load_model("tiny")


@pytest.fixture(scope="module")
def tiny_ids(tiny):
    """Two 64-token rows of the reference manual."""
    return token_segments(tiny[1], default_text(), length=64, segments=2)


@pytest.fixture(scope="module")
def tiny_full(tiny, tiny_ids):
    """Streaming perplexity of `tiny_ids` with the full cache (prefix 16)."""
    return streaming_perplexity(tiny[0], tiny_ids, CacheSpec(policy="full"), prefix=16)


@pytest.fixture
def compose_eval(tmp_path):
    def _compose(*overrides: str):
        return compose("eval", [*FAST, *overrides], tmp_path / "run")

    return _compose


# ---- streaming perplexity -------------------------------------------------------------------


def test_full_cache_streaming_equals_plain_forward(tiny, tiny_ids, tiny_full):
    """The correctness anchor: decoding token by token through the full cache is teacher forcing."""
    model, _ = tiny
    reference = plain_perplexity(model, tiny_ids, prefix=16)
    outcome = tiny_full
    assert outcome.value == pytest.approx(reference, rel=1e-5)
    assert outcome.extras["scored"] == 2 * (64 - 16) and outcome.tokens == 128
    assert outcome.kv_bytes == outcome.full_kv_bytes > 0 and not outcome.evicted
    # ...and the plain pass is HF's own loss (prefix 1 = every next-token prediction).
    with torch.no_grad():
        hf_loss = float(model(input_ids=tiny_ids, labels=tiny_ids).loss)
    assert math.log(plain_perplexity(model, tiny_ids, prefix=1)) == pytest.approx(hf_loss, rel=1e-5)


@pytest.mark.parametrize(
    "budget",
    [
        {"policy": "h2o", "window_length": 64},
        {"policy": "window", "window_length": 100},
        {"policy": "sink", "window_length": 64},
        {"policy": "h2o", "budget_ratio": 1.0},
    ],
)
def test_budget_covering_the_text_equals_full(tiny, tiny_ids, tiny_full, budget):
    model, full = tiny[0], tiny_full
    outcome = streaming_perplexity(model, tiny_ids, CacheSpec(**budget), prefix=16)
    assert outcome.value == pytest.approx(full.value, rel=1e-5)
    assert not outcome.evicted and outcome.note == "no eviction"


@pytest.mark.parametrize("policy", ["h2o", "window", "sink"])
def test_eviction_holds_a_fifth_of_the_kv(tiny, tiny_ids, tiny_full, policy):
    model, full = tiny[0], tiny_full
    outcome = streaming_perplexity(
        model, tiny_ids, CacheSpec(policy=policy, budget_ratio=0.2, min_tokens=0), prefix=16
    )
    assert outcome.evicted and outcome.note == ""
    assert outcome.full_kv_bytes == full.kv_bytes
    assert 0.15 < outcome.kv_bytes / outcome.full_kv_bytes < 0.3
    assert outcome.value != pytest.approx(full.value, rel=1e-6)


def test_default_text_is_the_reference_manual_and_deterministic(tiny):
    tokenizer = tiny[1]
    text = default_text()
    assert "assert" in text[:2000] and len(text) > 100_000
    a = token_segments(tokenizer, text, length=32, segments=3)
    assert a.shape == (3, 32) and torch.equal(a, token_segments(tokenizer, default_text(), 32, 3))
    assert not torch.equal(a[0], a[1])  # consecutive pieces of the text, not one row repeated


def test_short_text_file_scores_what_there_is(tiny, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Just a few words of text to score here.", encoding="utf-8")
    task = StreamingPerplexity(text_file=str(path), length=512, prefix=4, show_progress=False)
    ids = task.input_ids(tiny[1])
    assert ids.shape[0] == 1 and 4 < ids.shape[1] < 512
    outcome = task.run(*tiny, CacheSpec(policy="h2o", budget_ratio=0.2, min_tokens=0))
    assert math.isfinite(outcome.value) and outcome.extras["text"] == str(path)


# ---- passkey ----------------------------------------------------------------------------------


def test_passkey_prompt_has_the_length_and_the_key_at_its_depth(tiny):
    from llamahome.evaluation.passkey import FILLER, INTRO, NEEDLE, QUESTION

    tokenizer = tiny[1]
    unit = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"]) // 5  # one sentence
    for length in (256, 512):
        for depth in (0.0, 0.5, 1.0):
            prompt = build_prompt(tokenizer, length, depth, "48213")
            n = len(tokenizer(prompt)["input_ids"])
            assert abs(n - length) <= unit + 2, (length, n)
            assert prompt.count("48213") == 2 and prompt.endswith("The pass key is")
            # Depth is measured within the filler, between the instruction and the question.
            start, end = len(INTRO) + 1, prompt.index(QUESTION)
            needle = NEEDLE.format(key="48213")
            at = (prompt.index(needle) - start) / (end - start - len(needle))
            assert abs(at - depth) < 0.05, (depth, at)


def test_passkey_answer_parsing():
    assert is_correct(" 48213. Remember", "48213")
    assert is_correct("48213", "48213")
    assert not is_correct(" 4821", "48213") and not is_correct(" 482130", "48213")
    assert not is_correct(" is 12345 not 48213", "48213") and not is_correct("", "48213")


def test_passkey_accuracy_is_counted_per_length_and_depth(tiny, monkeypatch):
    """An oracle that only finds keys at depth 0: the accounting must say exactly that."""
    from llamahome.evaluation.passkey import INTRO, NEEDLE

    def oracle(model, tokenizer, prompts, cache_spec, max_new_tokens, chat, protected, meter):
        answers = []
        for prompt in (p.context + p.question for p in prompts):
            key = prompt.split("The pass key is ")[1][:5]
            first = prompt.index(NEEDLE.format(key=key)) == len(INTRO) + 1  # depth 0
            answers.append(f" {key}." if first else " 11111.")
        return answers, 10 * len(prompts)

    monkeypatch.setattr(passkey_module, "answer", oracle)
    task = Passkey(
        lengths=[256, 384], depths=[0.0, 0.5, 1.0], trials=4, batch_size=3, show_progress=False
    )
    outcome = task.run(*tiny, CacheSpec(policy="full"))
    assert outcome.metric == "accuracy" and outcome.higher_is_better
    assert outcome.value == pytest.approx(1 / 3)
    assert outcome.extras["accuracy@256_d0"] == 1.0 and outcome.extras["accuracy@384_d0.5"] == 0.0
    assert outcome.extras["accuracy@384"] == pytest.approx(1 / 3)
    assert outcome.extras["trials_per_cell"] == 4 and outcome.tokens == 10 * 24


def test_passkey_runs_the_model_with_the_cache(tiny):
    task = Passkey(lengths=[64], depths=[0.5], trials=2, show_progress=False)
    outcome = task.run(*tiny, CacheSpec(policy="h2o", budget_ratio=0.2, min_tokens=0))
    assert 0.0 <= outcome.value <= 1.0 and outcome.evicted
    assert 0 < outcome.kv_bytes < outcome.full_kv_bytes and outcome.tokens > 2 * 64


# ---- summarization ------------------------------------------------------------------------------


def test_summary_fixture_and_rouge():
    records = load_records(REPO / "llamahome" / "evaluation" / "resources" / "summaries.jsonl")
    assert len(records) == 8 and all(r["document"] and r["summary"] for r in records)
    summaries = [r["summary"] for r in records]
    assert rouge(summaries, summaries) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    )
    scores = rouge(["the cat sat on a mat"], ["the cat sat on the mat"])
    # 5 of 6 unigrams match both ways ("the" twice in the reference, once in the prediction).
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)


def test_summarization_runs_with_the_cache(tiny):
    task = Summarization(max_samples=2, max_new_tokens=4, batch_size=2, show_progress=False)
    outcome = task.run(*tiny, CacheSpec(policy="window", budget_ratio=0.5, min_tokens=0))
    assert outcome.metric == "rougeL" and 0.0 <= outcome.value <= 1.0
    assert {"rouge1", "rouge2", "rougeL"} <= set(outcome.extras) and outcome.extras[
        "documents"
    ] == 2
    assert outcome.evicted and outcome.kv_bytes < outcome.full_kv_bytes


@pytest.mark.parametrize(
    ("name", "where", "what"),
    [
        ("summaries_missing_summary.jsonl", "summaries_missing_summary.jsonl:2", "'summary'"),
        ("summaries_bad_json.jsonl", "summaries_bad_json.jsonl:3", "not valid JSON"),
    ],
)
def test_malformed_jsonl_names_file_and_line(name, where, what):
    with pytest.raises(DataError, match=f"{where}.*{what}"):
        Summarization(data_file=str(FIXTURES / name))


# ---- the entry point --------------------------------------------------------------------------


def test_defaults_and_sweep_config():
    from conftest import CONF_DIR
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        default = hydra_compose("eval", overrides=[], return_hydra_config=True)
        sweep = hydra_compose("eval", overrides=["sweep=cache_budget"], return_hydra_config=True)
    assert default.model.name == "smollm2" and default.task.length >= 1024
    assert str(sweep.hydra.mode) in ("MULTIRUN", "RunMode.MULTIRUN")
    assert dict(sweep.hydra.sweeper.params) == {
        "cache": "full,h2o,window,sink",
        "cache.budget_ratio": "0.1,0.2,0.5",
    }
    assert "eval_report" in default.hydra.callbacks


def test_evaluate_writes_one_row(compose_eval, tmp_path, capsys):
    from llamahome.eval import evaluate

    cfg = compose_eval("task.length=40", "task.prefix=8", "cache=sink", "cache.budget_ratio=0.25")
    row = evaluate(cfg)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("[eval] streaming_ppl ppl=")
    lines = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["value"] == pytest.approx(row["value"])
    header = (tmp_path / "run" / "results.csv").read_text().splitlines()[0].split(",")
    for column in (
        "task",
        "metric",
        "value",
        "policy",
        "budget",
        "kv_bytes",
        "tok_s",
        "wall_s",
        "model",
        "config_hash",
    ):
        assert column in header
    assert row["policy"] == "sink" and row["budget_ratio"] == 0.25 and row["model"] == "tiny"
    assert row["tok_s"] > 0 and row["wall_s"] > 0 and len(row["config_hash"]) == 12
    assert 0.2 < row["kv_ratio"] < 0.4 and row["note"] == ""


def test_budget_over_the_text_is_reported_not_an_error(compose_eval, capsys):
    from llamahome.eval import evaluate

    row = evaluate(
        compose_eval("task.length=40", "task.prefix=8", "cache=window", "cache.window_length=4096")
    )
    assert row["note"] == "no eviction" and row["kv_ratio"] > 0.9
    assert "no eviction" in capsys.readouterr().out


def test_evaluates_a_training_export(compose_eval, tiny, tmp_path):
    from llamahome.eval import evaluate
    from llamahome.model.export import export_hf

    run_dir = tmp_path / "train_run"
    export_hf(tiny[0], tiny[1], run_dir / "export")
    # The run dir itself is accepted: its export/ is what gets evaluated.
    row = evaluate(compose_eval(f"model_path={run_dir}", "task.length=40", "task.prefix=8"))
    assert row["model"] == "train_run/export" and math.isfinite(row["value"])
    direct = streaming_perplexity(
        tiny[0],
        token_segments(tiny[1], default_text(), 40, 1),
        CacheSpec(policy="h2o", min_tokens=0),
        8,
    )
    assert row["value"] == pytest.approx(direct.value, rel=1e-4)


@pytest.fixture
def no_model_load(monkeypatch):
    import llamahome.model.load as model_module

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load for a bad input")

    monkeypatch.setattr(model_module, "load_model", refuse)


def _bad_input(case: str, tmp: Path) -> list[str]:
    """Overrides (and files) for one malformed-input case."""
    if case == "missing text file":
        return [f"task.text_file={tmp / 'missing.txt'}"]
    if case == "empty text file":
        (tmp / "empty.txt").write_text("  \n")
        return [f"task.text_file={tmp / 'empty.txt'}"]
    if case == "export without weights":
        (tmp / "ckpt").mkdir()
        (tmp / "ckpt" / "config.json").write_text(json.dumps({"model_type": "llama"}))
        return [f"model_path={tmp / 'ckpt'}"]
    if case == "missing model dir":
        return [f"model_path={tmp / 'nowhere'}"]
    if case == "checkpoint dir":
        (tmp / "checkpoints").mkdir()
        return [f"model_path={tmp}"]
    if case == "jsonl without summary":
        return [
            "task=summarization",
            f"task.data_file={FIXTURES / 'summaries_missing_summary.jsonl'}",
        ]
    if case == "prefix too long":
        return ["task.prefix=2000"]
    if case == "bad depth":
        return ["task=passkey", "task.depths=[1.5]"]
    return ["cache.budget_ratio=2"]


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("missing text file", DataError, "missing.txt.*does not exist"),
        ("empty text file", DataError, "empty.txt: the file is empty"),
        ("export without weights", ModelError, "ckpt: config.json but no weights"),
        ("missing model dir", ModelError, "nowhere.*does not exist"),
        ("checkpoint dir", ModelError, "Lightning checkpoints"),
        ("jsonl without summary", DataError, r"jsonl:2: missing or empty 'summary'"),
        ("prefix too long", ConfigError, "task.prefix=2000 must be below task.length"),
        ("bad depth", ConfigError, "task.depths"),
        ("bad budget", ConfigError, "cache.budget_ratio"),
    ],
)
def test_bad_inputs_fail_before_the_model_loads(
    compose_eval, tmp_path, no_model_load, case, error, match
):
    from llamahome.eval import evaluate

    with pytest.raises(error, match=match):
        evaluate(compose_eval(*_bad_input(case, tmp_path)))


def test_bad_input_is_one_line_on_the_command_line(tmp_path):
    """The real command: one ``error:`` line naming the file, exit status 2, no traceback."""
    from eval_sweep import run_eval

    missing = tmp_path / "nope.txt"
    proc = run_eval("model=tiny", f"task.text_file={missing}", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: DataError: task.text_file='{missing}' does not exist (or is not a file)."
    ]
