"""`UBSMoEStrategy`: the federated core's round, as a Flower `Strategy` (flwr 1.42 Message API).

It is a transport over the round engine the in-process simulation uses (`ubsmoe.fl.rounds`): the
engine's `Federation.plan` gives each sampled client its start state, K_c and rank (the messages carry
them as `ArrayRecord`s), `Federation.fold` aggregates the replies that came back (with their drop
reasons) and `Federation.outputs` writes the round's lines and record; the per-tier evaluator and the
checkpoints are `ubsmoe run`'s. Seeds are derived the same way: torch from (seed, round) when a round
is planned, from (seed, round, "eval") before evaluating; a client seeds its own training from (seed,
round, client) (`local_round`). So with every node answering, a Flower run computes the same rounds
as `ubsmoe run`, and it resumes from the same checkpoints (`resume`: `ubsmoe.fl.simulation.open_run`).

Nodes: at the start of every round the strategy asks each SuperNode it has not met yet for its client
id and budget (a `query` message); a node's K_c and rank follow from its budget by the config's rules.
The round's participants are drawn from the experiment's client ids, as in the simulation; a sampled
client with no connected node, or whose node does not answer within the round timeout, or answers
with an error, is recorded as missing (a metrics.jsonl line with `accepted: false` and the reason)
and the round carries on with the updates it has, as long as there are at least `min_replies` of
them; below that the run stops with `FederationError` (the last checkpoint stays, complete).

Hostile nodes (DESIGN 6): a node whose identity is unusable (a client id outside the experiment's,
a budget that is not a number in (0, 1], a malformed reply) is not served; the round carries on and
its record's `dropped` says why (with the node id), once. A train reply is checked against what its
client was sent (`aggregate_round` with the round's `Assignment`s and senders): it must name the
client it was sent to, at its K_c (and rank), with no more examples than the client has, once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ubsmoe.config import ExperimentConfig
from ubsmoe.fl.experiment import INITIAL_EVAL_FILE, initial_global_state
from ubsmoe.fl.payload import GlobalState, load_global_state, phi_range
from ubsmoe.fl.rounds import Federation, RoundPlan
from ubsmoe.fl.seeds import derive_seed
from ubsmoe.fl.server import sample_clients
from ubsmoe.fl.simulation import open_run, resolve_run, run_fingerprint, save_round
from ubsmoe.fl.tiers import TierEvaluator, evaluation_due
from ubsmoe.flower.client_app import IDENTITY, METRICS, RUN, UPDATE, UPDATE_META, start_state_content
from ubsmoe.flower.records import records_to_update, state_to_records
from ubsmoe.flower.runtime import CONFIG_KEY, Runtime, budget_settings, check_budget, config_to_json
from ubsmoe.paths import write_text_atomic

__all__ = ["FederationError", "UBSMoEStrategy", "parse_identity"]


class FederationError(RuntimeError):
    """The federation cannot go on (too few replies in a round, inconsistent nodes)."""


def parse_identity(identity: Mapping[str, Any], num_clients: int) -> tuple[int, float]:
    """(client id, budget) of a node's identity reply, or ValueError saying why it is unusable.

    The client id must be an integer in [0, num_clients) (an integral float or text is read as one);
    the budget beta a finite number in (0, 1].
    """
    if "client-id" not in identity or "budget" not in identity:
        raise ValueError("the identity lacks client-id or budget")
    raw_client, raw_budget = identity["client-id"], identity["budget"]
    try:
        number = float(raw_client) if not isinstance(raw_client, int) else raw_client
        client = int(number)
        if isinstance(raw_client, bool) or client != number:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"client-id = {raw_client!r} is not an integer") from None
    if not 0 <= client < num_clients:
        raise ValueError(f"client-id = {client} is not one of the experiment's clients 0..{num_clients - 1}")
    try:
        budget = float(raw_budget) if isinstance(raw_budget, str) else raw_budget  # node-config text
    except ValueError:
        raise ValueError(f"budget (beta) = {raw_budget!r} is not a number") from None
    return client, check_budget(budget)  # the launcher's and the ClientApp's rule


@dataclasses.dataclass
class _Node:
    node_id: int
    client: int
    budget: float
    top_k: int
    rank: int


@dataclasses.dataclass
class _Round:
    """A round in flight: the engine's plan and what the transport saw of it."""

    plan: RoundPlan
    rejected: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # nodes / replies not served
    sent: dict[int, Message] = dataclasses.field(default_factory=dict)  # client -> its train message
    updates: dict[int, Any] = dataclasses.field(default_factory=dict)
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    client_eval: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def index(self) -> int:
        return self.plan.index

    @property
    def missing(self) -> dict[int, str]:
        return self.plan.missing


