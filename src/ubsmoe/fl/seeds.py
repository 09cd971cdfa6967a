"""Seeds derived from a run's seed and a position in it (round, client, tensor), stable everywhere."""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["derive_seed"]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts (stable across processes and platforms, unlike `hash`)."""
    text = ":".join(str(p) for p in ("ubsmoe-sim", *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") & ((1 << 63) - 1)
