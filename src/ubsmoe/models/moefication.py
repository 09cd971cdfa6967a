"""MoEfication: dense SwiGLU language models turned into UB-SMoE models (DESIGN section 3).

Each feed-forward network (FFN) `down(act(gate x) * up x)` is separable over its I intermediate
neurons, so it equals the sum of the FFNs over any partition of the neurons. `moefy` partitions every
FFN of a dense model into

- an always-on **shared group**: the `shared_fraction` of neurons with the highest mean |activation|
  on calibration tokens (a `ubsmoe.moe.SwiGLU`, frozen, no LoRA), and
- **M routed experts** of equal size, found by balanced k-means over the remaining neurons
  (`grouping`): on each neuron's |act(gate x) * (up x)| profile over the calibration tokens
  ("coactivation", default), on the neuron's gate row ("gate_kmeans"), or in index order
  ("contiguous"). When the routed count does not divide by M, the remainder (the next neurons by
  mean |activation|) joins the shared group, so no neuron is dropped;

and fits a router W_r (M, H): by default a ridge regression from the FFN input to each expert's output
L2 norm on the calibration tokens ("ridge"), or the mean gate row of each expert ("centroid"). The
dense FFN is replaced by a `MoEfiedBlock` (a `UBSMoEBlock` with unit gates and K_max = M). With K = M
it computes exactly the dense FFN; with K < M only the shared group and the K selected experts run.

Design notes (see also docs/decisions.md):

- Calibration streams sufficient statistics instead of keeping activations: pass 1 accumulates each
  neuron's sum |a| and, for co-activation grouping, the Gram matrix |A|^T |A| (I x I), on which
  balanced k-means runs in kernel form (distances need only the Gram matrix, so memory does not grow
  with the number of calibration tokens); pass 2, once the groups are known, accumulates X^T X and
  X^T Y (Y = per-expert output norms) for the ridge router. Layers are processed in chunks sized to
  `max_statistics_bytes`; the forward stops after the chunk's last layer.
- The router has no bias, because the UB-SMoE block's router has none: the ridge fit goes through the
  origin. (Top-k of the softmax is shift-invariant per token, but a per-expert bias is not.) On
  SmolLM2-135M (layers 3/10/17/24, M = 8) fitting an intercept changed the held-out layer error at
  K = 2/4/6 by less than 0.3%: the FFN input carries a near-constant direction that plays its part.
- The router is rescaled so that its logits spread with a standard deviation of `router_logit_std`
  across the experts of a token (on average over calibration tokens). The ranking does not change;
  the scale matters because DMR's phi (range [-1, 1]) is added to these logits.
- The optional recovery stage (`recovery=True`, off by default) trains each layer's routed experts
  (and, by default, the shared group) to reproduce the dense FFN output on cached calibration inputs
  at K sampled from `recovery_top_ks`, with the router fixed. It breaks the exact K = M identity
  (K = M is one of the sampled values, so it stays close).

`save_moefied` / `load_moefied` write and read a MoEfied model as safetensors plus a JSON file (no
recalibration, no base checkpoint needed); `moefy_cached` calibrates once per machine and caches the
result under a key derived from the base model, the config and the calibration tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.models.native import NATIVE_FAMILIES, ModelLoadError, UnsupportedModelError, require_transformers
from ubsmoe.moe import (
    SwiGLU,
    UBSMoEBlock,
    UBSMoEConfig,
    budget_to_top_k,
    experts_from_dense,
    route,
    skip_padding,
)
from ubsmoe.moe.config import dataclass_from_dict
from ubsmoe.moe.experts import gated_product

if TYPE_CHECKING:
    from transformers import PreTrainedModel

GROUPINGS = ("coactivation", "gate_kmeans", "contiguous")
ROUTERS = ("ridge", "centroid")
DEFAULT_BUDGETS = (0.25, 0.5, 0.75, 1.0)
DENSE_FAMILIES: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
"""model_type -> family name of the dense SwiGLU models `moefy` accepts (mlp.gate_proj/up_proj/down_proj)."""

FORMAT_NAME = "ubsmoe-moefied"
FORMAT_VERSION = 1
"""Bumped whenever calibration or the saved layout changes; part of the cache key."""
CONFIG_FILE = "moefication.json"
WEIGHTS_FILE = "model.safetensors"

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total); moefy reports stage "moefy" once per finished layer."""


