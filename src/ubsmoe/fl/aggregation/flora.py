"""FLoRA (Wang et al. 2024): stack the clients' LoRA factors so the product is the exact weighted sum.

With client pairs A_k (..., r_k, in), B_k (..., out, r_k), scalings s_k = alpha / r_k and weights w_k
(normalised to sum to one), concatenate along the rank axis

    A_stack = [A_1; A_2; ...; A_K]            shape (..., sum_k r_k, in),
    B_stack = [w_1 s_1 B_1, ..., w_K s_K B_K]  shape (..., out, sum_k r_k),

so that B_stack @ A_stack = sum_k w_k s_k B_k @ A_k exactly (no cross terms, unlike averaging A and B
separately). The stacked update is merged into the frozen base weight, W <- W + B_stack @ A_stack,
and clients start fresh adapters of their own ranks next round.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ubsmoe.fl.aggregation.lora_factors import check_factors, check_pair, client_scalings, client_weights


def flora_stack(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[float] | float,
    weights: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_stack (..., sum r_k, in), B_stack (..., out, sum r_k)); w_k s_k sits on the B side.

    B_stack @ A_stack == sum_k w_k s_k B_k @ A_k (scaling 1 on the stacked pair). dtype of As[0].
    """
    check_factors(As, Bs)
    w = client_weights(weights, len(As))
    s = client_scalings(scalings, len(As))
    dtype = As[0].dtype
    A_stack = torch.cat([A.double() for A in As], dim=-2)
    B_stack = torch.cat([(wk * sk) * B.double() for B, wk, sk in zip(Bs, w, s, strict=True)], dim=-1)
    return A_stack.to(dtype), B_stack.to(dtype)


def merge_into(
    weight: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """W + scaling * B_stack @ A_stack for a base weight W (..., out, in); returns a new tensor, W's dtype."""
    check_pair(A_stack, B_stack)
    expected = (*A_stack.shape[:-2], B_stack.shape[-2], A_stack.shape[-1])
    if tuple(weight.shape) != expected:
        raise ValueError(f"base weight has shape {tuple(weight.shape)}, but the stacked update is {expected}")
    return (weight.double() + scaling * (B_stack.double() @ A_stack.double())).to(weight.dtype)
