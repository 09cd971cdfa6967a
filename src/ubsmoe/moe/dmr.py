"""Server side of Dynamic Modulated Routing (DESIGN 2.2, step 7), as pure functions.

Tensors may carry any leading shape, e.g. (L, M) for all layers at once; the expert axis is last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """FedAvg weights w_c rescaled to sum to one."""
    total = float(sum(weights))
    if not weights or total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def global_utilization(
    counts: Sequence[torch.Tensor], tokens: Sequence[torch.Tensor | float], weights: Sequence[float]
) -> torch.Tensor:
    """u~_i = sum_c w_c * a_{c,i} / n_c: weighted per-token activation rate of each expert."""
    w = normalized_weights(weights)
    if not len(counts) == len(tokens) == len(w):
        raise ValueError(
            f"need one count, token total and weight per client, got {len(counts)}, {len(tokens)}, {len(w)}"
        )
    rates = []
    for a, n, wc in zip(counts, tokens, w, strict=True):
        n = torch.as_tensor(n, dtype=torch.float64)
        rates.append(wc * a.double() / n.clamp_min(1).unsqueeze(-1))
    return torch.stack(rates).sum(0)


def mean_top_k(top_ks: Sequence[int], weights: Sequence[float]) -> float:
    """K_bar = sum_c w_c * K_c."""
    return sum(wc * k for wc, k in zip(normalized_weights(weights), top_ks, strict=True))


def dmr_target(utilization: torch.Tensor, mean_k: float, eps: float = 1e-6) -> torch.Tensor:
    """phi_target_i = tanh(u* / (u~_i + eps) - 1) with u* = K_bar / M.

    Under-used experts get a positive target (up to +1), over-used ones a negative one
    (down to tanh(-1) ~ -0.76).
    """
    balanced_rate = mean_k / utilization.shape[-1]
    return torch.tanh(balanced_rate / (utilization + eps) - 1.0)


def dmr_update(
    phis: Sequence[torch.Tensor],
    counts: Sequence[torch.Tensor],
    tokens: Sequence[torch.Tensor | float],
    top_ks: Sequence[int],
    weights: Sequence[float],
    zeta: float = 0.9,
    eps: float = 1e-6,
) -> torch.Tensor:
    """phi <- zeta * (sum_c w_c phi_c) + (1 - zeta) * phi_target, from the clients of one round."""
    if not 0.0 <= zeta <= 1.0:
        raise ValueError(f"zeta must be in [0, 1], got {zeta}")
    w = normalized_weights(weights)
    averaged_phi = torch.stack([wc * p.double() for wc, p in zip(w, phis, strict=True)]).sum(0)
    target = dmr_target(global_utilization(counts, tokens, w), mean_top_k(top_ks, w), eps)
    return (zeta * averaged_phi + (1.0 - zeta) * target).to(phis[0].dtype)
