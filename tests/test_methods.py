"""Every method of DESIGN 2.5 through the federated core: client starts, aggregation rules, and full runs.

The function-level tests check each rule against its definition on the payloads; the run-level tests
drive every method through `run_experiment` on the tiny OLMoE of tests/test_run.py.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from test_run import QUICK, _lines, write_experiment  # noqa: E402

from ubsmoe.fl.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from ubsmoe.fl.experiment import Reporter, run_experiment  # noqa: E402
from ubsmoe.fl.payload import ClientUpdate, GlobalState  # noqa: E402
from ubsmoe.methods import BUILTIN_METHODS, method_class  # noqa: E402
from ubsmoe.methods.flora import BaseMerger  # noqa: E402
from ubsmoe.methods.lora import lora_pairs  # noqa: E402

M, OUT, IN, R = 3, 5, 4, 4
KEY_A, KEY_B = "layers.0.mlp.lora.lora_A.gate", "layers.0.mlp.lora.lora_B.gate"


def _method(name, **options):
    return method_class(name)(**options)


def _aggregate(method, state, updates):
    result = method.aggregate(state, updates)
    return result.adapters, result.method_state, result.report


def _state(seed: int = 0, **method_state) -> GlobalState:
    g = torch.Generator().manual_seed(seed)
    adapters = {KEY_A: torch.randn(M, R, IN, generator=g), KEY_B: torch.randn(M, OUT, R, generator=g)}
    return GlobalState(adapters=adapters, phi=torch.zeros(1, M), round=2, method_state=dict(method_state))


def _update(settings, state, client, rank, seed, num_examples=10, counts=None):
    start = settings.client_start(state, rank, client).adapters
    g = torch.Generator().manual_seed(seed)
    final = {k: v + torch.randn(v.shape, generator=g) for k, v in start.items()}
    final[KEY_A][:, rank:, :] = 0
    final[KEY_B][:, :, rank:] = 0
    counts = counts if counts is not None else torch.tensor([[4, 4, 4]])
    return ClientUpdate(
        client_id=client,
        adapter_deltas={k: final[k] - start[k] for k in start},
        phi=torch.zeros(1, M),
        counts=counts,
        tokens=torch.tensor([12]),
        num_examples=num_examples,
        top_k=1,
        rank=rank,
    ), final


def test_rank_clients_start_from_their_first_components():
    state = _state()
    for name in ("hetlora", "flexlora"):
        start = _method(name).client_start(state, 2, client=0).adapters
        assert torch.equal(start[KEY_A][:, :2], state.adapters[KEY_A][:, :2])
        assert not start[KEY_A][:, 2:].any() and not start[KEY_B][:, :, 2:].any()
    fresh = _method("flora").client_start(state, 2, client=0).adapters
    assert not fresh[KEY_B].any() and fresh[KEY_A][:, :2].any() and not fresh[KEY_A][:, 2:].any()
    again = _method("flora").client_start(state, 2, client=0).adapters
    other = _method("flora").client_start(state, 2, client=1).adapters
    assert torch.equal(fresh[KEY_A], again[KEY_A]) and not torch.equal(fresh[KEY_A], other[KEY_A])


def test_flexlora_keeps_the_top_svd_of_the_weighted_full_update():
    settings = _method("flexlora", scaling=0.5)
    state = _state()
    u1, f1 = _update(settings, state, 0, 2, seed=1, num_examples=10)
    u2, f2 = _update(settings, state, 1, 4, seed=2, num_examples=30)
    adapters, _, _ = _aggregate(settings, state, [u1, u2])
    full = 0.25 * 0.5 * f1[KEY_B] @ f1[KEY_A] + 0.75 * 0.5 * f2[KEY_B] @ f2[KEY_A]
    U, S, Vh = torch.linalg.svd(full.double())
    best = (U[..., :R] * S[..., None, :R]) @ Vh[..., :R, :]
    got = 0.5 * adapters[KEY_B].double() @ adapters[KEY_A].double()
    torch.testing.assert_close(got, best, atol=1e-4, rtol=1e-4)


def test_hetlora_zero_pads_and_weights_by_the_product_norm():
    settings = _method("hetlora")
    state = _state(ranks=torch.tensor([2, 4]))
    u1, f1 = _update(settings, state, 0, 2, seed=1)
    u2, f2 = _update(settings, state, 1, 4, seed=2)
    u2.metrics["next_rank"] = 2.0
    adapters, method_state, report = _aggregate(settings, state, [u1, u2])
    n1 = (f1[KEY_B] @ f1[KEY_A]).flatten(1).norm(dim=1)
    n2 = (f2[KEY_B] @ f2[KEY_A]).flatten(1).norm(dim=1)
    w1 = (n1 / (n1 + n2))[:, None, None]
    torch.testing.assert_close(adapters[KEY_A], w1 * f1[KEY_A] + (1 - w1) * f2[KEY_A])
    assert method_state["ranks"].tolist() == [2, 2] == report["client_ranks"]


@pytest.mark.parametrize("name", ["flora", "florist"])
def test_flora_and_florist_merge_the_exact_weighted_sum(name):
    settings = _method(name, scaling=0.5, **({"energy": 1.0} if name == "florist" else {}))
    state = _state()
    u1, f1 = _update(settings, state, 0, 2, seed=1, num_examples=10)
    u2, f2 = _update(settings, state, 1, 4, seed=2, num_examples=30)
    adapters, method_state, _ = _aggregate(settings, state, [u1, u2])
    assert torch.equal(adapters[KEY_A], state.adapters[KEY_A])  # the global pair is not what carries the update
    merged = method_state[f"merged_B.{KEY_A}"] @ method_state[f"merged_A.{KEY_A}"]
    expected = 0.25 * 0.5 * f1[KEY_B] @ f1[KEY_A] + 0.75 * 0.5 * f2[KEY_B] @ f2[KEY_A]
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    # a second round appends to the accumulated factors
    state2 = GlobalState(adapters=adapters, phi=state.phi, round=3, method_state=method_state)
    u3, f3 = _update(settings, state2, 0, 2, seed=3)
    _, method_state2, _ = _aggregate(settings, state2, [u3])
    merged2 = method_state2[f"merged_B.{KEY_A}"] @ method_state2[f"merged_A.{KEY_A}"]
    torch.testing.assert_close(merged2, expected + 0.5 * f3[KEY_B] @ f3[KEY_A], atol=1e-4, rtol=1e-4)


def test_a3smoe_weights_each_expert_by_its_activation():
    settings = _method("a3smoe", exponent=1.0)
    state = _state()
    # client 0 never activates expert 2: expert 2 takes client 1's delta alone
    u1, f1 = _update(settings, state, 0, R, seed=1, counts=torch.tensor([[6, 6, 0]]))
    u2, f2 = _update(settings, state, 1, R, seed=2, counts=torch.tensor([[4, 4, 4]]))
    adapters, _, _ = _aggregate(settings, state, [u1, u2])
    torch.testing.assert_close(adapters[KEY_A][2], f2[KEY_A][2])
    torch.testing.assert_close(adapters[KEY_A][0], (0.5 * f1[KEY_A][0] + (1 / 3) * f2[KEY_A][0]) / (0.5 + 1 / 3))


def test_tier_views():
    state = _state(**{"local.0.x.output_scale": torch.tensor(2.0), "local.1.x.output_scale": torch.tensor(4.0)})
    view = _method("a3smoe").tier_view(state, R, clients=[0, 1])
    assert float(view.method_state["x.output_scale"]) == 3.0
    merged = _method("flora").tier_view(state, 2, clients=[0])
    assert not merged.adapters[KEY_B].any()
    truncated = _method("hetlora").tier_view(state, 2, clients=[0])
    assert not truncated.adapters[KEY_A][:, 2:].any() and truncated.adapters[KEY_A][:, :2].any()


# ---- full runs on the tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_experiment(tmp_path_factory.mktemp("methods"))


def _run(setup, method, *extra, reporter=None, out=None):
    from ubsmoe.config import load_config

    config = load_config(setup["config"], [*QUICK, f"method={method}", *extra])
    out = out or setup["root"] / method
    return run_experiment(config, out, reporter=reporter), out


@pytest.mark.parametrize("method", BUILTIN_METHODS)
def test_every_method_runs(setup, method):
    summary, out = _run(setup, method)
    tiers = summary["tiers"]
    assert all(0.0 <= t["accuracy"]["mean"] <= 1.0 for t in tiers)
    lines = _lines(out)
    assert len(lines) == 2 * 4 and all(line["accepted"] for line in lines)
    state, _ = load_checkpoint(latest_checkpoint(out / "checkpoint"))
    if method in ("fedit", "hetlora", "flexlora", "flora", "florist"):
        assert [t["top_k"] for t in tiers] == [2, 2]  # K_max for everyone
        if method != "fedit":  # FedIT: one rank for everyone
            assert [line["rank"] for line in lines if line["round"] == 0] == [4, 4, 8, 8]
            small, large = (next(x for x in lines if x["client_id"] == c) for c in (0, 2))
            assert small["upload_bytes"] < large["upload_bytes"]
    else:
        assert [t["top_k"] for t in tiers] == [1, 2]
    if method in ("hetlora", "flexlora", "flora", "florist"):
        # a tier is evaluated at the rank its clients hold after the last round: HetLoRA's pruned one
        last_evaluation = sorted((out / "evaluations").glob("round_*.jsonl"))[-1]
        records = [json.loads(line) for line in last_evaluation.read_text().splitlines()]
        for tier, first_client in zip(tiers, (0, 2), strict=True):
            last = next(x for x in lines if x["client_id"] == first_client and x["round"] == 1)
            expected = min(last["rank"], int(last["next_rank"])) if method == "hetlora" else tier["rank"]
            assert {(r["rank"], r["evaluated_rank"]) for r in records if r["tier"] == tier["tier"]} == {
                (tier["rank"], expected)
            }
            assert tier["evaluated_rank"] == expected
    if method in ("flora", "florist"):
        assert any(k.startswith("merged_A.") for k in state.method_state)
        assert summary["tiers"][0]["accuracy"] == summary["tiers"][1]["accuracy"]  # one merged model
    if method == "a3smoe":
        scales = [v for k, v in state.method_state.items() if k.startswith("local.")]
        assert scales and any(float(v) != 1.0 for v in scales)
    if method == "smoe-llb":
        assert all(x["train_loss"] > x["train_lm_loss"] for x in lines)
    if method == "smoe-naive":
        assert all(x["train_loss"] == pytest.approx(x["train_lm_loss"]) for x in lines)


class _Interrupt(Reporter):
    def round_finished(self, record):
        raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["flora", "hetlora", "a3smoe"])
def test_a_baseline_resumes_exactly(setup, method):
    reference, reference_out = _run(setup, method, out=setup["root"] / f"{method}-reference")
    out = setup["root"] / f"{method}-interrupted"
    with pytest.raises(KeyboardInterrupt):
        _run(setup, method, reporter=_Interrupt(), out=out)
    resumed = run_experiment(None, out, resume=True)
    assert _lines(out) == _lines(reference_out)
    assert json.dumps(resumed["tiers"][0]["accuracy"]) == json.dumps(reference["tiers"][0]["accuracy"])


def test_the_merger_rebuilds_the_base_from_the_original(setup):
    from ubsmoe.config import load_config
    from ubsmoe.models.loading import load_experiment_model
    from ubsmoe.moe import moe_blocks

    config = load_config(setup["config"], [*QUICK, "method=flora"])
    model = load_experiment_model(config).model
    block = moe_blocks(model)[0]
    key_a = next(k for k in dict(model.named_parameters()) if ".lora_A.up" in k)
    original = block.gate_up_proj.detach().clone()
    inner = block.intermediate_size
    A = torch.randn(block.num_experts, 3, block.hidden_size)
    B = torch.randn(block.num_experts, inner, 3)
    merger = BaseMerger(model)
    state = GlobalState(adapters={}, phi=torch.zeros(0), method_state={f"merged_A.{key_a}": A, f"merged_B.{key_a}": B})
    merger.apply(state)
    merger.apply(state)  # twice: rebuilt from the original, not added again
    torch.testing.assert_close(block.gate_up_proj[:, inner:], original[:, inner:] + B @ A)
    torch.testing.assert_close(block.gate_up_proj[:, :inner], original[:, :inner])
    assert lora_pairs({key_a: A, key_a.replace("lora_A", "lora_B"): B})
