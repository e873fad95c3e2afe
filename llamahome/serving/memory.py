"""The KV pool: how many bytes of KV cache the server may hold, and what one request may need.

A request is admitted when its *worst case* fits in what the running requests have not
reserved. The worst case is its policy's bound over its own prompt + ``max_tokens`` (L):

* full cache: L tokens;
* an evicting policy: the budget's largest kept count for that L, plus the one slot a decode
  step writes before it evicts (``Budget.max_total + 1``), never more than L. A running
  ratio (``ratio_basis=running``) has no bound below L, nor has a score policy that holds a
  whole prompt while it scores it or shares its budget among heads (``kvzip``, ``learned``
  with ``head_budgets`` global or layer: ``score_spec.holds_whole_prompt``).

A prompt is prefilled in chunks and an evicting cache evicts after each chunk, so for the length
of one chunk's forward a row holds up to ``prefill_chunk`` tokens more than its bound. One
prompt is prefilled at a time, so the pool keeps that much aside once (``headroom``) rather
than per request. Sizes are key + value bytes over all layers (``kvcache.kv_bytes`` counts the
same buffers), so the bytes held, summed over the rows, never exceed ``capacity``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from llamahome.errors import ConfigError

# torch loads in the functions that use it: serve.py parses sizes while it checks the command
# line, before torch (start-up).
if TYPE_CHECKING:
    import torch

DEFAULT_SHARE = 0.5  # of the free memory at start, when serve.kv_memory is not given
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: Any, key: str) -> int:
    """A byte count from an integer or a size string (``"2GiB"``, ``"512MB"``, ``"1.5g"``).

    Raises:
        ConfigError: Naming `key`, for anything that is not a positive size.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)) and (
        match.group(2).lower() in _UNITS
    ):
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    else:
        raise ConfigError(
            f"{key}={value!r} is not a size: give bytes (1073741824) or a size with a unit "
            "(512MiB, 2GiB, 1.5GB)."
        )
    if size < 1:
        raise ConfigError(f"{key}={value!r} must be at least 1 byte.")
    return size


def free_memory(device: torch.device) -> int:
    """Bytes free now on `device` (GPU memory on CUDA, available RAM otherwise)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def kv_bytes_per_token(model_config: Any, dtype: torch.dtype) -> int:
    """Key + value bytes one token takes in a full cache, over all layers (one row)."""
    import torch

    text = model_config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * torch.empty((), dtype=dtype).itemsize


def tokens_bound(spec: Any, seq_len: int) -> int:
    """Most KV slots a cache for `spec` holds between steps, over a sequence of `seq_len`."""
    from llamahome.kvcache.score_spec import holds_whole_prompt

    budget = getattr(spec, "budget", None)
    if spec.policy == "full" or budget is None or holds_whole_prompt(spec):
        return seq_len
    most = budget.for_cache(seq_len).max_total
    return seq_len if most is None else min(seq_len, most + 1)


class KVPool:
    """The bytes of KV cache the running requests may reserve, and what they have reserved.

    Attributes:
        pool: ``serve.kv_memory`` in bytes.
        bytes_per_token: Key + value bytes of one token (all layers, one row).
        headroom: Set aside for the one prompt being prefilled (one chunk of tokens).
        reserved: Bytes reserved by the admitted requests (their worst cases).
    """

    def __init__(self, pool: int, bytes_per_token: int, prefill_chunk: int) -> None:
        """Make an empty pool of `pool` bytes."""
        self.pool = int(pool)
        self.bytes_per_token = int(bytes_per_token)
        self.headroom = int(prefill_chunk) * self.bytes_per_token
        self.reserved = 0

    @property
    def capacity(self) -> int:
        """What requests may reserve in all: the pool less the prefill headroom."""
        return max(0, self.pool - self.headroom)

    def worst_case(self, spec: Any, prompt_tokens: int, max_tokens: int) -> int:
        """Bytes a request may come to hold (see the module docstring)."""
        return self.bytes_per_token * tokens_bound(spec, prompt_tokens + max_tokens)

    def fits(self, size: int) -> bool:
        """Whether `size` more bytes fit now."""
        return self.reserved + size <= self.capacity

    def reserve(self, size: int) -> None:
        """Take `size` bytes (the caller checked `fits`)."""
        self.reserved += size

    def release(self, size: int) -> None:
        """Give `size` bytes back."""
        self.reserved = max(0, self.reserved - size)
