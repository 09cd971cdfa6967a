"""HetLoRA (Cho et al. 2024): heterogeneous LoRA ranks via truncation, zero-padding and norm weighting.

The server holds one global pair of rank r_max: A (..., r_max, in), B (..., out, r_max).

- Distribution: client k with rank r_k gets the first r_k components, A[..., :r_k, :] and B[..., :, :r_k]
  (`RankMethod`: the rest are zero).
- Aggregation: each client's pair is zero-padded to r_max (which leaves B_k A_k unchanged) and
  A and B are averaged separately,

      A = sum_k w_k pad(A_k),   B = sum_k w_k pad(B_k),   w_k = b_k ||B_k A_k||_F / sum_j b_j ||B_j A_j||_F,

  with optional base weights b_k (e.g. |D_k|, uniform by default). With a leading expert dim the
  weights are computed and normalised per expert (per slice of the leading shape).
- Local rank self-pruning: with gamma in (0, 1] the tail components j, floor(gamma r_k) <= j < r_k,
  are penalised (see `self_pruning_penalty`) and the client drops them when their size falls below a
  share of the components' total size (see `prune_rank`).

The LoRA scaling must be the same for every rank here (e.g. alpha / r_max, or alpha), otherwise
truncating or padding would change what a component means; the scaling does not enter the weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ubsmoe.fl.payload import ClientUpdate, GlobalState
from ubsmoe.methods.base import Aggregate
from ubsmoe.methods.lora import check_factors, check_pair, client_weights, lora_pairs, product_frobenius_norm
from ubsmoe.methods.rank import RankMethod

if TYPE_CHECKING:
    from ubsmoe.config import ExperimentConfig


def zero_pad(A: torch.Tensor, B: torch.Tensor, r_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad A (..., r, in) with zero rows and B (..., out, r) with zero columns up to rank r_max.

    B_pad @ A_pad == B @ A exactly, since the padded components are zero on both sides.
    """
    rank = check_pair(A, B)
    if r_max < rank:
        raise ValueError(f"cannot zero-pad factors of rank {rank} down to r_max = {r_max}")
    A_pad = A.new_zeros((*A.shape[:-2], r_max, A.shape[-1]))
    B_pad = B.new_zeros((*B.shape[:-1], r_max))
    A_pad[..., :rank, :] = A
    B_pad[..., :rank] = B
    return A_pad, B_pad


def hetlora_weights(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], base_weights: Sequence[float] | None = None
) -> torch.Tensor:
    """w_k = b_k ||B_k A_k||_F / sum_j b_j ||B_j A_j||_F, shape (K, *leading), float64, summing to one over k.

    Where every client's product is zero for a slice (e.g. the first round, B = 0), that slice falls back
    to the normalised base weights b_k.
    """
    check_factors(As, Bs)
    base = client_weights(base_weights if base_weights is not None else [1.0] * len(As), len(As))
    base_t = torch.tensor(base, dtype=torch.float64, device=As[0].device)
    base_t = base_t.reshape(-1, *([1] * (As[0].dim() - 2)))
    norms = torch.stack([product_frobenius_norm(A, B) for A, B in zip(As, Bs, strict=True)])
    raw = base_t * norms
    total = raw.sum(0, keepdim=True)
    return torch.where(total > 0, raw / total.where(total > 0, torch.ones_like(total)), base_t.expand_as(raw))


def hetlora_aggregate(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    r_max: int | None = None,
    base_weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (A, B) of rank r_max: zero-pad every client to r_max, then norm-weighted means of A and B.

    As[k] is (..., r_k, in), Bs[k] is (..., out, r_k); r_max defaults to max_k r_k. Returns
    A (..., r_max, in) and B (..., out, r_max) in the dtype of As[0].
    """
    ranks = check_factors(As, Bs)
    r_max = max(ranks) if r_max is None else r_max
    if r_max < max(ranks):
        raise ValueError(f"r_max = {r_max} is smaller than the largest client rank {max(ranks)}")
    w = hetlora_weights(As, Bs, base_weights)  # (K, *leading)
    A_out = torch.zeros((*As[0].shape[:-2], r_max, As[0].shape[-1]), dtype=torch.float64, device=As[0].device)
    B_out = torch.zeros((*Bs[0].shape[:-1], r_max), dtype=torch.float64, device=As[0].device)
    for k, (A, B) in enumerate(zip(As, Bs, strict=True)):
        A_pad, B_pad = zero_pad(A.double(), B.double(), r_max)
        wk = w[k][..., None, None]
        A_out = A_out + wk * A_pad
        B_out = B_out + wk * B_pad
    return A_out.to(As[0].dtype), B_out.to(Bs[0].dtype)


def _tail_start(rank: int, gamma: float) -> int:
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    return math.floor(gamma * rank)


def component_sizes(A: torch.Tensor, B: torch.Tensor, rank: int) -> torch.Tensor:
    """||B[..., :, j]||_2 ||A[..., j, :]||_2 = ||B_j A_j||_F of the first `rank` components, shape (..., rank)."""
    full = check_pair(A, B)
    if rank > full:
        raise ValueError(f"rank {rank} exceeds the factors' rank {full}")
    a_norms = torch.linalg.vector_norm(A[..., :rank, :], dim=-1)
    b_norms = torch.linalg.vector_norm(B[..., :, :rank], dim=-2)
    return a_norms * b_norms


def self_pruning_penalty(A: torch.Tensor, B: torch.Tensor, rank: int, gamma: float) -> torch.Tensor:
    """Local HetLoRA regulariser: sum_{j = floor(gamma r)}^{r - 1} ||B[..., :, j]||_2 * ||A[..., j, :]||_2.

    Each term is exactly the Frobenius norm of the rank-one component B[:, j] A[j, :], so the penalty is
    the summed size of the tail components (summed over any leading dims too); it is differentiable and
    0 when the tail is empty (floor(gamma r) = r). `rank` is the client's current rank (<= A's rank);
    components beyond it are ignored. (Cho et al. write the penalty as ||B_tail|| ||A_tail||; the
    per-component sum used here is an upper bound on ||B_tail A_tail||_F as well, and does not couple
    different components.) Add lambda * penalty to the local loss.
    """
    start = _tail_start(rank, gamma)
    sizes = component_sizes(A, B, rank)
    if start >= rank:
        return A.new_zeros(())
    return sizes[..., start:].sum()


def prune_rank(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], rank: int, gamma: float, ratio: float, min_rank: int = 1
) -> int:
    """The client's rank for the next round: r' = max(floor(gamma r), min_rank) when the tail is small, else r.

    "Small" is relative, over every adapted weight of the model together: the tail components
    (r' <= j < r) hold less than `ratio` of the size of all r components (sizes as in
    `self_pruning_penalty`). A relative rule, unlike an absolute threshold, does not depend on the
    model's width or on how far training has grown the adapters. The client then keeps only its first r'
    components; the server zero-pads them again when aggregating.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if min_rank < 1:
        raise ValueError(f"min_rank must be at least 1, got {min_rank}")
    start = max(_tail_start(rank, gamma), min_rank)
    if start >= rank:
        return rank
    tail = total = 0.0
    with torch.no_grad():
        for A, B in pairs:
            sizes = component_sizes(A.double(), B.double(), rank)
            tail += float(sizes[..., start:].sum())
            total += float(sizes.sum())
    return start if total > 0 and tail < ratio * total else rank


