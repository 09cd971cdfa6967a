"""Top-K routing with Dynamic Modulated Routing (DESIGN 2.2, steps 1-5).

All functions here are pure: they take tensors and return tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Routing(NamedTuple):
    """What the router decided for a flat batch of T tokens."""

    expert_index: torch.Tensor  # (T, K) long, chosen experts per token
    gates: torch.Tensor  # (T, K) weights that multiply each chosen expert's output (differentiable)
    probs: torch.Tensor  # (T, M) float32 modulated routing probabilities (with their graph; detach to store)


def modulated_logits(scores: torch.Tensor, phi: torch.Tensor | None, num_candidates: int) -> torch.Tensor:
    """m_i = s_i + phi_i for the top-N_p experts of s, m_i = s_i otherwise.

    `scores` is (T, M); `phi` (M,) or None (plain Top-K).
    """
    if phi is None:
        return scores
    num_experts = scores.shape[-1]
    if num_candidates >= num_experts:
        return scores + phi
    candidates = scores.topk(num_candidates, dim=-1).indices
    in_candidate_set = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, candidates, True)
    return scores + phi * in_candidate_set


def route(
    hidden: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    *,
    phi: torch.Tensor | None = None,
    num_candidates: int | None = None,
    normalize_gates: bool = False,
    unit_gates: bool = False,
) -> Routing:
    """Route a flat batch `hidden` (T, H) with router weight (M, H) to `top_k` experts per token.

    The softmax runs in at least float32, as transformers' MoE routers do. With `unit_gates` each chosen
    expert's gate has value 1 but the gradient of its probability (straight-through), so phi still
    learns in models whose experts were never gated (MoEfied dense models).
    """
    num_experts = router_weight.shape[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    scores = F.linear(hidden, router_weight)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # half -> float32, float64 stays
    logits = modulated_logits(scores, phi, num_candidates or num_experts)
    probs = logits.softmax(dim=-1)
    top_probs, expert_index = probs.topk(top_k, dim=-1)
    if normalize_gates and top_k == 1:
        # p / p is exactly 1 and would cut phi off from the loss; same value, straight-through gradient
        unit_gates = True
    elif normalize_gates:
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    gates = top_probs - top_probs.detach() + 1.0 if unit_gates else top_probs
    return Routing(expert_index, gates.to(hidden.dtype), probs)


def range_regularizer(phi: torch.Tensor, phi_min: float, phi_max: float, strength: float) -> torch.Tensor:
    """lambda * (||relu(phi_min - phi)||^2 + ||relu(phi - phi_max)||^2): zero inside the range."""
    below = F.relu(phi_min - phi)
    above = F.relu(phi - phi_max)
    return strength * (below.square().sum() + above.square().sum())
