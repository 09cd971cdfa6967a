"""Switch Transformer load-balancing loss (Fedus et al. 2022), the local auxiliary loss of SMoE-LLB.

For T tokens routed to K experts each among M:

    L = M * sum_i f_i P_i,
    f_i = (number of (token, slot) assignments to expert i) / (T K)     (no gradient),
    P_i = (1 / T) sum_t p_{t,i}                                          (mean router probability, with gradient).

Both f and P sum to one, and L = 1 under perfectly uniform routing; with top-1 and every token
sent to one expert with probability 1, L = M. (transformers' `load_balancing_loss_func` normalises f
per slot instead, which makes its value K times this one.)
"""

from __future__ import annotations

import torch


def switch_load_balancing_loss(
    probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """M * sum_i f_i P_i for router probabilities probs (..., M) and chosen experts expert_index (..., K) or (...).

    `probs` must keep its graph (not the detached `Routing.probs`): the gradient flows through P only.
    An optional boolean `mask` of shape (...) keeps only the tokens where it is True (e.g. non-padding).
    """
    if probs.shape[-1] != num_experts:
        raise ValueError(f"probs has {probs.shape[-1]} experts in its last dim, expected num_experts = {num_experts}")
    if expert_index.dtype.is_floating_point or expert_index.dtype == torch.bool:
        raise ValueError(f"expert_index must be an integer tensor, got {expert_index.dtype}")
    if expert_index.shape == probs.shape[:-1]:
        expert_index = expert_index.unsqueeze(-1)
    if expert_index.shape[:-1] != probs.shape[:-1]:
        raise ValueError(
            f"expert_index {tuple(expert_index.shape)} must be (...) or (..., K) with ... = {tuple(probs.shape[:-1])}"
        )
    if expert_index.numel() and (expert_index.min() < 0 or expert_index.max() >= num_experts):
        raise ValueError(f"expert_index must lie in [0, {num_experts})")
    probs = probs.reshape(-1, num_experts)
    expert_index = expert_index.reshape(probs.shape[0], -1)
    if mask is not None:
        if mask.numel() != probs.shape[0]:
            raise ValueError(f"mask has {mask.numel()} entries for {probs.shape[0]} tokens")
        keep = mask.reshape(-1).bool()
        probs, expert_index = probs[keep], expert_index[keep]
    if probs.shape[0] == 0 or expert_index.shape[-1] == 0:
        raise ValueError("need at least one routed token (and one slot) for the load-balancing loss")
    counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts).to(probs.dtype)
    fraction = (counts / counts.sum()).detach()
    mean_prob = probs.mean(0)
    return num_experts * (fraction * mean_prob).sum()
