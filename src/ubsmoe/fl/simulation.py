"""In-process federated simulation with one base model in memory, checkpoints and exact resume (DESIGN 2.4, 5, 6).

`run_simulation(model, client_data, client_top_ks, settings, out_dir, ...)` runs the federated protocol
of DESIGN 2.4 in one process over the round engine the Flower app also uses (`ubsmoe.fl.rounds`:
`Federation.plan`, `local_round` for each client, `Federation.fold`):

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
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ubsmoe.fl.checkpoint import latest_checkpoint, load_checkpoint, restore_rng_states, save_checkpoint
from ubsmoe.fl.client import ClientSettings
from ubsmoe.fl.payload import (
    GlobalState,
    adapter_parameters,
    global_state_from_model,
    load_global_state,
    phi_range,
)
from ubsmoe.fl.rounds import Federation, jsonable, local_round, normalised
from ubsmoe.fl.seeds import derive_seed
from ubsmoe.paths import write_text_atomic

if TYPE_CHECKING:
    from ubsmoe.config import ExperimentConfig
    from ubsmoe.methods import Method

__all__ = [
    "CHECKPOINT_DIR",
    "METRICS_FILE",
    "TIMING_KEYS",
    "RUN_KEYS",
    "SimulationHooks",
    "SimulationRecords",
    "derive_seed",
    "resolve_run",
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


RUN_KEYS = ("rounds", "fraction", "seed", "batch_size", "zeta", "eps", "dmr")
"""The run's settings besides the clients' (`resolve_run`); the simulation's `run` overrides any of them."""


def resolve_run(
    settings: ClientSettings | ExperimentConfig, overrides: Mapping[str, Any] | None = None
) -> tuple[ClientSettings, dict[str, Any]]:
    """(the clients' settings, the run's settings `RUN_KEYS`): from an ExperimentConfig, or defaults around
    ClientSettings (rounds = settings.total_rounds, fraction 1, seed 0, batch_size 8, zeta 0.9, eps 1e-6,
    dmr on); `overrides` replaces any of them (a None value keeps the default)."""
    unknown = sorted(set(overrides or {}) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"run: unknown setting(s) {', '.join(unknown)}; known: {', '.join(RUN_KEYS)}")
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
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return client_settings, {**defaults, **given}


@dataclasses.dataclass(frozen=True)
class SimulationHooks:
    """Callbacks of a simulation (all optional)."""

    evaluate: Callable[[nn.Module, int, GlobalState], Mapping[str, Any]] | None = None
    """`evaluate(model, round, state)` after each round's aggregation (model holds the new global state,
    `state`); its JSON-able dict goes to the record's "eval"."""
    on_round: Callable[[dict[str, Any]], None] | None = None
    """Called with each round's record after its checkpoint is written."""
    on_round_start: Callable[[int, list[int]], None] | None = None
    """`on_round_start(round, participants)` when a round begins."""
    on_step: Callable[[int, int, int], None] | None = None
    """`on_step(round, client, step)` after each local step (for progress bars)."""


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
    data_hash = hashlib.sha256(json.dumps(jsonable(list(client_data)), sort_keys=True).encode("utf-8")).hexdigest()
    return normalised(
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
    out_dir: str | os.PathLike[str] = "runs/simulation",
    *,
    run: Mapping[str, Any] | None = None,
    resume: bool = False,
    hooks: SimulationHooks | None = None,
    pad_id: int | None = None,
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
        settings: `ClientSettings`, or an `ExperimentConfig` (which also supplies the run's settings).
        run: overrides of the run's settings (`RUN_KEYS`: rounds, fraction, seed, batch_size, zeta, eps,
            dmr; `resolve_run` gives their defaults).
        resume: continue from the newest checkpoint in `out_dir/checkpoint` (fresh start if none).
        hooks: evaluation and progress callbacks (`SimulationHooks`).
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
    hooks = hooks or SimulationHooks()
    client_settings, run = resolve_run(settings, run)
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
    state, records = open_run(
        out, fingerprint, resume, model, merger, lambda: _initial_state(model, method, client_ranks)
    )
    federation = Federation(
        method,
        run,
        client_settings,
        [len(d) for d in client_data],
        client_top_ks,
        client_ranks,
        max_norm,
        phi_range(model),
        merger,
        state,
    )
    for round_index in range(state.round, total_rounds):
        plan = federation.plan(round_index)
        if hooks.on_round_start is not None:
            hooks.on_round_start(round_index, list(plan.participants))
        updates = {}
        for client, work in plan.clients.items():
            step_hook = None
            if hooks.on_step is not None:

                def step_hook(step: int, _round: int = round_index, _client: int = client) -> None:
                    hooks.on_step(_round, _client, step)

            updates[client] = local_round(
                model,
                work.start,
                client,
                work.top_k,
                work.rank,
                client_data[client],
                client_settings,
                method,
                run_seed,
                run["batch_size"],
                pad_id,
                on_step=step_hook,
            )
        report = federation.fold(plan, updates)
        new_state = federation.state
        load_global_state(model, new_state)
        eval_metrics: Mapping[str, Any] = {}
        eval_time = 0.0
        if hooks.evaluate is not None:
            torch.manual_seed(derive_seed(run_seed, round_index, "eval"))
            eval_start = time.perf_counter()
            eval_metrics = hooks.evaluate(model, round_index, new_state) or {}
            eval_time = time.perf_counter() - eval_start
            load_global_state(model, new_state)  # an evaluation may have loaded per-tier views
        lines, record = federation.outputs(plan, updates, report, eval_metrics, eval_time)
        records.append(record)
        save_round(out, new_state, records, lines, fingerprint, keep_checkpoints)
        if hooks.on_round is not None:
            hooks.on_round(record)
    return records


def _initial_state(model: nn.Module, method: Method, client_ranks: Sequence[int]) -> GlobalState:
    state = global_state_from_model(model, round=0)
    state.method_state = method.initial_state(client_ranks)
    return state


def open_run(
    out: Path,
    fingerprint: Mapping[str, Any],
    resume: bool,
    model: nn.Module,
    merger: Any | None,
    initial_state: Callable[[], GlobalState],
) -> tuple[GlobalState, SimulationRecords]:
    """The state a run starts its next round from, and its records so far; loads it into `model`.

    `resume`: continue from the newest checkpoint in `out/checkpoint` (its fingerprint must equal
    `fingerprint`; metrics.jsonl loses the lines of rounds after it), else start fresh from
    `initial_state()` (fresh too when there is no checkpoint). A fresh start refuses a folder that holds
    checkpoints. Shared by the simulation and the Flower strategy, so both resume from the same files.
    """
    out.mkdir(parents=True, exist_ok=True)
    checkpoints, metrics_path = out / CHECKPOINT_DIR, out / METRICS_FILE
    records = SimulationRecords()
    found = latest_checkpoint(checkpoints)
    if not resume or found is None:
        if found is not None:
            raise ValueError(
                f"{str(out)!r} already holds checkpoints of a run (newest {found.name}); "
                "pass resume=True to continue it, or use an empty output folder"
            )
        if metrics_path.exists():
            metrics_path.unlink()
        return initial_state(), records
    state, meta = load_checkpoint(found)
    saved = meta["extra"].get("fingerprint")
    if saved != fingerprint:
        differing = sorted(k for k in set(fingerprint) | set(saved or {}) if (saved or {}).get(k) != fingerprint.get(k))
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
    return state, records
