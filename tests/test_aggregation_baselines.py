import pytest
import torch

from ubsmoe.methods.a3smoe import a3smoe_aggregate, activation_aware_weights
from ubsmoe.methods.flexlora import flexlora_full_update, svd_factors
from ubsmoe.methods.flora import flora_stack, merge_into
from ubsmoe.methods.florist import energy_rank, florist_aggregate
from ubsmoe.methods.hetlora import (
    hetlora_aggregate,
    hetlora_weights,
    prune_rank,
    self_pruning_penalty,
    zero_pad,
)
from ubsmoe.methods.lora import (
    check_factors,
    product_frobenius_norm,
    rank_sliced,
    weighted_product_sum,
)

M, OUT, IN = 3, 7, 6
RANKS = [2, 3, 4]
ALPHA = 8.0


def clients(ranks=RANKS, lead=(M,)):
    As = [torch.randn(*lead, r, IN, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(*lead, OUT, r, dtype=torch.float64) for r in ranks]
    return As, Bs


def reference_sum(As, Bs, scalings, weights):
    total = sum(weights)
    return sum((w / total) * s * B @ A for A, B, s, w in zip(As, Bs, scalings, weights, strict=True))


def best_rank(delta, r):
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[..., :r] @ torch.diag_embed(S[..., :r]) @ Vh[..., :r, :]


# --- shared helpers ---


def test_product_norm():
    A, B = torch.randn(M, 3, IN, dtype=torch.float64), torch.randn(M, OUT, 3, dtype=torch.float64)
    torch.testing.assert_close(product_frobenius_norm(A, B), torch.linalg.matrix_norm(B @ A))


def test_check_factors_errors():
    As, Bs = clients()
    assert check_factors(As, Bs) == RANKS
    with pytest.raises(ValueError, match="at least one"):
        check_factors([], [])
    with pytest.raises(ValueError, match="one B per A"):
        check_factors(As, Bs[:2])
    with pytest.raises(ValueError, match="rank mismatch"):
        check_factors([As[0]], [Bs[1]])
    with pytest.raises(ValueError, match="only the rank may differ"):
        check_factors([As[0], torch.randn(M, 2, IN + 1)], [Bs[0], torch.randn(M, OUT, 2)])
    with pytest.raises(ValueError, match="leading"):
        check_factors([torch.randn(2, 3, IN)], [torch.randn(3, OUT, 3)])
    with pytest.raises(ValueError, match="one weight per client"):
        weighted_product_sum(As, Bs, 1.0, [1.0])
    with pytest.raises(ValueError, match="one scaling per client"):
        weighted_product_sum(As, Bs, [1.0, 2.0], [1.0, 1.0, 1.0])


# --- FLoRA ---


@pytest.mark.parametrize("lead", [(), (M,)])
def test_flora_stacked_product_is_the_exact_weighted_sum(lead):
    As, Bs = clients(lead=lead)
    scalings, weights = [ALPHA / r for r in RANKS], [10, 30, 60]
    A_stack, B_stack = flora_stack(As, Bs, scalings, weights)
    assert A_stack.shape == (*lead, sum(RANKS), IN) and B_stack.shape == (*lead, OUT, sum(RANKS))
    torch.testing.assert_close(B_stack @ A_stack, reference_sum(As, Bs, scalings, weights))
    W = torch.randn(*lead, OUT, IN, dtype=torch.float64)
    torch.testing.assert_close(merge_into(W, A_stack, B_stack), W + reference_sum(As, Bs, scalings, weights))
    with pytest.raises(ValueError, match="base weight"):
        merge_into(W.transpose(-1, -2), A_stack, B_stack)


# --- FlexLoRA ---


def test_flexlora_full_update_and_full_rank_is_exact():
    As, Bs = clients()
    scalings, weights = [ALPHA / r for r in RANKS], [1, 2, 3]
    expected = reference_sum(As, Bs, scalings, weights)
    delta = flexlora_full_update(As, Bs, scalings, weights)
    torch.testing.assert_close(delta, expected)
    full = min(OUT, IN)
    for s in scalings:
        A, B = svd_factors(delta, full, s)
        torch.testing.assert_close(s * B @ A, expected)


def test_flexlora_client_factors_are_the_best_rank_r_approximation():
    As, Bs = clients()
    scalings, weights = [ALPHA / r for r in RANKS], [1, 1, 2]
    delta = flexlora_full_update(As, Bs, scalings, weights)
    for s, r in zip(scalings, RANKS, strict=True):
        A, B = svd_factors(delta, r, s)
        assert A.shape == (M, r, IN) and B.shape == (M, OUT, r)
        torch.testing.assert_close(s * B @ A, best_rank(delta, r))
        # the singular values are split symmetrically: sqrt(s) B and sqrt(s) A^T have equal column norms
        torch.testing.assert_close((s**0.5 * B).norm(dim=-2), (s**0.5 * A).norm(dim=-1))


def test_svd_factors_with_scaling_and_oversized_rank():
    delta = torch.randn(M, OUT, IN, dtype=torch.float64)
    A, B = svd_factors(delta, 2, scaling=0.25)
    torch.testing.assert_close(0.25 * B @ A, best_rank(delta, 2))
    A, B = svd_factors(delta, IN + 2)
    assert A.shape == (M, IN + 2, IN)
    torch.testing.assert_close(B @ A, delta)
    with pytest.raises(ValueError, match="rank"):
        svd_factors(delta, 0)
    with pytest.raises(ValueError, match="scaling"):
        svd_factors(delta, 2, scaling=0.0)


# --- FLoRIST ---


def test_florist_at_tau_one_is_exact():
    As, Bs = clients()
    scalings, weights = [ALPHA / r for r in RANKS], [3, 1, 2]
    A_g, B_g, rank = florist_aggregate(As, Bs, scalings, weights, tau=1.0)
    assert rank == min(OUT, IN, sum(RANKS))
    assert A_g.shape == (M, rank, IN) and B_g.shape == (M, OUT, rank)
    torch.testing.assert_close(B_g @ A_g, reference_sum(As, Bs, scalings, weights))


def test_florist_smaller_tau_keeps_fewer_components_with_enough_energy():
    As, Bs = clients(ranks=[1, 2], lead=())  # true rank 3 < min(OUT, IN)
    scalings, weights = [2.0, 1.0], [1, 1]
    delta = reference_sum(As, Bs, scalings, weights)
    A_full, B_full, full = florist_aggregate(As, Bs, scalings, weights, tau=1.0)
    torch.testing.assert_close(B_full @ A_full, delta)
    S = torch.linalg.svdvals(delta)
    energy = S.square().cumsum(0) / S.square().sum()
    tau = float(energy[0] + energy[1]) / 2  # strictly between the first and second cumulative energy
    A_g, B_g, rank = florist_aggregate(As, Bs, scalings, weights, tau=tau)
    assert rank == 2 < full
    kept = B_g @ A_g
    assert kept.square().sum() >= tau * delta.square().sum()
    torch.testing.assert_close(kept, best_rank(delta, 2))


def test_energy_rank_per_slice():
    S = torch.tensor([[3.0, 4.0**0.5, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    # energies 9, 4 (13 total): 9/13 = 0.69; uniform thirds; all zero
    assert energy_rank(S, 0.5).tolist() == [1, 2, 1]
    assert energy_rank(S, 0.7).tolist() == [2, 3, 1]
    assert energy_rank(S, 1.0).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="tau"):
        energy_rank(S, 0.0)


# --- HetLoRA ---


def test_zero_pad_preserves_the_product_and_rank_slicing_keeps_the_first_components():
    A, B = torch.randn(M, 3, IN, dtype=torch.float64), torch.randn(M, OUT, 3, dtype=torch.float64)
    A_pad, B_pad = zero_pad(A, B, 5)
    assert A_pad.shape == (M, 5, IN) and B_pad.shape == (M, OUT, 5)
    torch.testing.assert_close(B_pad @ A_pad, B @ A)
    sliced = rank_sliced({"x.lora_A.up": A_pad, "x.lora_B.up": B_pad, "router": A}, 2)
    A_t, B_t = sliced["x.lora_A.up"], sliced["x.lora_B.up"]
    torch.testing.assert_close(A_t, A[:, :2])
    torch.testing.assert_close(B_t, B[..., :2])
    torch.testing.assert_close(B_t @ A_t, B[..., :2] @ A[:, :2])
    assert sliced["router"] is A  # tensors outside a LoRA pair pass through
    with pytest.raises(ValueError, match="zero-pad"):
        zero_pad(A, B, 2)


def test_hetlora_weights_are_proportional_to_product_norms_per_expert():
    As, Bs = clients()
    base = [1.0, 2.0, 3.0]
    w = hetlora_weights(As, Bs, base)
    assert w.shape == (3, M)
    norms = torch.stack([torch.linalg.matrix_norm(B @ A) for A, B in zip(As, Bs, strict=True)])
    expected = torch.tensor(base, dtype=torch.float64)[:, None] * norms
    torch.testing.assert_close(w, expected / expected.sum(0))
    A_g, B_g = hetlora_aggregate(As, Bs, r_max=5, base_weights=base)
    assert A_g.shape == (M, 5, IN) and B_g.shape == (M, OUT, 5)
    expected_A = sum(w[k][:, None, None] * zero_pad(As[k], Bs[k], 5)[0] for k in range(3))
    expected_B = sum(w[k][:, None, None] * zero_pad(As[k], Bs[k], 5)[1] for k in range(3))
    torch.testing.assert_close(A_g, expected_A)
    torch.testing.assert_close(B_g, expected_B)


def test_hetlora_equal_clients_aggregate_to_themselves_and_zero_products_fall_back():
    A, B = torch.randn(M, 4, IN, dtype=torch.float64), torch.randn(M, OUT, 4, dtype=torch.float64)
    A_g, B_g = hetlora_aggregate([A, A.clone()], [B, B.clone()], base_weights=[1, 5])
    torch.testing.assert_close(A_g, A)
    torch.testing.assert_close(B_g, B)
    zeros = torch.zeros(M, OUT, 4, dtype=torch.float64)  # first round: B = 0 everywhere
    w = hetlora_weights([A, 2 * A], [zeros, zeros], [1, 3])
    torch.testing.assert_close(w, torch.tensor([[0.25] * M, [0.75] * M], dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than the largest"):
        hetlora_aggregate([A], [B], r_max=3)


def test_self_pruning_penalty_and_prune_rank():
    A = torch.randn(2, 4, IN, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, OUT, 4, dtype=torch.float64)
    penalty = self_pruning_penalty(A, B, rank=4, gamma=0.5)  # tail components 2 and 3
    expected = sum(torch.linalg.matrix_norm(B[:, :, j : j + 1] @ A[:, j : j + 1, :]).sum() for j in (2, 3))
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    assert A.grad[:, :2].abs().sum() == 0 and A.grad[:, 2:].abs().sum() > 0
    assert float(self_pruning_penalty(A, B, rank=4, gamma=1.0)) == 0.0  # empty tail
    with pytest.raises(ValueError, match="gamma"):
        self_pruning_penalty(A, B, rank=4, gamma=0.0)
    A_small = A.detach().clone()
    A_small[:, 2:] *= 1e-6
    # the rule is relative: the tail's share of the components' total size, over every pair together
    assert prune_rank([(A_small, B)], rank=4, gamma=0.5, ratio=0.05) == 2
    assert prune_rank([(A.detach(), B)], rank=4, gamma=0.5, ratio=0.05) == 4
    assert prune_rank([(A_small, B), (A.detach(), B)], rank=4, gamma=0.5, ratio=0.05) == 4  # one big tail
    assert prune_rank([(100 * A_small, B)], rank=4, gamma=0.5, ratio=0.05) == 2  # the scale does not matter
    assert prune_rank([(A_small, B)], rank=4, gamma=0.1, ratio=0.05) == 4  # tail from max(floor(0.4), 1) = 1
    assert prune_rank([(A_small[:, :2], B[..., :2])], rank=2, gamma=0.5, ratio=1.0, min_rank=2) == 2
    assert prune_rank([(torch.zeros_like(A_small), B)], rank=4, gamma=0.5, ratio=0.05) == 4  # nothing learned yet
    with pytest.raises(ValueError, match="ratio"):
        prune_rank([(A_small, B)], rank=4, gamma=0.5, ratio=1.5)


# --- A3SMoE ---


def test_activation_aware_weights():
    freq = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.25, 0.25, 0.5, 0.0], [0.1, 0.9, 0.0, 0.0]], dtype=torch.float64)
    sizes = [100, 200, 300]
    w = activation_aware_weights(freq, sizes, t=2.0)
    assert w.shape == (3, 4)
    torch.testing.assert_close(w.sum(0), torch.ones(4, dtype=torch.float64))
    raw = freq[:, 1] ** 2 * torch.tensor(sizes, dtype=torch.float64)
    torch.testing.assert_close(w[:, 1], raw / raw.sum())
    by_size = torch.tensor(sizes, dtype=torch.float64) / 600
    torch.testing.assert_close(w[:, 3], by_size)  # nobody activated expert 3: |D_c| fallback
    for column in activation_aware_weights([f for f in freq], sizes, t=0.0).T:
        torch.testing.assert_close(column, by_size)
    changed = freq.clone()
    changed[:, [0, 2, 3]] = torch.rand(3, 3, dtype=torch.float64)
    torch.testing.assert_close(activation_aware_weights(changed, sizes, t=2.0)[:, 1], w[:, 1])
    with pytest.raises(ValueError, match="one example count"):
        activation_aware_weights(freq, [1, 2], t=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        activation_aware_weights(-freq, sizes, t=1.0)
    with pytest.raises(ValueError, match="at least one"):
        activation_aware_weights([], [], t=1.0)


def test_a3smoe_aggregate_averages_each_expert_with_its_own_weights():
    w = activation_aware_weights(torch.rand(2, M, dtype=torch.float64), [1, 3], t=1.0)
    deltas = [{"A": torch.randn(M, 2, IN), "B": torch.randn(M, OUT, 2)} for _ in range(2)]
    out = a3smoe_aggregate(deltas, w)
    for key in ("A", "B"):
        assert out[key].dtype == torch.float32
        for i in range(M):
            expected = w[0, i] * deltas[0][key][i].double() + w[1, i] * deltas[1][key][i].double()
            torch.testing.assert_close(out[key][i], expected.float())
    per_key = a3smoe_aggregate(deltas, {"A": w, "B": w.flip(0)})
    torch.testing.assert_close(per_key["A"], out["A"])
    with pytest.raises(ValueError, match="no aggregation weights"):
        a3smoe_aggregate(deltas, {"A": w})
    with pytest.raises(ValueError, match="leading expert dim"):
        a3smoe_aggregate([{"x": torch.zeros(M + 1, 2)}] * 2, w)
    with pytest.raises(ValueError, match="keys"):
        a3smoe_aggregate([{"x": torch.zeros(M)}, {"y": torch.zeros(M)}], w)
    with pytest.raises(ValueError, match=r"\(C=3, M\)"):
        a3smoe_aggregate([{"x": torch.zeros(M)}] * 3, w)
    with pytest.raises(ValueError, match="at least one"):
        a3smoe_aggregate([], w)
