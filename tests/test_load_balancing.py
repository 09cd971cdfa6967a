import pytest
import torch

from ubsmoe.moe.load_balancing import switch_load_balancing_loss


def test_uniform_routing_gives_one():
    num_experts, tokens = 4, 8
    probs = torch.full((tokens, num_experts), 1.0 / num_experts)
    top1 = torch.arange(tokens) % num_experts
    torch.testing.assert_close(switch_load_balancing_loss(probs, top1, num_experts), torch.tensor(1.0))
    top2 = torch.stack([top1, (top1 + 1) % num_experts], dim=-1)
    torch.testing.assert_close(switch_load_balancing_loss(probs, top2, num_experts), torch.tensor(1.0))


def test_collapse_onto_one_expert_gives_num_experts():
    num_experts = 5
    probs = torch.zeros(2, 3, num_experts)
    probs[..., 2] = 1.0
    index = torch.full((2, 3, 1), 2)
    torch.testing.assert_close(switch_load_balancing_loss(probs, index, num_experts), torch.tensor(5.0))


def test_matches_the_formula_and_gradient_flows_to_probs_only():
    num_experts = 4
    logits = torch.randn(6, num_experts, dtype=torch.float64, requires_grad=True)
    probs = logits.softmax(-1)
    index = probs.topk(2, dim=-1).indices
    loss = switch_load_balancing_loss(probs, index, num_experts)
    f = torch.bincount(index.reshape(-1), minlength=num_experts).double() / index.numel()
    torch.testing.assert_close(loss, num_experts * (f * probs.mean(0)).sum())
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # d loss / d P_i = M f_i: the gradient wrt probs is M f_i / T for every token
    probs2 = probs.detach().clone().requires_grad_(True)
    switch_load_balancing_loss(probs2, index, num_experts).backward()
    torch.testing.assert_close(probs2.grad, (num_experts * f / 6).expand(6, -1))


def test_mask_and_errors():
    num_experts = 3
    probs = torch.full((4, num_experts), 1.0 / num_experts)
    index = torch.tensor([0, 1, 2, 0])
    masked = switch_load_balancing_loss(probs, index, num_experts, mask=torch.tensor([True, True, True, False]))
    torch.testing.assert_close(masked, torch.tensor(1.0))
    with pytest.raises(ValueError, match="num_experts"):
        switch_load_balancing_loss(probs, index, 4)
    with pytest.raises(ValueError, match="lie in"):
        switch_load_balancing_loss(probs, index + 1, num_experts)
    with pytest.raises(ValueError, match="must be"):
        switch_load_balancing_loss(probs, index[:3], num_experts)
    with pytest.raises(ValueError, match="integer"):
        switch_load_balancing_loss(probs, index.float(), num_experts)
    with pytest.raises(ValueError, match="at least one"):
        switch_load_balancing_loss(probs, index, num_experts, mask=torch.zeros(4, dtype=torch.bool))
