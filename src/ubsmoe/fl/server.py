"""Server round logic (DESIGN 2.2 step 7, 2.4, 6) as functions over plain payloads.

- `sample_clients`: the round's participants, seeded by (seed, round).
- `validate_update`: why an update must be dropped (None when it is fine); never raises.
- `screen_updates`: the verdict on each of a round's updates: `validate_update`, plus what only the
  round knows (the `Assignment` the server gave each client: known senders, K_c, examples; who sent
  each update; one update per client).
- `aggregate_round`: drop bad updates (with their reasons), clip the clients' phi to its range, FedAvg
  of the adapter deltas weighted by num_examples (or the method's own rule, `Method.aggregate`),
  DMR update of phi (or phi kept when DMR is off) and a
  utilization report.

The server trusts nothing a client claims that it can check (DESIGN 6): every tensor's keys, shapes,
dtypes and finiteness; phi within its range [phi_min, phi_max] (values beyond it are clipped to it,
values beyond it by more than its width drop the update); counts summing to top_k * tokens;
num_examples at most the tokens routed (every example has at least one token) and, given an
`Assignment`, at most the examples the client can have trained on; top_k (and a rank method's rank)
as assigned; a sender the server assigned, each at most once per round.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ubsmoe.fl.payload import ClientUpdate, GlobalState
from ubsmoe.moe import dead_experts, dmr_update, global_utilization, utilization_cv

if TYPE_CHECKING:
    from ubsmoe.methods import Method

__all__ = [
    "PHI_RANGE",
    "Assignment",
    "aggregate_round",
    "clip_phi",
    "delta_norm",
    "sample_clients",
    "screen_updates",
    "validate_update",
]

PHI_RANGE = (-1.0, 1.0)
"""The default [phi_min, phi_max] (DESIGN 2.2 step 5); pass the model's own (`ubsmoe.fl.payload.phi_range`)."""


@dataclass(frozen=True)
class Assignment:
    """What the server asked of one client in a round, i.e. what its update is checked against.

    `top_k`: the K_c it was sent; `max_examples`: the most distinct examples it can have trained on
    (its examples, at most local_steps * batch_size), None when the server does not know; `rank`: the
    LoRA rank it was sent under a rank method (None otherwise).
    """

    top_k: int
    max_examples: int | None = None
    rank: int | None = None


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
    update: Any,
    global_state: GlobalState,
    max_norm: float | None = None,
    method: Method | None = None,
    *,
    assignment: Assignment | None = None,
    phi_range: tuple[float, float] | None = PHI_RANGE,
) -> str | None:
    """A clear reason why `update` must be dropped, or None when it can be aggregated.

    `assignment`: what the server sent this client (its update must match it); `phi_range`: phi's
    [phi_min, phi_max] (an update whose phi lies beyond it by more than its width is dropped; None
    skips the check, e.g. when the server keeps phi). Pure; never raises.
    """
    try:
        problem = _problem(update, global_state, max_norm, phi_range)
        if problem is None and assignment is not None:
            problem = _assignment_problem(update, assignment)
        if problem is None and method is not None:
            problem = method.update_problem(update, global_state, assignment)
        return problem
    except Exception as error:  # a malformed payload must never crash the server
        return f"malformed update ({type(error).__name__}: {error})"


def _phi_excess(phi: torch.Tensor, phi_range: tuple[float, float]) -> float:
    """How far the furthest value of `phi` lies outside [phi_min, phi_max] (0 inside)."""
    if not phi.numel():
        return 0.0
    low, high = phi_range
    wide = phi.double()
    return float((wide - wide.clamp(low, high)).abs().max())


