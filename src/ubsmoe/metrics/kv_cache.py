"""Which keywords a model's forward takes, and the KV cache's name in its call and output, across transformers 5.x.

transformers renamed `past_key_values` to `cache` within 5.x (5.24 takes both and warns on the old
name, which it says goes in 5.40), and the `pyproject.toml` range spans both sides of the rename, so
the forward loops of `scoring` and `generation` ask the model which name it takes instead of
assuming one.
"""

from __future__ import annotations

import inspect
from typing import Any


def forward_takes(model: Any, name: str) -> bool:
    """Whether the model's forward declares the keyword `name` (False where its signature is unreadable)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_keyword(model: Any) -> str:
    """`cache` where the model's forward takes it, else the older `past_key_values`."""
    return "cache" if forward_takes(model, "cache") else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The cache of a forward's output, under whichever name its output class declares."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values")