# ---- configuration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MoEficationConfig:
    """How a dense model is split into experts and routed (DESIGN section 3).

    Attributes:
        num_experts: M routed experts per layer (K_max = M).
        shared_fraction: share of the intermediate neurons in the always-on shared group, chosen by
            highest mean |activation| (plus the remainder that makes the routed count divide by M).
        grouping: "coactivation" (balanced k-means on |activation| profiles), "gate_kmeans"
            (balanced k-means on gate rows) or "contiguous" (index order).
        router: "ridge" (FFN input -> expert output norm) or "centroid" (mean gate row of each expert).
        ridge_lambda: ridge penalty relative to the mean eigenvalue of X^T X (scale-free).
        router_logit_std: the router's logits are scaled to this mean spread across experts; None
            keeps the raw fit (ridge: output-norm units).
        calibration_tokens: at most this many (non-padding) calibration tokens are used.
        kmeans_iterations: maximum iterations of balanced k-means (it stops early at convergence).
        seed: seeds k-means initialisation and the recovery stage.
        recovery: run the layer-local distillation stage after building each layer.
        recovery_tokens: calibration tokens cached per layer for recovery (a seeded random subset).
        recovery_steps / recovery_batch_size / recovery_lr: Adam steps (cosine schedule), tokens per
            step and peak learning rate of the recovery stage.
        recovery_top_ks: K values sampled (uniformly, one per step) during recovery; None -> the K of
            the budgets 0.25 / 0.5 / 0.75 / 1.0.
        recovery_train_shared: also train the shared group in the recovery stage.
    """

    num_experts: int = 8
    shared_fraction: float = 0.25
    grouping: Literal["coactivation", "gate_kmeans", "contiguous"] = "coactivation"
    router: Literal["ridge", "centroid"] = "ridge"
    ridge_lambda: float = 0.1
    router_logit_std: float | None = 1.0
    calibration_tokens: int = 8192
    kmeans_iterations: int = 30
    seed: int = 0
    recovery: bool = False
    recovery_tokens: int = 8192
    recovery_steps: int = 200
    recovery_batch_size: int = 256
    recovery_lr: float = 1e-4
    recovery_top_ks: tuple[int, ...] | None = None
    recovery_train_shared: bool = True

    def __post_init__(self) -> None:
        if self.recovery_top_ks is not None:
            object.__setattr__(self, "recovery_top_ks", tuple(self.recovery_top_ks))
        problems = []

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        if not is_int(self.num_experts) or self.num_experts < 2:
            problems.append(f"num_experts must be an integer >= 2, got {self.num_experts!r}")
        if not is_number(self.shared_fraction) or not 0.0 <= self.shared_fraction < 1.0:
            problems.append(f"shared_fraction must be in [0, 1), got {self.shared_fraction!r}")
        if self.grouping not in GROUPINGS:
            problems.append(f"grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}")
        if self.router not in ROUTERS:
            problems.append(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if not is_number(self.ridge_lambda) or self.ridge_lambda < 0:
            problems.append(f"ridge_lambda must be a number >= 0, got {self.ridge_lambda!r}")
        if self.router_logit_std is not None and (not is_number(self.router_logit_std) or self.router_logit_std <= 0):
            problems.append(f"router_logit_std must be > 0 or None, got {self.router_logit_std!r}")
        for name in ("calibration_tokens", "kmeans_iterations", "recovery_tokens", "recovery_steps"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if not is_int(self.recovery_batch_size) or self.recovery_batch_size < 1:
            problems.append(f"recovery_batch_size must be an integer >= 1, got {self.recovery_batch_size!r}")
        if not is_int(self.seed):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if not is_number(self.recovery_lr) or self.recovery_lr <= 0:
            problems.append(f"recovery_lr must be > 0, got {self.recovery_lr!r}")
        if self.recovery_top_ks is not None:
            ks = self.recovery_top_ks
            m = self.num_experts if is_int(self.num_experts) else 0
            if not ks or not all(is_int(k) and 1 <= k <= m for k in ks):
                problems.append(f"recovery_top_ks must be a non-empty list of integers in [1, {m}], got {list(ks)}")
        if problems:
            raise ValueError("invalid MoEficationConfig: " + "; ".join(problems))

    def top_ks(self) -> tuple[int, ...]:
        """K values of the recovery stage (default: the four budget tiers)."""
        if self.recovery_top_ks is not None:
            return self.recovery_top_ks
        return tuple(sorted({budget_to_top_k(b, self.num_experts) for b in DEFAULT_BUDGETS}))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.recovery_top_ks is not None:
            data["recovery_top_ks"] = list(self.recovery_top_ks)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoEficationConfig:
        return dataclass_from_dict(cls, data)


# ---- the MoEfied block -------------------------------------------------------------------------
class MoEfiedBlock(UBSMoEBlock):
    """A UB-SMoE block over the neuron groups of a dense SwiGLU FFN (unit gates, K_max = M).

    At K < M it is the UB-SMoE block: routing with DMR, only the shared group and the K selected
    experts run, PG is recorded. At K = M (with `dense_at_full_k`, the default) it runs the plain
    dense FFN instead: one matmul for all experts' gate/up rows, one for all down columns, each
    expert's LoRA delta batched over the experts (x @ stacked A^T, then one batched B), plus the
    shared group. This equals the grouped path (every expert selected with gate value 1) and is faster
    because it skips routing, sorting and gathering. There:

    - utilization counts every expert once per token;
    - phi gets no gradient: every expert is selected whatever phi is, so the forward does not depend
      on it (the grouped path's straight-through gates would give phi a surrogate gradient);
    - PG adds nothing: no expert misses any routing mass. In training mode the used routing mass is
      still recorded, so that a step that mixes K values over micro-batches stays exact.

    Attributes:
        dense_at_full_k: take the dense path at K = M (set False to force the grouped path).
        shared_neurons / neuron_groups: original neuron indices of the shared group and of each
            expert (metadata, saved with the model).
    """

    token_lora_by_default = True
    """Eight experts: per-token LoRA projections cost little extra and save many small matmuls (docs/decisions.md)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dense_at_full_k = True
        self.shared_neurons: list[int] = []
        self.neuron_groups: list[list[int]] = []

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_at_full_k and self.top_k == self.num_experts:
            return self._dense_forward(x)
        return super().compute(x)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, num_experts, inner_size, hidden = x.shape[0], self.num_experts, self.intermediate_size, self.hidden_size
        gate_up_weight = self.gate_up_proj.reshape(num_experts * 2 * inner_size, hidden)  # a view (contiguous)
        down_weight = self.down_proj.transpose(0, 1).reshape(hidden, num_experts * inner_size)  # a view in our layout
        lora = self.lora
        # LoRA stays factored (never merged into the weights), so the cost per token is the same in
        # training and evaluation and matches ubsmoe.metrics.flops
        factored = bool(lora.targets)
        gate_up = F.linear(x.to(gate_up_weight.dtype), gate_up_weight).view(tokens, num_experts, 2, inner_size)
        input_targets = lora.input_targets if factored else ()
        if input_targets:
            stacked_a = lora.input_a()  # (M, n_t * r, H)
            projected = F.linear(x.to(stacked_a.dtype), stacked_a.reshape(-1, hidden))
            projected = (lora.scaling * projected).view(tokens, num_experts * len(input_targets), lora.rank)
            stacked_b = torch.stack([lora.lora_B[t] for t in input_targets], dim=1)  # (M, n_t, n, r)
            stacked_b = stacked_b.reshape(-1, inner_size, lora.rank).transpose(1, 2)
            deltas = torch.bmm(projected.transpose(0, 1), stacked_b).view(num_experts, len(input_targets), tokens, -1)
            deltas = deltas.permute(2, 0, 1, 3)  # (T, M, n_t, n)
            if len(input_targets) == 2:
                gate_up = gate_up + deltas
            else:
                # F.linear keeps no output for backward, so the one target's rows can be updated in place
                gate_up[:, :, ("gate", "up").index(input_targets[0])] += deltas[:, :, 0]
        inner = gated_product(gate_up, self.activation)  # (T, M, n)
        out = F.linear(inner.reshape(tokens, -1).to(down_weight.dtype), down_weight)
        if factored and "down" in lora.targets:
            lora_a, lora_b = lora.lora_A["down"], lora.lora_B["down"]  # (M, r, n), (M, H, r)
            projected = torch.bmm(inner.transpose(0, 1).to(lora_a.dtype), lora_a.transpose(1, 2))  # (M, T, r)
            projected = (lora.scaling * projected).transpose(0, 1).reshape(tokens, -1)
            out = out + F.linear(projected, lora_b.transpose(0, 1).reshape(hidden, -1))
        out = self.rescale(out.to(x.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        self._record_dense(x)
        return out

    def _record_dense(self, x: torch.Tensor) -> None:
        probs = None
        if self.training and self.config.pseudo_gradient and self.lora.targets:
            with torch.no_grad():
                probs = route(
                    x,
                    self.router_weight,
                    self.num_experts,
                    phi=self.phi if self.config.dmr else None,
                    num_candidates=self.num_candidates,
                ).probs
        self.record_all_selected(x.shape[0], probs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared={len(self.shared_neurons)}, dense_at_full_k={self.dense_at_full_k}"


def dense_layout(down_proj: torch.Tensor) -> torch.Tensor:
    """The experts' down weights (M, H, n) as a view of an (H, M, n)-contiguous tensor.

    Both paths accept either layout; with this one the dense path reads all experts' down columns as
    one (H, M*n) matrix without copying it (the per-expert matrices of the grouped path are strided).
    """
    return down_proj.transpose(0, 1).contiguous().transpose(0, 1)


def moefied_blocks(model: nn.Module) -> list[tuple[str, MoEfiedBlock]]:
    """(qualified name, block) of every MoEfied block of a model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEfiedBlock)]


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