# ---- the method ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class HetLoRA(RankMethod):
    """HetLoRA: truncated starts, self-pruning penalty and rank pruning on the client, norm-weighted
    zero-padded averaging on the server; each client's rank lives in the method state (`ranks`)."""

    penalty: float = 1e-3
    """lambda, the weight of the self-pruning penalty."""
    gamma: float = 0.5
    """The tail starts at floor(gamma r)."""
    prune_ratio: float = 0.05
    """A client drops its tail when the tail holds less than this share of its components' total size."""

    @classmethod
    def options(cls, config: ExperimentConfig) -> dict[str, Any]:
        b = config.baselines
        return {"penalty": b.hetlora_penalty, "gamma": b.hetlora_gamma, "prune_ratio": b.hetlora_prune_ratio}

    def initial_state(self, client_ranks: Sequence[int]) -> dict[str, torch.Tensor]:
        return _write_ranks({}, list(client_ranks))

    def client_rank(self, state: GlobalState, client: int, configured: int) -> int | None:
        ranks = _ranks(state.method_state)
        return ranks[client] if ranks is not None and client < len(ranks) else configured

    def extra_loss(
        self, adapters: Mapping[str, torch.Tensor], rank: int | None, start: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        if rank is None or self.penalty == 0:
            return None
        terms = [
            self_pruning_penalty(adapters[a][..., :rank, :], adapters[b][..., :rank], rank, self.gamma)
            for a, b in lora_pairs(adapters)
        ]
        return self.penalty * torch.stack(terms).sum() if terms else None

    def client_report(self, adapters: Mapping[str, torch.Tensor], rank: int | None) -> dict[str, float]:
        if rank is None:
            return {}
        pairs = [(adapters[a][..., :rank, :], adapters[b][..., :rank]) for a, b in lora_pairs(adapters)]
        return {"next_rank": float(prune_rank(pairs, rank, self.gamma, self.prune_ratio))}

    def combine_pairs(self, result, key_a, key_b, As, Bs, weights) -> None:
        r_max = result.adapters[key_a].shape[-2]
        dtype = result.adapters[key_a].dtype
        A, B = hetlora_aggregate(As, Bs, r_max=r_max)
        result.adapters[key_a], result.adapters[key_b] = A.to(dtype), B.to(dtype)

    def finish_round(self, result: Aggregate, updates: Sequence[ClientUpdate]) -> None:
        """A client's proposed `next_rank` (never above its current rank) becomes its rank next round."""
        ranks = _ranks(result.method_state) or []
        for update in updates:
            proposed = update.metrics.get("next_rank")
            if isinstance(proposed, int | float) and 1 <= int(proposed) <= ranks[int(update.client_id)]:
                ranks[int(update.client_id)] = int(proposed)
        _write_ranks(result.method_state, ranks)
        result.report["client_ranks"] = ranks


# HetLoRA's state between rounds: every client's current rank, as the method-state tensor `ranks`
_RANKS = "ranks"


def _ranks(method_state: Mapping[str, torch.Tensor]) -> list[int] | None:
    ranks = method_state.get(_RANKS)
    return None if ranks is None else [int(r) for r in ranks.tolist()]


def _write_ranks(method_state: dict[str, torch.Tensor], ranks: list[int]) -> dict[str, torch.Tensor]:
    method_state[_RANKS] = torch.tensor(ranks, dtype=torch.long)
    return method_state
