"""GPU readiness figures for one CUDA GPU (run by scripts/gpu_check.sh; CI never runs it).

Sections, each independent (a failure prints FAIL and the next one runs):

1. ``mfu``: bf16 LoRA training step on a llama3_2_1b-shaped model (random init), tokens/s and
   MFU against the GPU's dense bf16 peak (nanoGPT's 6N + 12*L*d*T FLOPs per token; a LoRA step
   does ~2/3 of that, since frozen weights get no gradient, so the "work done" MFU is printed too).
2. ``decode``: h2o (budget_ratio=0.2) vs the full cache at 8k and 32k prompt tokens on the same
   model, bf16, SDPA (flash) attention: decode tok/s and peak memory.
3. ``fsdp``: ``python -m llamahome.train trainer=fsdp`` on model=tiny, one GPU, a few steps.
4. ``qlora``: a 4-bit base (bitsandbytes) + LoRA, a few optimizer steps; skipped without
   bitsandbytes.

Without CUDA it prints what it would measure and exits 0.

    python scripts/gpu_check.py [--sections mfu,decode,fsdp,qlora] [--lengths 8192,32768]
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

# Llama-3.2-1B as published (conf/model/llama3_2_1b.yaml); random init, nothing is downloaded.
LLAMA3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=None,
    pad_token_id=0,
)
# Dense bf16 peak FLOP/s by device name (no sparsity); Lightning's table covers more.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
SECTIONS = ("mfu", "decode", "fsdp", "qlora")
DEVICE = "cuda"  # a variable so the logic can be dry-run on CPU


def _first(*modules: str):
    """Import the first module that exists (the layout before and after the restructure)."""
    for name in modules:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(modules[-1])


def _llama(dtype: torch.dtype = torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA3_2_1B)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config._attn_implementation_internal = "sdpa"
    return model


def _peak() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def check_mfu(steps: int = 10, batch: int = 4, seq: int = 2048) -> None:
    """bf16 LoRA step throughput and MFU."""
    from peft import LoraConfig, get_peft_model

    model = _llama()
    n_params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, LLAMA3_2_1B["vocab_size"], (batch, seq), device=DEVICE)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    tok_s = batch * seq / seconds
    c = LLAMA3_2_1B
    per_token = 6 * n_params + 12 * c["num_hidden_layers"] * c["hidden_size"] * seq
    peak = _peak()
    print(
        f"mfu: llama3_2_1b-shaped ({n_params / 1e9:.2f}B params), LoRA r=8, bf16, "
        f"batch {batch} x {seq}: {seconds * 1e3:.0f} ms/step, {tok_s:,.0f} tok/s"
    )
    if peak:
        mfu = per_token * tok_s / peak
        print(
            f"mfu: MFU {mfu:.1%} (6N+attn convention; LoRA does ~2/3 of it: {mfu * 2 / 3:.1%}) "
            f"of {peak / 1e12:.0f} TFLOP/s bf16 ({torch.cuda.get_device_name()})"
        )
    else:
        print(f"mfu: no bf16 peak known for {torch.cuda.get_device_name()}")


def check_decode(lengths: list[int], new_tokens: int = 64) -> None:
    """h2o vs full decode tok/s and peak memory, SDPA flash attention."""
    import dataclasses

    from transformers import DynamicCache

    from llamahome import make_cache

    spec_mod = _first("llamahome.kvcache.spec", "llamahome.core.cache")
    names = {f.name for f in dataclasses.fields(spec_mod.CacheSpec)}
    no_floor = {"min_tokens": 0} if "min_tokens" in names else {}
    model = _llama().eval()
    for length in lengths:
        ids = torch.randint(3, LLAMA3_2_1B["vocab_size"], (1, length), device=DEVICE)
        for policy in ("full", "h2o"):
            model.config._attn_implementation_internal = "sdpa"  # h2o switches to hybrid
            cache = (
                DynamicCache(config=model.config)
                if policy == "full"
                else make_cache("h2o", model.config, budget_ratio=0.2, **no_floor)
            )
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with (
                torch.no_grad(),
                torch.nn.attention.sdpa_kernel(
                    [
                        torch.nn.attention.SDPBackend.FLASH_ATTENTION,
                        torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
                        torch.nn.attention.SDPBackend.MATH,
                    ]
                ),
            ):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                nxt = out.logits[:, -1:].argmax(-1)
                for _ in range(new_tokens):
                    out = model(nxt, cache=cache, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                t2 = time.perf_counter()
            kept = cache.layers[0].keys.shape[2]
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(
                f"decode: {policy:4s} @ {length:>6}: prefill {t1 - t0:6.2f} s, decode "
                f"{new_tokens / (t2 - t1):7.1f} tok/s, peak {peak:6.2f} GiB, "
                f"kept {kept} of {cache.get_seq_length()} tokens"
            )
            del cache, out


def _run(cmd: list[str], timeout: int) -> None:
    print("  $", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
    for line in tail:
        print("   ", line)
    if proc.returncode:
        raise RuntimeError(f"exit status {proc.returncode}")


def check_fsdp() -> None:
    """The train CLI with trainer=fsdp on one GPU, model=tiny, a few steps."""
    with tempfile.TemporaryDirectory() as tmp:
        _run(
            [
                sys.executable,
                "-m",
                "llamahome.train",
                "model=tiny",
                "peft=none",
                "data=stdlib",
                "trainer=fsdp",
                "trainer.devices=1",
                "trainer.max_steps=6",
                "trainer.val_check_interval=3",
                "data.max_seq_length=128",
                "data.batch_size=4",
                "data.max_train_samples=64",
                "data.max_val_samples=8",
                "callbacks.sample_generation.max_new_tokens=4",
                "print_config=false",
                f"hydra.run.dir={tmp}/run",
            ],
            timeout=240,
        )
    print("fsdp: ok (6 steps, FSDP2, bf16-mixed, 1 GPU)")


def check_qlora(steps: int = 5) -> None:
    """A 4-bit base through llamahome.load_model + LoRA; loss finite, adapters move."""
    if importlib.util.find_spec("bitsandbytes") is None:
        print("qlora: SKIP (bitsandbytes is not installed: pip install 'llamahome[qlora]')")
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamahome import load_model

    ft = _first("llamahome.model.finetuning", "llamahome.core.finetuning")
    qlora = ft.QLoRA(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    small = {**LLAMA3_2_1B, "num_hidden_layers": 2, "vocab_size": 1024}
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(LlamaConfig(**small)).to(torch.bfloat16).save_pretrained(tmp)
        # The tokenizer is not used by a saved Llama (only a local BPE sizes the model from it).
        model, _ = load_model(tmp, tokenizer=object(), quantization=qlora.quantization_config())
        model = ft.apply_finetuning(model, qlora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, 1024, (2, 256), device=DEVICE)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    if not all(map(torch.isfinite, map(torch.tensor, losses))):
        raise RuntimeError(f"non-finite loss: {losses}")
    print(
        f"qlora: ok (4-bit nf4 base, LoRA r=8, {steps} steps, loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--lengths", default="8192,32768")
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if not torch.cuda.is_available():
        print("gpu_check: SKIP, no CUDA device. On one GPU it would measure:")
        print("  mfu:    bf16 LoRA step tok/s and MFU, llama3_2_1b-shaped model (random init)")
        print(f"  decode: h2o (budget_ratio=0.2) vs full decode tok/s + peak memory at {lengths}")
        print("  fsdp:   python -m llamahome.train trainer=fsdp trainer.devices=1 (model=tiny)")
        print("  qlora:  4-bit base + LoRA steps (skipped without bitsandbytes)")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"gpu_check on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    checks: dict[str, Callable[[], None]] = {
        "mfu": check_mfu,
        "decode": lambda: check_decode(lengths),
        "fsdp": check_fsdp,
        "qlora": check_qlora,
    }
    failed = []
    for name in sections:
        start = time.perf_counter()
        try:
            checks[name]()
        except Exception as err:  # noqa: BLE001 - one section failing must not hide the others
            failed.append(name)
            print(f"{name}: FAIL {type(err).__name__}: {err}")
        finally:
            torch.cuda.empty_cache()
        print(f"{name}: {time.perf_counter() - start:.0f} s")
    print("gpu_check:", "failed " + ", ".join(failed) if failed else "all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