# ---- diagnostics -------------------------------------------------------------------------------
@torch.no_grad()
def expert_outputs(block: UBSMoEBlock, x: torch.Tensor) -> torch.Tensor:
    """Each routed expert's output (T, M, H) for inputs x (T, H), frozen weights only (no LoRA)."""
    x = x.reshape(-1, block.hidden_size).to(block.gate_up_proj.dtype)
    gate_up = torch.einsum("th,mnh->tmn", x, block.gate_up_proj)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.einsum("tmn,mhn->tmh", block.activation(gate) * up, block.down_proj)


@torch.no_grad()
def reconstruction_error(
    block: UBSMoEBlock,
    x: torch.Tensor,
    target: torch.Tensor,
    top_k: int,
    *,
    router: Literal["block", "oracle"] = "block",
) -> float:
    """Relative squared error sum ||y_K - y||^2 / sum ||y||^2 of the block at K (frozen weights, no LoRA).

    router="block" selects by the block's router weight (phi ignored); "oracle" selects the K experts
    with the largest output norm for each token (an upper bound on any router).
    """
    x = x.reshape(-1, block.hidden_size)
    outputs = expert_outputs(block, x)
    if router == "oracle":
        scores = outputs.norm(dim=-1)
    elif router == "block":
        scores = F.linear(x.to(block.router_weight.dtype), block.router_weight)
    else:
        raise ValueError(f"router must be 'block' or 'oracle', got {router!r}")
    chosen = scores.topk(top_k, dim=-1).indices
    mask = torch.zeros_like(scores, dtype=outputs.dtype).scatter_(1, chosen, 1.0)
    out = (outputs * mask.unsqueeze(-1)).sum(1)
    if block.shared_expert is not None:
        out = out + block.shared_expert(x.to(out.dtype))
    target = target.reshape(out.shape).to(out.dtype)
    return float((out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30))


# ---- model inspection --------------------------------------------------------------------------
def _supported_text() -> str:
    return ", ".join(f"{key} ({name})" for key, name in DENSE_FAMILIES.items())


def dense_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every dense SwiGLU FFN of a supported model, in layer order.

    Raises UnsupportedModelError for other architectures (listing the supported ones) and
    ModelLoadError for a model that is already MoEfied or has no FFN of the expected layout.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if moefied_blocks(model):
        raise ModelLoadError("this model is already MoEfied (it contains MoEfied blocks)")
    if model_type in NATIVE_FAMILIES:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) is a native MoE model: adapt it with "
            "ubsmoe.models.adapt_moe_model instead of MoEfying it. MoEfication supports dense models with "
            f"model_type: {_supported_text()}"
        )
    if model_type not in DENSE_FAMILIES:
        what = f"{type(model).__name__} (model_type {model_type!r})" if model_type else type(model).__name__
        raise UnsupportedModelError(
            f"{what} cannot be MoEfied. Supported dense families (config.model_type): {_supported_text()}; "
            f"native MoE families ({', '.join(NATIVE_FAMILIES)}) are adapted with ubsmoe.models.adapt_moe_model."
        )
    found = []
    for name, module in model.named_modules():
        projections = [getattr(module, key, None) for key in ("gate_proj", "up_proj", "down_proj")]
        if all(isinstance(p, nn.Linear) for p in projections):
            if any(p.bias is not None for p in projections):
                raise UnsupportedModelError(f"{name}: FFNs with biases (mlp_bias=True) cannot be MoEfied")
            if not callable(getattr(module, "act_fn", None)):
                raise UnsupportedModelError(f"{name}: the FFN has no act_fn")
            found.append((name, module))
    if not found:
        raise ModelLoadError(
            f"no dense FFN (mlp.gate_proj / up_proj / down_proj) found in this {DENSE_FAMILIES[model_type]} model"
        )
    return found


