"""cache=learned: a KVzap-style scorer our pipeline trains, scoring tokens as they enter the cache.

The model here is SmolLM2's first two decoder layers (its real embeddings, attention and
tokenizer, at a fraction of the cost): a random tiny Llama attends almost uniformly, so its KVzip
scores are noise that no scorer could rank. ``experiment=kv_scorer`` trains on it with the real
Trainer, and the run is then used with ``cache=learned`` by train, eval, generate, chat and serve.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
from conftest import compose, tiny_llama_config

from llamahome.kvcache.learned import KVScorer, attach_scorer, attention_inputs, scorer_for
from llamahome.kvcache.spec import keep_ratio, make_cache
from llamahome.utils.cli import user_errors

pytestmark = pytest.mark.usefixtures("one_thread")

SCORER_TRAIN = (
    "experiment=kv_scorer",
    "data.max_seq_length=256",
    "data.batch_size=2",
    "data.max_train_samples=44",
    "data.max_val_samples=4",
    "trainer.max_steps=22",
    "trainer.val_check_interval=11",
    "print_config=false",
    "logger=csv",
)


def held_out_text() -> str:
    """English prose the scorer never saw (it trains on the Python reference manual)."""
    import argparse
    import collections
    import json as json_module
    import logging as logging_module
    import pathlib

    modules = (argparse, collections, json_module, logging_module, pathlib)
    return "\n\n".join(m.__doc__ for m in modules if m.__doc__)


@pytest.fixture(scope="module")
def slice_dir(smollm2, tmp_path_factory):
    """SmolLM2's embeddings, first two decoder layers and tokenizer, as a model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    big, tokenizer = smollm2
    config = LlamaConfig(**{**big.config.to_dict(), "num_hidden_layers": 2})
    config._attn_implementation_internal = "sdpa"
    small = LlamaForCausalLM(config)
    small.load_state_dict(big.state_dict(), strict=False)
    path = tmp_path_factory.mktemp("smol2")
    small.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scorer_run(slice_dir, tmp_path_factory):
    """``python -m llamahome.train experiment=kv_scorer model=<slice>``, in process."""
    from llamahome.train import train

    run = tmp_path_factory.mktemp("kv_scorer_run")
    train(compose("train", (*_model(slice_dir), *SCORER_TRAIN), run))
    return run


def _model(path) -> list[str]:
    """``model=<dir>`` as the entry points rewrite it."""
    from llamahome.utils.cli import model_argument

    return model_argument(["x", f"model={path}"])[1:]


def test_experiment_exports_the_model_and_its_scorer(scorer_run):
    export = scorer_run / "export"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    info = json.loads((export / "kv_scorer" / "config.json").read_text())
    assert info["format"] == "llamahome-kv-scorer" and info["teacher"]["method"] == "kvzip"
    assert (export / "kv_scorer" / "model.safetensors").is_file()
    rows = (scorer_run / "metrics.csv").read_text().splitlines()
    val = [float(r.split(",")[-2]) for r in rows[1:] if r.split(",")[-2]]
    assert val[-1] < 0.5 * val[0]  # val/loss falls: the untrained scorer vs the trained one