def _problem(
    update: Any, state: GlobalState, max_norm: float | None, phi_range: tuple[float, float] | None
) -> str | None:
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
    if phi_range is not None:
        low, high = phi_range
        excess = _phi_excess(phi, phi_range)
        if excess > high - low:
            return (
                f"phi lies {excess:.4g} outside its range [{low:g}, {high:g}], more than the range's width: "
                "local training under the range regulariser does not go that far"
            )

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
    if tokens.numel() and update.num_examples > int(tokens.min()):
        return (
            f"num_examples = {update.num_examples} exceeds the {int(tokens.min())} token(s) the client routed "
            "(every example has at least one token)"
        )

    if max_norm is not None:
        norm = delta_norm(deltas)
        if not norm <= max_norm:
            return f"adapter delta norm {norm:.4g} exceeds max_norm {max_norm:.4g}"
    if not isinstance(update.metrics, dict):
        return f"metrics must be a dict, got {type(update.metrics).__name__}"
    return None


def _assignment_problem(update: ClientUpdate, assignment: Assignment) -> str | None:
    if update.top_k != assignment.top_k:
        return f"top_k = {update.top_k}, but the server assigned this client K_c = {assignment.top_k}"
    if assignment.max_examples is not None and update.num_examples > assignment.max_examples:
        return (
            f"num_examples = {update.num_examples} exceeds the {assignment.max_examples} example(s) this client can "
            "have trained on this round (its examples, at most local_steps * batch_size)"
        )
    return None


def _valid_id(client_id: Any) -> bool:
    return isinstance(client_id, int | str) and not isinstance(client_id, bool)


def screen_updates(
    global_state: GlobalState,
    updates: Sequence[Any],
    max_norm: float | None = None,
    method: Method | None = None,
    *,
    assignments: Mapping[Any, Assignment] | None = None,
    senders: Sequence[Any] | None = None,
    phi_range: tuple[float, float] | None = PHI_RANGE,
) -> list[str | None]:
    """The verdict on each update of a round, in order: a reason to drop it, or None to aggregate it.

    `senders[i]`: the client the server knows `updates[i]` came from (the client it ran, or the node
    it sent the train message to); the update must name that client. `assignments`: the round's
    clients and what each was assigned; an update from any other client is dropped, and each update
    is checked against its client's `Assignment`. Only a client's first update counts: a later one
    with the same client id (or the same sender) is dropped as a duplicate. The rest is
    `validate_update`. Pure; never raises.
    """
    if senders is not None and len(senders) != len(updates):
        raise ValueError(f"{len(senders)} senders for {len(updates)} updates")
    seen: dict[Any, int] = {}
    verdicts: list[str | None] = []
    for index, update in enumerate(updates):
        verdicts.append(
            _screen(
                index,
                update,
                senders[index] if senders is not None else None,
                senders is not None,
                seen,
                global_state,
                max_norm,
                method,
                assignments,
                phi_range,
            )
        )
    return verdicts


def _screen(
    index: int,
    update: Any,
    sender: Any,
    known_sender: bool,
    seen: dict[Any, int],
    state: GlobalState,
    max_norm: float | None,
    method: Method | None,
    assignments: Mapping[Any, Assignment] | None,
    phi_range: tuple[float, float] | None,
) -> str | None:
    if not isinstance(update, ClientUpdate):
        return validate_update(update, state, max_norm, method, phi_range=phi_range)
    claimed = update.client_id
    if not _valid_id(claimed):
        return f"client_id must be an int or a str, got {claimed!r}"
    if known_sender and claimed != sender:
        return f"the update names client {claimed!r}, but it came from client {sender!r}"
    who = sender if known_sender else claimed
    if not _valid_id(who):
        return f"the update came from an unknown sender {who!r}"
    if assignments is not None and who not in assignments:
        return f"unknown sender: client {who!r} was not assigned work this round"
    if who in seen:
        return f"duplicate: client {who!r} already sent an update this round (update {seen[who]}); only that one counts"
    seen[who] = index
    assignment = assignments[who] if assignments is not None else None
    return validate_update(update, state, max_norm, method, assignment=assignment, phi_range=phi_range)


