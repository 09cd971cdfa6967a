"""Server round logic (DESIGN 2.2 step 7, 2.4, 6) as functions over plain payloads.

- `sample_clients`: the round's participants, seeded by (seed, round).
- `validate_update`: why an update must be dropped (None when it is fine); never raises.
- `aggregate_round`: drop bad updates (with their reasons), FedAvg of the adapter deltas weighted by
  num_examples (or a baseline's own rule, `ubsmoe.fl.methods.aggregate_adapters`), DMR update of phi
  (or phi kept when DMR is off) and a utilization report.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from ubsmoe.fl.methods import MethodSettings, aggregate_adapters
from ubsmoe.fl.payload import ClientUpdate, GlobalState
from ubsmoe.moe import dead_experts, dmr_update, global_utilization, utilization_cv

__all__ = ["aggregate_round", "delta_norm", "sample_clients", "validate_update"]


def sample_clients(client_ids: Sequence[Any], fraction: float, round: int, seed: int) -> list[Any]:
    """max(1, floor(fraction * N)) distinct clients, drawn with a RNG seeded by (seed, round).

    Deterministic for a given (client_ids, fraction, round, seed); the result keeps the order of
    `client_ids`.
    """
    ids = list(client_ids)
    if not ids:
        raise ValueError("sample_clients needs at least one client id")
    if len(set(map(repr, ids))) != len(ids):
        raise ValueError("client ids must be distinct")
    if not (isinstance(fraction, int | float) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction = {fraction!r}: must be in (0, 1]")
    count = min(len(ids), max(1, math.floor(fraction * len(ids) + 1e-9)))
    rng = random.Random(f"ubsmoe-sample:{seed}:{round}")
    chosen = sorted(rng.sample(range(len(ids)), count))
    return [ids[i] for i in chosen]


def delta_norm(deltas: dict[str, torch.Tensor]) -> float:
    """Global L2 norm of all adapter deltas together (computed in float64)."""
    if not deltas:
        return 0.0
    return float(torch.sqrt(sum((d.double() ** 2).sum() for d in deltas.values())))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer_tensor(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def validate_update(
    update: Any, global_state: GlobalState, max_norm: float | None = None, method: MethodSettings | None = None
) -> str | None:
    """A clear reason why `update` must be dropped, or None when it can be aggregated."""
    try:
        problem = _problem(update, global_state, max_norm)
        if problem is None and method is not None and method.uses_ranks:
            problem = _rank_problem(update, global_state)
        return problem
    except Exception as error:  # a malformed payload must never crash the server
        return f"malformed update ({type(error).__name__}: {error})"


def _problem(update: Any, state: GlobalState, max_norm: float | None) -> str | None:
    if not isinstance(update, ClientUpdate):
        return f"not a ClientUpdate (got {type(update).__name__})"
    if not _is_int(update.num_examples) or update.num_examples <= 0:
        return f"num_examples must be a positive integer, got {update.num_examples!r}"
    num_layers, num_experts = tuple(state.phi.shape)
    if not _is_int(update.top_k) or not 1 <= update.top_k <= num_experts:
        return f"top_k must be an integer in [1, {num_experts}], got {update.top_k!r}"

    deltas = update.adapter_deltas
    if not isinstance(deltas, dict):
        return f"adapter_deltas must be a dict of tensors, got {type(deltas).__name__}"
    missing = [k for k in state.adapters if k not in deltas]
    if missing:
        return f"adapter_deltas lacks {len(missing)} key(s), first {missing[0]!r}"
    extra = [k for k in deltas if k not in state.adapters]
    if extra:
        return f"adapter_deltas has {len(extra)} unexpected key(s), first {extra[0]!r}"
    for key, reference in state.adapters.items():
        delta = deltas[key]
        if not isinstance(delta, torch.Tensor):
            return f"adapter delta {key!r} is not a tensor ({type(delta).__name__})"
        if tuple(delta.shape) != tuple(reference.shape):
            return f"adapter delta {key!r} has shape {tuple(delta.shape)}, expected {tuple(reference.shape)}"
        if delta.dtype != reference.dtype:
            return f"adapter delta {key!r} has dtype {delta.dtype}, expected {reference.dtype}"
        if not bool(torch.isfinite(delta).all()):
            return f"adapter delta {key!r} has non-finite values (NaN or Inf)"

    phi = update.phi
    if not isinstance(phi, torch.Tensor):
        return f"phi is not a tensor ({type(phi).__name__})"
    if tuple(phi.shape) != (num_layers, num_experts):
        return f"phi has shape {tuple(phi.shape)}, expected {(num_layers, num_experts)} (layers, experts)"
    if phi.dtype != state.phi.dtype:
        return f"phi has dtype {phi.dtype}, expected {state.phi.dtype}"
    if not bool(torch.isfinite(phi).all()):
        return "phi has non-finite values (NaN or Inf)"

    counts, tokens = update.counts, update.tokens
    if not isinstance(counts, torch.Tensor) or not isinstance(tokens, torch.Tensor):
        return "counts and tokens must be tensors"
    if tuple(counts.shape) != (num_layers, num_experts):
        return f"counts has shape {tuple(counts.shape)}, expected {(num_layers, num_experts)} (layers, experts)"
    if tuple(tokens.shape) != (num_layers,):
        return f"tokens has shape {tuple(tokens.shape)}, expected {(num_layers,)} (layers)"
    if not _integer_tensor(counts) or not _integer_tensor(tokens):
        return f"counts and tokens must be integer tensors, got {counts.dtype} and {tokens.dtype}"
    if bool((counts < 0).any()) or bool((tokens < 0).any()):
        return "counts and tokens must be non-negative"
    if bool((tokens == 0).any()):
        layer = int((tokens == 0).nonzero()[0])
        return f"tokens is 0 at layer {layer}: the client routed no token"
    expected = update.top_k * tokens.long()
    mismatch = (counts.long().sum(-1) != expected).nonzero()
    if mismatch.numel():
        layer = int(mismatch[0])
        return (
            f"counts of layer {layer} sum to {int(counts[layer].long().sum())}, expected top_k * tokens = "
            f"{update.top_k} * {int(tokens[layer])} = {int(expected[layer])}"
        )

    if max_norm is not None:
        norm = delta_norm(deltas)
        if not norm <= max_norm:
            return f"adapter delta norm {norm:.4g} exceeds max_norm {max_norm:.4g}"
    if not isinstance(update.metrics, dict):
        return f"metrics must be a dict, got {type(update.metrics).__name__}"
    return None


def _rank_problem(update: ClientUpdate, state: GlobalState) -> str | None:
    ranks = {int(v.shape[-2]) for k, v in state.adapters.items() if ".lora_A." in k}
    r_max = max(ranks) if ranks else 0
    if not _is_int(update.rank) or not 1 <= update.rank <= r_max:
        return f"rank must be an integer in [1, {r_max}] for a rank method, got {update.rank!r}"
    return None


def aggregate_round(
    global_state: GlobalState,
    updates: Sequence[ClientUpdate],
    zeta: float = 0.9,
    eps: float = 1e-6,
    max_norm: float | None = None,
    *,
    dmr: bool = True,
    method: MethodSettings | None = None,
) -> tuple[GlobalState, dict[str, Any]]:
    """The new global state from one round's updates, and a JSON-friendly report.

    Bad updates (see `validate_update`) are dropped with their reason; the rest are aggregated:
    adapters = global + FedAvg(deltas; weights num_examples), or the rule of `method` (a baseline,
    `ubsmoe.fl.methods`), which may also change `method_state`; phi = `dmr_update(...)` when `dmr`,
    else the global phi. With no valid update the adapters and phi stay as they were. The returned
    state's round is `global_state.round + 1` in both cases (the round took place).

    Report: round, changed, accepted (client ids), weights (normalised), dropped ([{client_id,
    reason}]), message, and when changed: delta_norms, num_examples, metrics (num-examples-weighted
    means of the clients' metrics) and utilization per layer ({utilization (weighted activation
    rate per expert), cv, dead_experts}).
    """
    accepted: list[ClientUpdate] = []
    dropped: list[dict[str, Any]] = []
    for update in updates:
        reason = validate_update(update, global_state, max_norm, method)
        if reason is None:
            accepted.append(update)
        else:
            dropped.append({"client_id": _client_id(update), "reason": reason})
    report: dict[str, Any] = {
        "round": global_state.round,
        "accepted": [u.client_id for u in accepted],
        "dropped": dropped,
    }
    if not accepted:
        report.update(
            changed=False,
            weights=[],
            message=f"no valid update among {len(updates)}: global adapters and phi unchanged",
        )
        unchanged = GlobalState(
            adapters={k: v.clone() for k, v in global_state.adapters.items()},
            phi=global_state.phi.clone(),
            round=global_state.round + 1,
            method_state={k: v.clone() for k, v in global_state.method_state.items()},
        )
        return unchanged, report

    weights = [float(u.num_examples) for u in accepted]
    total = sum(weights)
    if global_state.adapters:
        adapters, method_state, method_report = aggregate_adapters(method or MethodSettings(), global_state, accepted)
    else:
        adapters, method_state, method_report = {}, dict(global_state.method_state), {}
    if dmr:
        phi = dmr_update(
            [u.phi for u in accepted],
            [u.counts for u in accepted],
            [u.tokens for u in accepted],
            [u.top_k for u in accepted],
            weights,
            zeta=zeta,
            eps=eps,
        )
    else:
        phi = global_state.phi.clone()

    rates = global_utilization([u.counts for u in accepted], [u.tokens for u in accepted], weights)
    summed = torch.stack([u.counts.long() for u in accepted]).sum(0)
    cv = utilization_cv(rates)
    dead = dead_experts(summed)
    report.update(
        changed=True,
        weights=[w / total for w in weights],
        num_examples=[u.num_examples for u in accepted],
        delta_norms=[delta_norm(u.adapter_deltas) for u in accepted],
        metrics=_weighted_metrics(accepted, weights),
        utilization=[
            {"utilization": rates[layer].tolist(), "cv": float(cv[layer]), "dead_experts": int(dead[layer])}
            for layer in range(rates.shape[0])
        ],
        message=f"aggregated {len(accepted)} of {len(updates)} update(s)",
        **method_report,
    )
    new_state = GlobalState(adapters=adapters, phi=phi, round=global_state.round + 1, method_state=method_state)
    return new_state, report


def _client_id(update: Any) -> Any:
    return getattr(update, "client_id", None)


def _weighted_metrics(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> dict[str, float]:
    """num-examples-weighted mean of each finite numeric metric, over the clients that report it."""
    sums: dict[str, float] = {}
    mass: dict[str, float] = {}
    for update, weight in zip(updates, weights, strict=True):
        for name, value in update.metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                sums[name] = sums.get(name, 0.0) + weight * float(value)
                mass[name] = mass.get(name, 0.0) + weight
    return {name: sums[name] / mass[name] for name in sums}
