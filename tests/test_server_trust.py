"""The server trusts nothing a client claims that it can check (DESIGN 6, issue 16 "hostile clients").

phi finite and within [phi_min, phi_max] (clipped, or the update dropped when far out), num_examples
no more than the tokens routed nor the examples the client can have trained on, K_c (and rank) as
assigned, one update per client per round, known senders; in `aggregate_round`, in the in-process
simulation and in the Flower strategy (a fake grid, no Ray), each drop with its reason in the round's
record.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

pytest.importorskip("transformers")

from test_fl_core import NUM_EXPERTS, NUM_LAYERS, good_updates, synthetic_state, synthetic_update  # noqa: E402

import ubsmoe.fl.rounds as rounds  # noqa: E402
import ubsmoe.fl.simulation as simulation  # noqa: E402
from ubsmoe.fl.payload import GlobalState, global_state_from_model, phi_range  # noqa: E402
from ubsmoe.fl.server import Assignment, aggregate_round, screen_updates, validate_update  # noqa: E402
from ubsmoe.methods.hetlora import HetLoRA  # noqa: E402

ASSIGNED = {"c0": Assignment(top_k=1), "c1": Assignment(top_k=2), "c2": Assignment(top_k=4)}
"""What good_updates' clients were assigned (their K_c)."""


def _same_state(a: GlobalState, b: GlobalState) -> bool:
    return a.adapters.keys() == b.adapters.keys() and all(torch.equal(a.adapters[k], b.adapters[k]) for k in a.adapters)


def _signed(value: float) -> torch.Tensor:
    """A (L, M) phi of +value on even experts and -value on odd ones."""
    sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(NUM_EXPERTS)])
    return (sign * value).expand(NUM_LAYERS, NUM_EXPERTS).clone()


# ---- phi -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [1e30, -1e30, 1e6, 3.5])
def test_validate_update_refuses_a_phi_far_out_of_its_range(value):
    state = synthetic_state()
    update = good_updates(state)[1]
    update.phi = update.phi.clone()
    update.phi[1, 3] = value
    reason = validate_update(update, state)
    assert reason is not None and "outside its range [-1, 1]" in reason
    assert validate_update(update, state, phi_range=(-10.0, 10.0)) is None or abs(value) > 30
    assert validate_update(update, state, phi_range=None) is None  # no range check (the server keeps phi)


def test_a_narrower_range_is_the_one_checked():
    state = synthetic_state()
    update = good_updates(state)[0]
    update.phi = _signed(0.4)
    assert validate_update(update, state, phi_range=(-0.5, 0.5)) is None
    update.phi = _signed(1.6)  # 1.1 outside, more than the width 1
    assert "outside its range [-0.5, 0.5]" in validate_update(update, state, phi_range=(-0.5, 0.5))


def test_a_hostile_phi_never_moves_the_global_phi_out_of_range_over_rounds():
    state = synthetic_state()
    for _ in range(3):
        updates = good_updates(state)
        updates[1].phi = _signed(1e6)
        state, report = aggregate_round(state, updates)
        assert report["accepted"] == ["c0", "c2"]
        assert "outside its range" in report["dropped"][0]["reason"]
        assert float(state.phi.abs().max()) <= 1.0


def test_a_phi_somewhat_out_of_range_is_clipped_and_said():
    state = synthetic_state()
    updates = good_updates(state)
    updates[1].phi = _signed(2.5)
    new, report = aggregate_round(state, updates, zeta=1.0)  # zeta 1: the new phi is the clients' mean
    assert report["accepted"] == ["c0", "c1", "c2"] and report["dropped"] == []
    assert [c["client_id"] for c in report["clipped"]] == ["c1"]
    assert re.search(
        r"phi clipped to \[-1, 1\]: 16 value\(s\) outside, the furthest by 1\.5", report["clipped"][0]["reason"]
    )
    clean = good_updates(state)
    clean[1].phi = _signed(1.0)
    expected, clean_report = aggregate_round(state, clean, zeta=1.0)
    assert torch.equal(new.phi, expected.phi) and clean_report["clipped"] == []
    assert float(new.phi.abs().max()) <= 1.0