# ---- calibration data --------------------------------------------------------------------------
Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids (B, S) long, attention_mask (B, S) bool), on CPU

CalibrationData = torch.Tensor | Iterable[torch.Tensor | Mapping[str, torch.Tensor]]


def calibration_batches(
    calibration: CalibrationData, max_tokens: int, batch_size: int = 8, vocab_size: int | None = None
) -> list[Batch]:
    """Normalise calibration data to a list of (input_ids, attention_mask) holding at most `max_tokens` tokens.

    Accepts a tensor of token ids (S,) or (B, S), or an iterable of such tensors or of mappings with
    "input_ids" and optional "attention_mask"; every batch is cut into forwards of at most
    `batch_size` rows. Tokens beyond `max_tokens` (counting non-padding tokens in order) are masked
    out and trimmed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if isinstance(calibration, torch.Tensor | Mapping):
        items = [calibration]
    else:
        try:
            items = iter(calibration)
        except TypeError:
            raise ValueError(
                f"calibration data must be token ids (a tensor) or an iterable of batches, got {type(calibration).__name__}"
            ) from None
    batches: list[Batch] = []
    remaining = max_tokens
    for index, item in enumerate(items):
        if remaining <= 0:
            break
        all_ids, all_mask = _batch_tensors(item, index)
        if vocab_size is not None and all_ids.numel():
            low, high = int(all_ids.min()), int(all_ids.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(
                    f"calibration batch {index}: token ids must be in [0, {vocab_size}), got [{low}, {high}]"
                )
        for ids, mask in zip(all_ids.split(batch_size), all_mask.split(batch_size), strict=True):
            if remaining <= 0:
                break
            kept = mask & (mask.reshape(-1).cumsum(0).view_as(mask) <= remaining)
            if not kept.any():
                continue
            rows = kept.any(1)
            ids, kept = ids[rows], kept[rows]
            last = int(kept.any(0).nonzero().max()) + 1
            ids, kept = ids[:, :last], kept[:, :last]
            remaining -= int(kept.sum())
            batches.append((ids, kept))
    if not batches:
        raise ValueError("calibration data holds no tokens")
    return batches


def _batch_tensors(item: Any, index: int) -> Batch:
    if isinstance(item, tuple) and len(item) == 2:  # (input_ids, attention_mask), as calibration_batches returns
        ids, mask = item
    elif isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"calibration batch {index} has no 'input_ids'")
        ids, mask = item["input_ids"], item.get("attention_mask")
    else:
        ids, mask = item, None
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() > 2:
        raise ValueError(f"calibration batch {index}: input_ids must be an integer tensor (S,) or (B, S)")
    ids = ids.detach().cpu().long().reshape(-1, ids.shape[-1] if ids.dim() else 1)
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = torch.as_tensor(mask).detach().cpu().reshape(-1, mask.shape[-1]).bool()
        if mask.shape != ids.shape:
            raise ValueError(
                f"calibration batch {index}: attention_mask {tuple(mask.shape)} != input_ids {tuple(ids.shape)}"
            )
    return ids, mask


def calibration_fingerprint(batches: Sequence[Batch]) -> str:
    """A hash of the calibration tokens actually used: each row's ids and mask up to its last used token.

    It does not depend on how the rows are grouped into forwards (`batch_size`).
    """
    digest = hashlib.blake2b(digest_size=16)
    for ids, mask in batches:
        for row_ids, row_mask in zip(ids, mask, strict=True):
            end = int(row_mask.nonzero().max()) + 1
            digest.update(f"{end};".encode())
            digest.update(row_ids[:end].numpy().tobytes())
            digest.update(row_mask[:end].numpy().tobytes())
    return digest.hexdigest()


# ---- calibration passes ------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by a hook once the last layer of interest has run (skips the rest of the forward)."""


@dataclass
class _LayerPlan:
    name: str
    mlp: nn.Module
    abs_sum: torch.Tensor | None = None  # (I,) float64
    gram: torch.Tensor | None = None  # (I, I) float32, |A|^T |A|
    tokens: int = 0
    shared: torch.Tensor | None = None
    groups: list[torch.Tensor] | None = None
    gate_up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    down_gram: torch.Tensor | None = None  # (M, n, n): W_d,g^T W_d,g of each expert
    group_index: torch.Tensor | None = None  # (M, n) long
    xtx: torch.Tensor | None = None
    xty: torch.Tensor | None = None
    recovery_x: list[torch.Tensor] | None = None
    recovery_y: list[torch.Tensor] | None = None


def _run_batches(model: nn.Module, batches: Sequence[Batch], device: torch.device, state: dict[str, Any]) -> None:
    """Forward every batch (the hooks do the work); `state` tells the hooks which rows are real tokens."""
    for index, (ids, mask) in enumerate(batches):
        state["mask"] = mask.reshape(-1).to(device)
        state["batch"] = index
        with contextlib.suppress(_StopForward):
            model(input_ids=ids.to(device), attention_mask=mask.to(device).long(), use_cache=False)


