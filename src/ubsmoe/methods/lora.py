"""LoRA pairs as the methods see them: the model's adapter keys, and the factor checks of the rank baselines.

Layout: the expert LoRA of a block lives under `<block path>.lora.lora_A.<target>` and
`<block path>.lora.lora_B.<target>`; `lora_pairs` finds the pairs, `zero_tail` / `rank_sliced` give a
rank-r view, `layer_of` maps a key to its row of phi and of the utilization counts.

Factor conventions (the same as `ubsmoe.moe.experts.ExpertLoRA`): a LoRA pair is A of shape (..., r, in) and
B of shape (..., out, r), with any leading shape (e.g. (M,) for M experts), and the weight update it
stands for is

    delta W = s * B @ A,    shape (..., out, in),    s = alpha / r the LoRA scaling.

Client lists carry one pair per client; ranks may differ between clients, everything else may not.
Arithmetic runs in float64 and results come back in the dtype of the first client's A.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ubsmoe.moe.dmr import normalized_weights


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


# ---- the model's adapter keys ------------------------------------------------------------------
_LORA_A, _LORA_B = ".lora_A.", ".lora_B."


def lora_pairs(adapters: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(A key, B key) of every expert-LoRA pair, in the adapters' order."""
    return [
        (k, k.replace(_LORA_A, _LORA_B)) for k in adapters if _LORA_A in k and k.replace(_LORA_A, _LORA_B) in adapters
    ]


def non_lora_keys(adapters: Mapping[str, torch.Tensor]) -> list[str]:
    """The adapter keys outside every LoRA pair (e.g. a trainable router), in the adapters' order."""
    paired = {k for pair in lora_pairs(adapters) for k in pair}
    return [k for k in adapters if k not in paired]


def block_path(key: str) -> str:
    """'model.layers.3.mlp.lora.lora_A.gate' -> 'model.layers.3.mlp' (the UB-SMoE block owning the LoRA)."""
    return key.split(".lora.")[0]


def _natural(path: str) -> list[Any]:
    """Sort key that orders 'layers.2' before 'layers.10' (module order), whatever order the keys came in."""
    return [int(part) if part.isdigit() else part for part in path.split(".")]


def layer_of(adapters: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Layer index (row of phi and of the utilization counts) of every expert-LoRA key.

    Blocks are numbered in module order, read from their paths, so a state read back from a checkpoint
    (whose keys come sorted as text) maps the same way.
    """
    keys = [k for k in adapters if _LORA_A in k or _LORA_B in k]
    blocks = sorted({block_path(k) for k in keys}, key=_natural)
    index = {path: i for i, path in enumerate(blocks)}
    return {k: index[block_path(k)] for k in keys}


def zero_tail(adapters: Mapping[str, torch.Tensor], rank: int) -> None:
    """Zero the components past `rank` of every expert-LoRA pair, in place (A rows, B columns)."""
    with torch.no_grad():
        for key_a, key_b in lora_pairs(adapters):
            adapters[key_a][..., rank:, :].zero_()
            adapters[key_b][..., rank:].zero_()


def rank_sliced(adapters: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The adapters with every LoRA pair cut to its first `rank` components (views; other tensors as they are)."""
    sliced = dict(adapters)
    for key_a, key_b in lora_pairs(adapters):
        sliced[key_a], sliced[key_b] = adapters[key_a][..., :rank, :], adapters[key_b][..., :rank]
    return sliced


def fresh_a(shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A freshly initialised LoRA A (Kaiming-uniform bound of ExpertLoRA), reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)
