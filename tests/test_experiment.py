"""The experiment=pydoc_alpaca preset: it composes, and a few real steps score held-out answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamahome.evaluation.heldout import heldout_examples, score_texts
from llamahome.train import train

# The preset, shrunk to a few steps on model=tiny (a SmolLM2 step is seconds on 2 CPU cores);
# the full run (figures in docs/finetuning.md) is not a test.
FEW_STEPS = (
    "experiment=pydoc_alpaca",
    "model=tiny",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "data.batch_size=2",
    "data.max_seq_length=128",
    "data.max_val_samples=4",
    "callbacks.heldout_generation.num_samples=2",
    "callbacks.heldout_generation.max_new_tokens=6",
    "~callbacks.sample_generation",
    "export=false",
    "print_config=false",
)


def test_preset_fine_tunes_smollm2_with_lora_on_pydoc_alpaca(compose_train) -> None:
    cfg = compose_train("experiment=pydoc_alpaca")
    assert cfg.model.name == "smollm2" and cfg.model.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg.data.name == "pydoc_alpaca" and cfg.data.group_by == "topic"  # held-out topics
    assert cfg.peft._target_ == "peft.LoraConfig" and cfg.peft.r == 16
    assert cfg.validate_before_fit  # val/loss_first is the untrained model's
    assert cfg.callbacks.heldout_generation._target_.endswith("HeldOutGeneration")
    assert cfg.run_name == "smollm2-lora-pydoc_alpaca"


def test_preset_runs_a_few_steps_and_scores_held_out_answers(compose_train) -> None:
    cfg = compose_train(*FEW_STEPS)
    metrics = train(cfg)
    for key in (
        "val/loss_first",
        "val/loss",
        "heldout/rougeL",
        "heldout/rougeL_before",
        "heldout/exact_match",
    ):
        assert key in metrics and metrics[key] == metrics[key], key  # present, not NaN
    record = json.loads((Path(cfg.paths.output_dir) / "heldout_samples.json").read_text())
    assert len(record["samples"]) == 2 and record["before"]["rougeL"] == pytest.approx(
        metrics["heldout/rougeL_before"]
    )
    sample = record["samples"][0]
    assert "Below is an instruction" in sample["prompt"]  # llama-recipes' alpaca template
    assert sample["reference"] and isinstance(sample["after"], str)


def test_held_out_pairs_split_each_row_at_its_first_label() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [1, 2, 3, 4, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, -100], [-100, 2, 3, 4, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    assert heldout_examples([batch], 5) == [([5, 6, 7], [8, 9]), ([1], [2, 3, 4])]
    assert heldout_examples([batch], 1) == [([5, 6, 7], [8, 9])]
    packed = {**batch, "seq_lens": torch.tensor([[4, 2], [3, 1]])}  # first document only
    assert heldout_examples([packed], 5) == [([5, 6, 7], [8]), ([1], [2, 3])]


def test_scores_reward_the_reference_and_exact_match_ignores_whitespace() -> None:
    perfect = score_texts(
        ["The with  statement\nwraps a block."], ["The with statement wraps a block."]
    )
    assert perfect == {"rouge1": 1.0, "rougeL": 1.0, "exact_match": 1.0}
    partial = score_texts(["The with statement"], ["The with statement wraps a block."])
    assert 0 < partial["rougeL"] < 1 and partial["exact_match"] == 0