class UBSMoEStrategy(Strategy):
    """The ServerApp's strategy; see the module docstring. `records` holds the per-round records."""

    def __init__(
        self,
        runtime: Runtime,
        evaluator: TierEvaluator,
        out_dir: str | Path,
        *,
        min_replies: int = 1,
        round_timeout: float = 600.0,
        fraction_evaluate: float = 0.0,
        keep_checkpoints: int | None = None,
        resume: bool = False,
    ):
        config: ExperimentConfig = runtime.config
        if min_replies < 1:
            raise ValueError(f"min-replies = {min_replies}: must be >= 1")
        if not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate = {fraction_evaluate}: must be in [0, 1]")
        self.runtime, self.config, self.evaluator = runtime, config, evaluator
        self.out = Path(out_dir)
        self.min_replies, self.round_timeout, self.fraction_evaluate = min_replies, round_timeout, fraction_evaluate
        self.keep_checkpoints = keep_checkpoints
        self.method = runtime.method
        self.client_settings, self.run = resolve_run(config)
        self.max_norm = config.federation.max_update_norm
        model = runtime.loaded.model
        self.client_ids = list(range(config.num_clients))
        self.configured_top_ks = config.client_top_ks(runtime.loaded.k_max)
        self.configured_ranks = config.client_ranks()
        self.fingerprint = run_fingerprint(
            runtime.data.client_encoded,
            self.configured_top_ks,
            self.client_settings,
            self.run,
            self.max_norm,
            runtime.pad_id,
            self.method,
            self.configured_ranks,
        )
        self.config_json = config_to_json(config)
        self.nodes: dict[int, _Node] = {}  # client id -> node
        self.refused: dict[int, str] = {}  # node id -> why its identity was refused (not asked again)
        self._refusals: list[dict[str, Any]] = []  # refusals not yet recorded in a round
        # a resumed run continues from the newest checkpoint, written by this app or by `ubsmoe run`
        state, self.records = open_run(
            self.out, self.fingerprint, resume, model, runtime.merger, lambda: initial_global_state(model, config)
        )
        self.resumed_from: int | None = self.records.resumed_from
        self.federation = Federation(
            self.method,
            self.run,
            self.client_settings,
            [len(d) for d in runtime.data.client_encoded],
            self.configured_top_ks,
            self.configured_ranks,
            self.max_norm,
            phi_range(model),
            runtime.merger,
            state,
        )
        self.initial_eval: dict[str, Any] | None = None
        self.current: _Round | None = None

    @property
    def state(self) -> GlobalState:
        """The current global state (the engine's)."""
        return self.federation.state

    @property
    def rounds_left(self) -> int:
        """Rounds still to run: Flower numbers them from 1 whatever round the run resumed at."""
        return self.config.federation.rounds - self.state.round

    def _index(self, server_round: int) -> int:
        """The run's 0-based round index of Flower's `server_round` (1-based, restarting at 1 on resume)."""
        return server_round - 1 + (self.resumed_from or 0)

    # ---- helpers -----------------------------------------------------------------------------------
    def _run_record(self, **extra: Any) -> dict[str, Any]:
        return {
            CONFIG_KEY: self.config_json,
            "seed": int(self.run["seed"]),
            "batch-size": int(self.run["batch_size"]),
            **extra,
        }

    def _discover(self, grid: Grid) -> None:
        """Learn the client id and budget of every SuperNode not met yet; forget the ones gone."""
        node_ids = set(grid.get_node_ids())
        self.nodes = {c: n for c, n in self.nodes.items() if n.node_id in node_ids}
        self.refused = {n: r for n, r in self.refused.items() if n in node_ids}
        known = {n.node_id for n in self.nodes.values()} | set(self.refused)
        new = sorted(node_ids - known)
        if not new:
            return
        messages = {
            node: Message(
                RecordDict({RUN: ConfigRecord(self._run_record())}), dst_node_id=node, message_type=MessageType.QUERY
            )
            for node in new
        }
        replies = grid.send_and_receive(list(messages.values()), timeout=self.round_timeout)
        node_of_message = {m.metadata.message_id: node for node, m in messages.items()}
        for reply in replies:
            node_id = node_of_message.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                log(WARNING, "node %s could not say who it is: %s", node_id, reply.error.reason)
                continue
            try:  # an unusable identity (unknown client id, NaN budget, ...) refuses the node, not the run
                identity = reply.content.config_records[IDENTITY]
                client, budget = parse_identity(identity, len(self.client_ids))
                top_k, rank = budget_settings(self.config, budget, self.runtime.loaded.k_max)
            except Exception as error:
                reason = f"node {node_id} not served: its identity is unusable ({error})"
                log(WARNING, "%s", reason)
                self.refused[node_id] = reason
                self._refusals.append({"client_id": None, "node_id": node_id, "reason": reason})
                continue
            if client in self.nodes and self.nodes[client].node_id != node_id:
                raise FederationError(
                    f"nodes {self.nodes[client].node_id} and {node_id} both say they are client {client}; "
                    "give every SuperNode its own client-id"
                )
            configured = self.config.client_budgets()[client]
            if abs(budget - configured) > 1e-12:
                log(
                    WARNING, "client %s declares beta=%s; the experiment config gives it %s", client, budget, configured
                )
            self.nodes[client] = _Node(node_id, client, budget, top_k, rank)
        log(INFO, "nodes: %s", {c: (n.node_id, n.budget) for c, n in sorted(self.nodes.items())})

    # ---- training ----------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        index = self._index(server_round)
        self._discover(grid)
        plan = self.federation.plan(
            index,
            top_ks={c: n.top_k for c, n in self.nodes.items()},
            ranks={c: n.rank for c, n in self.nodes.items()},
            reachable=lambda c: None if c in self.nodes else "no connected SuperNode has this client id",
        )
        current = _Round(plan, rejected=self._refusals)
        self._refusals = []
        for client in plan.reachable:
            work = plan.clients[client]
            current.sent[client] = self._message(self.nodes[client], work.start, MessageType.TRAIN, index, work.rank)
        self.current = current
        sent_to = {c: m.metadata.dst_node_id for c, m in current.sent.items()}
        log(INFO, "round %s: clients %s, sent to %s", index, plan.participants, sent_to)
        return list(current.sent.values())

    def _message(self, node: _Node, state: GlobalState, kind: str, index: int, rank: int | None = None) -> Message:
        """A train or evaluate message: `state`'s adapters and phi, the method state every client is sent
        (`Method.sent_state`: FLoRA/FLoRIST's merges so far; A3SMoE's local tensors stay on the client, in
        its context.state), and the run settings."""
        state.method_state = self.method.sent_state(self.state)
        run = self._run_record(**{"client-id": node.client, "top-k": node.top_k})
        if rank is not None:
            run["rank"] = int(rank)
        content = start_state_content(run, state)
        return Message(content, dst_node_id=node.node_id, message_type=kind, group_id=str(index))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        current = self.current
        assert current is not None and current.index == self._index(server_round)
        # the grid stamps each sent message with its id; a reply names it, also an error reply that the
        # SuperLink writes itself for a node gone offline (whose source is the SuperLink, not the node)
        client_of_message = {m.metadata.message_id: c for c, m in current.sent.items() if m.metadata.message_id}
        client_of_node = {m.metadata.dst_node_id: c for c, m in current.sent.items()}
        for reply in replies:
            client = client_of_message.get(reply.metadata.reply_to_message_id)
            if client is None:
                client = client_of_node.get(reply.metadata.src_node_id)
            if client is None:  # answers no train message of this round: not from a client it assigned
                current.rejected.append(
                    {
                        "client_id": None,
                        "node_id": reply.metadata.src_node_id,
                        "reason": f"a reply from node {reply.metadata.src_node_id} that answers no train message of "
                        "this round: dropped",
                    }
                )
                continue
            if client in current.updates or client in current.missing:
                current.rejected.append(
                    {
                        "client_id": client,
                        "node_id": reply.metadata.src_node_id,
                        "reason": f"duplicate: a second reply for client {client}; only the first counts",
                    }
                )
                continue
            if reply.has_error():
                current.missing[client] = f"the client failed: {reply.error.reason}"
                continue
            try:
                content = reply.content
                current.updates[client] = records_to_update(
                    content.array_records[UPDATE], content.config_records[UPDATE_META], content.metric_records[METRICS]
                )
            except Exception as error:  # a malformed reply is dropped, with its reason
                current.missing[client] = f"malformed reply ({type(error).__name__}: {error})"
        for client in current.sent:
            if client not in current.updates and client not in current.missing:
                current.missing[client] = f"no reply within the round timeout ({self.round_timeout:g} s)"
        if current.missing:
            log(WARNING, "round %s: missing clients %s", current.index, current.missing)
        if len(current.updates) < self.min_replies:
            raise FederationError(
                f"round {current.index}: {len(current.updates)} client update(s) arrived, fewer than min-replies "
                f"= {self.min_replies} (missing: {current.missing}); the run stops at the checkpoint of round "
                f"{current.index}"
            )
        current.report = self.federation.fold(current.plan, current.updates)
        load_global_state(self.runtime.loaded.model, self.state)
        arrays, _ = state_to_records(self.state)
        metrics = MetricRecord(
            {k: v for k, v in current.report.get("metrics", {}).items() if isinstance(v, int | float)}
        )
        return arrays, metrics

    # ---- federated evaluation (optional) -----------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate <= 0:
            return []
        index = self._index(server_round)
        clients = sample_clients(sorted(self.nodes), self.fraction_evaluate, index, f"{self.run['seed']}:eval")
        messages = []
        for client in clients:
            node = self.nodes[client]
            rank = self.method.client_rank(self.state, client, node.rank)
            view = self.method.tier_view(self.state, rank, [client])
            messages.append(self._message(node, view, MessageType.EVALUATE, index))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        losses, weights = [], []
        for reply in replies:
            if reply.has_error():
                continue
            try:  # a malformed or non-finite evaluation is left out, not trusted
                metrics = reply.content.metric_records[METRICS]
                loss, tokens = float(metrics["eval_loss"]), float(metrics["eval_tokens"])
            except Exception as error:
                log(WARNING, "an evaluate reply is malformed (%s): left out", error)
                continue
            if not (math.isfinite(loss) and math.isfinite(tokens) and tokens >= 0):
                log(WARNING, "an evaluate reply has eval_loss=%s, eval_tokens=%s: left out", loss, tokens)
                continue
            losses.append(loss)
            weights.append(tokens)
        if not losses or sum(weights) == 0:
            return None
        mean = sum(l * w for l, w in zip(losses, weights, strict=True)) / sum(weights)
        if self.current is not None:
            self.current.client_eval = {"eval_loss": mean, "clients": len(losses)}
        return MetricRecord({"eval_loss": mean})

    # ---- central evaluation, records and checkpoint (the `evaluate_fn` of `Strategy.start`) -------------
    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        model = self.runtime.loaded.model
        if server_round == 0:
            if not self.config.evaluation.initial:
                return None
            if self.resumed_from is not None:  # evaluated when the run started; kept in its folder
                path = self.out / INITIAL_EVAL_FILE
                self.initial_eval = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
                return None
            torch.manual_seed(self.config.seed)
            self.initial_eval = self.evaluator(model, None, initial_global_state(model, self.config))
            write_text_atomic(self.out / INITIAL_EVAL_FILE, json.dumps(self.initial_eval, indent=2) + "\n")
            load_global_state(model, self.state)
            return MetricRecord({"mean_accuracy": float(self.initial_eval["mean_accuracy"])})
        current = self.current
        assert current is not None and current.index == self._index(server_round)
        eval_metrics: Mapping[str, Any] = {}
        eval_time = 0.0
        if evaluation_due(self.config, current.index):
            torch.manual_seed(derive_seed(self.run["seed"], current.index, "eval"))
            started = time.perf_counter()
            eval_metrics = self.evaluator(model, current.index, self.state) or {}
            eval_time = time.perf_counter() - started
            load_global_state(model, self.state)
        self._finish_round(current, eval_metrics, eval_time)
        if eval_metrics:
            return MetricRecord({"mean_accuracy": float(eval_metrics["mean_accuracy"])})
        return None

    def _finish_round(self, current: _Round, eval_metrics: Mapping[str, Any], eval_time: float) -> None:
        report = current.report
        if current.rejected:  # nodes and replies refused this round go with the round's dropped updates
            report = {**report, "dropped": [*report.get("dropped", []), *current.rejected]}
        lines, record = self.federation.outputs(
            current.plan,
            current.updates,
            report,
            eval_metrics,
            eval_time,
            extra={"client_eval": current.client_eval} if current.client_eval else None,
        )
        self.records.append(record)
        save_round(self.out, self.state, self.records, lines, self.fingerprint, self.keep_checkpoints, runtime="flower")

    def summary(self) -> None:
        log(
            INFO,
            "UBSMoEStrategy: method %s, %s clients, fraction %s, min-replies %s, round timeout %s s",
            self.config.method,
            len(self.client_ids),
            self.run["fraction"],
            self.min_replies,
            self.round_timeout,
        )
