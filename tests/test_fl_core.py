"""Federated core over plain payloads: client_update, validate_update, aggregate_round, sample_clients."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ubsmoe.config import ExperimentConfig  # noqa: E402
from ubsmoe.fl.client import ClientSettings, client_update, round_lr  # noqa: E402
from ubsmoe.fl.payload import (  # noqa: E402
    ClientUpdate,
    GlobalState,
    global_state_from_model,
    load_global_state,
    split_trainable_state,
)
from ubsmoe.fl.server import aggregate_round, delta_norm, sample_clients, validate_update  # noqa: E402
from ubsmoe.models import adapt_moe_model, tiny_config  # noqa: E402
from ubsmoe.models.state import trainable_state  # noqa: E402
from ubsmoe.moe import UBSMoEConfig, dmr_update, get_phi  # noqa: E402

NUM_LAYERS, NUM_EXPERTS, NATIVE_K = 2, 8, 2


def build_model(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("olmoe"))
    return adapt_moe_model(model, UBSMoEConfig(lora_rank=4))


def make_batches(count: int = 2, batch: int = 4, length: int = 12, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, 128, (batch, length), generator=generator)
        labels = ids.clone()
        labels[:, : length // 3] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


SETTINGS = ClientSettings(lr=1e-2, min_lr=1e-2, local_steps=3, total_rounds=1)


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def start(model) -> GlobalState:
    return global_state_from_model(model)


def run_client(model, state, top_k=NATIVE_K, settings=SETTINGS, client_id="c0", seed=0, batches=None):
    torch.manual_seed(seed)
    return client_update(model, state, batches or make_batches(), top_k, settings, client_id)


# ---- payload -------------------------------------------------------------------------------------
def test_global_state_splits_phi_from_adapters(model, start):
    full = trainable_state(model)
    adapters, phis = split_trainable_state(full)
    assert set(start.adapters) == set(adapters) and adapters
    assert not any(k.endswith(".phi") for k in start.adapters)
    assert len(phis) == NUM_LAYERS
    assert start.phi.shape == (NUM_LAYERS, NUM_EXPERTS)


def test_load_global_state_roundtrip_and_checks(model, start):
    state = GlobalState({k: torch.randn_like(v) for k, v in start.adapters.items()}, torch.rand(2, 8), round=3)
    load_global_state(model, state)
    back = global_state_from_model(model)
    assert all(torch.equal(back.adapters[k], state.adapters[k]) for k in state.adapters)
    assert torch.equal(get_phi(model), state.phi)
    key = next(iter(start.adapters))
    with pytest.raises(ValueError, match="lacks"):
        load_global_state(model, GlobalState({k: v for k, v in start.adapters.items() if k != key}, start.phi))
    with pytest.raises(ValueError, match="phi must have shape"):
        load_global_state(model, GlobalState(start.adapters, torch.zeros(3, 8)))
    load_global_state(model, start)


# ---- client --------------------------------------------------------------------------------------
def test_client_update_shapes_finite_counts(model, start):
    update = run_client(model, start)
    assert set(update.adapter_deltas) == set(start.adapters)
    for key, delta in update.adapter_deltas.items():
        assert delta.shape == start.adapters[key].shape and delta.dtype == start.adapters[key].dtype
        assert delta.device.type == "cpu" and torch.isfinite(delta).all()
    assert any(delta.abs().sum() > 0 for delta in update.adapter_deltas.values())
    assert update.phi.shape == (NUM_LAYERS, NUM_EXPERTS) and torch.isfinite(update.phi).all()
    assert not torch.equal(update.phi, start.phi)  # phi is trained locally
    assert update.counts.shape == (NUM_LAYERS, NUM_EXPERTS) and update.tokens.shape == (NUM_LAYERS,)
    assert torch.equal(update.counts.sum(-1), NATIVE_K * update.tokens)
    assert (update.tokens == 3 * 4 * 12).all()  # local_steps * batch * length tokens per layer
    assert update.num_examples == 8  # 2 batches of 4, cycled: one pass of distinct examples
    assert update.metrics["examples_processed"] == 12
    assert update.top_k == NATIVE_K and update.client_id == "c0"
    for name in ("train_loss", "first_loss", "last_loss", "step_time_s", "lr"):
        assert math.isfinite(update.metrics[name])
    assert validate_update(update, start, max_norm=1e6) is None


def test_loss_goes_down_over_a_round(model, start):
    settings = dataclasses.replace(SETTINGS, local_steps=8)
    update = run_client(model, start, settings=settings, batches=make_batches(count=1))
    assert update.metrics["last_loss"] < update.metrics["first_loss"] - 0.1


def test_payload_shares_no_storage_with_model(model, start):
    update = run_client(model, start)
    snapshot = {k: v.clone() for k, v in update.adapter_deltas.items()}
    phi = update.phi.clone()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)
    assert all(torch.equal(snapshot[k], update.adapter_deltas[k]) for k in snapshot)
    assert torch.equal(phi, update.phi)


def test_same_seed_gives_identical_updates(model, start):
    first, second = run_client(model, start, seed=5), run_client(model, start, seed=5)
    for key in first.adapter_deltas:
        assert torch.equal(first.adapter_deltas[key], second.adapter_deltas[key])
    assert torch.equal(first.phi, second.phi) and torch.equal(first.counts, second.counts)
    assert first.metrics["train_loss"] == second.metrics["train_loss"]


def test_heterogeneous_top_k_gives_identical_shapes(model, start):
    low, native = run_client(model, start, top_k=1), run_client(model, start, top_k=NATIVE_K)
    assert {k: v.shape for k, v in low.adapter_deltas.items()} == {k: v.shape for k, v in native.adapter_deltas.items()}
    assert low.phi.shape == native.phi.shape and low.counts.shape == native.counts.shape
    assert torch.equal(low.counts.sum(-1), low.tokens) and low.top_k == 1
    assert validate_update(low, start) is None and validate_update(native, start) is None


def test_one_shot_iterator_is_cycled(model, start):
    update = client_update(model, start, iter(make_batches(count=2)), 1, SETTINGS, "gen")
    assert update.num_examples == 8 and update.metrics["examples_processed"] == 12
    with pytest.raises(ValueError, match="no batches"):
        client_update(model, start, [], 1, SETTINGS, "empty")


def test_round_lr_cosine_schedule():
    assert round_lr(1.0, 0.1, 0, 5) == 1.0
    assert round_lr(1.0, 0.1, 4, 5) == pytest.approx(0.1)
    assert round_lr(1.0, 0.1, 2, 5) == pytest.approx(0.55)
    assert round_lr(1.0, 0.1, 3, 5, "constant") == 1.0
    assert round_lr(1.0, 0.1, 0, 1) == 1.0
    config = ExperimentConfig()
    settings = ClientSettings.from_config(config)
    assert settings.lr == config.federation.optimizer.lr
    assert settings.local_steps == config.federation.local_steps
    assert settings.total_rounds == config.federation.rounds


def test_client_uses_round_from_global_state(model, start):
    settings = ClientSettings(lr=1e-2, min_lr=1e-4, local_steps=1, total_rounds=3)
    last = dataclasses.replace(start, round=2)
    assert run_client(model, last, settings=settings).metrics["lr"] == pytest.approx(1e-4)
    assert run_client(model, start, settings=settings).metrics["lr"] == pytest.approx(1e-2)


# ---- server: synthetic updates -------------------------------------------------------------------
def synthetic_state() -> GlobalState:
    g = torch.Generator().manual_seed(0)
    adapters = {"a.lora_A": torch.randn(3, 4, generator=g), "b.lora_B": torch.randn(5, generator=g)}
    return GlobalState(adapters=adapters, phi=torch.randn(NUM_LAYERS, NUM_EXPERTS, generator=g) * 0.1, round=4)


def synthetic_update(state: GlobalState, client_id, num_examples, top_k, seed) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(60, 100, (NUM_LAYERS,), generator=g)  # >= num_examples: one token per example at least
    counts = torch.zeros(NUM_LAYERS, NUM_EXPERTS, dtype=torch.long)
    for layer in range(NUM_LAYERS):
        picks = torch.randint(0, NUM_EXPERTS, (int(tokens[layer]) * top_k,), generator=g)
        counts[layer] = torch.bincount(picks, minlength=NUM_EXPERTS)
    return ClientUpdate(
        client_id=client_id,
        adapter_deltas={k: torch.randn(v.shape, generator=g) * 0.01 for k, v in state.adapters.items()},
        phi=torch.rand(NUM_LAYERS, NUM_EXPERTS, generator=g) - 0.5,
        counts=counts,
        tokens=tokens,
        num_examples=num_examples,
        top_k=top_k,
        metrics={"train_loss": float(seed)},
    )


def good_updates(state):
    return [synthetic_update(state, f"c{i}", n, k, i) for i, (n, k) in enumerate([(10, 1), (30, 2), (60, 4)])]


def test_fedavg_weighted_by_num_examples():
    state = synthetic_state()
    updates = good_updates(state)
    new, report = aggregate_round(state, updates)
    total = sum(u.num_examples for u in updates)
    for key, value in state.adapters.items():
        manual = value + sum(u.num_examples / total * u.adapter_deltas[key] for u in updates)
        assert torch.allclose(new.adapters[key], manual, atol=1e-6)
    assert report["changed"] and report["accepted"] == ["c0", "c1", "c2"] and report["dropped"] == []
    assert report["weights"] == pytest.approx([0.1, 0.3, 0.6])
    assert new.round == state.round + 1
    assert report["metrics"]["train_loss"] == pytest.approx(0.1 * 0 + 0.3 * 1 + 0.6 * 2)


def test_phi_follows_dmr_update_exactly_and_report():
    state = synthetic_state()
    updates = good_updates(state)
    new, report = aggregate_round(state, updates, zeta=0.7, eps=1e-5)
    expected = dmr_update(
        [u.phi for u in updates],
        [u.counts for u in updates],
        [u.tokens for u in updates],
        [u.top_k for u in updates],
        [u.num_examples for u in updates],
        zeta=0.7,
        eps=1e-5,
    )
    assert torch.equal(new.phi, expected)
    assert len(report["utilization"]) == NUM_LAYERS
    for layer in report["utilization"]:
        assert len(layer["utilization"]) == NUM_EXPERTS and layer["cv"] >= 0 and 0 <= layer["dead_experts"] <= 8
    off, _ = aggregate_round(state, updates, dmr=False)
    assert torch.equal(off.phi, state.phi)


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda u: u.adapter_deltas["a.lora_A"].__setitem__((0, 0), float("nan")), "non-finite"),
        (lambda u: u.adapter_deltas.__setitem__("b.lora_B", torch.zeros(6)), "shape"),
        (lambda u: u.adapter_deltas.__setitem__("a.lora_A", u.adapter_deltas["a.lora_A"] * 1e6), "norm"),
        (lambda u: u.adapter_deltas.pop("a.lora_A"), "lacks"),
        (lambda u: u.adapter_deltas.__setitem__("x.extra", torch.zeros(1)), "unexpected"),
        (lambda u: u.adapter_deltas.__setitem__("b.lora_B", u.adapter_deltas["b.lora_B"].double()), "dtype"),
        (lambda u: setattr(u, "phi", torch.zeros(3, NUM_EXPERTS)), "phi has shape"),
        (lambda u: setattr(u, "phi", u.phi.masked_fill(u.phi > 0, float("inf"))), "phi has non-finite"),
        (lambda u: u.counts.__setitem__((1, 0), u.counts[1, 0] + 1), "expected top_k \\* tokens"),
        (lambda u: u.counts.__setitem__((0, 0), -1), "non-negative"),
        (lambda u: setattr(u, "counts", u.counts.float()), "integer"),
        (lambda u: setattr(u, "num_examples", 0), "num_examples"),
        (lambda u: setattr(u, "top_k", 9), "top_k"),
        (lambda u: setattr(u, "adapter_deltas", None), "adapter_deltas must be a dict"),
    ],
)
def test_bad_update_is_dropped_and_round_goes_on(corrupt, reason):
    state = synthetic_state()
    updates = good_updates(state)
    corrupt(updates[1])
    assert validate_update(updates[1], state, max_norm=10.0) is not None
    new, report = aggregate_round(state, updates, max_norm=10.0)
    assert report["accepted"] == ["c0", "c2"]
    assert len(report["dropped"]) == 1 and report["dropped"][0]["client_id"] == "c1"
    assert re.search(reason, report["dropped"][0]["reason"]), report["dropped"][0]["reason"]
    expected, _ = aggregate_round(state, [updates[0], updates[2]])
    assert all(torch.equal(new.adapters[k], expected.adapters[k]) for k in state.adapters)
    assert torch.equal(new.phi, expected.phi)


def test_garbage_is_dropped_without_raising():
    state = synthetic_state()
    assert "not a ClientUpdate" in validate_update({"client_id": 1}, state)
    _, report = aggregate_round(state, [None, *good_updates(state)])
    assert report["dropped"][0]["client_id"] is None and len(report["accepted"]) == 3


def test_all_bad_leaves_state_unchanged():
    state = synthetic_state()
    updates = good_updates(state)
    for update in updates:
        update.phi = update.phi * float("nan")
    new, report = aggregate_round(state, updates)
    assert not report["changed"] and report["accepted"] == [] and len(report["dropped"]) == 3
    assert "unchanged" in report["message"]
    assert all(torch.equal(new.adapters[k], v) for k, v in state.adapters.items())
    assert torch.equal(new.phi, state.phi) and new.round == state.round + 1


def test_delta_norm():
    assert delta_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}) == pytest.approx(5.0)


# ---- server + client together --------------------------------------------------------------------
def test_round_with_real_clients(model, start):
    updates = [run_client(model, start, top_k=k, client_id=f"k{k}", seed=k) for k in (1, NATIVE_K, 4)]
    new, report = aggregate_round(start, updates, max_norm=1e3)
    assert report["changed"] and len(report["accepted"]) == 3
    assert all(torch.isfinite(v).all() for v in new.adapters.values()) and torch.isfinite(new.phi).all()
    load_global_state(model, new)  # the new state fits the model


# ---- sampling ------------------------------------------------------------------------------------
def test_sample_clients_deterministic_and_respects_fraction():
    ids = [f"c{i}" for i in range(10)]
    first = sample_clients(ids, 0.3, round=2, seed=7)
    assert first == sample_clients(ids, 0.3, round=2, seed=7)
    assert len(first) == 3 and len(set(first)) == 3 and set(first) <= set(ids)
    assert first == [c for c in ids if c in first]  # keeps the input order
    draws = {tuple(sample_clients(ids, 0.3, round=r, seed=7)) for r in range(20)}
    assert len(draws) > 1  # rounds differ
    assert sample_clients(ids, 0.01, round=0, seed=0) and len(sample_clients(ids, 0.01, round=0, seed=0)) == 1
    assert sample_clients(ids, 1.0, round=5, seed=3) == ids
    assert len(sample_clients(ids, 0.7, round=0, seed=0)) == 7
    with pytest.raises(ValueError):
        sample_clients(ids, 0.0, round=0, seed=0)
    with pytest.raises(ValueError):
        sample_clients([], 0.5, round=0, seed=0)


def test_client_update_accepts_an_experiment_config(model, start):
    config = ExperimentConfig.from_dict({"federation": {"local_steps": 2, "rounds": 4}})
    torch.manual_seed(0)
    update = client_update(model, start, make_batches(count=1), 1, config, 3)
    assert update.metrics["local_steps"] == 2 and update.metrics["lr"] == config.federation.optimizer.lr
    assert validate_update(update, start) is None


def test_client_update_applies_pg_in_the_configured_space():
    """A local round with PG in update space differs from one in gradient space and from one without PG."""
    deltas = {}
    for name, config in (
        ("none", UBSMoEConfig(lora_rank=4, pseudo_gradient=False)),
        ("gradient", UBSMoEConfig(lora_rank=4)),
        ("update", UBSMoEConfig(lora_rank=4, pg_space="update")),
    ):
        torch.manual_seed(0)
        model = adapt_moe_model(transformers.AutoModelForCausalLM.from_config(tiny_config("olmoe")), config)
        update = run_client(model, global_state_from_model(model), top_k=1)
        assert all(torch.isfinite(d).all() for d in update.adapter_deltas.values())
        deltas[name] = torch.cat([d.flatten() for d in update.adapter_deltas.values()])
    assert not torch.allclose(deltas["update"], deltas["none"])
    assert not torch.allclose(deltas["update"], deltas["gradient"])
