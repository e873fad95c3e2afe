"""Loading models: the embedded SmolLM2, local exports, and clear errors when weights are missing."""

from __future__ import annotations

import pytest
import torch

from llamahome import ConfigError, ModelError, load_model


def test_smollm2_loads_offline_and_a_lora_step_trains(smollm2) -> None:
    from peft import LoraConfig

    from llamahome.model.finetuning import apply_finetuning

    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size == 576 and cfg.max_position_embeddings == 8192
    assert tokenizer.chat_template and tokenizer.pad_token is not None

    import copy

    lora = apply_finetuning(copy.deepcopy(model), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    lora.train()
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < 0.01 * sum(p.numel() for p in lora.parameters())
    batch = tokenizer(["def add(a, b):\n    return a + b"], return_tensors="pt")
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    loss = lora(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))


def test_missing_hub_weights_fail_fast_with_one_clear_error(monkeypatch) -> None:
    # Fast means no network round-trips (transformers' retries cost ~30 s offline); counted
    # rather than timed, so a busy machine cannot fail the test.
    import socket

    attempts: list[object] = []

    def no_network(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ModelError) as info:
        load_model("llama7b")
    message = str(info.value)
    assert attempts == []
    assert "meta-llama/Llama-2-7b-hf" in message
    assert "model.pretrained" in message and "HF_HOME" in message
    assert "\n" not in message


def test_missing_local_directory_is_a_model_error(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_weights_is_a_model_error(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")  # named before anything loads
    with pytest.raises(ModelError, match=r"config\.json: has no \"model_type\""):
        load_model(str(tmp_path))
    model, tokenizer = load_model("tiny", attn_implementation="sdpa")
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="config.json but no weights"):
        load_model(str(tmp_path))


def test_unknown_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Unknown model option"):
        load_model("tiny", not_a_field=1)


def test_bad_dtype_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.dtype"):
        load_model("tiny", dtype="float64")


def test_tiny_random_init_uses_the_local_bpe_tokenizer() -> None:
    model, tokenizer = load_model("tiny")
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.num_hidden_layers == 4
    ids = tokenizer("import os\nprint(os.getcwd())", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == len(tokenizer)
    model2, _ = load_model("tiny")  # same seed, same init: runs are comparable
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))


def test_trust_remote_code_is_off_unless_asked() -> None:
    from llamahome.model.load import resolve_spec

    assert resolve_spec("smollm2").trust_remote_code is False
    assert resolve_spec("smollm2", trust_remote_code=True).trust_remote_code is True
