"""Keep secrets (API keys, tokens) out of logs, config dumps and W&B run configs."""

from __future__ import annotations

import re
from typing import Any

SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)
MASK = "***"


def redact(value: Any) -> Any:
    """Return a copy of a nested dict/list with values under secret-looking keys masked.

    Keys such as ``WANDB_API_KEY``, ``hf_token`` or ``password`` are masked; ``max_new_tokens``
    and other counts (ints) are left alone, since a number is never a credential.
    """
    if isinstance(value, dict):
        return {
            k: (MASK if _is_secret(k, v) else redact(v)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _is_secret(key: Any, value: Any) -> bool:
    if not (isinstance(key, str) and isinstance(value, str)):
        return False
    return bool(SECRET_KEY.search(key)) and bool(value)