def clip_phi(phi: torch.Tensor, phi_range: tuple[float, float]) -> tuple[torch.Tensor, str | None]:
    """(`phi` clipped to [phi_min, phi_max], a note on what was clipped or None when nothing was).

    A phi inside its range comes back as the same tensor (so honest updates aggregate bit-identically).
    """
    low, high = phi_range
    outside = (phi < low) | (phi > high)
    count = int(outside.sum())
    if not count:
        return phi, None
    note = f"phi clipped to [{low:g}, {high:g}]: {count} value(s) outside, the furthest by {_phi_excess(phi, phi_range):.4g}"
    return phi.clamp(low, high), note


def aggregate_round(
    global_state: GlobalState,
    updates: Sequence[ClientUpdate],
    zeta: float = 0.9,
    eps: float = 1e-6,
    max_norm: float | None = None,
    *,
    dmr: bool = True,
    method: Method | None = None,
    assignments: Mapping[Any, Assignment] | None = None,
    senders: Sequence[Any] | None = None,
    phi_range: tuple[float, float] = PHI_RANGE,
) -> tuple[GlobalState, dict[str, Any]]:
    """The new global state from one round's updates, and a JSON-friendly report.

    Bad updates (see `screen_updates`: `validate_update`, and with `assignments` / `senders` unknown
    senders, impostors, duplicates and claims beyond the assignment) are dropped with their reason;
    the rest are aggregated: adapters = global + FedAvg(deltas; weights num_examples), or the rule of
    `method` (`ubsmoe.methods`), which may also change `method_state`; phi =
    `dmr_update(...)` of the clients' phi clipped to `phi_range`, itself kept within `phi_range`, when
    `dmr`, else the global phi (the clients' phi is then not range-checked). With no valid update the
    adapters and phi stay as they were. The returned state's round is `global_state.round + 1` in both
    cases (the round took place).

    Report: round, changed, accepted (client ids), weights (normalised), dropped ([{client_id (the
    sender when `senders` is given), reason}]), clipped ([{client_id, reason}], the accepted updates
    whose phi was clipped), verdicts (the reason or None of each update, in order), message, and when
    changed: delta_norms, num_examples, metrics (num-examples-weighted means of the clients' metrics)
    and utilization per layer ({utilization (weighted activation rate per expert), cv, dead_experts}).
    """
    verdicts = screen_updates(
        global_state,
        updates,
        max_norm,
        method,
        assignments=assignments,
        senders=senders,
        phi_range=phi_range if dmr else None,
    )
    accepted: list[ClientUpdate] = []
    dropped: list[dict[str, Any]] = []
    for index, (update, reason) in enumerate(zip(updates, verdicts, strict=True)):
        if reason is None:
            accepted.append(update)
        else:
            sender = senders[index] if senders is not None else _client_id(update)
            dropped.append({"client_id": sender, "reason": reason})
    phis, clipped = [], []
    for update in accepted:
        phi, note = clip_phi(update.phi, phi_range) if dmr else (update.phi, None)
        phis.append(phi)
        if note is not None:
            clipped.append({"client_id": update.client_id, "reason": note})
    report: dict[str, Any] = {
        "round": global_state.round,
        "accepted": [u.client_id for u in accepted],
        "dropped": dropped,
        "clipped": clipped,
        "verdicts": verdicts,
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
        if method is None:
            from ubsmoe.methods.base import Method

            method = Method()
        result = method.aggregate(global_state, accepted)
        adapters, method_state, method_report = result.adapters, result.method_state, result.report
    else:
        adapters, method_state, method_report = {}, dict(global_state.method_state), {}
    if dmr:
        phi = dmr_update(
            phis,
            [u.counts for u in accepted],
            [u.tokens for u in accepted],
            [u.top_k for u in accepted],
            weights,
            zeta=zeta,
            eps=eps,
        )
        phi, _ = clip_phi(phi, phi_range)  # the global phi never leaves its range
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
