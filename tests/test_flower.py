"""The Flower app (ubsmoe.flower): records round-trip exactly, and a Flower simulation (Ray, 4 SuperNodes)
of a tiny experiment computes the same rounds as `ubsmoe run` (`run_experiment`) with the same seed.

Tolerance: the Flower clients run the same functions with the same seeds on the same CPU, so the final
adapters, phi and every metrics.jsonl number except wall-clock times are expected to be equal; the
comparison allows 1e-6 (absolute on tensors; relative, or absolute below 1, on floats) for a float
summation order that can differ between the two runs (seen here: an answer perplexity of 125.149420
against 125.149419). A client that fails does not stop the run (its line says why), and fewer
updates than min-replies stop it with a clear message.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("transformers")

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_run import QUICK, _without_timing, write_experiment  # noqa: E402

from ubsmoe.config import load_config  # noqa: E402
from ubsmoe.fl.experiment import run_experiment  # noqa: E402
from ubsmoe.fl.payload import ClientUpdate, GlobalState  # noqa: E402
from ubsmoe.flower import client_app as flower_client  # noqa: E402
from ubsmoe.flower.records import (  # noqa: E402
    RAW_STYPE,
    records_to_state,
    records_to_update,
    state_to_records,
    update_to_records,
)
from ubsmoe.flower.server_app import make_server_app  # noqa: E402
from ubsmoe.flower.strategy import FederationError  # noqa: E402

TOLERANCE = 1e-6
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}


# ---- records ---------------------------------------------------------------------------------------
def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_global_state_round_trips_exactly():
    g = torch.Generator().manual_seed(1)
    state = GlobalState(
        adapters={
            "model.layers.10.mlp.lora.lora_A.gate": torch.randn(4, 2, 8, generator=g),
            "model.layers.2.mlp.lora.lora_B.gate": torch.randn(4, 8, 2, generator=g, dtype=torch.float64),
            "router.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "empty": torch.zeros(0, 3),
        },
        phi=torch.rand(2, 4, generator=g),
        round=7,
        method_state={"ranks": torch.tensor([4, 2, 1]), "merged_A.x": torch.randn(2, 3, generator=g).half()},
    )
    arrays, config = state_to_records(state)
    assert arrays["adapters.router.weight"].stype == RAW_STYPE  # numpy has no bfloat16
    back = records_to_state(arrays, config)
    assert back.round == 7
    assert list(back.adapters) == list(state.adapters)  # order kept, not sorted
    assert all(_same(back.adapters[k], v) for k, v in state.adapters.items())
    assert list(back.method_state) == list(state.method_state)
    assert all(_same(back.method_state[k], v) for k, v in state.method_state.items())
    assert _same(back.phi, state.phi)
    empty = records_to_state(*state_to_records(GlobalState({}, torch.zeros(0, 0), 0)))
    assert empty.adapters == {} and empty.method_state == {} and empty.phi.shape == (0, 0)


@pytest.mark.parametrize("client_id, rank", [(3, None), ("node-a", 2)])
def test_client_update_round_trips_exactly(client_id, rank):
    g = torch.Generator().manual_seed(2)
    update = ClientUpdate(
        client_id=client_id,
        adapter_deltas={"b.lora_A.up": torch.randn(2, 3, generator=g), "a": torch.randn(5, generator=g).bfloat16()},
        phi=torch.rand(2, 4, generator=g),
        counts=torch.tensor([[1, 0, 3, 2], [0, 0, 5, 1]]),
        tokens=torch.tensor([6, 6]),
        num_examples=9,
        top_k=2,
        metrics={"train_loss": 1.2345678901234567, "local_steps": 2.0, "next_rank": 1.0},
        rank=rank,
        local_state={"blk.output_scale": torch.rand(4, generator=g)} if rank is None else {},
    )
    back = records_to_update(*update_to_records(update))
    assert back.client_id == client_id and type(back.client_id) is type(client_id)
    assert (back.num_examples, back.top_k, back.rank) == (9, 2, rank)
    assert back.metrics == update.metrics
    assert list(back.adapter_deltas) == list(update.adapter_deltas)
    assert all(_same(back.adapter_deltas[k], v) for k, v in update.adapter_deltas.items())
    for name in ("phi", "counts", "tokens"):
        assert _same(getattr(back, name), getattr(update, name))
    assert back.local_state.keys() == update.local_state.keys()
    assert all(_same(back.local_state[k], v) for k, v in update.local_state.items())


def test_a_non_numeric_metric_is_refused():
    update = ClientUpdate(0, {}, torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), 1, 1, {"note": "text"})
    with pytest.raises(ValueError, match="note"):
        update_to_records(update)


# ---- simulation vs in-process ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_experiment(tmp_path_factory.mktemp("flower"))


def _flower(setup, name: str, extra: list[str], client=None, **options) -> Path:
    out = setup["root"] / name
    defaults = {
        "config": str(setup["config"]),
        "overrides": ";".join([*QUICK, *extra]),
        "out-dir": str(out),
        "round-timeout": 1800.0,
        **options,
    }
    run_simulation(make_server_app(defaults), client or flower_client.app, num_supernodes=4, backend_config=BACKEND)
    return out


def _reference(setup, name: str, extra: list[str]) -> Path:
    out = setup["root"] / name
    run_experiment(load_config(setup["config"], [*QUICK, *extra]), out)
    return out


def _close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOLERANCE * max(1.0, abs(a), abs(b))
    return a == b


def _lines(out: Path) -> list[dict]:
    return [_without_timing(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((out / "checkpoint").glob("round_*"))[-1] / "state.safetensors"))


def _assert_same_run(flower: Path, reference: Path) -> None:
    assert _close(_lines(flower), _lines(reference))
    a, b = _final_state(flower), _final_state(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert float((a[key].double() - b[key].double()).abs().max()) <= TOLERANCE, key
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (flower, reference))
    assert _close(_without_timing(sa["tiers"]), _without_timing(sb["tiers"]))
    assert _close(_without_timing(sa["balance"]), _without_timing(sb["balance"]))
    assert sa["runtime"]["kind"] == "flower"
    assert [r["round"] for r in _without_timing(sa["rounds"])] == [0, 1]
    assert (flower / "initial_eval.json").is_file() and (flower / "adapters").is_dir()
    # the final adapters in peft's format too, from the ServerApp as from `ubsmoe run` (none for FLoRA/FLoRIST)
    assert bool(sa["peft_adapters"]) == bool(sb["peft_adapters"]) == (sa["method"] not in ("flora", "florist"))
    if sa["peft_adapters"]:
        pa, pb = (load_file(str(p / "adapters" / "peft" / "adapter_model.safetensors")) for p in (flower, reference))
        assert pa.keys() == pb.keys()
        assert all(float((pa[k].double() - pb[k].double()).abs().max()) <= TOLERANCE for k in pa)


def test_flower_simulation_matches_the_in_process_run(setup):
    flower = _flower(setup, "flower-ubsmoe", [], **{"fraction-evaluate": 1.0})
    reference = _reference(setup, "reference-ubsmoe", [])
    _assert_same_run(flower, reference)
    records = json.loads((flower / "summary.json").read_text())["rounds"]
    assert all(math.isfinite(r["client_eval"]["eval_loss"]) and r["client_eval"]["clients"] == 4 for r in records)


def test_a3smoe_keeps_its_local_state_on_the_client_and_matches(setup):
    # fraction 0.5: clients sit rounds out, so a client's output scales must come back from context.state
    extra = ["method=a3smoe", "federation.fraction=0.5", "federation.rounds=3"]
    flower = _flower(setup, "flower-a3smoe", extra)
    reference = _reference(setup, "reference-a3smoe", extra)
    lines = _lines(flower)
    rounds = [{line["client_id"] for line in lines if line["round"] == r} for r in range(3)]
    # a client that trains twice starts its second round from the scales kept in its context.state
    assert any(sum(c in clients for clients in rounds) >= 2 for c in range(4))
    assert _close(lines, _lines(reference))
    a, b = _final_state(flower), _final_state(reference)
    assert any(k.startswith("method.local.") for k in a)
    assert a.keys() == b.keys()
    assert all(float((a[k].double() - b[k].double()).abs().max()) <= TOLERANCE for k in a)


# ---- faults ----------------------------------------------------------------------------------------
_failing = ClientApp()


def _fails(context: Context) -> bool:
    return int(context.node_config["partition-id"]) == 3


@_failing.query()
def _query(msg: Message, context: Context) -> Message:
    return flower_client.query(msg, context)


@_failing.train()
def _train(msg: Message, context: Context) -> Message:
    if _fails(context):
        raise RuntimeError("this device fell over")
    return flower_client.train(msg, context)


def test_a_failing_client_does_not_stop_the_run(setup):
    out = _flower(setup, "flower-fault", [], client=_failing, **{"min-replies": 3})
    lines = _lines(out)
    assert len(lines) == 8
    for line in lines:
        assert line["accepted"] is (line["client_id"] != 3)
        if line["client_id"] == 3:
            assert "missing" in line["drop_reason"] and "fell over" in line["drop_reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["missing"][0]["client_id"] for r in summary["rounds"]] == [3, 3]
    assert all(len(r["accepted"]) == 3 for r in summary["rounds"])


# ---- resume ----------------------------------------------------------------------------------------
_second_round_fails = ClientApp()


@_second_round_fails.query()
def _query2(msg: Message, context: Context) -> Message:
    return flower_client.query(msg, context)


@_second_round_fails.train()
def _train2(msg: Message, context: Context) -> Message:
    if msg.metadata.group_id == "1":  # the run's round 1 (0-based): every client falls over
        raise RuntimeError("the federation went down")
    return flower_client.train(msg, context)


def test_a_stopped_flower_run_resumes_to_the_uninterrupted_result(setup):
    # the run stops after round 0 (no update in round 1, fewer than min-replies), then resumes from its
    # checkpoint with a healthy federation and must end where an uninterrupted run ends
    with pytest.raises(FederationError, match="round 1: 0 client update"):
        _flower(setup, "flower-resumed", [], client=_second_round_fails)
    out = setup["root"] / "flower-resumed"
    assert [p.name for p in sorted((out / "checkpoint").glob("round_*"))] == ["round_0001"]
    assert not (out / "summary.json").exists()
    _flower(setup, "flower-resumed", [], resume=True)
    reference = setup["root"] / "reference-ubsmoe"
    if not (reference / "summary.json").is_file():
        _reference(setup, "reference-ubsmoe", [])
    _assert_same_run(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["initial"] is not None  # kept from the run's start
