"""Universal pseudo-gradient: inactive experts learn, by exactly kappa * rho_c * q_i * g_bar."""

from __future__ import annotations

import pytest
import torch

from ubsmoe.moe import (
    UBSMoEBlock,
    UBSMoEConfig,
    adapters_before_step,
    apply_pseudo_gradients,
    apply_pseudo_updates,
    pseudo_gradient_increment,
    sparsity_factor,
)

M, H, I, STARVED = 8, 16, 8, 7


def starved_setup(top_k, **config):
    """A block whose expert 7 is never selected (score about -2 below the rest) yet has probability mass."""
    torch.manual_seed(1)  # same block and data on every call
    router = torch.randn(M, H, dtype=torch.float64) * 0.05
    router[:, 0] = 0.0
    router[STARVED, 0] = -2.0
    block = UBSMoEBlock(
        torch.randn(M, 2 * I, H, dtype=torch.float64) / 4,
        torch.randn(M, H, I, dtype=torch.float64) / 3,
        router,
        4,
        UBSMoEConfig(lora_rank=2, **config),
    )
    with torch.no_grad():
        for p in block.lora.adapter_parameters():
            p.normal_(0, 0.3)
    block.top_k = top_k
    x = torch.randn(32, H, dtype=torch.float64)
    x[:, 0] = 1.0
    return block, x


def backward(block, x):
    block.zero_grad()
    block(x).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in block.lora.named_parameters()}


def test_never_selected_expert_gets_gradient_only_with_pg():
    for pg, expect_signal in ((True, True), (False, False)):
        block, x = starved_setup(2, pseudo_gradient=pg)
        real = backward(block, x)
        assert block.utilization()["counts"][STARVED] == 0
        assert all(g[STARVED].abs().max() == 0 for g in real.values())
        apply_pseudo_gradients(block)
        for p in block.lora.adapter_parameters():
            signal = p.grad[STARVED].abs().max().item()
            assert (signal > 0) == expect_signal, (pg, signal)


def test_pseudo_gradient_follows_the_formula_exactly():
    block, x = starved_setup(2, pg_kappa=0.7)
    real = backward(block, x)
    # independent routing masses from the router alone
    probs = torch.softmax(x @ block.router_weight.T, dim=-1)
    active = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(2, dim=-1).indices, True)
    mu = (probs * active).sum(0)
    q = (probs * ~active).sum(0)
    rho = (M - 2) / 2
    apply_pseudo_gradients(block)
    for name, p in block.lora.named_parameters():
        g_bar = real[name].sum(0) / mu.sum()
        expected = real[name] + 0.7 * rho * q.view(-1, 1, 1) * g_bar
        torch.testing.assert_close(p.grad, expected)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_pseudo_gradient_scales_with_rho(top_k):
    increments = {}
    for form in ("complement", "inverse"):
        block, x = starved_setup(top_k, pg_rho_form=form)
        real = backward(block, x)
        apply_pseudo_gradients(block)
        increments[form] = block.lora.lora_B["down"].grad[STARVED] - real["lora_B.down"][STARVED]
    assert increments["complement"].abs().max() > 0
    torch.testing.assert_close(increments["complement"] * M / (M - top_k), increments["inverse"])
    assert sparsity_factor(M, top_k) == pytest.approx((M - top_k) / top_k)


def test_pseudo_gradient_vanishes_when_every_expert_is_active():
    block, x = starved_setup(M)
    real = backward(block, x)
    apply_pseudo_gradients(block)
    for name, p in block.lora.named_parameters():
        torch.testing.assert_close(p.grad, real[name])


def test_masses_are_per_step_and_not_recorded_in_eval():
    block, x = starved_setup(2)
    backward(block, x)
    apply_pseudo_gradients(block)
    assert block._used_mass.abs().sum() == 0  # cleared after each step
    block.eval()
    real = backward(block, x)
    apply_pseudo_gradients(block)
    for name, p in block.lora.named_parameters():
        torch.testing.assert_close(p.grad, real[name])


def test_pseudo_gradient_increment_pure_function():
    grad = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    used, missed = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 0.5, 2.0])
    out = pseudo_gradient_increment(grad.sum(dim=0), used, missed, kappa=2.0)
    g_bar = torch.tensor([2.0, 3.0])  # (sum_j g_j) / (sum_j mu_j)
    torch.testing.assert_close(out, 2.0 * torch.tensor([[0.0], [0.5], [2.0]]) * g_bar)
    assert pseudo_gradient_increment(grad.sum(dim=0), torch.zeros(3), torch.ones(3)) is None  # nothing was used


def test_update_space_adds_the_pseudo_update_after_the_optimizer_step():
    """pg_space = update: the optimizer steps on the real gradients; then every expert gets
    kappa * rho * q_i * u_bar, u_bar built from the experts' actual updates (the same formula in update space)."""
    block, x = starved_setup(2, pg_kappa=0.5, pg_space="update")
    reference, _ = starved_setup(2, pseudo_gradient=False)
    real = backward(block, x)
    backward(reference, x)
    apply_pseudo_gradients(block)  # a no-op in update space: the gradients stay the real ones
    for name, p in block.lora.named_parameters():
        torch.testing.assert_close(p.grad, real[name])
    probs = torch.softmax(x @ block.router_weight.T, dim=-1)
    active = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(2, dim=-1).indices, True)
    mu, q = (probs * active).sum(0), (probs * ~active).sum(0)
    optimizers = [torch.optim.AdamW(b.lora.parameters(), lr=1e-2, weight_decay=0.0) for b in (block, reference)]
    starts = [p.detach().clone() for p in block.lora.adapter_parameters()]
    before = adapters_before_step(block)
    assert adapters_before_step(reference) == [None]
    # it keeps only what the formula needs: each adapter tensor summed over the experts
    assert [b.shape for b in before[0]] == [p.shape[1:] for p in starts]
    for optimizer in optimizers:
        optimizer.step()
    apply_pseudo_updates(block, before)
    apply_pseudo_updates(reference, [None])
    rho = (M - 2) / 2
    for p, plain, start in zip(
        block.lora.adapter_parameters(), reference.lora.adapter_parameters(), starts, strict=True
    ):
        update = plain.detach() - start  # AdamW's update on the real gradients alone
        expected = start + update + 0.5 * rho * q.view(-1, 1, 1) * update.sum(0) / mu.sum()
        torch.testing.assert_close(p.detach(), expected)
        # the never-selected expert moves only by the pseudo-update, at the scale of the real updates
        assert update[STARVED].abs().max() == 0 and (p.detach() - start)[STARVED].abs().max() > 0
    assert block._used_mass.abs().sum() == 0  # cleared after the step


def test_update_space_is_invariant_to_the_gradient_scale_under_adam():
    """Scaling the loss scales gradient-space PG's input but not Adam's step; update-space PG follows the step."""
    moved = []
    for scale in (1.0, 1e3):
        block, x = starved_setup(2, pg_space="update")
        block.zero_grad()
        (scale * block(x).pow(2).sum()).backward()
        optimizer = torch.optim.AdamW(block.lora.parameters(), lr=1e-2, weight_decay=0.0, eps=1e-12)
        down_b = block.lora.adapter_parameters()[-1]  # lora_B["down"], the last adapter tensor
        start = down_b.detach()[STARVED].clone()
        before = adapters_before_step(block)
        optimizer.step()
        apply_pseudo_updates(block, before)
        moved.append(down_b.detach()[STARVED] - start)
    torch.testing.assert_close(moved[0], moved[1])
