"""One federated round, written once: the server plans it, clients carry out their plans, the server folds
the replies in. The in-process simulation (`ubsmoe.fl.simulation`) and the Flower app
(`ubsmoe.flower.strategy`, `ubsmoe.flower.client_app`) are transports over these pieces.

- `Federation.plan(index)`: seeds torch from (seed, round), samples the round's participants
  (`sample_clients`) and gives each one a `ClientPlan`: its K_c, its LoRA rank (`Method.client_rank`),
  the state it starts from (`Method.client_start`) and the `Assignment` its reply is checked against.
  A transport that cannot reach a participant says why (`reachable`), and the client is missing.
- `local_round(model, plan, ...)`: a client's work: its batches for the round (`client_batches`, seeded
  by (seed, round, client)), torch seeded from (seed, round, client), `client_update`.
- `Federation.fold(plan, updates, missing)`: the replies that came back, screened and aggregated
  (`aggregate_round` with the method and the round's assignments), merged into the base when the
  method merges (`Method.base_merger`); the new global state becomes `Federation.state`.
- `Federation.outputs(...)`: the round's metrics.jsonl lines and record, with a line for every
  participant (a missing one with its reason).

So a round depends only on the state it starts from and the seed, whichever transport carries it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ubsmoe.data.prompts import collate
from ubsmoe.fl.client import ClientSettings, client_update
from ubsmoe.fl.payload import ClientUpdate, GlobalState
from ubsmoe.fl.seeds import derive_seed
from ubsmoe.fl.server import Assignment, aggregate_round, delta_norm, sample_clients, validate_update
from ubsmoe.methods import Method
from ubsmoe.metrics.communication import payload_bytes

__all__ = [
    "ClientPlan",
    "Federation",
    "RoundPlan",
    "client_batches",
    "jsonable",
    "local_round",
    "normalised",
    "round_outputs",
]


# ---- plans -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientPlan:
    """What one participant is asked to do this round."""

    client: int
    top_k: int
    rank: int | None
    start: GlobalState
    assignment: Assignment


@dataclass
class RoundPlan:
    """A round as planned: its participants, the plan of each, and the ones that could not be reached."""

    index: int
    started: float
    participants: list[int]
    start_state: GlobalState
    clients: dict[int, ClientPlan]
    missing: dict[int, str] = field(default_factory=dict)

    @property
    def reachable(self) -> list[int]:
        """The participants that were given work, in sampling order."""
        return [c for c in self.participants if c not in self.missing]


class Federation:
    """The server half of every round (see the module docstring); `state` is the current global state.

    Args:
        method: the method (`ubsmoe.methods`).
        run: the run's settings (`resolve_run`): seed, fraction, batch_size, zeta, eps, dmr.
        client_settings: every client's local-training settings.
        client_sizes: the number of training examples of each client (client i has id i).
        top_ks, ranks: each client's configured K_c and LoRA rank.
        max_norm: drop updates whose delta norm exceeds it.
        phi_range: the model's [phi_min, phi_max].
        merger: `Method.base_merger(model)` of the server's model (None when the method does not merge).
    """

    def __init__(
        self,
        method: Method,
        run: Mapping[str, Any],
        client_settings: ClientSettings,
        client_sizes: Sequence[int],
        top_ks: Sequence[int],
        ranks: Sequence[int],
        max_norm: float | None,
        phi_range: tuple[float, float],
        merger: Any | None = None,
        state: GlobalState | None = None,
    ):
        self.method, self.run, self.client_settings = method, dict(run), client_settings
        self.client_sizes, self.top_ks, self.ranks = list(client_sizes), list(top_ks), list(ranks)
        self.max_norm, self.phi_range, self.merger = max_norm, phi_range, merger
        self.state = state

    @property
    def client_ids(self) -> list[int]:
        return list(range(len(self.client_sizes)))

    def plan(
        self,
        index: int,
        *,
        top_ks: Mapping[int, int] | None = None,
        ranks: Mapping[int, int] | None = None,
        reachable: Callable[[int], str | None] | None = None,
    ) -> RoundPlan:
        """Round `index`'s plan. `top_ks` / `ranks` override a client's configured K_c / rank (a Flower
        node's declared budget); `reachable(client)` returns why a client cannot be reached, or None."""
        started = time.perf_counter()
        torch.manual_seed(derive_seed(self.run["seed"], index))
        self.state = dataclasses.replace(self.state, round=index)
        participants = list(sample_clients(self.client_ids, self.run["fraction"], index, self.run["seed"]))
        plan = RoundPlan(index, started, participants, self.state, {})
        steps = self.client_settings.local_steps * int(self.run["batch_size"])
        for client in participants:
            top_k = (top_ks or {}).get(client, self.top_ks[client])
            configured_rank = (ranks or {}).get(client, self.ranks[client])
            rank = self.method.client_rank(self.state, client, configured_rank)
            why = reachable(client) if reachable is not None else None
            if why is not None:
                plan.missing[client] = why
            start = self.method.client_start(self.state, rank, client) if why is None else self.state
            assignment = Assignment(top_k=top_k, max_examples=min(self.client_sizes[client], steps), rank=rank)
            plan.clients[client] = ClientPlan(client, top_k, rank, start, assignment)
        return plan

    def fold(
        self, plan: RoundPlan, updates: Mapping[int, Any], missing: Mapping[int, str] | None = None
    ) -> dict[str, Any]:
        """Aggregate the replies of `plan` (client -> update) into the new `state`; returns the round's
        report (`aggregate_round`'s). `missing`: participants that were sent work but did not reply."""
        plan.missing.update(missing or {})
        senders = [c for c in plan.participants if c in updates]
        new_state, report = aggregate_round(
            plan.start_state,
            [updates[c] for c in senders],
            zeta=self.run["zeta"],
            eps=self.run["eps"],
            max_norm=self.max_norm,
            dmr=self.run["dmr"],
            method=self.method,
            assignments={c: plan.clients[c].assignment for c in plan.reachable},
            senders=senders,
            phi_range=self.phi_range,
        )
        if self.merger is not None:
            self.merger.apply(new_state)
        self.state = new_state
        return report

    def outputs(
        self,
        plan: RoundPlan,
        updates: Mapping[int, Any],
        report: Mapping[str, Any],
        eval_metrics: Mapping[str, Any],
        eval_time: float,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(metrics.jsonl lines, record) of a folded round."""
        return round_outputs(
            plan.index,
            plan.participants,
            updates,
            {c: p.top_k for c, p in plan.clients.items()},
            plan.start_state,
            report,
            self.method,
            {c: p.rank for c, p in plan.clients.items()},
            self.max_norm,
            eval_metrics,
            eval_time,
            plan.started,
            missing=plan.missing,
            extra=extra,
        )


# ---- the client's half -------------------------------------------------------------------------
def client_batches(
    examples: Sequence[Mapping[str, Sequence[int]]], batch_size: int, seed: int, round: int, client: Any, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """A client's batches for one round: its examples shuffled by (seed, round, client), cut by `batch_size`."""
    order = list(range(len(examples)))
    random.Random(f"ubsmoe-batches:{seed}:{round}:{client}").shuffle(order)
    return [
        collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        for start in range(0, len(order), batch_size)
    ]


def local_round(
    model: nn.Module,
    start: GlobalState,
    client: int,
    top_k: int,
    rank: int | None,
    examples: Sequence[Mapping[str, Sequence[int]]],
    settings: ClientSettings,
    method: Method,
    seed: int,
    batch_size: int,
    pad_id: int,
    on_step: Callable[[int], None] | None = None,
) -> ClientUpdate:
    """Carry out one client's plan on `model`: its seeded batches, torch seeded from (seed, round, client),
    `client_update` from `start`. The same call in-process and on a Flower node."""
    batches = client_batches(examples, batch_size, seed, start.round, client, pad_id)
    torch.manual_seed(derive_seed(seed, start.round, client))
    return client_update(model, start, batches, top_k, settings, client, on_step=on_step, method=method, rank=rank)


# ---- a round's outputs -------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def normalised(value: Any) -> Any:
    """`value` as it reads back from JSON (so fresh and resumed records compare equal)."""
    return json.loads(json.dumps(jsonable(value)))


def _client_line(
    round: int,
    client: int,
    update: Any,
    top_k: int,
    reason: str | None,
    state: GlobalState,
    method: Method,
    rank: int | None,
) -> dict[str, Any]:
    metrics = getattr(update, "metrics", None)
    line: dict[str, Any] = {
        "round": round,
        "client_id": client,
        "top_k": getattr(update, "top_k", top_k),
        "num_examples": getattr(update, "num_examples", None),
        "accepted": reason is None,
        "drop_reason": reason,
        "download_bytes": payload_bytes(method.sent_tensors(state, rank), state.phi),
    }
    if isinstance(update, ClientUpdate):
        line["upload_bytes"] = payload_bytes(method.uploaded_tensors(update), update.phi, update.counts, update.tokens)
    if reason is None:
        line["delta_norm"] = delta_norm(update.adapter_deltas)
    if isinstance(metrics, Mapping):
        line.update({k: v for k, v in metrics.items() if k not in line})
    return normalised(line)


def _finite_mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def round_outputs(
    round_index: int,
    participants: Sequence[int],
    updates: Mapping[int, Any],
    top_ks: Sequence[int] | Mapping[int, int],
    start_state: GlobalState,
    report: Mapping[str, Any],
    method: Method,
    ranks: Mapping[int, int | None],
    max_norm: float | None,
    eval_metrics: Mapping[str, Any],
    eval_time: float,
    started: float,
    missing: Mapping[int, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(metrics.jsonl lines, round record) of one aggregated round; shared by the simulation and Flower.

    `updates` maps each participant that replied to its update; `missing` gives the reason of each one
    that did not (Flower: no node, timeout, client error); `extra` adds keys to the record.
    """
    missing = missing or {}
    replied = [c for c in participants if c in updates]
    verdicts = report.get("verdicts")
    # the reasons aggregate_round decided by (its updates were those of `replied`, in that order)
    decided = (
        dict(zip(replied, verdicts, strict=True)) if verdicts is not None and len(verdicts) == len(replied) else None
    )
    lines = []
    for client in participants:
        if client in updates:
            update = updates[client]
            reason = decided[client] if decided is not None else validate_update(update, start_state, max_norm, method)
        else:
            update, reason = None, f"missing: {missing.get(client, 'no reply')}"
        lines.append(
            _client_line(round_index, client, update, top_ks[client], reason, start_state, method, ranks[client])
        )
    utilization = report.get("utilization", [])
    cvs = [layer["cv"] for layer in utilization]
    record = normalised(
        {
            "round": round_index,
            "clients": list(participants),
            "accepted": report["accepted"],
            "dropped": report["dropped"],
            **({"clipped": report["clipped"]} if report.get("clipped") else {}),
            **({"missing": [{"client_id": c, "reason": r} for c, r in sorted(missing.items())]} if missing else {}),
            "changed": report["changed"],
            "message": report["message"],
            "client_metrics": lines,
            "train": report.get("metrics", {}),
            "utilization_cv": cvs,
            "mean_utilization_cv": _finite_mean(cvs),
            "dead_experts": [layer["dead_experts"] for layer in utilization],
            **{k: report[k] for k in ("client_ranks", "merge_rank") if k in report},
            "utilization": [layer["utilization"] for layer in utilization],
            "eval": eval_metrics,
            **(extra or {}),
            "eval_time_s": eval_time,
            "round_time_s": time.perf_counter() - started,
        }
    )
    return lines, record
