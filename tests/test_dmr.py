"""Dynamic Modulated Routing: the server update, the range regulariser and rebalancing over rounds."""

from __future__ import annotations

import math

import pytest
import torch

from ubsmoe.moe import (
    UBSMoEBlock,
    UBSMoEConfig,
    dmr_target,
    dmr_update,
    global_utilization,
    mean_top_k,
    modulated_logits,
    range_regularizer,
    utilization_cv,
)
from ubsmoe.moe.stats import dead_experts


def test_server_update_follows_the_formula():
    counts = [torch.tensor([60.0, 30.0, 10.0, 0.0]), torch.tensor([10.0, 10.0, 0.0, 0.0])]
    tokens = [50.0, 10.0]
    weights = [3.0, 1.0]
    phis = [torch.tensor([0.1, 0.0, 0.0, 0.2]), torch.tensor([0.3, 0.0, -0.4, 0.2])]
    w = [0.75, 0.25]
    u = torch.tensor(
        [w[0] * 60 / 50 + w[1] * 1.0, w[0] * 30 / 50 + w[1] * 1.0, w[0] * 10 / 50, 0.0], dtype=torch.float64
    )
    torch.testing.assert_close(global_utilization(counts, tokens, weights), u)
    k_bar = w[0] * 2 + w[1] * 2
    assert mean_top_k([2, 2], weights) == pytest.approx(k_bar)
    target = torch.tanh((k_bar / 4) / (u + 1e-6) - 1)
    expected = 0.9 * (w[0] * phis[0] + w[1] * phis[1]) + 0.1 * target.float()
    torch.testing.assert_close(dmr_update(phis, counts, tokens, [2, 2], weights), expected)


def test_target_raises_starved_and_lowers_overloaded_experts():
    target = dmr_target(torch.tensor([[1.2, 0.5, 0.25, 0.05, 0.0]]), mean_k=1.0)  # u* = 0.2
    assert target[0, 0] < target[0, 1] < 0 < target[0, 3] < target[0, 4]
    assert target[0, 4].item() == pytest.approx(1.0)  # dead expert: +1
    assert target.min().item() >= math.tanh(-1.0)
    assert dmr_target(torch.full((4,), 0.5), mean_k=2.0).abs().max() < 1e-5  # balanced: no push


def test_server_update_works_on_all_layers_at_once():
    L, M = 3, 4
    counts = [torch.randint(0, 20, (L, M)).float() for _ in range(2)]
    tokens = [torch.full((L,), 10.0), torch.full((L,), 12.0)]
    phis = [torch.zeros(L, M), torch.zeros(L, M)]
    stacked = dmr_update(phis, counts, tokens, [1, 2], [1, 1])
    for layer in range(L):
        single = dmr_update(
            [p[layer] for p in phis], [c[layer] for c in counts], [t[layer] for t in tokens], [1, 2], [1, 1]
        )
        torch.testing.assert_close(stacked[layer], single)


def test_bad_server_inputs_are_rejected():
    with pytest.raises(ValueError, match="weights"):
        global_utilization([torch.zeros(2)], [1.0], [0.0])
    with pytest.raises(ValueError, match="one count"):
        global_utilization([torch.zeros(2)], [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="zeta"):
        dmr_update([torch.zeros(2)], [torch.zeros(2)], [1.0], [1], [1.0], zeta=1.5)


def test_range_regularizer_zero_inside_positive_outside():
    assert range_regularizer(torch.tensor([-1.0, 0.0, 0.99, 1.0]), -1.0, 1.0, 0.01).item() == 0.0
    value = range_regularizer(torch.tensor([-1.5, 0.0, 2.0]), -1.0, 1.0, 0.01)
    assert value.item() == pytest.approx(0.01 * (0.25 + 1.0))


def test_phi_modulates_only_the_candidate_set():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    phi = torch.tensor([0.5, 0.5, 0.5, 0.5])
    torch.testing.assert_close(modulated_logits(scores, phi, 2), torch.tensor([[3.5, 2.5, 1.0, 0.0]]))
    torch.testing.assert_close(modulated_logits(scores, phi, 4), scores + 0.5)


def test_utilization_balance_measures():
    counts = torch.tensor([[5, 5, 5, 5], [20, 0, 0, 0]])
    torch.testing.assert_close(utilization_cv(counts), torch.tensor([0.0, math.sqrt(3.0)], dtype=torch.float64))
    assert dead_experts(counts).tolist() == [0, 3]


def test_rounds_of_dmr_rebalance_a_skewed_router():
    """Heterogeneous clients route through a skewed router; the server update lowers the CV."""
    M, H, I = 8, 16, 8
    router = torch.randn(M, H) * 0.3
    router[:, 0] = torch.linspace(1.5, -1.5, M)  # expert 0 favoured, expert 7 starved
    block = UBSMoEBlock(torch.randn(M, 2 * I, H) / 4, torch.randn(M, H, I) / 3, router, 4, UBSMoEConfig(lora_rank=0))
    top_ks = [1, 2, 3, 4]
    data = [torch.cat([torch.ones(200, 1), torch.randn(200, H - 1)], dim=1) for _ in top_ks]
    phi = torch.zeros(M)
    history = []
    for _ in range(12):
        counts, tokens = [], []
        with torch.no_grad():
            block.phi.copy_(phi)
            for k, x in zip(top_ks, data, strict=True):
                block.top_k = k
                block.reset_utilization()
                block(x)
                counts.append(block.utilization()["counts"])
                tokens.append(block.utilization()["tokens"])
        history.append(utilization_cv(global_utilization(counts, tokens, [1, 1, 1, 1])).item())
        phi = dmr_update([phi] * 4, counts, tokens, top_ks, [1, 1, 1, 1])
    assert phi[7] > 0.3 and phi[0] < -0.2  # starved expert pushed up, overloaded pushed down
    assert history[-1] < 0.85 * history[0]
    assert all(b <= a + 1e-9 for a, b in zip(history, history[1:], strict=False))  # never worse