def _profile_pass(
    model: nn.Module, plans: list[_LayerPlan], batches: Sequence[Batch], config: MoEficationConfig, device: torch.device
) -> None:
    """Pass 1: per neuron sum |a| and (co-activation grouping) the Gram matrix |A|^T |A|."""
    state: dict[str, Any] = {}
    handles = []
    for position, plan in enumerate(plans):
        size = plan.mlp.down_proj.in_features
        plan.abs_sum = torch.zeros(size, dtype=torch.float64, device=device)
        if config.grouping == "coactivation":
            plan.gram = torch.zeros(size, size, dtype=torch.float32, device=device)

        def hook(module: nn.Module, args: tuple, plan: _LayerPlan = plan, last: bool = position == len(plans) - 1):
            a = args[0].reshape(-1, args[0].shape[-1])[state["mask"]].abs().float()
            plan.abs_sum += a.sum(0, dtype=torch.float64)
            plan.tokens += a.shape[0]
            if plan.gram is not None:
                plan.gram.addmm_(a.T, a)
            if last:
                raise _StopForward

        handles.append(plan.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        _run_batches(model, batches, device, state)
    finally:
        for handle in handles:
            handle.remove()


def _router_pass(
    model: nn.Module,
    plans: list[_LayerPlan],
    batches: Sequence[Batch],
    config: MoEficationConfig,
    device: torch.device,
    recovery_rows: list[torch.Tensor] | None,
) -> None:
    """Pass 2: X^T X, X^T Y (Y = per-expert output norms) and, for recovery, cached (x, dense output) rows."""
    state: dict[str, Any] = {}
    handles = []
    for position, plan in enumerate(plans):
        hidden = plan.mlp.gate_proj.in_features
        plan.xtx = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        plan.xty = torch.zeros(hidden, config.num_experts, dtype=torch.float64, device=device)
        plan.tokens = 0
        if recovery_rows is not None:
            plan.recovery_x, plan.recovery_y = [], []

        def input_hook(module: nn.Module, args: tuple, plan: _LayerPlan = plan) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])[state["mask"]].float()
            plan.xtx += (x.T @ x).double()
            plan.tokens += x.shape[0]
            state[f"x{id(plan)}"] = x

        def inner_hook(module: nn.Module, args: tuple, plan: _LayerPlan = plan) -> None:
            a = args[0].reshape(-1, args[0].shape[-1])[state["mask"]].float()
            grouped = a[:, plan.group_index].transpose(0, 1)  # (M, T, n)
            squared = (torch.bmm(grouped, plan.down_gram) * grouped).sum(-1)  # ||W_d,g a_g||^2, (M, T)
            norms = squared.clamp_min(0).sqrt().T.double()
            plan.xty += state[f"x{id(plan)}"].double().T @ norms

        def output_hook(
            module: nn.Module,
            args: tuple,
            output: torch.Tensor,
            plan: _LayerPlan = plan,
            last: bool = position == len(plans) - 1,
        ) -> None:
            if recovery_rows is not None:
                rows = recovery_rows[state["batch"]].to(device)
                x = state[f"x{id(plan)}"]
                y = output.reshape(-1, output.shape[-1])[state["mask"]]
                plan.recovery_x.append(x[rows].cpu())
                plan.recovery_y.append(y[rows].float().cpu())
            state.pop(f"x{id(plan)}", None)
            if last:
                raise _StopForward

        handles.append(plan.mlp.register_forward_pre_hook(input_hook))
        handles.append(plan.mlp.down_proj.register_forward_pre_hook(inner_hook))
        handles.append(plan.mlp.register_forward_hook(output_hook))
    try:
        _run_batches(model, batches, device, state)
    finally:
        for handle in handles:
            handle.remove()


def _recovery_rows(batches: Sequence[Batch], count: int, seed: int) -> list[torch.Tensor]:
    """Per batch, the positions (among its non-padding tokens) cached for recovery: a seeded random subset."""
    sizes = [int(mask.sum()) for _, mask in batches]
    total = sum(sizes)
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 7919))[: min(count, total)]
    selected = torch.zeros(total, dtype=torch.bool)
    selected[chosen] = True
    return [part.nonzero().reshape(-1) for part in selected.split(sizes)]