def test_the_global_phi_stays_in_a_narrow_range():
    state = synthetic_state()
    updates = good_updates(state)
    for update in updates:  # every client routes every token to expert 0: the others' DMR target is +1
        update.phi = _signed(0.5)
        update.counts = torch.zeros_like(update.counts)
        update.counts[:, 0] = update.top_k * update.tokens
    new, _ = aggregate_round(state, updates, phi_range=(-0.5, 0.5))  # unclipped: 0.9 * 0.5 + 0.1 * 1 = 0.55
    assert float(new.phi.min()) >= -0.5 and float(new.phi.max()) == 0.5
    wide, _ = aggregate_round(state, updates)
    assert float(wide.phi.max()) == pytest.approx(0.55)


def test_with_dmr_off_the_clients_phi_is_neither_checked_nor_used():
    state = synthetic_state()
    updates = good_updates(state)
    updates[1].phi = _signed(1e6)
    new, report = aggregate_round(state, updates, dmr=False)
    assert report["accepted"] == ["c0", "c1", "c2"] and torch.equal(new.phi, state.phi)


# ---- FedAvg weights ----------------------------------------------------------------------------------
def test_num_examples_cannot_exceed_the_tokens_routed():
    state = synthetic_state()
    updates = good_updates(state)
    updates[1].num_examples = 10**12
    reason = validate_update(updates[1], state)
    assert reason is not None and re.search(r"num_examples = 1000000000000 exceeds the \d+ token\(s\)", reason)
    new, report = aggregate_round(state, updates)
    assert report["accepted"] == ["c0", "c2"] and report["weights"] == pytest.approx([10 / 70, 60 / 70])
    expected, _ = aggregate_round(state, [updates[0], updates[2]])
    assert _same_state(new, expected)


def test_num_examples_cannot_exceed_what_the_client_was_assigned():
    state = synthetic_state()
    updates = good_updates(state)  # num_examples 10, 30, 60
    assignments = {**ASSIGNED, "c1": Assignment(top_k=2, max_examples=20)}
    _, report = aggregate_round(state, updates, assignments=assignments)
    assert report["accepted"] == ["c0", "c2"]
    assert (
        "num_examples = 30 exceeds the 20 example(s) this client can have trained on" in report["dropped"][0]["reason"]
    )
    assert validate_update(updates[1], state, assignment=Assignment(top_k=2, max_examples=30)) is None


def test_a_client_must_report_the_k_it_was_assigned():
    state = synthetic_state()
    updates = good_updates(state)
    lying = synthetic_update(state, "c0", 10, 4, 0)  # assigned K = 1, reports K = 4 (counts consistent with 4)
    assert validate_update(lying, state) is None  # by itself it looks fine
    _, report = aggregate_round(state, [lying, updates[1], updates[2]], assignments=ASSIGNED)
    assert report["accepted"] == ["c1", "c2"]
    assert report["dropped"] == [
        {"client_id": "c0", "reason": "top_k = 4, but the server assigned this client K_c = 1"}
    ]


def test_a_rank_method_client_must_report_the_rank_it_was_assigned():
    g = torch.Generator().manual_seed(0)
    adapters = {"m.lora_A.w": torch.randn(4, 3, generator=g), "m.lora_B.w": torch.randn(5, 4, generator=g)}
    state = GlobalState(adapters=adapters, phi=torch.zeros(NUM_LAYERS, NUM_EXPERTS))
    update = synthetic_update(state, 0, 10, 1, 0)
    update.rank = 3
    method = HetLoRA()
    assert validate_update(update, state, method=method, assignment=Assignment(top_k=1, rank=3)) is None
    reason = validate_update(update, state, method=method, assignment=Assignment(top_k=1, rank=2))
    assert reason == "rank = 3, but the server assigned this client rank 2"


# ---- senders -----------------------------------------------------------------------------------------
def test_the_same_update_twice_counts_once():
    state = synthetic_state()
    updates = good_updates(state)
    new, report = aggregate_round(state, [updates[0], updates[1], updates[1], updates[2]])
    assert report["accepted"] == ["c0", "c1", "c2"] and report["weights"] == pytest.approx([0.1, 0.3, 0.6])
    assert len(report["dropped"]) == 1 and report["dropped"][0]["client_id"] == "c1"
    assert report["dropped"][0]["reason"].startswith("duplicate: client 'c1' already sent an update this round")
    expected, _ = aggregate_round(state, updates)
    assert _same_state(new, expected) and torch.equal(new.phi, expected.phi)


