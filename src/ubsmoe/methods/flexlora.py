"""FlexLoRA (Bai et al. 2024): average full LoRA updates, then redistribute by truncated SVD.

The server forms the weighted full update of each adapted weight,

    delta W = sum_k w_k s_k B_k @ A_k,    s_k = alpha / r_k,   w normalised to sum to one,

takes one SVD delta W = U S V^T (per slice of any leading, e.g. expert, shape), and gives client k
the top-r_k triplets, split symmetrically so that

    s_k B'_k @ A'_k = U_r S_r V_r^T,    B'_k = U_r sqrt(S_r / s_k),   A'_k = sqrt(S_r / s_k) V_r^T,

the best rank-r_k approximation of delta W (Eckart-Young). Shapes follow `ubsmoe.methods.lora`:
A (..., r, in), B (..., out, r), delta W (..., out, in).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ubsmoe.methods.lora import weighted_product_sum
from ubsmoe.methods.rank import RankMethod


def flexlora_full_update(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[float] | float,
    weights: Sequence[float],
) -> torch.Tensor:
    """delta W = sum_k w_k s_k B_k @ A_k, shape (..., out, in), in the dtype of As[0]."""
    return weighted_product_sum(As, Bs, scalings, weights).to(As[0].dtype)


def _factors_from_svd(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the top-`rank` triplets with scaling * B @ A = U_r S_r Vh_r; zero components past min(out, in)."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if not scaling > 0:
        raise ValueError(f"scaling must be positive, got {scaling}")
    kept = min(rank, S.shape[-1])
    root = (S[..., :kept] / scaling).sqrt()
    A = U.new_zeros((*Vh.shape[:-2], rank, Vh.shape[-1]))
    B = U.new_zeros((*U.shape[:-1], rank))
    A[..., :kept, :] = root[..., :, None] * Vh[..., :kept, :]
    B[..., :kept] = U[..., :kept] * root[..., None, :]
    return A, B


def svd_factors(delta: torch.Tensor, rank: int, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (..., rank, in), B (..., out, rank)) with scaling * B @ A = best rank-`rank` approximation of delta.

    The singular values are split symmetrically (sqrt(S / scaling) on each side). If rank exceeds
    min(out, in) the extra components are zero (and the product is delta itself).
    """
    if delta.dim() < 2:
        raise ValueError(f"delta needs at least 2 dims (..., out, in), got shape {tuple(delta.shape)}")
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    A, B = _factors_from_svd(U, S, Vh, rank, scaling)
    return A.to(delta.dtype), B.to(delta.dtype)


@dataclass(frozen=True)
class FlexLoRA(RankMethod):
    """FlexLoRA: the server keeps the top-r_max SVD of the weighted full update as the global pair; a
    rank-r_c client starts from its first r_c components, which are the top-r_c SVD (the components are
    ordered by singular value)."""

    def combine_pairs(self, result, key_a, key_b, As, Bs, weights) -> None:
        r_max = result.adapters[key_a].shape[-2]
        dtype = result.adapters[key_a].dtype
        full = flexlora_full_update([A.double() for A in As], [B.double() for B in Bs], self.scaling, weights)
        A, B = svd_factors(full, r_max, self.scaling)
        result.adapters[key_a], result.adapters[key_b] = A.to(dtype), B.to(dtype)
