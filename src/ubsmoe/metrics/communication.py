"""Communication cost of federated payloads: the bytes of the tensors a client downloads and uploads.

Counted as the raw tensor payload (numel x element size), which is what any serialisation of the
tensors carries at least (Flower's ArrayRecord adds a few bytes of framing per array). Per client
and round under UB-SMoE:

- download: the global adapters (every expert's LoRA) and phi (L x M);
- upload: the adapter deltas, phi, and the utilization statistics (counts L x M, tokens L).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["payload_bytes"]


def payload_bytes(*items: Any) -> int:
    """Total bytes of the tensors in `items` (tensors, mappings or sequences of them, nested)."""
    total = 0
    for item in items:
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, Mapping):
            total += payload_bytes(*item.values())
        elif isinstance(item, list | tuple):
            total += payload_bytes(*item)
        elif item is not None:
            raise TypeError(f"cannot count the bytes of a {type(item).__name__}")
    return total
