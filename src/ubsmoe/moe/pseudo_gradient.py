"""Universal pseudo-gradient (DESIGN 2.3): a learning signal for experts a token did not activate.

Pure tensor math; the block accumulates the routing masses during the forward and calls
`add_pseudo_gradient` on each expert-LoRA gradient after backward.
"""

from __future__ import annotations

import torch


def add_pseudo_gradient(
    grad: torch.Tensor,
    used_mass: torch.Tensor,
    scaled_missed_mass: torch.Tensor,
    kappa: float = 1.0,
) -> torch.Tensor:
    """g_i + kappa * (rho_c * q_i) * g_bar with g_bar = (sum_j g_j) / (sum_j mu_j).

    grad:               (M, ...) real gradients of one adapter tensor, zero for inactive experts
    used_mass:          (M,) mu_j = sum over tokens of p_tj * 1[j active for t]
    scaled_missed_mass: (M,) rho_c * q_i, q_i = sum over tokens of p_ti * 1[i not active for t]
                        (rho is folded in per forward so a step that mixes K values stays exact)
    Costs O(size of one expert's adapter) beyond the elementwise add.
    """
    total_used = used_mass.sum()
    if total_used <= 0:
        return grad
    universal_direction = grad.sum(dim=0) / total_used.to(grad.dtype)
    weights = (kappa * scaled_missed_mass).to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
    return grad + weights * universal_direction
