"""The ClientApp: one federated client of the experiment on a SuperNode (simulated or deployed).

Message handlers (the ServerApp of `ubsmoe.flower.server_app` sends these):

- `query`: answers the node's client id and budget (`ubsmoe.flower.runtime.node_identity`: node-config
  `client-id` / `partition-id`, and `beta` when set);
- `train`: the client's plan carried out by `ubsmoe.fl.rounds.local_round`, the function the in-process
  simulation calls (same batches, same torch seed), from the start state the server sent (already
  truncated / freshly drawn for the method by `Method.client_start`); replies with the `ClientUpdate`
  as records (`ubsmoe.flower.records`);
- `evaluate`: the mean LM loss of the global model (the client's view of it) on the client's examples
  at its K_c.

A3SMoE's client-local output scales live in `context.state` (record `LOCAL_RECORD`): a client starts
from them and stores its new ones there; the server never sends them down. They also go up inside the
`ClientUpdate` (its `local_state`, as the core defines it), because the server's per-tier evaluation
uses them (`Method.tier_view`).

The model and data are loaded once per process and run (cached), not per message.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ubsmoe.fl.payload import GlobalState, load_global_state, local_parameters
from ubsmoe.fl.rounds import client_batches, local_round
from ubsmoe.flower.records import (
    array_to_tensor,
    records_to_state,
    state_to_records,
    tensor_to_array,
    update_to_records,
)
from ubsmoe.flower.runtime import CONFIG_KEY, Runtime, config_from_json, load_runtime, node_identity
from ubsmoe.models.answer_loss import answer_loss
from ubsmoe.moe import set_top_k

__all__ = ["LOCAL_RECORD", "app", "client_evaluate", "client_train", "identity_reply"]

LOCAL_RECORD = "ubsmoe.local"
RUN = "ubsmoe.run"
STATE = "ubsmoe.state"
STATE_META = "ubsmoe.state-meta"
UPDATE = "ubsmoe.update"
UPDATE_META = "ubsmoe.update-meta"
METRICS = "ubsmoe.metrics"
IDENTITY = "ubsmoe.identity"

_CACHE: dict[tuple[Any, str], Runtime] = {}


def _runtime(run: ConfigRecord, context: Context) -> Runtime:
    """This process's loaded experiment for the message's config and run (loaded on first use)."""
    text = str(run[CONFIG_KEY])
    config = config_from_json(text)
    import hashlib

    key = (context.run_id, hashlib.sha256(text.encode("utf-8")).hexdigest())
    if key not in _CACHE:
        _CACHE.clear()  # one experiment per process at a time: a new run gets a fresh model
        _CACHE[key] = load_runtime(config)
    return _CACHE[key]


def _identity(run: ConfigRecord, context: Context) -> tuple[int, float]:
    return node_identity(dict(context.node_config), config_from_json(str(run[CONFIG_KEY])))


def identity_reply(run: ConfigRecord, context: Context) -> RecordDict:
    client, budget = _identity(run, context)
    return RecordDict({IDENTITY: ConfigRecord({"client-id": client, "budget": budget})})


def _local_state(context: Context) -> dict[str, torch.Tensor]:
    record = context.state.array_records.get(LOCAL_RECORD)
    return {k: array_to_tensor(v) for k, v in record.items()} if record is not None else {}


def client_train(content: RecordDict, context: Context) -> RecordDict:
    """The train handler's work: one local round; returns the reply's content."""
    run = content.config_records[RUN]
    rt = _runtime(run, context)
    client, _ = _identity(run, context)
    if int(run["client-id"]) != client:
        raise ValueError(f"the server addressed client {int(run['client-id'])}, but this node is client {client}")
    sent = records_to_state(content.array_records[STATE], content.config_records[STATE_META])
    if rt.merger is not None:
        rt.merger.apply(sent)  # FLoRA/FLoRIST: the base holds every merge so far
    start = GlobalState(adapters=sent.adapters, phi=sent.phi, round=sent.round, method_state=_local_state(context))
    rank = int(run["rank"]) if "rank" in run else None
    update = local_round(
        rt.loaded.model,
        start,
        client,
        int(run["top-k"]),
        rank,
        rt.data.client_encoded[client],
        rt.settings,
        rt.method,
        int(run["seed"]),
        int(run["batch-size"]),
        rt.pad_id,
    )
    if update.local_state:
        context.state[LOCAL_RECORD] = ArrayRecord({k: tensor_to_array(v) for k, v in update.local_state.items()})
    arrays, meta, metrics = update_to_records(update)
    return RecordDict({UPDATE: arrays, UPDATE_META: meta, METRICS: metrics})


@torch.no_grad()
def client_evaluate(content: RecordDict, context: Context) -> RecordDict:
    """The evaluate handler's work: mean LM loss (per answer token) of the sent model on this client's examples."""
    run = content.config_records[RUN]
    rt = _runtime(run, context)
    client, _ = _identity(run, context)
    sent = records_to_state(content.array_records[STATE], content.config_records[STATE_META])
    if rt.merger is not None:
        rt.merger.apply(sent)
    model = rt.loaded.model
    load_global_state(model, sent)
    local = _local_state(context)
    for key, parameter in local_parameters(model).items():
        parameter.copy_(local.get(key, torch.ones_like(parameter)))
    set_top_k(model, int(run["top-k"]))
    examples = rt.data.client_encoded[client]
    batches = client_batches(examples, int(run["batch-size"]), int(run["seed"]), sent.round, client, rt.pad_id)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in batches:
            result = answer_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"))
            if result.tokens:
                total += float(result.loss) * result.tokens
                tokens += result.tokens
    finally:
        model.train(was_training)
    mean = total / tokens if tokens else float("nan")
    metrics = MetricRecord({"eval_loss": mean, "num-examples": len(examples), "eval_tokens": tokens})
    if math.isfinite(mean):
        metrics["eval_perplexity"] = math.exp(min(mean, 50.0))
    return RecordDict({METRICS: metrics})


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(identity_reply(msg.content.config_records[RUN], context), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(client_train(msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(client_evaluate(msg.content, context), reply_to=msg)


def start_state_content(run: dict[str, Any], state: GlobalState) -> RecordDict:
    """The content of a train / evaluate message: run settings, and the state the client starts from."""
    arrays, meta = state_to_records(state)
    return RecordDict({RUN: ConfigRecord(run), STATE: arrays, STATE_META: meta})
