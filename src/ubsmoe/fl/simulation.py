"""In-process federated simulation with one base model in memory, checkpoints and exact resume (DESIGN 2.4, 5, 6).

`run_simulation(model, client_data, client_top_ks, settings, rounds, ...)` runs the federated protocol
of DESIGN 2.4 with the same functions the Flower apps use (`sample_clients`, `client_update`,
`aggregate_round`):

- One model: `model` is the only model object. Each client's `client_update` loads the global
  adapters and phi into it (its adapters are swapped in), trains, and returns detached CPU deltas;
  after the round the aggregated global state is loaded back. Nothing is deep-copied; memory is one
  base model plus one `GlobalState` and the round's `ClientUpdate`s (adapter-sized).
- Determinism: the round's participants are seeded by (seed, round) (`sample_clients`); a client's
  batches are its examples shuffled by a `random.Random` seeded by (seed, round, client) and cut into
  `batch_size` batches (`ubsmoe.data.prompts.collate`); torch's global RNG is re-seeded from
  (seed, round) at the start of every round, from (seed, round, client) before every client and from
  (seed, round, "eval") before `evaluate`. So a round depends only on the global state it starts from
  and the seed: a resumed run is bit-identical to an uninterrupted one without restoring RNG streams
  (the checkpoint still stores and restores the global torch / random / numpy states, for callers).
- Outputs in `out_dir`: `metrics.jsonl`, one JSON line per (round, participating client): round,
  client_id, top_k, num_examples, accepted, drop_reason and the client's training metrics; and
  `checkpoint/round_XXXX/` after every round (see `ubsmoe.fl.checkpoint`; its meta holds the
  per-round records so far and a fingerprint of the run's settings). A round's metrics lines are
  appended before its checkpoint is written; on resume the file is rewritten (atomically) without
  the lines of rounds after the checkpoint, so an interrupted round never leaves duplicates.
- Resume: `resume=True` continues from the newest checkpoint (its settings fingerprint must match);
  with no checkpoint it starts fresh. `resume=False` refuses a folder that already holds checkpoints.
  The returned `SimulationRecords` says which happened (`resumed_from`). `rounds` may be larger on
  resume than in the interrupted call (the run is extended; the LR schedule is the settings').
- Wall-clock values (`TIMING_KEYS`) are the only non-deterministic numbers in records and lines.

Nothing is printed; pass `on_round(record)` for progress.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ubsmoe.data.prompts import collate
from ubsmoe.fl.checkpoint import latest_checkpoint, load_checkpoint, restore_rng_states, save_checkpoint
from ubsmoe.fl.client import ClientSettings, client_update
from ubsmoe.fl.payload import (
    ClientUpdate,
    GlobalState,
    adapter_parameters,
    global_state_from_model,
    load_global_state,
    phi_range,
)
from ubsmoe.fl.seeds import derive_seed
from ubsmoe.fl.server import Assignment, aggregate_round, delta_norm, sample_clients, validate_update
from ubsmoe.metrics.communication import payload_bytes
from ubsmoe.paths import write_text_atomic

if TYPE_CHECKING:
    from ubsmoe.config import ExperimentConfig
    from ubsmoe.methods import Method

__all__ = [
    "CHECKPOINT_DIR",
    "METRICS_FILE",
    "TIMING_KEYS",
    "SimulationRecords",
    "client_batches",
    "derive_seed",
    "resolve_run",
    "round_outputs",
    "run_fingerprint",
    "run_simulation",
    "save_round",
]

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"
TIMING_KEYS = frozenset({"step_time_s", "round_time_s", "eval_time_s"})
"""Keys whose values are wall-clock times (differ between otherwise identical runs)."""


class SimulationRecords(list):
    """The per-round records (a list of dicts); `resumed_from` is the number of rounds restored from a
    checkpoint (None when the run started fresh) and `checkpoint` the folder it resumed from."""

    resumed_from: int | None = None
    checkpoint: str | None = None


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _normalised(value: Any) -> Any:
    """`value` as it reads back from JSON (so fresh and resumed records compare equal)."""
    return json.loads(json.dumps(_jsonable(value)))


def resolve_run(
    settings: ClientSettings | ExperimentConfig,
    rounds: int | None,
    fraction: float | None,
    seed: int | None,
    batch_size: int | None,
    zeta: float | None,
    eps: float | None,
    dmr: bool | None,
) -> tuple[ClientSettings, dict[str, Any]]:
    if isinstance(settings, ClientSettings):
        client_settings = settings
        defaults = {
            "rounds": settings.total_rounds,
            "fraction": 1.0,
            "seed": 0,
            "batch_size": 8,
            "zeta": 0.9,
            "eps": 1e-6,
            "dmr": True,
        }
    else:
        client_settings = ClientSettings.from_config(settings)
        defaults = {
            "rounds": settings.federation.rounds,
            "fraction": settings.federation.fraction,
            "seed": settings.seed,
            "batch_size": settings.federation.batch_size,
            "zeta": settings.dmr.zeta,
            "eps": settings.dmr.eps,
            "dmr": settings.dmr_active,
        }
    given = {
        "rounds": rounds,
        "fraction": fraction,
        "seed": seed,
        "batch_size": batch_size,
        "zeta": zeta,
        "eps": eps,
        "dmr": dmr,
    }
    return client_settings, {k: defaults[k] if v is None else v for k, v in given.items()}


def _check_inputs(client_data: Sequence[Sequence[Any]], client_top_ks: Sequence[int], run: dict[str, Any]) -> None:
    problems = []
    if not client_data:
        problems.append("client_data is empty: the simulation needs at least one client")
    if len(client_data) != len(client_top_ks):
        problems.append(f"{len(client_data)} clients' data but {len(client_top_ks)} top_ks")
    for index, examples in enumerate(client_data):
        if len(examples) == 0:
            problems.append(f"client {index} has no examples")
    for index, k in enumerate(client_top_ks):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            problems.append(f"client {index}: top_k = {k!r} must be an integer >= 1")
    if not (isinstance(run["rounds"], int) and run["rounds"] >= 1):
        problems.append(f"rounds = {run['rounds']!r}: must be an integer >= 1")
    if not (isinstance(run["batch_size"], int) and run["batch_size"] >= 1):
        problems.append(f"batch_size = {run['batch_size']!r}: must be an integer >= 1")
    if not (isinstance(run["fraction"], int | float) and 0 < run["fraction"] <= 1):
        problems.append(f"fraction = {run['fraction']!r}: must be in (0, 1]")
    if problems:
        raise ValueError("\n".join(problems))


def run_fingerprint(
    client_data: Sequence[Sequence[Any]],
    client_top_ks: Sequence[int],
    client_settings: ClientSettings,
    run: dict[str, Any],
    max_norm: float | None,
    pad_id: int,
    method: Method,
    client_ranks: Sequence[int],
) -> dict[str, Any]:
    data_hash = hashlib.sha256(json.dumps(_jsonable(list(client_data)), sort_keys=True).encode("utf-8")).hexdigest()
    return _normalised(
        {
            "num_clients": len(client_data),
            "client_sizes": [len(d) for d in client_data],
            "client_data_sha256": data_hash,
            "top_ks": list(client_top_ks),
            "settings": dataclasses.asdict(client_settings),
            **{k: v for k, v in run.items() if k != "rounds"},
            "max_norm": max_norm,
            "pad_id": pad_id,
            "method": {"class": f"{type(method).__module__}:{type(method).__qualname__}", **dataclasses.asdict(method)},
            "client_ranks": list(client_ranks),
        }
    )


def _append_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps(line, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _truncate_metrics(path: Path, next_round: int) -> None:
    """Rewrite `path` atomically with only the well-formed lines of rounds before `next_round`."""
    if not path.exists():
        return
    kept = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
        if isinstance(line, dict) and isinstance(line.get("round"), int) and line["round"] < next_round:
            kept.append(raw + "\n")
    write_text_atomic(path, "".join(kept))


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
    return _normalised(line)


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
    record = _normalised(
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


def save_round(
    out: Path,
    state: GlobalState,
    records: Sequence[Mapping[str, Any]],
    lines: Sequence[Mapping[str, Any]],
    fingerprint: Mapping[str, Any],
    keep: int | None,
    **extra: Any,
) -> None:
    """Append the round's metrics.jsonl lines, then checkpoint `state` with the records so far."""
    _append_lines(out / METRICS_FILE, list(lines))
    save_checkpoint(
        out / CHECKPOINT_DIR,
        state,
        state.round,
        {"fingerprint": fingerprint, "records": list(records), **extra},
        keep=keep,
    )


