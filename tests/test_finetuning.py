"""PEFT methods and the memory/speed levers, each shown to take effect on a tiny real Llama.

The levers run a real Lightning Trainer on a real ``LlamaLitModule`` around a 2-layer
``LlamaForCausalLM`` (32-dim, 256-token vocabulary) with synthetic batches: a fit is well under
a second, so each lever is checked by behaviour (dtypes seen, steps taken, norms) not by config.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_TRAIN
from lightning.pytorch.callbacks import Callback

from llamahome import ConfigError
from llamahome.model.finetuning import (
    QLoRA,
    apply_finetuning,
    compile_backend,
    is_checkpointing,
    require_qlora_support,
)
from llamahome.model.load import ModelSpec, load_model
from llamahome.train import train
from llamahome.training.checks import check_finetuning
from llamahome.training.module import LlamaLitModule

HAS_CUDA = torch.cuda.is_available()
VOCAB = 256
MICRO = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def micro_model(**overrides):
    """A 2-layer Llama through load_model (seed-0 init: two calls give the same weights)."""
    spec = ModelSpec(name="micro", config=MICRO, attn_implementation="sdpa")
    model, _ = load_model(spec, tokenizer=object(), **overrides)  # no tokenizer needed to build
    return model.train()


def batches(
    n: int, rows: int = 2, length: int = 16, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Full rows (no padding), so every batch has the same number of loss tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (rows, length), generator=gen)
        out.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        )
    return out


class Recorder(Callback):
    """Grad norms before clipping, and the norm of the gradient the optimizer applied.

    Lightning runs forward/backward/clipping inside ``optimizer.step(closure)``, so the applied
    gradient is read off the SGD update itself: ``||p_after - p_before|| / lr``.
    """

    def __init__(self) -> None:
        self.unclipped: list[float] = []
        self.applied: list[float] = []
        self.steps = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        before: list[torch.Tensor] = []

        def pre_step(opt, args, kwargs) -> None:
            before[:] = [p.detach().clone() for p in params]

        @torch.no_grad()
        def post_step(opt, args, kwargs) -> None:
            self.steps += 1
            delta = torch.stack(
                [
                    torch.linalg.vector_norm((p - b).float())
                    for p, b in zip(params, before, strict=True)
                ]
            )
            self.applied.append(float(torch.linalg.vector_norm(delta)) / opt.param_groups[0]["lr"])

        optimizer.register_step_pre_hook(pre_step)
        optimizer.register_step_post_hook(post_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.detach().float() for p in pl_module.parameters() if p.grad is not None]
        self.unclipped.append(
            float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
        )


def fit(model, data, lr: float = 0.1, compile: bool | str = False, **trainer_kwargs):
    """Fit with SGD (no moment estimates: parameter updates are comparable across runs)."""
    lit = LlamaLitModule(
        model, optimizer=functools.partial(torch.optim.SGD, lr=lr), compile=compile
    )
    recorder = Recorder()
    kwargs = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "callbacks": [recorder],
        **trainer_kwargs,
    }
    trainer = L.Trainer(**kwargs)
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return trainer, lit, recorder


# --- gradient checkpointing -------------------------------------------------------------


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_loss_and_grads(peft: bool) -> None:
    from peft import LoraConfig

    method = (
        LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
        if peft
        else None
    )
    plain = apply_finetuning(micro_model(), method)
    checkpointed = apply_finetuning(micro_model(gradient_checkpointing=True), method)
    base = checkpointed.get_base_model() if peft else checkpointed
    assert is_checkpointing(base) and not is_checkpointing(plain) and base.config.use_cache is False
    plain.train(), checkpointed.train()

    calls = {"n": 0}
    # Count the MLP's forward itself: module hooks do not fire in the checkpoint's replay.
    mlp = base.model.layers[0].mlp
    forward = mlp.forward

    def counting_forward(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    mlp.forward = counting_forward
    batch = batches(1)[0]
    loss, grads = _loss_and_grads(plain, batch)
    calls["n"] = 0
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, batch)
    assert calls["n"] == 2  # forward, then recomputed in backward: activations were not kept
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and grads  # LoRA: grads reach frozen-input adapters
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5)


# --- precision ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "weight_dtype", "activation_dtype"),
    [
        ("32-true", torch.float32, torch.float32),
        ("bf16-mixed", torch.float32, torch.bfloat16),  # fp32 master weights, bf16 autocast
        ("bf16-true", torch.bfloat16, torch.bfloat16),
    ],
)
def test_precision_takes_effect(precision: str, weight_dtype, activation_dtype) -> None:
    model = micro_model()
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    proj = model.model.layers[0].self_attn.q_proj
    proj.register_forward_hook(lambda mod, args, out: seen.append((mod.weight.dtype, out.dtype)))
    trainer, _, _ = fit(model, batches(2), precision=precision)
    assert trainer.global_step == 2
    assert seen and set(seen) == {(weight_dtype, activation_dtype)}


@pytest.mark.skipif(HAS_CUDA, reason="fp16 AMP is valid with a GPU")
def test_fp16_mixed_on_cpu_is_a_config_error_not_a_silent_bf16_swap(compose_train) -> None:
    # Lightning would warn and train in bf16 instead; the user asked for fp16.
    with pytest.raises(ConfigError, match=r"trainer.precision=16-mixed .*bf16-mixed"):
        train(compose_train(*TINY_TRAIN, "trainer.precision=16-mixed"))


# --- accumulation, clipping -------------------------------------------------------------


def test_accumulation_steps_once_per_k_batches_like_a_k_times_larger_batch() -> None:
    small = batches(8, rows=2)
    trainer, lit, recorder = fit(micro_model(), small, accumulate_grad_batches=4)
    assert trainer.global_step == recorder.steps == 2  # 8 batches / 4

    # The same 16 rows as 2 batches of 8 without accumulation: the same two updates.
    large = [{k: torch.cat([b[k] for b in small[i : i + 4]]) for k in small[0]} for i in (0, 4)]
    _, reference, _ = fit(micro_model(), large)
    for (name, p), q in zip(
        lit.model.named_parameters(), reference.model.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_clipping_bounds_the_norm_the_optimizer_sees() -> None:
    _, _, clipped = fit(micro_model(), batches(3), gradient_clip_val=0.01)
    assert min(clipped.unclipped) > 0.01  # the bound bites
    assert max(clipped.applied) == pytest.approx(0.01, rel=1e-3)
    _, _, free = fit(micro_model(), batches(3), gradient_clip_val=None)
    assert free.applied == pytest.approx(free.unclipped, rel=1e-3)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
        ("compile=turbo", "compile"),
    ],
)
def test_bad_lever_values_fail_before_the_model_loads(
    compose_train, monkeypatch, override, key
) -> None:
    import llamahome.model.load as model_module

    monkeypatch.setattr(model_module, "build_or_load_model", _must_not_load)
    with pytest.raises(ConfigError, match=key):
        train(compose_train(*TINY_TRAIN, override))


# --- torch.compile -----------------------------------------------------------------------


def _compiled_fit(backend: str | bool):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer, lit, _ = fit(micro_model(), batches(2), compile=backend)
    return lit, counters["stats"]["unique_graphs"]


def test_compile_traces_the_forward_and_keeps_state_dict_keys() -> None:
    # aot_eager traces forward and backward graphs like inductor but skips code generation
    # (~5 s here vs ~60 s), so the wiring is checked in the suite; inductor is the slow test.
    eager_trainer, eager, _ = fit(micro_model(), batches(2))
    lit, graphs = _compiled_fit("aot_eager")
    assert lit._compiled_forward is not None and graphs >= 1
    assert list(lit.state_dict()) == list(eager.state_dict())  # no _orig_mod: resume either way
    for p, q in zip(lit.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LLAMAHOME_SLOW"), reason="~1 min; LLAMAHOME_SLOW=1 runs it")
def test_compile_true_uses_inductor_on_cpu() -> None:
    # About a minute on 2 CPU cores (cold cache): inductor generates and compiles C++ per graph.
    lit, graphs = _compiled_fit(True)
    assert graphs >= 1 and compile_backend(True) == "inductor"


# --- QLoRA: GPU only, clear errors elsewhere --------------------------------------------


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model loaded before the config was validated")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only error")
def test_qlora_on_cpu_fails_before_the_model_loads(compose_train, monkeypatch) -> None:
    import llamahome.model.load as model_module

    monkeypatch.setattr(model_module, "build_or_load_model", _must_not_load)
    with pytest.raises(ConfigError, match=r"peft=qlora .*no CUDA GPU.*peft=lora") as info:
        train(compose_train(*TINY_TRAIN, "model=smollm2", "peft=qlora"))
    assert "\n" not in str(info.value)
    # The Python API says the same before loading anything.
    with pytest.raises(ConfigError, match="peft=qlora"):
        load_model("smollm2", quantization=QLoRA().quantization_config())


def test_qlora_without_bitsandbytes_or_on_an_explicit_cpu_accelerator(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match=r"pip install 'llamahome\[qlora\]'"):
        require_qlora_support("gpu")
    with pytest.raises(ConfigError, match="trainer.accelerator=cpu"):
        require_qlora_support("cpu")


def test_qlora_on_a_random_init_model_is_a_config_error(compose_train, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = compose_train(*TINY_TRAIN, "peft=qlora")  # model=tiny: pretrained is null
    with pytest.raises(ConfigError, match="model.pretrained is null"):
        check_finetuning(cfg, QLoRA())


def test_qlora_config_maps_onto_bitsandbytes_and_lora(compose_train) -> None:
    from hydra.utils import instantiate

    cfg = compose_train("peft=qlora", "peft.r=4", "peft.bnb_4bit_quant_type=fp4")
    qlora = instantiate(cfg.peft, _convert_="all")
    assert qlora.lora.r == 4 and qlora.lora.target_modules >= {"q_proj", "down_proj"}
    bnb = qlora.quantization_config()
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "fp4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="peft.bnb_4bit_quant_type"):
        QLoRA(bnb_4bit_quant_type="int3")
    with pytest.raises(ConfigError, match="peft=qlora needs the model loaded in 4 bits"):
        apply_finetuning(micro_model(), qlora)


@pytest.mark.gpu
@pytest.mark.skipif(
    not HAS_CUDA or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs CUDA and bitsandbytes",
)
def test_qlora_trains_on_a_4bit_base_and_exports_a_float_merge(compose_train) -> None:
    from transformers import AutoModelForCausalLM

    keep = [o for o in TINY_TRAIN if not o.startswith(("model=", "peft=", "data=", "trainer."))]
    cfg = compose_train(
        *keep,
        "model=smollm2",
        "peft=qlora",
        "data=pydoc_alpaca",
        "trainer=gpu",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "model.gradient_checkpointing=true",
    )
    metrics = train(cfg)
    assert metrics["val/loss"] == metrics["val/loss"]  # finite, trained through 4-bit layers
    export = Path(cfg.paths.output_dir) / "export"
    merged = AutoModelForCausalLM.from_pretrained(export)
    assert not hasattr(merged.config, "quantization_config")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


# --- target modules ----------------------------------------------------------------------


def test_unknown_target_module_fails_through_train_before_fit(compose_train, monkeypatch) -> None:
    def must_not_fit(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(L.Trainer, "fit", must_not_fit)
    with pytest.raises(ConfigError, match=r"peft.target_modules \['qkv_proj'\] not found") as info:
        train(compose_train(*TINY_TRAIN, "peft=lora", "peft.target_modules=[q_proj,qkv_proj]"))
    assert "o_proj" in str(info.value)  # it lists what the model does have


def test_lora_dropout_masks_are_cheap_and_keep_nn_dropouts_law() -> None:
    from peft import LoraConfig

    from llamahome.training.module import CheapMaskDropout

    lit = LlamaLitModule(
        apply_finetuning(
            micro_model(), LoraConfig(r=4, lora_dropout=0.25, target_modules=["q_proj"])
        ),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
    )
    swapped = [m for m in lit.modules() if isinstance(m, CheapMaskDropout)]
    assert len(swapped) == MICRO["num_hidden_layers"]  # one per adapted q_proj
    dropout = swapped[0].train()
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    # Kept with probability 1 - p (4 sigma: +-0.004), scaled by 1 / (1 - p); the gradient too.
    assert abs(float(kept.float().mean()) - 0.75) < 0.004
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())
    assert torch.equal(dropout.eval()(x), x)  # eval mode: the identity