def test_an_unknown_sender_is_dropped():
    state = synthetic_state()
    updates = good_updates(state)
    stranger = synthetic_update(state, "mallory", 10, 1, 7)
    _, report = aggregate_round(state, [*updates, stranger], assignments=ASSIGNED)
    assert report["accepted"] == ["c0", "c1", "c2"]
    assert report["dropped"] == [
        {"client_id": "mallory", "reason": "unknown sender: client 'mallory' was not assigned work this round"}
    ]


def test_an_update_must_name_the_client_it_came_from():
    state = synthetic_state()
    updates = good_updates(state)
    updates[2].client_id = "c0"  # client c2 passes itself off as c0
    verdicts = screen_updates(state, updates, assignments=ASSIGNED, senders=["c0", "c1", "c2"])
    assert verdicts == [None, None, "the update names client 'c0', but it came from client 'c2'"]
    _, report = aggregate_round(state, updates, assignments=ASSIGNED, senders=["c0", "c1", "c2"])
    assert report["accepted"] == ["c0", "c1"] and report["dropped"][0]["client_id"] == "c2"
    assert report["verdicts"] == verdicts


def test_honest_clients_aggregate_exactly_as_before():
    state = synthetic_state()
    updates = good_updates(state)
    assignments = {u.client_id: Assignment(top_k=u.top_k, max_examples=u.num_examples, rank=None) for u in updates}
    plain, plain_report = aggregate_round(state, updates)
    checked, report = aggregate_round(state, updates, assignments=assignments, senders=["c0", "c1", "c2"])
    assert _same_state(plain, checked) and torch.equal(plain.phi, checked.phi)
    assert report["accepted"] == plain_report["accepted"] and report["dropped"] == [] and report["clipped"] == []
    assert report["verdicts"] == [None, None, None]


# ---- the in-process simulation ------------------------------------------------------------------------
def test_the_simulation_drops_hostile_updates_with_their_reasons(tmp_path, monkeypatch):
    from test_simulation import DATA, SETTINGS, TOP_KS, build_model, metrics_lines

    real = rounds.client_update

    def hostile(model, state, batches, top_k, settings, client_id, **kwargs):
        update = real(model, state, batches, top_k, settings, client_id, **kwargs)
        if state.round == 0:
            if client_id == 1:
                update.phi = _signed(1e6)
            elif client_id == 2:  # assigned K = 2, says 4 (and doubles its counts to match)
                update.top_k, update.counts = 4, update.counts * 2
            elif client_id == 3:  # as many examples as tokens, more than its 6
                update.num_examples = int(update.tokens.min())
        else:
            if client_id == 1:
                update.client_id = 0
            elif client_id == 2:
                update.num_examples = 10**12
            elif client_id == 3:
                update.phi = _signed(2.0)
        return update

    monkeypatch.setattr(rounds, "client_update", hostile)
    model = build_model()
    records = simulation.run_simulation(
        model, DATA, TOP_KS, SETTINGS, tmp_path, run={"rounds": 2, "fraction": 1.0, "seed": 7, "batch_size": 4}
    )
    expected = {
        0: {
            1: "phi lies 1e\\+06 outside its range \\[-1, 1\\]",
            2: "top_k = 4, but the server assigned this client K_c = 2",
            3: "num_examples = \\d+ exceeds the 6 example\\(s\\) this client can have trained on",
        },
        1: {1: "the update names client 0, but it came from client 1", 2: "exceeds the \\d+ token\\(s\\)"},
    }
    lines = metrics_lines(tmp_path)
    for record in records:
        drops = expected[record["round"]]
        assert record["accepted"] == [c for c in range(4) if c not in drops]
        assert [d["client_id"] for d in record["dropped"]] == sorted(drops)
        for drop in record["dropped"]:
            assert re.search(drops[drop["client_id"]], drop["reason"]), drop["reason"]
        for line in (x for x in lines if x["round"] == record["round"]):
            reason = next((d["reason"] for d in record["dropped"] if d["client_id"] == line["client_id"]), None)
            assert line["drop_reason"] == reason and line["accepted"] is (reason is None)
    assert "clipped" not in records[0]
    assert records[1]["clipped"] == [
        {"client_id": 3, "reason": "phi clipped to [-1, 1]: 16 value(s) outside, the furthest by 1"}
    ]
    low, high = phi_range(model)
    final = global_state_from_model(model)
    assert (low, high) == (-1.0, 1.0) and float(final.phi.min()) >= low and float(final.phi.max()) <= high