def run_simulation(
    model: nn.Module,
    client_data: Sequence[Sequence[Mapping[str, Sequence[int]]]],
    client_top_ks: Sequence[int],
    settings: ClientSettings | ExperimentConfig,
    rounds: int | None = None,
    fraction: float | None = None,
    seed: int | None = None,
    out_dir: str | os.PathLike[str] = "runs/simulation",
    batch_size: int | None = None,
    evaluate: Callable[[nn.Module, int], Mapping[str, Any]] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
    *,
    on_round_start: Callable[[int, list[int]], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    pad_id: int | None = None,
    zeta: float | None = None,
    eps: float | None = None,
    dmr: bool | None = None,
    max_norm: float | None = None,
    keep_checkpoints: int | None = None,
    method: Method | None = None,
    client_ranks: Sequence[int] | None = None,
) -> SimulationRecords:
    """Run (or continue) a federated simulation on `model`; see the module docstring.

    Args:
        model: an adapted model (`adapt_moe_model`); it ends holding the final global state.
        client_data: each client's encoded examples (`encode_for_training` dicts); client i has id i.
        client_top_ks: K_c of each client.
        settings: `ClientSettings`, or an `ExperimentConfig` (which also supplies the defaults of
            rounds, fraction, seed, batch_size, zeta, eps and dmr). With `ClientSettings` the defaults
            are rounds = settings.total_rounds, fraction 1, seed 0, batch_size 8, zeta 0.9, eps 1e-6, dmr on.
        evaluate: called as `evaluate(model, round, state)` after each round's aggregation (model holds
            the new global state, `state`); its JSON-able dict goes to the record's "eval".
        on_round: called with each round's record after its checkpoint is written.
        on_round_start: called as `on_round_start(round, participants)` when a round begins.
        on_step: called as `on_step(round, client, step)` after each local step (for progress bars).
        resume: continue from the newest checkpoint in `out_dir/checkpoint` (fresh start if none).
        pad_id: padding id for `collate` (default: model.config.pad_token_id, else 0).
        max_norm: drop updates whose delta norm exceeds it (`validate_update`).
        keep_checkpoints: keep only this many newest checkpoints (None = all).
        method: the method (`ubsmoe.methods`); default from an ExperimentConfig, else UB-SMoE.
        client_ranks: each client's LoRA rank under a rank method (default from an ExperimentConfig).

    Each round's updates are checked against what the round assigned each participant (its K_c and
    rank, at most min(its examples, local_steps * batch_size) examples, its own client id) and the
    model's phi range (`ubsmoe.fl.server.aggregate_round`).

    Returns the records of all rounds (restored ones included): round, clients, accepted, dropped
    ([{client_id, reason}]), clipped (only when a client's phi was clipped to its range: [{client_id,
    reason}]), client_metrics (the metrics.jsonl lines of the round), train (the
    num-examples-weighted client metrics), utilization_cv, dead_experts and utilization (the global
    activation rate of each expert, L x M) per layer,
    mean_utilization_cv, changed, eval, round_time_s.
    """
    client_settings, run = resolve_run(settings, rounds, fraction, seed, batch_size, zeta, eps, dmr)
    _check_inputs(client_data, client_top_ks, run)
    if method is None:
        if isinstance(settings, ClientSettings):
            from ubsmoe.methods.ubsmoe import UBSMoE

            method = UBSMoE(seed=run["seed"])
        else:
            method = settings.method_instance()
    if client_ranks is None:
        client_ranks = [0] * len(client_data) if isinstance(settings, ClientSettings) else settings.client_ranks()
    merger = method.base_merger(model)
    if pad_id is None:
        pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
    total_rounds, run_seed = run["rounds"], run["seed"]
    fingerprint = run_fingerprint(
        client_data, client_top_ks, client_settings, run, max_norm, pad_id, method, client_ranks
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints, metrics_path = out / CHECKPOINT_DIR, out / METRICS_FILE
    records = SimulationRecords()
    found = latest_checkpoint(checkpoints)

    if resume and found is not None:
        state, meta = load_checkpoint(found)
        saved = meta["extra"].get("fingerprint")
        if saved != fingerprint:
            differing = sorted(
                k for k in set(fingerprint) | set(saved or {}) if (saved or {}).get(k) != fingerprint.get(k)
            )
            raise ValueError(
                f"cannot resume from {str(found)!r}: the run's settings differ from the checkpointed run's "
                f"({', '.join(differing) or 'fingerprint missing'})"
            )
        saved_records = meta["extra"].get("records")
        if not isinstance(saved_records, list) or len(saved_records) != state.round:
            raise ValueError(f"cannot resume from {str(found)!r}: its records do not cover its {state.round} round(s)")
        order = list(adapter_parameters(model))  # a checkpoint returns its keys sorted as text
        state.adapters = {k: state.adapters[k] for k in order if k in state.adapters} | state.adapters
        load_global_state(model, state)
        if merger is not None:
            merger.apply(state)
        restore_rng_states(meta["rng"])
        records.extend(saved_records)
        records.resumed_from, records.checkpoint = state.round, str(found)
        _truncate_metrics(metrics_path, state.round)
    else:
        if found is not None:
            raise ValueError(
                f"{str(out)!r} already holds checkpoints of a run (newest {found.name}); "
                "pass resume=True to continue it, or use an empty output folder"
            )
        state = global_state_from_model(model, round=0)
        state.method_state = method.initial_state(client_ranks)
        if metrics_path.exists():
            metrics_path.unlink()

    client_ids = list(range(len(client_data)))
    bounds = phi_range(model)
    for round_index in range(state.round, total_rounds):
        started = time.perf_counter()
        torch.manual_seed(derive_seed(run_seed, round_index))
        state = dataclasses.replace(state, round=round_index)
        participants = sample_clients(client_ids, run["fraction"], round_index, run_seed)
        if on_round_start is not None:
            on_round_start(round_index, list(participants))
        updates = []
        ranks = {c: method.client_rank(state, c, client_ranks[c]) for c in participants}
        for client in participants:
            batches = client_batches(client_data[client], run["batch_size"], run_seed, round_index, client, pad_id)
            torch.manual_seed(derive_seed(run_seed, round_index, client))
            step_hook = None
            if on_step is not None:

                def step_hook(step: int, _round: int = round_index, _client: int = client) -> None:
                    on_step(_round, _client, step)

            start = method.client_start(state, ranks[client], client)
            updates.append(
                client_update(
                    model,
                    start,
                    batches,
                    client_top_ks[client],
                    client_settings,
                    client,
                    on_step=step_hook,
                    method=method,
                    rank=ranks[client],
                )
            )

        # what each participant was asked to do: its update is checked against it (DESIGN 6)
        assignments = {
            c: Assignment(
                top_k=client_top_ks[c],
                max_examples=min(len(client_data[c]), client_settings.local_steps * run["batch_size"]),
                rank=ranks[c],
            )
            for c in participants
        }
        new_state, report = aggregate_round(
            state,
            updates,
            zeta=run["zeta"],
            eps=run["eps"],
            max_norm=max_norm,
            dmr=run["dmr"],
            method=method,
            assignments=assignments,
            senders=list(participants),
            phi_range=bounds,
        )
        if merger is not None:
            merger.apply(new_state)
        load_global_state(model, new_state)
        eval_metrics: Mapping[str, Any] = {}
        eval_time = 0.0
        if evaluate is not None:
            torch.manual_seed(derive_seed(run_seed, round_index, "eval"))
            eval_start = time.perf_counter()
            eval_metrics = evaluate(model, round_index, new_state) or {}
            eval_time = time.perf_counter() - eval_start
            load_global_state(model, new_state)  # an evaluation may have loaded per-tier views

        lines, record = round_outputs(
            round_index,
            participants,
            dict(zip(participants, updates, strict=True)),
            client_top_ks,
            state,
            report,
            method,
            ranks,
            max_norm,
            eval_metrics,
            eval_time,
            started,
        )
        records.append(record)
        save_round(out, new_state, records, lines, fingerprint, keep_checkpoints)
        state = new_state
        if on_round is not None:
            on_round(record)
    return records
