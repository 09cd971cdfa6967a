"""FedIT (Zhang et al. 2024): every client trains the full expert LoRA at K_max; FedAvg.

The budgets change nothing: FedIT is the homogeneous reference the rank baselines are measured
against (the tiers only label clients in the reports).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ubsmoe.methods.base import Method

__all__ = ["FedIT"]


@dataclass(frozen=True)
class FedIT(Method):
    """Every client at K_max with the full LoRA rank; FedAvg."""

    top_k_from_budget: ClassVar[bool] = False
