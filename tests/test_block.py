"""The UB-SMoE block against independent references, finite differences and its compute contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import naive_moe
from torch.utils.flop_counter import FlopCounterMode

from ubsmoe.moe import SwiGLU, UBSMoEBlock, UBSMoEConfig, budget_to_top_k, experts_from_dense


def make_block(M=8, H=16, I=8, k=2, dtype=torch.float64, randomize_lora=False, **config):
    gate_up = torch.randn(M, 2 * I, H, dtype=dtype) / H**0.5
    down = torch.randn(M, H, I, dtype=dtype) / I**0.5
    router = torch.randn(M, H, dtype=dtype)
    block = UBSMoEBlock(gate_up, down, router, k, UBSMoEConfig(**config))
    if randomize_lora:
        with torch.no_grad():
            for p in block.lora.adapter_parameters():
                p.copy_(torch.randn_like(p) * 0.3)
    return block


def reference_of(block, x, **overrides):
    lora = {t: (block.lora.lora_A[t], block.lora.lora_B[t]) for t in block.lora.targets}
    kwargs = dict(
        phi=block.phi if block.config.dmr else None,
        num_candidates=block.num_candidates,
        lora=lora,
        scaling=block.lora.scaling,
        normalize=block.config.normalize_gates,
        unit_gates=block.config.unit_gates,
    )
    kwargs.update(overrides)
    return naive_moe(x, block.gate_up_proj, block.down_proj, block.router_weight, block.top_k, **kwargs)


@pytest.mark.parametrize("top_k", [1, 2, 5, 8])
def test_zero_lora_zero_phi_equals_naive_reference(top_k):
    block = make_block(implementation="eager")
    block.top_k = top_k
    x = torch.randn(12, 16, dtype=torch.float64)
    expected = naive_moe(x, block.gate_up_proj, block.down_proj, block.router_weight, top_k)
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("num_candidates", [3, 4, None])
def test_lora_and_phi_equal_naive_reference(normalize, num_candidates):
    block = make_block(
        randomize_lora=True, normalize_gates=normalize, num_candidates=num_candidates, implementation="eager"
    )
    with torch.no_grad():
        block.phi.copy_(torch.linspace(-1.0, 1.0, 8, dtype=torch.float32))
    block.top_k = 3
    x = torch.randn(10, 16, dtype=torch.float64)
    torch.testing.assert_close(block(x), reference_of(block, x))


@pytest.mark.parametrize("projection", ["rows", "tokens"])
def test_grouped_mm_matches_eager_forward_and_gradients(projection):
    block = make_block(
        M=8, H=32, I=16, k=2, dtype=torch.float32, randomize_lora=True, lora_rank=4, lora_projection=projection
    )
    assert block.implementation_for(torch.float32) == "grouped_mm"
    x = torch.randn(3, 7, 32)
    results = {}
    for impl in ("grouped_mm", "eager"):
        object.__setattr__(block.config, "implementation", impl)
        block.zero_grad()
        out = block(x)
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        results[impl] = (
            out.detach(),
            [p.grad.clone() for p in block.lora.adapter_parameters()],
            block.phi.grad.clone(),
        )
    (out_g, grads_g, phi_g), (out_e, grads_e, phi_e) = results["grouped_mm"], results["eager"]
    torch.testing.assert_close(out_g, out_e, rtol=1e-4, atol=1e-5)
    for g, e in zip(grads_g, grads_e, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(phi_g, phi_e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("targets", [("gate", "up", "down"), ("up", "down"), ("gate",), ("down",)])
@pytest.mark.parametrize("unit_gates", [False, True])
def test_lora_per_token_equals_lora_per_row_and_the_reference(targets, unit_gates):
    """lora_projection "tokens" (A of gate/up and B of down over all experts per token) computes the same
    function and gradients as "rows" (every projection per routed row)."""
    torch.manual_seed(0)
    block = make_block(
        M=8,
        H=32,
        I=16,
        k=8,
        randomize_lora=True,
        lora_rank=4,
        lora_targets=targets,
        unit_gates=unit_gates,
        implementation="eager",
    )
    with torch.no_grad():
        block.phi.copy_(torch.linspace(-0.5, 0.5, 8))
    x = torch.randn(11, 32, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(11, 32, dtype=torch.float64)
    for top_k in (1, 3, 7):
        block.top_k = top_k
        results = {}
        for projection in ("rows", "tokens"):
            object.__setattr__(block.config, "lora_projection", projection)
            block.zero_grad()
            x.grad = None
            out = block(x)
            (out * weights).sum().backward()
            grads = [p.grad.clone() for p in block.lora.adapter_parameters()] + [block.phi.grad.clone()]
            results[projection] = (out.detach(), grads, x.grad.clone())
        assert block.lora_on_tokens
        torch.testing.assert_close(results["tokens"][0], reference_of(block, x.detach()))
        torch.testing.assert_close(results["rows"][0], results["tokens"][0])
        for got, want in zip(results["tokens"][1], results["rows"][1], strict=True):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(results["tokens"][2], results["rows"][2])


@pytest.mark.parametrize("projection", ["rows", "tokens"])
def test_an_empty_batch_gives_an_empty_output(projection):
    block = make_block(M=8, H=32, I=16, k=2, dtype=torch.float32, randomize_lora=True, lora_projection=projection)
    block.train()
    x = torch.zeros(0, 32, requires_grad=True)
    out = block(x)
    assert out.shape == (0, 32)
    out.sum().backward()
    assert x.grad.shape == (0, 32)


def test_grouped_mm_matches_naive_reference_with_unaligned_fallback():
    # H=6 is not 16-byte aligned in float32: auto must fall back to eager and still be right
    block = make_block(M=4, H=6, I=3, k=2, dtype=torch.float32, randomize_lora=True, lora_rank=2)
    assert block.implementation_for(torch.float32) == "eager"
    x = torch.randn(5, 6)
    torch.testing.assert_close(block(x), reference_of(block, x), rtol=1e-4, atol=1e-5)


def test_matches_transformers_olmoe_sparse_block():
    transformers = pytest.importorskip("transformers")
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    for norm in (False, True):
        cfg = transformers.OlmoeConfig(
            hidden_size=32, intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm
        )
        hf = OlmoeSparseMoeBlock(cfg).double()
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.2)
        block = UBSMoEBlock(
            hf.experts.gate_up_proj,
            hf.experts.down_proj,
            hf.gate.weight,
            hf.gate.top_k,
            UBSMoEConfig(normalize_gates=norm, implementation="eager"),
        )
        assert block.gate_up_proj is hf.experts.gate_up_proj  # by reference, no copy
        x = torch.randn(2, 5, 32, dtype=torch.float64)
        torch.testing.assert_close(block(x), hf(x))


def test_all_groups_with_unit_gates_equal_the_dense_ffn():
    H, I, M = 16, 32, 4
    gate, up, down = (
        torch.randn(I, H, dtype=torch.float64),
        torch.randn(I, H, dtype=torch.float64),
        torch.randn(H, I, dtype=torch.float64),
    )
    groups = list(torch.randperm(I).view(M, I // M))
    gate_up, down_e = experts_from_dense(gate, up, down, groups)
    block = UBSMoEBlock(gate_up, down_e, torch.randn(M, H, dtype=torch.float64), M, UBSMoEConfig(unit_gates=True))
    x = torch.randn(9, H, dtype=torch.float64)
    torch.testing.assert_close(block(x), SwiGLU(gate, up, down)(x))


def test_shared_expert_is_always_on_and_gated():
    block = make_block(k=2)
    shared = SwiGLU(
        torch.randn(8, 16, dtype=torch.float64),
        torch.randn(8, 16, dtype=torch.float64),
        torch.randn(16, 8, dtype=torch.float64),
    )
    gate = torch.nn.Linear(16, 1, bias=False).double()
    with_shared = UBSMoEBlock(
        block.gate_up_proj,
        block.down_proj,
        block.router_weight,
        2,
        block.config,
        shared_expert=shared,
        shared_expert_gate=gate,
    )
    x = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(with_shared(x), block(x) + torch.sigmoid(gate(x)) * shared(x))


def test_lora_and_phi_gradients_match_finite_differences():
    block = make_block(M=6, H=8, I=4, k=2, randomize_lora=True, lora_rank=2, num_candidates=4)
    block.phi.data = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.4, -0.5], dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    names = [n for n, p in block.named_parameters() if p.requires_grad]
    assert {"phi", "lora.lora_A.gate", "lora.lora_B.down"} <= set(names)
    params = tuple(dict(block.named_parameters())[n].detach().clone().requires_grad_() for n in names)
    weights = torch.randn(5, 8, dtype=torch.float64)

    def loss(*values):
        out = torch.func.functional_call(block, dict(zip(names, values, strict=True)), (x,))
        return (out * weights).sum()

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-6)


def test_unit_gates_pass_gradient_to_phi():
    block = make_block(k=2, unit_gates=True, randomize_lora=True)
    block(torch.randn(6, 16, dtype=torch.float64)).pow(2).sum().backward()
    assert block.phi.grad is not None and block.phi.grad.abs().sum() > 0


def test_counts_sum_to_k_times_tokens_and_reset():
    block = make_block(k=3)
    block(torch.randn(4, 5, 16, dtype=torch.float64))
    block(torch.randn(7, 16, dtype=torch.float64))
    stats = block.utilization()
    assert stats["tokens"].item() == 27
    assert stats["counts"].sum().item() == 3 * 27
    block.reset_utilization()
    assert block.utilization()["counts"].sum() == 0 and block.utilization()["tokens"] == 0


def test_only_selected_experts_are_computed():
    """FLOPs of the expert path fall linearly with K: inactive experts never run."""
    block = make_block(M=8, H=64, I=32, k=8, dtype=torch.float32, implementation="eager")
    x = torch.randn(64, 64)

    def flops(k):
        block.top_k = k
        with FlopCounterMode(display=False) as counter:
            block(x)
        return counter.get_total_flops()

    router = 2 * 64 * 64 * 8
    per_k = (flops(8) - router) / 8
    for k in (1, 2, 4):
        assert flops(k) - router == pytest.approx(k * per_k, rel=1e-6)


def test_frozen_weights_are_shared_and_not_trainable():
    block = make_block()
    trainable = set(block.trainable_parameters())
    assert "gate_up_proj" not in trainable and "router_weight" not in trainable
    assert trainable == {"phi", *(f"lora.lora_{ab}.{t}" for ab in "AB" for t in ("gate", "up", "down"))}
    assert set(block.state_dict()) >= trainable  # statistics buffers stay out of the state dict
    assert not any("count" in k or "mass" in k for k in block.state_dict())


def test_router_trainable_and_dmr_off_switches():
    block = make_block(router_trainable=True, dmr=False)
    assert block.router_weight.requires_grad and not block.phi.requires_grad
    assert block.range_loss().item() == 0.0


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="down_proj must have shape"):
        UBSMoEBlock(torch.zeros(4, 8, 6), torch.zeros(4, 6, 3), torch.zeros(4, 6), 2)
    with pytest.raises(ValueError, match="native_top_k"):
        UBSMoEBlock(torch.zeros(4, 8, 6), torch.zeros(4, 6, 4), torch.zeros(4, 6), 5)
    block = make_block()
    with pytest.raises(ValueError, match="top_k must be"):
        block.top_k = 0
    with pytest.raises(ValueError, match="lora_targets"):
        UBSMoEConfig(lora_targets=("gate", "q_proj"))
    with pytest.raises(ValueError, match="unknown UBSMoEConfig fields: rank"):
        UBSMoEConfig.from_dict({"rank": 3})


def test_config_round_trips_and_budget_rule():
    config = UBSMoEConfig(lora_rank=4, num_candidates=16, lora_targets=("gate", "down"))
    assert UBSMoEConfig.from_dict(config.to_dict()) == config
    assert [budget_to_top_k(b, 8) for b in (0.25, 0.5, 0.75, 1.0)] == [2, 4, 6, 8]
    assert budget_to_top_k(0.05, 8) == 1
    with pytest.raises(ValueError, match="budget"):
        budget_to_top_k(1.5, 8)


def test_partial_lora_targets_and_rank_zero():
    x = torch.randn(6, 16, dtype=torch.float64)
    partial = make_block(randomize_lora=True, lora_targets=("up", "down"), implementation="eager")
    torch.testing.assert_close(partial(x), reference_of(partial, x))
    plain = make_block(lora_rank=0)
    assert plain.lora.targets == ()
    torch.testing.assert_close(plain(x), reference_of(plain, x))


def test_bfloat16_weights_run_with_float32_adapters():
    block = make_block(M=8, H=32, I=16, dtype=torch.bfloat16)
    assert block.lora.lora_A["gate"].dtype == torch.float32
    out = block(torch.randn(4, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_activation_default_is_silu():
    assert make_block().activation is F.silu


def test_renormalised_gates_at_k1_still_train_phi():
    block = make_block(normalize_gates=True, randomize_lora=True)
    block.top_k = 1
    x = torch.randn(8, 16, dtype=torch.float64)
    out = block(x)
    torch.testing.assert_close(out, reference_of(block, x))  # value: gate exactly 1
    out.pow(2).sum().backward()
    assert block.phi.grad.abs().sum() > 1e-6
