"""One way to make a learning-rate schedule from the ``scheduler`` config group's partial."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["make_schedule"]


def make_schedule(factory: Callable[..., Any], optimizer: Any, num_training_steps: int) -> Any:
    """Call `factory` (a ``conf/scheduler`` partial) on `optimizer` with what it takes.

    transformers' schedules differ: ``get_constant_schedule_with_warmup`` has no
    ``num_training_steps``, the cosine and linear ones need it.

    Args:
        factory: The schedule partial (``transformers.get_*_schedule*`` or any callable).
        optimizer: The optimizer it schedules.
        num_training_steps: The run's optimizer steps, passed when the factory takes it.

    Returns:
        The scheduler.
    """
    kwargs: dict[str, Any] = {"num_training_steps": num_training_steps}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass everything
        return factory(optimizer, **kwargs)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any and "num_training_steps" not in params:
        kwargs = {}
    return factory(optimizer, **kwargs)