# ---- recovery ----------------------------------------------------------------------------------
def recover_block(
    block: MoEfiedBlock,
    x: torch.Tensor,
    target: torch.Tensor,
    config: MoEficationConfig,
    *,
    seed: int = 0,
) -> list[float]:
    """Layer-local distillation: train the block's experts (and shared group) toward the dense output.

    Minimises sum ||block_K(x) - y||^2 / sum ||y||^2 over mini-batches of the cached inputs x (N, H)
    and dense outputs y, with K drawn uniformly from `config.top_ks()` per step, Adam with a cosine
    learning-rate schedule. The router, phi and LoRA are left unchanged (within `moefy` LoRA-B is
    still zero, so the adapters do not take part). Returns the per-step losses.
    """
    trained = [block.gate_up_proj, block.down_proj]
    if config.recovery_train_shared and block.shared_expert is not None:
        trained += list(block.shared_expert.parameters())
    flags = {id(p): p.requires_grad for p in block.parameters()}
    top_k, tracking, mode = block.top_k, block.track_utilization, block.training
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    dtype = block.gate_up_proj.dtype
    x, target = x.to(block.gate_up_proj.device, dtype), target.to(block.gate_up_proj.device, dtype)
    optimizer = torch.optim.Adam(trained, lr=config.recovery_lr)
    generator = torch.Generator().manual_seed(seed)
    top_ks = config.top_ks()
    losses = []
    block.track_utilization = False
    block.eval()  # no PG bookkeeping
    try:
        with torch.enable_grad():
            for step in range(config.recovery_steps):
                for group in optimizer.param_groups:
                    group["lr"] = config.recovery_lr * 0.5 * (1 + math.cos(math.pi * step / config.recovery_steps))
                rows = torch.randint(x.shape[0], (min(config.recovery_batch_size, x.shape[0]),), generator=generator)
                block.top_k = top_ks[int(torch.randint(len(top_ks), (1,), generator=generator))]
                y = target[rows.to(x.device)]
                loss = (block(x[rows.to(x.device)]) - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        for parameter in block.parameters():
            parameter.grad = None
            parameter.requires_grad_(flags[id(parameter)])
        block.top_k, block.track_utilization = top_k, tracking
        block.train(mode)
    return losses


# ---- MoEfication -------------------------------------------------------------------------------
def moefy(
    model: PreTrainedModel,
    calibration: CalibrationData,
    config: MoEficationConfig | None = None,
    ubsmoe_config: UBSMoEConfig | None = None,
    *,
    batch_size: int = 8,
    max_statistics_bytes: int = 2**31,
    progress: Progress | None = None,
) -> PreTrainedModel:
    """Turn a dense Llama-family model into a UB-SMoE model in place, calibrated on `calibration`.

    Args:
        model: a Llama, Mistral, Qwen2 or Qwen3 model from transformers 5.x (any head).
        calibration: token ids (S,) / (B, S), or an iterable of tensors or of mappings with
            "input_ids" and optional "attention_mask"; at most `config.calibration_tokens`
            non-padding tokens are used (see `calibration_batches`).
        config: grouping, shared fraction, M, router and recovery options.
        ubsmoe_config: the blocks' LoRA/DMR/PG settings; `unit_gates` is forced on.
        batch_size: rows per forward when `calibration` is one tensor.
        max_statistics_bytes: bound on the calibration statistics held at once; layers are
            calibrated in as many passes as needed to stay under it.
        progress: optional callback progress(stage, done, total).

    Returns the same model object, its FFNs replaced by `MoEfiedBlock`s at K = M (the dense
    function), every base parameter frozen. When the routed neuron count does not divide by M, the
    remainder joins the shared group (see `split_shared`); an FFN with fewer routed neurons than M
    is a ModelLoadError. The dense FFNs' weights are released: the experts and
    the shared group are new tensors in group order. Calibration runs two passes over the tokens per
    chunk of layers (the forward stops after the chunk's last layer).
    """
    config = config or MoEficationConfig()
    layer_config = replace(ubsmoe_config or UBSMoEConfig(), unit_gates=True)
    # sizes, not modules: holding the dense FFNs here would keep their weights alive until the end
    layers = [(name, mlp.down_proj.in_features, mlp.gate_proj.in_features) for name, mlp in dense_mlps(model)]
    for name, inner, _ in layers:
        try:
            split_shared(torch.zeros(inner), config.shared_fraction, config.num_experts)
        except ValueError as error:
            raise ModelLoadError(f"{name}: {error}") from error
    try:
        device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters is not a dense LM
        raise ModelLoadError("the model has no parameters") from None
    vocab = getattr(model.config, "vocab_size", None)
    batches = calibration_batches(calibration, config.calibration_tokens, batch_size, vocab)
    total_tokens = sum(int(mask.sum()) for _, mask in batches)
    if total_tokens < config.calibration_tokens:
        warnings.warn(
            f"MoEfication calibrates on {total_tokens} tokens, fewer than calibration_tokens={config.calibration_tokens}",
            stacklevel=2,
        )
    recovery_rows = _recovery_rows(batches, config.recovery_tokens, config.seed) if config.recovery else None

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    training = model.training
    model.eval()
    done = 0
    try:
        with torch.no_grad():
            for chunk in _layer_chunks(layers, config, max_statistics_bytes, total_tokens):
                plans = [_LayerPlan(name, model.get_submodule(name)) for name in chunk]
                _profile_pass(model, plans, batches, config, device)
                for index, plan in enumerate(plans):
                    _plan_groups(plan, config, seed=config.seed + 1000 * (done + index))
                _router_pass(model, plans, batches, config, device, recovery_rows)
                for plan in plans:
                    block = _build_block(plan, config, layer_config)
                    parent_name, _, child_name = plan.name.rpartition(".")
                    setattr(model.get_submodule(parent_name), child_name, block)
                    plan.mlp = None  # the dense FFN's weights are released here
                    if config.recovery:
                        x, y = torch.cat(plan.recovery_x), torch.cat(plan.recovery_y)
                        plan.recovery_x = plan.recovery_y = None
                        recover_block(block, x, y, config, seed=config.seed + done)
                    done += 1
                    if progress is not None:
                        progress("moefy", done, len(layers))
                del plans
    finally:
        model.train(training)
    model.moefication_config = config
    model.moefication_calibration = {"tokens": total_tokens, "fingerprint": calibration_fingerprint(batches)}
    return skip_padding(model)


def _layer_chunks(
    layers: list[tuple[str, int, int]], config: MoEficationConfig, budget: int, tokens: int
) -> list[list[str]]:
    """Consecutive layers whose calibration statistics fit in `budget` bytes together (at least one each)."""
    chunks: list[list[str]] = [[]]
    used = 0
    for name, inner, hidden in layers:
        size = 8 * inner + 8 * hidden * (hidden + config.num_experts)
        if config.grouping == "coactivation":
            size += 4 * inner * inner
        if config.recovery:
            size += 8 * min(config.recovery_tokens, tokens) * hidden
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks


def _plan_groups(plan: _LayerPlan, config: MoEficationConfig, seed: int) -> None:
    mlp = plan.mlp
    mean_abs = plan.abs_sum.cpu() / max(plan.tokens, 1)
    plan.shared, routed = split_shared(mean_abs, config.shared_fraction, config.num_experts)
    gram = plan.gram.cpu() if plan.gram is not None else None
    plan.gram = None
    plan.groups = group_neurons(
        routed,
        config.num_experts,
        config.grouping,
        coactivation_gram=gram,
        gate_weight=mlp.gate_proj.weight.detach().cpu() if config.grouping == "gate_kmeans" else None,
        iterations=config.kmeans_iterations,
        seed=seed,
    )
    device = mlp.down_proj.weight.device
    plan.gate_up, down = experts_from_dense(
        mlp.gate_proj.weight.detach(),
        mlp.up_proj.weight.detach(),
        mlp.down_proj.weight.detach(),
        [g.to(device) for g in plan.groups],
    )
    plan.down = dense_layout(down)
    down = plan.down.float()
    plan.down_gram = down.transpose(1, 2) @ down  # (M, n, n)
    plan.group_index = torch.stack(plan.groups).to(device)


def _build_block(plan: _LayerPlan, config: MoEficationConfig, layer_config: UBSMoEConfig) -> MoEfiedBlock:
    mlp = plan.mlp
    gate, up, down = (p.weight.detach() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    if config.router == "ridge":
        router = fit_ridge_router(plan.xtx.cpu(), plan.xty.cpu(), config.ridge_lambda)
    else:
        router = centroid_router(gate.cpu(), plan.groups)
    router = scale_router(router, plan.xtx.cpu(), plan.tokens, config.router_logit_std)
    shared_index = plan.shared.to(gate.device)
    shared = (
        SwiGLU(gate[shared_index], up[shared_index], down[:, shared_index].contiguous(), mlp.act_fn)
        if plan.shared.numel()
        else None
    )
    block = MoEfiedBlock(
        plan.gate_up,
        plan.down,
        router.to(device=gate.device, dtype=gate.dtype),
        config.num_experts,
        layer_config,
        shared_expert=shared,
        activation=mlp.act_fn,
    )
    block.shared_neurons = plan.shared.tolist()
    block.neuron_groups = [g.tolist() for g in plan.groups]
    plan.gate_up = plan.down = plan.down_gram = plan.xtx = plan.xty = None
    return block


# ---- save / load -------------------------------------------------------------------------------
def _is_adapter_key(key: str, block_names: Sequence[str]) -> bool:
    """Trainable block state that the saved model does not carry: phi, expert LoRA, A3SMoE's output scale."""
    return any(
        key in (f"{name}.phi", f"{name}.output_scale") or key.startswith(f"{name}.lora.") for name in block_names
    )


def save_moefied(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write a MoEfied model: `model.safetensors` (every frozen weight, experts, shared groups and
    routers; not the expert LoRA or phi, which other code saves) and `moefication.json` (the base
    model's config, the MoEficationConfig, the UBSMoEConfig and each layer's neuron groups)."""
    from safetensors.torch import save_file

    blocks = moefied_blocks(model)
    config = getattr(model, "moefication_config", None)
    if not blocks or config is None:
        raise ModelLoadError("save_moefied needs a model returned by moefy or load_moefied")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in blocks]
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        if _is_adapter_key(key, names):
            continue
        identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if identity in seen and tensor.numel():
            aliases[key] = seen[identity]  # tied weights (e.g. lm_head = embed_tokens)
            continue
        seen[identity] = key
        tensors[key] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "producer": FORMAT_NAME})
    first = blocks[0][1]
    description = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "dtype": str(first.gate_up_proj.dtype).removeprefix("torch."),
        "base_config": model.config.to_dict(),
        "moefication": config.to_dict(),
        "ubsmoe": first.config.to_dict(),
        "calibration": getattr(model, "moefication_calibration", {}),
        "aliases": aliases,
        "layers": [
            {"module": name, "shared": block.shared_neurons, "groups": block.neuron_groups} for name, block in blocks
        ],
    }
    (directory / CONFIG_FILE).write_text(json.dumps(description, indent=1, default=str), encoding="utf-8")
    return directory


def load_moefied(
    directory: str | os.PathLike[str],
    ubsmoe_config: UBSMoEConfig | None = None,
    *,
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """Rebuild a model written by `save_moefied` (no calibration, no base checkpoint needed).

    `ubsmoe_config` replaces the saved block settings (LoRA rank, DMR, PG ...; `unit_gates` stays
    on); the frozen weights do not depend on it. Returns the model in eval mode, base frozen, with
    fresh adapters (LoRA-B zero, phi zero) and every block at K = M.
    """
    from safetensors.torch import load_file

    transformers = require_transformers()
    directory = Path(directory)
    description = _read_description(directory)
    try:
        base = dict(description["base_config"])
        model_type = base.pop("model_type")
        hf_config = transformers.CONFIG_MAPPING[model_type].from_dict({**base, "model_type": model_type})
        model_class = getattr(transformers, description["model_class"])
        dtype = getattr(torch, description["dtype"])
        moefication = MoEficationConfig.from_dict(description["moefication"])
        saved_layer_config = UBSMoEConfig.from_dict(description["ubsmoe"])
        layers = description["layers"]
        aliases = dict(description.get("aliases", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ModelLoadError(f"{directory / CONFIG_FILE} is not a valid MoEfied model description: {error}") from error
    layer_config = replace(ubsmoe_config or saved_layer_config, unit_gates=True)
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE), device=str(device or "cpu"))
    except Exception as error:
        raise ModelLoadError(f"cannot read {directory / WEIGHTS_FILE}: {error}") from error
    block_keys = list(tensors)

    with _no_init():
        model = model_class._from_config(hf_config, dtype=dtype)
    if device is not None:
        model.to(device)
    for parameter in model.parameters():  # the blocks built below bring their own trainable adapters
        parameter.requires_grad_(False)
    try:
        for layer in layers:
            name = layer["module"]
            old = model.get_submodule(name)
            shared = None
            if layer["shared"]:
                shared = SwiGLU(
                    tensors.pop(f"{name}.shared_expert.gate_weight"),
                    tensors.pop(f"{name}.shared_expert.up_weight"),
                    tensors.pop(f"{name}.shared_expert.down_weight"),
                    old.act_fn,
                )
            block = MoEfiedBlock(
                tensors.pop(f"{name}.gate_up_proj"),
                dense_layout(tensors.pop(f"{name}.down_proj")),
                tensors.pop(f"{name}.router_weight"),
                moefication.num_experts,
                layer_config,
                shared_expert=shared,
                activation=old.act_fn,
            )
            block.shared_neurons = list(layer["shared"])
            block.neuron_groups = [list(g) for g in layer["groups"]]
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, block)
    except (KeyError, AttributeError, ValueError) as error:
        raise ModelLoadError(f"{directory} does not match its description: {error}") from error
    consumed = set(block_keys) - set(tensors)  # the blocks' frozen tensors, built above from the file
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    names = [name for name, _ in moefied_blocks(model)]
    missing = [k for k in missing if k not in aliases and k not in consumed and not _is_adapter_key(k, names)]
    if missing or unexpected:
        raise ModelLoadError(
            f"{directory / WEIGHTS_FILE} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    state = model.state_dict()
    for key, source in aliases.items():  # tied weights the rebuilt model does not tie itself
        if key in state and source in state and state[key].data_ptr() != state[source].data_ptr():
            state[key].copy_(state[source])
    model.moefication_config = moefication
    model.moefication_calibration = description.get("calibration", {})
    return skip_padding(model).eval()


def _read_description(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(f"{directory} is not a saved MoEfied model: {CONFIG_FILE} is missing")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    if not isinstance(description, dict) or description.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{path} is not a {FORMAT_NAME} description")
    if description.get("version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path} has format version {description.get('version')!r}; this ubsmoe reads version {FORMAT_VERSION}. "
            "MoEfy the base model again."
        )
    return description


@contextlib.contextmanager
def _no_init() -> Any:
    """Skip random initialisation of a model whose weights are loaded right after (transformers' helper)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - other transformers versions
        yield
        return
    with no_init_weights():
        yield


# ---- calibration cache -------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """A hash of a model's config and every tensor of its state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def moefication_cache_key(base_identity: str, config: MoEficationConfig, batches: Sequence[Batch]) -> str:
    """Key of a cached MoEfied model: base model identity, format version, config and calibration tokens."""
    payload = json.dumps(
        {
            "base": base_identity,
            "format": [FORMAT_NAME, FORMAT_VERSION],
            "config": config.to_dict(),
            "calibration": calibration_fingerprint(batches),
        },
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def moefy_cached(
    cache_dir: str | os.PathLike[str],
    base: PreTrainedModel | Callable[[], PreTrainedModel],
    calibration: CalibrationData,
    config: MoEficationConfig | None = None,
    ubsmoe_config: UBSMoEConfig | None = None,
    *,
    base_identity: str | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> PreTrainedModel:
    """The MoEfied model from `cache_dir` if it was calibrated before, else `moefy` and cache it.

    Args:
        cache_dir: the cache root; each MoEfied model lives in `cache_dir/<key>`.
        base: the dense model, or a zero-argument function that loads it (called only on a miss).
        base_identity: a string identifying the base weights (e.g. a checkpoint hash); required when
            `base` is a function, else the model's weights are hashed (`model_fingerprint`).

    The key hashes the base identity, the config, the calibration tokens actually used and the
    format version. A miss writes into a temporary directory inside `cache_dir` and renames it into
    place, so a cache entry is either complete or absent (a concurrent writer's entry wins). The
    returned model has `moefication_cache = {"key", "path", "hit"}`.
    """
    config = config or MoEficationConfig()
    model = None
    if base_identity is None:
        if callable(base) and not isinstance(base, nn.Module):
            raise ValueError("moefy_cached needs base_identity when the base model is given as a loader function")
        base_identity = model_fingerprint(base)
    if isinstance(base, nn.Module):
        model = base
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    batches = calibration_batches(calibration, config.calibration_tokens, batch_size, vocab)
    key = moefication_cache_key(base_identity, config, batches)
    root = Path(cache_dir)
    path = root / key
    if (path / CONFIG_FILE).is_file():
        result = load_moefied(path, ubsmoe_config)
        result.moefication_cache = {"key": key, "path": str(path), "hit": True}
        return result
    if model is None:
        model = base()
    moefy(model, batches, config, ubsmoe_config, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        save_moefied(model, temporary)
        try:
            os.rename(temporary, path)
        except OSError:
            if not (path / CONFIG_FILE).is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    model.moefication_cache = {"key": key, "path": str(path), "hit": False}
    return model


__all__ = [
    "DENSE_FAMILIES",
    "GROUPINGS",
    "ROUTERS",
    "MoEficationConfig",
    "MoEfiedBlock",
    "balanced_assignment",
    "balanced_kmeans",
    "calibration_batches",
    "centroid_router",
    "dense_layout",
    "dense_mlps",
    "expert_outputs",
    "fit_ridge_router",
    "group_neurons",
    "load_moefied",
    "model_fingerprint",
    "moefication_cache_key",
    "moefied_blocks",
    "moefy",
    "moefy_cached",
    "reconstruction_error",
    "recover_block",
    "save_moefied",
    "scale_router",
    "split_shared",
]
