"""Universal pseudo-gradient (DESIGN 2.3): a learning signal for experts a token did not activate.

Pure tensor math; the block accumulates the routing masses during the forward and adds
`pseudo_gradient_increment` to each expert-LoRA gradient after backward (gradient space) or to each
expert's actual update after the optimizer step (update space).
"""

from __future__ import annotations

import torch


def pseudo_gradient_increment(
    summed: torch.Tensor,
    used_mass: torch.Tensor,
    scaled_missed_mass: torch.Tensor,
    kappa: float = 1.0,
) -> torch.Tensor | None:
    """kappa * (rho_c * q_i) * g_bar for every expert i, g_bar = summed / (sum_j mu_j); None when nothing was used.

    summed:             (...) sum over the experts of one adapter tensor's real gradients (gradient space) or
                        of its actual optimizer updates (update space): all the formula needs of them
    used_mass:          (M,) mu_j = sum over tokens of p_tj * 1[j active for t]
    scaled_missed_mass: (M,) rho_c * q_i, q_i = sum over tokens of p_ti * 1[i not active for t]
                        (rho is folded in per forward so a step that mixes K values stays exact)
    Returns the (M, ...) term to add to every expert's gradient or update.
    """
    total_used = used_mass.sum()
    if total_used <= 0:
        return None
    universal_direction = summed / total_used.to(summed.dtype)
    weights = (kappa * scaled_missed_mass).to(summed.dtype).view(-1, *([1] * summed.dim()))
    return weights * universal_direction