# ---- the Flower strategy ------------------------------------------------------------------------------
flwr = pytest.importorskip("flwr")


class FakeGrid:
    """Delivers each message to its node's handler at once and returns the handlers' replies."""

    def __init__(self, handlers):
        self.handlers, self.count = handlers, 0

    def get_node_ids(self):
        return list(self.handlers)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            self.count += 1
            message.metadata.__dict__["_message_id"] = f"message-{self.count}"  # as flwr's grids stamp it
            replies.append(self.handlers[message.metadata.dst_node_id](message))
        return replies


def test_the_flower_strategy_refuses_hostile_nodes_and_replies(tmp_path, monkeypatch):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from test_run import QUICK, write_experiment

    from ubsmoe.config import load_config
    from ubsmoe.flower import client_app as flower_client
    from ubsmoe.flower.runtime import load_runtime
    from ubsmoe.flower.strategy import UBSMoEStrategy

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):  # as inside a ServerApp
        monkeypatch.setattr(TaskIdentity, name, value)
    setup = write_experiment(tmp_path / "setup")
    config = load_config(setup["config"], [*QUICK, "federation.fraction=1.0"])
    (tmp_path / "run").mkdir()
    strategy = UBSMoEStrategy(load_runtime(config), lambda *args: {}, tmp_path / "run")

    def node(client_id, budget, partition=None, claim=None):
        def handle(message):
            if message.metadata.message_type == MessageType.QUERY:
                identity = ConfigRecord({"client-id": client_id, "budget": budget})
                return Message(RecordDict({flower_client.IDENTITY: identity}), reply_to=message)
            context = Context(1, message.metadata.dst_node_id, {"partition-id": partition}, RecordDict(), {})
            content = flower_client.client_train(message.content, context)
            if claim is not None:  # the reply passes itself off as another client's
                content.config_records[flower_client.UPDATE_META]["client-id"] = str(claim)
            return Message(content, reply_to=message)

        return handle

    grid = FakeGrid(
        {
            101: node(0, 0.5, partition=0),
            102: node(1, 0.5, partition=1, claim=0),
            103: node(99, 0.5),  # a client id the experiment does not have
            104: node(2, float("nan")),  # a budget that is not a number
        }
    )
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [101, 102]
    replies = grid.send_and_receive(messages)
    strategy.aggregate_train(1, [*replies, replies[0]])  # client 0's reply comes twice
    strategy._finish_round(strategy.current, {}, 0.0)
    (record,) = strategy.records
    assert record["accepted"] == [0]
    dropped = {(d["client_id"], d.get("node_id")): d["reason"] for d in record["dropped"]}
    assert dropped[(1, None)] == "the update names client 0, but it came from client 1"
    assert "client-id = 99 is not one of the experiment's clients 0..3" in dropped[(None, 103)]
    assert "budget (beta) = nan: must be a number in (0, 1]" in dropped[(None, 104)]
    assert dropped[(0, 101)] == "duplicate: a second reply for client 0; only the first counts"
    assert {m["client_id"] for m in record["missing"]} == {2, 3}
    lines = {line["client_id"]: line for line in record["client_metrics"]}
    assert lines[0]["accepted"] and lines[1]["drop_reason"] == dropped[(1, None)]
    assert all(math.isfinite(v) for v in strategy.state.phi.flatten().tolist())

    # the refused nodes are not asked again; the next round goes on
    messages = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [101, 102] and strategy.current.rejected == []
