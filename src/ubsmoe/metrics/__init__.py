"""Metrics: FLOPs (analytic and measured); evaluation, communication and balance metrics to come.

Names are imported lazily, so that `python -m ubsmoe.metrics.flops` runs the module only once.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "COMPONENTS": "ubsmoe.metrics.flops",
    "ModelDims": "ubsmoe.metrics.flops",
    "OLMOE_1B_7B": "ubsmoe.metrics.flops",
    "count_flops": "ubsmoe.metrics.flops",
    "flops_per_token": "ubsmoe.metrics.flops",
    "olmoe_1b_7b_table": "ubsmoe.metrics.flops",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
