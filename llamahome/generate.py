"""Generate text with a KV-cache policy: ``python -m llamahome.generate prompt="..."``.

Defaults: the embedded SmolLM2-135M-Instruct (``model=smollm2``), its chat template, the H2O
cache at the paper's 20% budget of prompt + answer (``cache=h2o``) above a floor of
``cache.min_tokens`` (1024) tokens below which nothing is evicted, so a short prompt gets exactly
the full cache's answer; greedy decoding, tokens streamed to stdout and a closing summary line::

    [generate] prompt 31 tokens | new 128 tokens | 3.2 s, 40.0 tok/s |
        KV 0.64 MiB held vs 3.51 MiB full (18%) | cache=h2o     (one line)

Everything is a Hydra override: ``cache=full``, ``cache.budget_ratio=0.1``,
``prompt_file=notes.txt``, ``do_sample=true temperature=0.8``, ``max_new_tokens=256``, and
``model=`` takes a conf name, a Hugging Face directory, a train run (or its export/) or a hub id.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from llamahome.errors import ConfigError
from llamahome.utils.cli import launch, quiet_libraries, user_errors
from llamahome.utils.sweep import in_multirun, run_sweep_job
from llamahome.utils.validation import build, check_seed

log = logging.getLogger("llamahome.generate")


def read_prompt(cfg: DictConfig) -> str:
    """Return the prompt text: ``prompt_file=`` when set, else ``prompt=``.

    Raises:
        ConfigError: If the prompt is missing or empty, or the file cannot be read.
    """
    prompt, path = cfg.get("prompt"), cfg.get("prompt_file")
    if prompt is None and path is None:
        raise ConfigError(
            "prompt is missing: give prompt='Explain KV caches.' or prompt_file=q.txt"
        )
    if path is not None:
        try:
            prompt = Path(path).expanduser().read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"prompt_file={path!r} cannot be read: {err.strerror}") from err
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"prompt_file={path!r} is not UTF-8 text (byte {err.start}: {err.reason}): "
                "save it as UTF-8."
            ) from err
    if not str(prompt).strip():
        raise ConfigError("prompt is empty: give some text to continue")
    return str(prompt)


def generation_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``model.generate`` keyword arguments from the config's sampling keys, validated.

    Raises:
        ConfigError: Naming the first key out of range.
    """
    from llamahome.model.generation import SAMPLING_KEYS, sampling_kwargs

    return sampling_kwargs(**{key: cfg.get(key) for key in SAMPLING_KEYS})


def check_chat_template(value: Any) -> None:
    """Raise ConfigError unless `value` is auto, true or false."""
    if value not in (True, False, "auto"):
        raise ConfigError(f"chat_template={value!r} must be auto, true or false")


def encode(tokenizer: Any, prompt: str, chat_template: Any, system_prompt: str | None) -> dict:
    """Tokenize `prompt`, through the chat template when asked (or ``auto`` and available).

    Raises:
        ConfigError: If ``chat_template=true`` but the tokenizer has none.
    """
    check_chat_template(chat_template)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use = has_template if chat_template == "auto" else bool(chat_template)
    if use and not has_template:
        raise ConfigError(
            "chat_template=true but this tokenizer has no chat template: use chat_template=false"
        )
    if not use:
        return dict(tokenizer(prompt, return_tensors="pt"))
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Load, generate with the configured cache, stream, summarise.

    Cheap checks (cache budget, model spec, prompt, sampling keys) run before the model loads,
    so a bad value fails in a second.

    Args:
        cfg: The composed ``conf/generate.yaml``.

    Returns:
        The text and the summary figures (prompt_tokens, new_tokens, seconds, tok_s,
        kv_bytes, full_kv_bytes, policy).
    """
    check_seed(cfg)
    cache_spec = build(cfg, "cache")
    model_spec = build(cfg, "model")
    prompt = read_prompt(cfg)
    gen_kwargs = generation_kwargs(cfg)
    check_chat_template(cfg.get("chat_template", "auto"))
    from llamahome.model.scorer import check_scorer_available

    check_scorer_available(cache_spec, model_spec)
    if cfg.get("print_config"):
        from llamahome.utils.rich_utils import print_config_tree

        print_config_tree(cfg)

    import torch
    from transformers import TextStreamer

    from llamahome.kvcache.spec import full_kv_bytes, keep_ratio, kv_bytes
    from llamahome.model.context import fit_new_tokens, model_context
    from llamahome.model.load import load_model, load_tokenizer

    torch.manual_seed(int(cfg.get("seed") or 0))
    tokenizer = load_tokenizer(model_spec)
    inputs = encode(tokenizer, prompt, cfg.get("chat_template", "auto"), cfg.get("system_prompt"))
    prompt_tokens = int(inputs["input_ids"].shape[1])
    what = f"prompt_file={cfg.prompt_file}" if cfg.get("prompt_file") else "prompt"
    # A prompt past the context fails here, from the config alone, before the weights load.
    fit_new_tokens(prompt_tokens, gen_kwargs["max_new_tokens"], model_context(model_spec), what)
    model, tokenizer = load_model(model_spec, tokenizer=tokenizer)
    model.eval()
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    max_new = fit_new_tokens(prompt_tokens, gen_kwargs["max_new_tokens"], model.config, what)
    if max_new < gen_kwargs["max_new_tokens"]:
        log.warning("max_new_tokens capped at %d: prompt + answer must fit the context", max_new)
        gen_kwargs["max_new_tokens"] = max_new
    # Ratio budgets are shares of the whole sequence; the floor (cache.min_tokens) keeps a short
    # prompt + answer unevicted, so the default cache never changes a short answer.
    cache = cache_spec.build(model.config, seq_len=prompt_tokens + max_new)
    streamer = (
        TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if cfg.stream else None
    )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        gen_kwargs["pad_token_id"] = tokenizer.eos_token_id  # silences generate()'s warning

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, cache=cache, streamer=streamer, **gen_kwargs)
    seconds = time.perf_counter() - start

    new_ids = out[0, prompt_tokens:]
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    if streamer is None:
        print(text, flush=True)
    held, full = kv_bytes(cache), full_kv_bytes(cache)
    result = {
        "text": text,
        "prompt_tokens": prompt_tokens,
        "new_tokens": int(new_ids.shape[0]),
        "seconds": seconds,
        "tok_s": new_ids.shape[0] / seconds if seconds > 0 else float("nan"),
        "kv_bytes": held,
        "full_kv_bytes": full,
        "keep_ratio": keep_ratio(cache),
        "policy": cache_spec.policy,
    }
    share = f" ({held / full:.0%})" if full else ""
    print(
        f"[generate] prompt {prompt_tokens} tokens | new {result['new_tokens']} tokens | "
        f"{seconds:.1f} s, {result['tok_s']:.1f} tok/s | KV {held / 2**20:.2f} MiB held vs "
        f"{full / 2**20:.2f} MiB full{share}, keep {result['keep_ratio']:.0%} | "
        f"cache={cache_spec.policy}",
        flush=True,
    )
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    quiet_libraries()
    if in_multirun():  # a failing job is recorded and the sweep goes on to its summary
        run_sweep_job(generate, cfg, None)
        return
    with user_errors():
        generate(cfg)


if __name__ == "__main__":
    launch(main, "generate")  # model=<dir|run|hub id>, one-line errors, fast --help
