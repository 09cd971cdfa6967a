"""How neurons become experts and how a router is fitted: pure functions over tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ubsmoe.models.moefication.config import GROUPINGS

if TYPE_CHECKING:
    pass


# ---- neuron grouping (pure functions) ----------------------------------------------------------
def split_shared(mean_abs: torch.Tensor, shared_fraction: float, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared, routed) neuron indices, each sorted ascending.

    The shared group holds the round(shared_fraction * I) neurons with the highest mean |activation|,
    plus the next (I - S) mod M neurons by the same order, so that the routed count divides by M.
    """
    size = mean_abs.numel()
    shared_count = round(shared_fraction * size)
    shared_count += (size - shared_count) % num_experts
    if size - shared_count < num_experts:
        raise ValueError(
            f"an FFN with {size} neurons and shared_fraction {shared_fraction} leaves {size - shared_count} routed "
            f"neurons, fewer than num_experts={num_experts}"
        )
    order = torch.argsort(mean_abs.double(), descending=True, stable=True)
    return order[:shared_count].sort().values, order[shared_count:].sort().values


def balanced_assignment(distances: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each of N points to one of C clusters of exactly `size` points (N = C * size).

    Greedy over (point, cluster) pairs in increasing distance: a pair is taken when the point is
    unassigned and the cluster not full. Deterministic (stable order).
    """
    num_points, num_clusters = distances.shape
    if num_points != num_clusters * size:
        raise ValueError(f"{num_points} points cannot fill {num_clusters} clusters of {size}")
    order = torch.argsort(distances.reshape(-1), stable=True).tolist()
    labels = [-1] * num_points
    room = [size] * num_clusters
    left = num_points
    for flat in order:
        point, cluster = divmod(flat, num_clusters)
        if labels[point] < 0 and room[cluster] > 0:
            labels[point] = cluster
            room[cluster] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(gram: torch.Tensor, num_clusters: int, iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """Balanced k-means in kernel form: labels (N,) of N points into equal clusters, from their Gram matrix.

    Points are only seen through `gram` (N x N, G_ij = <p_i, p_j>), so the points may be as long as
    the number of calibration tokens. Squared distance of point i to the mean of cluster c:
    G_ii - 2/n sum_{j in c} G_ij + 1/n^2 sum_{j,l in c} G_jl. Seeding by k-means++ (seeded), assignment
    by `balanced_assignment`; the labels with the lowest objective seen are returned.
    """
    gram = gram.double()
    num_points = gram.shape[0]
    if num_points % num_clusters:
        raise ValueError(f"{num_points} points do not split into {num_clusters} equal clusters")
    size = num_points // num_clusters
    generator = torch.Generator().manual_seed(seed)
    diag = gram.diagonal()
    centers = [int(torch.randint(num_points, (1,), generator=generator))]
    nearest = (diag + diag[centers[0]] - 2 * gram[:, centers[0]]).clamp_min(0)
    for _ in range(1, num_clusters):
        weights = nearest.clone()
        weights[centers] = 0
        if weights.sum() <= 0:
            weights = torch.ones(num_points, dtype=torch.float64)
            weights[centers] = 0
        center = int(torch.multinomial(weights, 1, generator=generator))
        centers.append(center)
        nearest = torch.minimum(nearest, (diag + diag[center] - 2 * gram[:, center]).clamp_min(0))
    distances = diag[:, None] + diag[centers][None, :] - 2 * gram[:, centers]
    labels = balanced_assignment(distances, size)
    best, best_cost = labels, math.inf
    for _ in range(iterations):
        members = F.one_hot(labels, num_clusters).double()
        cross = gram @ members  # (N, C): sum_{j in c} G_ij
        within = (members * cross).sum(0) / size**2
        distances = diag[:, None] - 2 * cross / size + within[None, :]
        cost = float(distances.gather(1, labels[:, None]).sum())
        if cost < best_cost - 1e-12 * abs(cost):
            best, best_cost = labels, cost
        new_labels = balanced_assignment(distances, size)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return best


def group_neurons(
    routed: torch.Tensor,
    num_experts: int,
    grouping: str,
    *,
    coactivation_gram: torch.Tensor | None = None,
    gate_weight: torch.Tensor | None = None,
    iterations: int = 30,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Split the routed neuron indices into `num_experts` equal groups (each sorted, ordered by first index).

    coactivation: balanced k-means with `coactivation_gram` (I x I, |A|^T |A| over calibration tokens);
    gate_kmeans: balanced k-means on the rows of `gate_weight` (I, H); contiguous: index order.
    """
    if routed.numel() % num_experts:
        raise ValueError(f"{routed.numel()} routed neurons do not split into {num_experts} equal groups")
    if grouping == "contiguous":
        groups = list(routed.sort().values.view(num_experts, -1))
    else:
        if grouping == "coactivation":
            if coactivation_gram is None:
                raise ValueError("coactivation grouping needs the co-activation Gram matrix")
            gram = coactivation_gram[routed][:, routed]
        elif grouping == "gate_kmeans":
            if gate_weight is None:
                raise ValueError("gate_kmeans grouping needs the gate weight")
            rows = gate_weight[routed].double()
            gram = rows @ rows.T
        else:
            raise ValueError(f"unknown grouping {grouping!r}; allowed: {', '.join(GROUPINGS)}")
        labels = balanced_kmeans(gram, num_experts, iterations, seed)
        groups = [routed[labels == c].sort().values for c in range(num_experts)]
    return sorted(groups, key=lambda g: int(g[0]))


# ---- routers (pure functions) ------------------------------------------------------------------
def fit_ridge_router(xtx: torch.Tensor, xty: torch.Tensor, ridge_lambda: float) -> torch.Tensor:
    """W (M, H) minimising ||X W^T - Y||^2 + lam ||W||^2, lam = ridge_lambda * trace(X^T X) / H, from X^T X and X^T Y."""
    xtx, xty = xtx.double(), xty.double()
    hidden = xtx.shape[0]
    penalty = ridge_lambda * float(xtx.diagonal().mean().clamp_min(1e-30))
    system = xtx + penalty * torch.eye(hidden, dtype=torch.float64)
    try:
        solution = torch.linalg.solve(system, xty)
    except RuntimeError:  # singular (no penalty, or all-zero inputs): minimum-norm least squares
        solution = torch.linalg.pinv(system) @ xty
    return solution.T.contiguous()


def centroid_router(gate_weight: torch.Tensor, groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """W (M, H) whose row i is the mean gate row of expert i's neurons."""
    return torch.stack([gate_weight[g].double().mean(0) for g in groups])


def scale_router(weight: torch.Tensor, xtx: torch.Tensor, tokens: int, target_std: float | None) -> torch.Tensor:
    """Rescale W so that the root-mean-square, over tokens, of the logits' spread across experts is target_std.

    The mean over tokens of the across-expert variance of W x is trace(Wc S Wc^T) / M with
    Wc = W minus its mean row and S = X^T X / T, so no activations are needed.
    """
    weight = weight.double()
    if target_std is None or tokens == 0:
        return weight
    centered = weight - weight.mean(0, keepdim=True)
    variance = float(torch.einsum("mh,hk,mk->", centered, xtx.double() / tokens, centered)) / weight.shape[0]
    return weight * (target_std / math.sqrt(variance)) if variance > 0 else weight
