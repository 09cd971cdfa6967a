"""Expert-utilization balance measures over activation counts (expert axis last)."""

from __future__ import annotations

import torch


def utilization_cv(counts: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation (population std / mean) of the counts over experts; 0 is balanced."""
    counts = counts.double()
    mean = counts.mean(dim=-1)
    return counts.std(dim=-1, correction=0) / mean.clamp_min(1e-12)


def dead_experts(counts: torch.Tensor) -> torch.Tensor:
    """Number of experts that received no token."""
    return (counts == 0).sum(dim=-1)
