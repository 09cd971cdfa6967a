"""Shared helpers for the federated LoRA baselines (HetLoRA, FlexLoRA, FLoRA, FLoRIST).

Conventions (the same as `ubsmoe.moe.experts.ExpertLoRA`): a LoRA pair is A of shape (..., r, in) and
B of shape (..., out, r), with any leading shape (e.g. (M,) for M experts), and the weight update it
stands for is

    delta W = s * B @ A,    shape (..., out, in),    s = alpha / r the LoRA scaling.

Client lists carry one pair per client; ranks may differ between clients, everything else may not.
Arithmetic runs in float64 and results come back in the dtype of the first client's A.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ubsmoe.moe.dmr import normalized_weights


def lora_product(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """delta W = scaling * B @ A for batched factors A (..., r, in) and B (..., out, r)."""
    check_pair(A, B)
    return scaling * (B @ A)


def check_pair(A: torch.Tensor, B: torch.Tensor) -> int:
    """Check that A (..., r, in) and B (..., out, r) form one LoRA pair; return its rank r."""
    if A.dim() < 2 or B.dim() < 2:
        raise ValueError(f"LoRA factors need at least 2 dims, got A {tuple(A.shape)} and B {tuple(B.shape)}")
    if A.shape[:-2] != B.shape[:-2]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} have different leading (e.g. expert) dims")
    if A.shape[-2] != B.shape[-1]:
        raise ValueError(
            f"rank mismatch: A {tuple(A.shape)} has rank {A.shape[-2]} (dim -2), "
            f"B {tuple(B.shape)} has rank {B.shape[-1]} (dim -1)"
        )
    return A.shape[-2]


def check_factors(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]) -> list[int]:
    """Check one LoRA pair per client, all of one (leading, out, in) shape; return the client ranks r_k."""
    if len(As) == 0:
        raise ValueError("need at least one client's LoRA factors")
    if len(As) != len(Bs):
        raise ValueError(f"need one B per A, got {len(As)} A factors and {len(Bs)} B factors")
    ranks = [check_pair(A, B) for A, B in zip(As, Bs, strict=True)]
    lead, in_features, out_features = As[0].shape[:-2], As[0].shape[-1], Bs[0].shape[-2]
    for k, (A, B) in enumerate(zip(As, Bs, strict=True)):
        if A.shape[:-2] != lead or A.shape[-1] != in_features or B.shape[-2] != out_features:
            raise ValueError(
                f"client {k} has A {tuple(A.shape)}, B {tuple(B.shape)}, but client 0 has "
                f"A {tuple(As[0].shape)}, B {tuple(Bs[0].shape)}: only the rank may differ between clients"
            )
    return ranks


def client_weights(weights: Sequence[float], num_clients: int) -> list[float]:
    """Client weights w_k normalised to sum to one; exactly one per client."""
    if len(weights) != num_clients:
        raise ValueError(f"need one weight per client, got {len(weights)} weights for {num_clients} clients")
    return normalized_weights(weights)


def client_scalings(scalings: Sequence[float] | float, num_clients: int) -> list[float]:
    """LoRA scalings s_k (alpha / r_k), one per client; a single number applies to every client."""
    if isinstance(scalings, (int, float)):
        scalings = [float(scalings)] * num_clients
    if len(scalings) != num_clients:
        raise ValueError(f"need one scaling per client, got {len(scalings)} scalings for {num_clients} clients")
    return [float(s) for s in scalings]


def weighted_product_sum(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[float] | float,
    weights: Sequence[float],
) -> torch.Tensor:
    """sum_k w_k * s_k * B_k @ A_k (w normalised to sum to one), shape (..., out, in), in float64.

    This forms the full out x in update; it is the reference the factor-only methods are tested against.
    """
    check_factors(As, Bs)
    w = client_weights(weights, len(As))
    s = client_scalings(scalings, len(As))
    total = torch.zeros((*As[0].shape[:-2], Bs[0].shape[-2], As[0].shape[-1]), dtype=torch.float64, device=As[0].device)
    for A, B, wk, sk in zip(As, Bs, w, s, strict=True):
        total = total + (wk * sk) * (B.double() @ A.double())
    return total


def product_frobenius_norm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||B @ A||_F over the last two dims, shape (...), without forming the out x in product.

    Uses ||B A||_F^2 = trace((B^T B)(A A^T)) = sum_ij (B^T B)_ij (A A^T)_ij, two r x r Gram matrices.
    """
    check_pair(A, B)
    A, B = A.double(), B.double()
    gram_b = B.transpose(-1, -2) @ B
    gram_a = A @ A.transpose(-1, -2)
    return (gram_b * gram_a).sum(dim=(-1, -2)).clamp_min(0.0).sqrt()