def _rank_correlations(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list:
    """Spearman correlations of scorer and teacher per (row, layer, KV head), real tokens."""
    from torchmetrics.functional import spearman_corrcoef

    from llamahome.kvcache.kvzip import repeat_prompt
    from llamahome.kvcache.teacher import kvzip_scores

    scorer = scorer_for(model.config)
    teacher = kvzip_scores(model, ids, repeat_prompt(tokenizer), mask, with_hidden=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rho = []
    with torch.no_grad():
        for layer, target in enumerate(teacher.scores):
            pred = scorer.score(layer, teacher.hidden[layer], positions, teacher.keys[layer],
                                teacher.values[layer])
            for row in range(len(ids)):
                real = mask[row].bool()
                rho.append(spearman_corrcoef(pred[row][:, real].T, target[row][:, real].T))
    return rho


def test_scorer_ranks_tokens_like_its_teacher_on_held_out_text(scorer_run, tmp_path):
    from llamahome import load_model
    from llamahome.utils.validation import build

    model, tokenizer = load_model(str(scorer_run))
    # Held-out text: the validation topics of the manual, never trained on (split by topic).
    cfg = compose("train", (*_model(scorer_run), *SCORER_TRAIN), tmp_path)
    data = build(cfg, "data", tokenizer=tokenizer)
    data.setup("validate")
    rho = []
    for batch in data.val_dataloader():
        rho += _rank_correlations(model, tokenizer, batch["input_ids"], batch["attention_mask"])
    assert len(rho) == 4 * 2  # rows x layers, each a KV head vector
    assert float(torch.cat(rho).mean()) >= 0.8
    # Text of another kind (stdlib docstrings) is harder: the scorer still ranks well.
    other = tokenizer(held_out_text(), return_tensors="pt").input_ids[:, :768].view(3, 256)
    rho = _rank_correlations(model, tokenizer, other, torch.ones_like(other))
    assert float(torch.cat(rho).mean()) >= 0.7


def test_every_token_is_scored_as_it_enters_at_prefill_and_decode():
    from transformers import LlamaForCausalLM

    from llamahome.kvcache.attention import enable_hybrid_attention

    torch.manual_seed(0)
    model = enable_hybrid_attention(LlamaForCausalLM(tiny_llama_config()).eval())
    scorer = KVScorer(2, 64, 2)
    torch.nn.init.normal_(scorer.layers[0].weight)
    torch.nn.init.normal_(scorer.layers[1].weight)
    attach_scorer(model, scorer)
    ids = torch.randint(2, 96, (1, 30), generator=torch.Generator().manual_seed(1))
    cache = make_cache("learned", model.config, window_length=1000, min_tokens=0)
    with torch.no_grad(), attention_inputs(model) as hidden:
        out = model(ids, cache=cache)
    for i, layer in enumerate(cache.layers):
        expected = scorer.score(i, hidden[i], None, layer.keys, layer.values)
        torch.testing.assert_close(layer.scores, expected)
    with torch.no_grad():
        for step in range(3):
            token = out.logits[:, -1:].argmax(-1)
            with attention_inputs(model) as hidden:
                out = model(token, cache=cache)
            for i, layer in enumerate(cache.layers):
                new = scorer.score(i, hidden[i], torch.tensor([[30 + step]]),
                                   layer.keys[:, :, -1:], layer.values[:, :, -1:])
                torch.testing.assert_close(layer.scores[:, :, -1:], new)


def test_learned_without_a_scorer_is_one_error_line_before_loading(tmp_path, capsys, monkeypatch):
    from llamahome import generate as generate_module

    def never(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("llamahome.model.load.load_model", never)
    cfg = compose("generate", ["model=tiny", "cache=learned", "print_config=false"], tmp_path)
    with pytest.raises(SystemExit) as exit_info, user_errors():
        generate_module.generate(cfg)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(lines) == 1
    assert "python -m llamahome.train experiment=kv_scorer model=tiny" in lines[0]


def test_the_run_is_picked_up_by_train_eval_generate_chat_and_serve(
    scorer_run, tmp_path, capsys, caplog, monkeypatch
):
    from llamahome.chat import chat
    from llamahome.eval import evaluate
    from llamahome.generate import generate
    from llamahome.train import train

    model = _model(scorer_run)
    learned = ("cache=learned", "cache.budget_ratio=0.25", "cache.min_tokens=0")

    # train: fine-tune the run further; its sample generation uses cache=learned.
    caplog.set_level(logging.INFO, logger="llamahome.training.callbacks")
    train(compose("train", (
        *model, *learned, "data=pydoc", "data.max_seq_length=64", "data.max_train_samples=4",
        "data.max_val_samples=2", "trainer.max_steps=1", "validate_before_fit=false",
        "export=false", "print_config=false", "callbacks.sample_generation.max_new_tokens=4",
    ), tmp_path / "train"))
    assert "sample @ step 1" in caplog.text

    # eval: streaming perplexity through the learned cache; the row reports the keep ratio.
    row = evaluate(compose("eval", (
        *model, *learned, "task.length=96", "task.prefix=32", "task.show_progress=false",
    ), tmp_path / "eval"))
    assert row["policy"] == "learned" and row["keep_ratio"] == pytest.approx(0.25, abs=0.02)

    # generate: the status line carries the keep ratio.
    out = generate(compose("generate", (
        *model, *learned, "prompt=" + "The list type. " * 20, "max_new_tokens=6",
        "print_config=false", "stream=false",
    ), tmp_path / "gen"))
    assert out["policy"] == "learned" and out["keep_ratio"] < 0.5
    assert "keep " in capsys.readouterr().out

    # chat: one turn from stdin.
    monkeypatch.setattr("sys.stdin", io.StringIO("What does a list hold?\n"))
    chat(compose("chat", (*model, *learned, "max_new_tokens=4", "print_config=false"),
                 tmp_path / "chat"))
    assert "cache=learned" in capsys.readouterr().out

    # serve: the real app under uvicorn, a short request with the official client.
    _serve_one_request(model, learned, tmp_path / "serve")


def _serve_one_request(model, learned, run_dir) -> None:
    import openai
    from serve_helpers import running

    from llamahome.serve import build_server

    app, engine, _ = build_server(compose("serve", (
        *model, *learned, "print_config=false", "serve.max_new_tokens=8", "serve.model_name=m",
    ), run_dir))
    # serve_helpers.running: uvicorn without its logging dictConfig, which would close every
    # handler configured before, the streams of earlier tests' handlers included.
    try:
        with running(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=120)
            reply = client.completions.create(
                model="m", prompt="The list type. " * 20, max_tokens=4, temperature=0
            )
        assert reply.usage.completion_tokens == 4
        assert reply.usage.model_extra["kv_cache"]["policy"] == "learned"
    finally:
        engine.stop()


def test_keep_ratio_of_a_learned_cache_counts_real_tokens_only():
    from transformers import LlamaForCausalLM

    from llamahome.kvcache.attention import enable_hybrid_attention

    torch.manual_seed(0)
    model = enable_hybrid_attention(LlamaForCausalLM(tiny_llama_config()).eval())
    attach_scorer(model, KVScorer(2, 64, 2))
    cache = make_cache("learned", model.config, budget_ratio=0.2, min_tokens=0, seq_len=100,
                       head_budgets="global")
    with torch.no_grad():
        model(torch.randint(2, 96, (2, 100), generator=torch.Generator().manual_seed(2)),
              cache=cache)
    assert keep_ratio(cache) == pytest.approx(0.2)
