"""MoEfication of dense Llama-family models: identity at K = M, sparsity at K < M, grouping, router, save/load, cache."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")

from ubsmoe.methods.a3smoe import OutputScale  # noqa: E402
from ubsmoe.models import ModelLoadError, UnsupportedModelError, tiny_config  # noqa: E402
from ubsmoe.models.moefication import (  # noqa: E402
    MoEficationConfig,
    MoEfiedBlock,
    balanced_kmeans,
    calibration_batches,
    calibration_fingerprint,
    dense_layout,
    expert_outputs,
    group_neurons,
    load_moefied,
    moefied_blocks,
    moefy,
    moefy_cached,
    reconstruction_error,
    recover_block,
    save_moefied,
    split_shared,
)
from ubsmoe.moe import (  # noqa: E402
    SwiGLU,
    UBSMoEConfig,
    attach_extensions,
    collect_utilization,
    experts_from_dense,
    set_top_k,
)

LORA = UBSMoEConfig(lora_rank=4, lora_alpha=8.0)
TOKENS = 512  # calibration tokens of the tiny model


def tiny_llama(dtype=torch.float64, model_type="llama", **overrides) -> transformers.PreTrainedModel:
    """Hidden 32, intermediate 64, 2 layers, vocab 128; FFN weights scaled so the FFNs matter."""
    values = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **values))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mlp." in name:
                parameter.normal_(0.0, 1.0 / parameter.shape[-1] ** 0.5)
    return model.to(dtype).eval()


def token_ids(batch=16, length=32, seed=1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def moefied(model=None, ids=None, **config) -> transformers.PreTrainedModel:
    ids = token_ids() if ids is None else ids
    config = MoEficationConfig(**{"num_experts": 4, "calibration_tokens": ids.numel(), **config})
    return moefy(model if model is not None else tiny_llama(), ids, config, LORA)


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids(2, 12, seed=5) if ids is None else ids).logits


def randomize_lora(model_or_block, scale=0.3) -> None:
    with torch.no_grad():
        for name, parameter in model_or_block.named_parameters():
            if ".lora_" in name or name.startswith("lora."):
                parameter.copy_(torch.randn_like(parameter) * scale)


def set_dense_path(model, on: bool) -> None:
    for _, block in moefied_blocks(model):
        block.dense_at_full_k = on


# ---- 1. K = M is the dense model; K < M computes only what is selected --------------------------------
@pytest.mark.parametrize("grouping", ["coactivation", "gate_kmeans", "contiguous"])
def test_k_equals_m_reproduces_the_dense_model(grouping):
    original = tiny_llama()
    model = moefied(copy.deepcopy(original), grouping=grouping)
    assert len(moefied_blocks(model)) == 2
    expected = logits(original)
    torch.testing.assert_close(logits(model), expected, rtol=1e-12, atol=1e-12)  # dense path
    set_dense_path(model, False)
    torch.testing.assert_close(logits(model), expected, rtol=1e-12, atol=1e-12)  # grouped path, every expert
    set_top_k(model, 2)
    assert (logits(model) - expected).abs().max() > 1e-3  # K < M is a different (sparser) function


def test_float32_model_and_another_family():
    for model_type in ("llama", "qwen2"):
        original = tiny_llama(torch.float32, model_type=model_type)
        model = moefied(copy.deepcopy(original))
        torch.testing.assert_close(logits(model), logits(original), rtol=1e-5, atol=1e-5)


def make_block(M=4, H=16, n=6, S=5, dtype=torch.float64, **config):
    torch.manual_seed(3)
    inner = M * n + S
    gate, up, down = (
        torch.randn(inner, H, dtype=dtype),
        torch.randn(inner, H, dtype=dtype),
        torch.randn(H, inner, dtype=dtype),
    )
    groups = list(torch.arange(M * n).view(M, n))
    gate_up, down_e = experts_from_dense(gate, up, down, groups)
    shared = SwiGLU(gate[M * n :], up[M * n :], down[:, M * n :]) if S else None
    block = MoEfiedBlock(
        gate_up,
        dense_layout(down_e),
        torch.randn(M, H, dtype=dtype),
        M,
        UBSMoEConfig(unit_gates=True, lora_rank=3, **config),
        shared_expert=shared,
        activation=F.silu,
    )
    return block, SwiGLU(gate, up, down)


@pytest.mark.parametrize("targets", [("gate", "up", "down"), ("up",), ("gate", "down")])
def test_dense_path_equals_grouped_path_with_lora_values_and_gradients(targets):
    block, _ = make_block(lora_targets=targets, implementation="eager")
    randomize_lora(block)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    weights = torch.randn(3, 7, 16, dtype=torch.float64)
    results = {}
    for dense in (True, False):
        block.dense_at_full_k = dense
        block.zero_grad(set_to_none=True)
        with torch.no_grad():
            no_grad = block(x)  # evaluation takes the same (factored) path
        out = block(x)
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in block.named_parameters() if "lora" in n}
        results[dense] = (no_grad, out, grads)
    torch.testing.assert_close(results[True][0], results[False][1])
    torch.testing.assert_close(results[True][1], results[False][1])
    assert results[True][2].keys() == results[False][2].keys() and results[True][2]
    for name, grad in results[True][2].items():
        torch.testing.assert_close(grad, results[False][2][name], msg=name)


def test_zero_lora_block_is_the_dense_ffn_and_records_statistics():
    block, dense = make_block()
    block.eval()
    x = torch.randn(10, 16, dtype=torch.float64)
    torch.testing.assert_close(block(x), dense(x))
    stats = block.utilization()
    assert stats["tokens"].item() == 10 and stats["counts"].tolist() == [10] * 4  # each expert once per token
    # phi gets no gradient on the dense path (every expert is selected whatever phi is); PG sees no missed mass
    block.train()
    randomize_lora(block)
    block(x).pow(2).sum().backward()
    assert block.phi.grad is None
    assert block._used_mass.sum().item() == pytest.approx(10.0)
    assert block._scaled_missed_mass.abs().sum().item() == 0.0


def test_only_the_shared_group_and_selected_experts_are_computed():
    M, H, n, S, r, T = 4, 16, 6, 5, 3, 20
    block, _ = make_block(M, H, n, S, dtype=torch.float32, implementation="eager")
    block.eval()  # no PG bookkeeping (which would add a router matmul to the dense path)
    x = torch.randn(T, H)

    def flops(k, dense=True):
        block.top_k, block.dense_at_full_k = k, dense
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            block(x)
        return counter.get_total_flops()

    router, shared = 2 * T * H * M, 6 * T * S * H
    # routed path, per (token, expert) row: frozen gate/up/down, the gate/up LoRA B as one block-diagonal
    # (2n, 2r) matmul, the down LoRA A; per token for all M experts (MoEfied default "tokens"): the
    # gate/up LoRA A and the down LoRA B
    assert block.lora_on_tokens
    per_row = T * (6 * n * H + 2 * (2 * r) * (2 * n) + 2 * r * n)
    per_token = T * M * (2 * H * (2 * r) + 2 * r * H)
    for k in range(1, M + 1):
        assert flops(k, dense=False) == router + shared + k * per_row + per_token
    # the dense path at K = M: no router, every expert's LoRA A and B of each target
    per_expert = T * (6 * n * H + 6 * H * r + 6 * n * r)
    assert flops(M) == shared + M * per_expert
    assert flops(M) < flops(M, dense=False)
    # per routed row instead: every LoRA projection per row
    block.config = dataclasses.replace(block.config, lora_projection="rows")
    assert not block.lora_on_tokens
    per_row = T * (6 * n * H + 2 * H * (2 * r) + 2 * (2 * r) * (2 * n) + 2 * r * n + 2 * r * H)
    for k in range(1, M + 1):
        assert flops(k, dense=False) == router + shared + k * per_row


# ---- 2. grouping ---------------------------------------------------------------------------------
def test_groups_partition_the_routed_neurons_disjoint_from_the_shared_group():
    model = moefied(num_experts=5)  # 64 neurons: 16 shared + 48 routed, 48 % 5 = 3 more go to the shared group
    for _, block in moefied_blocks(model):
        assert len(block.shared_neurons) == 19
        assert [len(g) for g in block.neuron_groups] == [9] * 5
        everything = block.shared_neurons + [i for g in block.neuron_groups for i in g]
        assert sorted(everything) == list(range(64))
        assert block.intermediate_size == 9 and block.shared_expert.gate_weight.shape == (19, 32)


def test_split_shared_takes_the_highest_mean_activations():
    mean_abs = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 3.0, 0.05, 0.01, 2.0, 0.5])
    shared, routed = split_shared(mean_abs, 0.2, 4)  # 2 shared, 8 routed
    assert shared.tolist() == [1, 3] and routed.tolist() == [0, 2, 4, 5, 6, 7, 8, 9]
    shared, routed = split_shared(mean_abs, 0.2, 3)  # 8 % 3 = 2 more: the next two by mean |a|
    assert shared.tolist() == [1, 3, 5, 8] and len(routed) == 6
    with pytest.raises(ValueError, match="fewer than num_experts"):
        split_shared(mean_abs, 0.5, 8)


def planted_ffn(M=4, n=8, H=24, seed=0):
    """A SwiGLU whose neurons form M clusters (similar gate and up rows), scattered over the index."""
    generator = torch.Generator().manual_seed(seed)
    centres_gate, centres_up = torch.randn(M, H, generator=generator), torch.randn(M, H, generator=generator)
    cluster = torch.randperm(M * n, generator=generator) % M
    gate = centres_gate[cluster] + 0.05 * torch.randn(M * n, H, generator=generator)
    up = centres_up[cluster] + 0.05 * torch.randn(M * n, H, generator=generator)
    down = torch.randn(H, M * n, generator=generator) / (M * n) ** 0.5
    return gate.double(), up.double(), down.double(), cluster


def test_coactivation_grouping_recovers_planted_clusters_and_beats_contiguous():
    M, n, H = 4, 8, 24
    gate, up, down, cluster = planted_ffn(M, n, H)
    generator = torch.Generator().manual_seed(1)
    x_cal, x_test = torch.randn(400, H, generator=generator).double(), torch.randn(400, H, generator=generator).double()
    activations = (F.silu(x_cal @ gate.T) * (x_cal @ up.T)).abs()
    gram = activations.T @ activations
    routed = torch.arange(M * n)
    errors = {}
    for grouping in ("coactivation", "gate_kmeans", "contiguous"):
        groups = group_neurons(routed, M, grouping, coactivation_gram=gram, gate_weight=gate, seed=0)
        assert sorted(torch.cat(groups).tolist()) == routed.tolist() and {len(g) for g in groups} == {n}
        if grouping != "contiguous":  # each planted cluster is found exactly
            assert sorted(sorted(g.tolist()) for g in groups) == sorted(
                sorted((cluster == c).nonzero().reshape(-1).tolist()) for c in range(M)
            )
        gate_up, down_e = experts_from_dense(gate, up, down, groups)
        block = MoEfiedBlock(gate_up, down_e, torch.zeros(M, H, dtype=torch.float64), M, UBSMoEConfig(unit_gates=True))
        target = SwiGLU(gate, up, down)(x_test)
        errors[grouping] = reconstruction_error(block, x_test, target, M // 2, router="oracle")
    assert errors["coactivation"] < 0.5 * errors["contiguous"]
    # deterministic given the seed
    again = group_neurons(routed, M, "coactivation", coactivation_gram=gram, seed=0)
    first = group_neurons(routed, M, "coactivation", coactivation_gram=gram, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))


def test_balanced_kmeans_gives_equal_clusters_on_unbalanced_data():
    points = torch.cat([torch.randn(20, 3) + 10, torch.randn(4, 3)]).double()  # one big blob, one small
    labels = balanced_kmeans(points @ points.T, 3, seed=0)
    assert torch.bincount(labels, minlength=3).tolist() == [8, 8, 8]


def test_moefy_is_deterministic_given_the_seed():
    first, second = moefied(), moefied()
    for (_, a), (_, b) in zip(moefied_blocks(first), moefied_blocks(second), strict=True):
        assert a.neuron_groups == b.neuron_groups and a.shared_neurons == b.shared_neurons
        assert torch.equal(a.router_weight, b.router_weight)


# ---- 3. router ------------------------------------------------------------------------------------
def held_out_inputs(model) -> list[torch.Tensor]:
    """Each MoEfied block's input on held-out tokens."""
    captured = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
        for _, b in moefied_blocks(model)
    ]
    logits(model, token_ids(8, 32, seed=9))
    for hook in hooks:
        hook.remove()
    return captured


def top_k_recall(scores: torch.Tensor, norms: torch.Tensor, k: int) -> float:
    chosen = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
    best = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, norms.topk(k, dim=1).indices, True)
    return (chosen & best).sum().item() / best.sum().item()


def test_ridge_router_beats_a_random_router_at_predicting_the_largest_experts():
    model = moefied(ids=token_ids(64, 32), num_experts=8, shared_fraction=0.0)
    for (_, block), x in zip(moefied_blocks(model), held_out_inputs(model), strict=True):
        norms = expert_outputs(block, x).norm(dim=-1)
        ridge = top_k_recall(x @ block.router_weight.T, norms, 2)
        random = top_k_recall(x @ torch.randn_like(block.router_weight).T, norms, 2)
        assert ridge > random + 0.15, (ridge, random)
        assert ridge > 0.5


def test_router_logits_are_scaled_to_the_requested_spread():
    for target in (0.5, 2.0):
        model = moefied(router_logit_std=target)
        for (_, block), x in zip(moefied_blocks(model), held_out_inputs(model), strict=True):
            spread = (x @ block.router_weight.T).var(dim=1, correction=0).mean().sqrt()
            assert spread.item() == pytest.approx(target, rel=0.1)


def test_centroid_router_is_the_mean_gate_row():
    original = tiny_llama()
    model = moefied(copy.deepcopy(original), router="centroid", router_logit_std=None)
    for (name, block), layer in zip(moefied_blocks(model), original.model.layers, strict=True):
        gate = layer.mlp.gate_proj.weight
        expected = torch.stack([gate[g].mean(0) for g in block.neuron_groups])
        torch.testing.assert_close(block.router_weight, expected, msg=name)


# ---- 4. recovery ------------------------------------------------------------------------------------
def test_recovery_reduces_the_layer_distillation_loss():
    block, dense = make_block(M=4, H=16, n=6, S=4, dtype=torch.float32)
    x, x_test = torch.randn(512, 16) + 0.5, torch.randn(512, 16) + 0.5
    y, y_test = dense(x).detach(), dense(x_test).detach()
    config = MoEficationConfig(num_experts=4, recovery_steps=150, recovery_batch_size=128, recovery_lr=1e-2)
    before = {k: reconstruction_error(block, x_test, y_test, k) for k in (1, 2)}
    losses = recover_block(block, x, y, config, seed=0)
    after = {k: reconstruction_error(block, x_test, y_test, k) for k in (1, 2)}
    assert len(losses) == 150 and all(after[k] < 0.8 * before[k] for k in (1, 2)), (before, after)
    assert not block.gate_up_proj.requires_grad and block.gate_up_proj.grad is None  # frozen again
    assert block.top_k == 4 and block.utilization()["tokens"].item() == 0  # recovery left no trace


def test_moefy_with_recovery_runs_and_keeps_k_equal_m_close():
    original = tiny_llama(torch.float32)
    config = dict(recovery=True, recovery_steps=10, recovery_batch_size=64, recovery_tokens=256)
    model = moefied(copy.deepcopy(original), **config)
    assert model.moefication_config.recovery
    assert (logits(model) - logits(original)).abs().max() < 0.5


# ---- 5. save / load and the calibration cache ------------------------------------------------------
def test_save_then_load_gives_identical_logits(tmp_path):
    model = moefied()
    save_moefied(model, tmp_path)
    description = json.loads((tmp_path / "moefication.json").read_text())
    assert description["moefication"]["num_experts"] == 4 and description["aliases"]  # tied lm_head
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
    assert "model.layers.0.mlp.router_weight" in keys and "model.layers.1.mlp.shared_expert.gate_weight" in keys
    assert not any(".lora." in k or k.endswith(".phi") for k in keys)  # the trainable state is saved elsewhere
    loaded = load_moefied(tmp_path)
    for k in (4, 2):
        set_top_k(model, k)
        set_top_k(loaded, k)
        torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    for (_, a), (_, b) in zip(moefied_blocks(model), moefied_blocks(loaded), strict=True):
        assert a.neuron_groups == b.neuron_groups and a.shared_neurons == b.shared_neurons
        assert b.down_proj.stride() == a.down_proj.stride()
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n or n.endswith(".phi") for n in trainable)
    other = load_moefied(tmp_path, UBSMoEConfig(lora_rank=2, dmr=False))
    assert all(b.config.lora_rank == 2 and b.config.unit_gates for _, b in moefied_blocks(other))
    # a method's block extension (A3SMoE's output scale) is not in the file, and the file loads into a
    # model that has one; an older file's retired UBSMoEConfig fields still read
    description = json.loads((tmp_path / "moefication.json").read_text())
    description["ubsmoe"].update(load_balance_coef=0.0, output_rescale=False)
    (tmp_path / "moefication.json").write_text(json.dumps(description))
    rescaled = load_moefied(tmp_path)
    attach_extensions(rescaled, {"output_scale": OutputScale})
    assert all(float(b.local_extensions["output_scale"].scale) == 1.0 for _, b in moefied_blocks(rescaled))
    save_moefied(rescaled, tmp_path / "again")
    assert not any("extensions" in k for k in load_file(str(tmp_path / "again" / "model.safetensors")))


def test_cache_hit_does_not_recalibrate(tmp_path):
    calls = []

    def load_base():
        calls.append(1)
        return tiny_llama()

    config = MoEficationConfig(num_experts=4, calibration_tokens=TOKENS)
    first = moefy_cached(tmp_path, load_base, token_ids(), config, LORA, base_identity="tiny-llama")
    assert calls == [1] and not first.moefication_cache["hit"]
    second = moefy_cached(
        tmp_path, lambda: pytest.fail("recalibrated"), token_ids(), config, LORA, base_identity="tiny-llama"
    )
    assert second.moefication_cache["hit"] and second.moefication_cache["key"] == first.moefication_cache["key"]
    torch.testing.assert_close(logits(second), logits(first), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == [first.moefication_cache["key"]]  # no temporary left
    # a different config or calibration set is a different entry; a model passed directly is fingerprinted
    moefy_cached(tmp_path, tiny_llama(), token_ids(seed=2), config, LORA)
    moefy_cached(
        tmp_path,
        load_base,
        token_ids(),
        MoEficationConfig(num_experts=2, calibration_tokens=TOKENS),
        base_identity="tiny-llama",
    )
    assert len(list(tmp_path.iterdir())) == 3 and len(calls) == 2


def test_chunked_calibration_equals_one_pass():
    whole = moefied(tiny_llama())
    chunked = moefy(
        tiny_llama(),
        token_ids(),
        MoEficationConfig(num_experts=4, calibration_tokens=TOKENS),
        LORA,
        max_statistics_bytes=1,
    )
    for (_, a), (_, b) in zip(moefied_blocks(whole), moefied_blocks(chunked), strict=True):
        assert a.neuron_groups == b.neuron_groups
        torch.testing.assert_close(a.router_weight, b.router_weight, rtol=1e-6, atol=1e-8)


# ---- 6. statistics, data and errors ----------------------------------------------------------------
def test_utilization_counts_at_every_k():
    model = moefied()
    for k in (4, 1):
        set_top_k(model, k)
        logits(model)
        stats = collect_utilization(model)
        assert stats["counts"].sum(1).tolist() == [k * 24] * 2 and stats["tokens"].tolist() == [24] * 2
        for _, block in moefied_blocks(model):
            block.reset_utilization()


def test_calibration_batches_respect_the_token_budget_and_masks():
    ids = token_ids(4, 10)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    batches = calibration_batches([{"input_ids": ids, "attention_mask": mask}], 20)
    (kept_ids, kept), *_ = batches
    assert int(kept.sum()) == 20 and not kept[0, :3].any() and kept_ids.shape[0] == 3
    split = calibration_batches([token_ids(16, 32)], 100_000, batch_size=5)  # one big batch: forwards of <= 5 rows
    assert [b[0].shape[0] for b in split] == [5, 5, 5, 1] and sum(int(m.sum()) for _, m in split) == 512
    assert calibration_fingerprint(split) == calibration_fingerprint(calibration_batches(token_ids(16, 32), 10**5))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        calibration_batches(torch.full((2, 4), 500), 10, vocab_size=128)
    with pytest.raises(ValueError, match="integer tensor"):
        calibration_batches(torch.randn(2, 4), 10)
    with pytest.raises(ValueError, match="no tokens"):
        calibration_batches([], 10)
    with pytest.warns(UserWarning, match="fewer than calibration_tokens"):
        moefy(tiny_llama(), token_ids(2, 8), MoEficationConfig(num_experts=4, calibration_tokens=1000))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_experts", 1, "num_experts must be an integer >= 2"),
        ("shared_fraction", 1.0, r"shared_fraction must be in \[0, 1\)"),
        ("grouping", "random", "grouping must be one of coactivation, gate_kmeans, contiguous"),
        ("router", "mlp", "router must be one of ridge, centroid"),
        ("ridge_lambda", -1.0, "ridge_lambda"),
        ("router_logit_std", 0.0, "router_logit_std"),
        ("calibration_tokens", 0, "calibration_tokens must be an integer >= 1"),
        ("recovery_lr", float("nan"), "recovery_lr"),
        ("recovery_top_ks", [0, 9], "recovery_top_ks"),
    ],
)
def test_bad_config_values_give_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        MoEficationConfig(**{field: value})


def test_config_round_trips_and_rejects_unknown_fields():
    config = MoEficationConfig(num_experts=16, grouping="gate_kmeans", recovery_top_ks=[2, 16])
    assert MoEficationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert MoEficationConfig().top_ks() == (2, 4, 6, 8)
    with pytest.raises(ValueError, match="unknown MoEficationConfig fields: experts"):
        MoEficationConfig.from_dict({"experts": 8})


def test_unsupported_models_give_clear_errors(tmp_path):
    native = transformers.AutoModelForCausalLM.from_config(tiny_config("olmoe"))
    with pytest.raises(UnsupportedModelError, match="native MoE model: adapt it with"):
        moefy(native, token_ids(), MoEficationConfig())
    gpt2 = transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    )
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2'.*llama \(Llama\)"):
        moefy(gpt2, token_ids(), MoEficationConfig())
    with pytest.raises(UnsupportedModelError, match="biases"):
        moefy(tiny_llama(mlp_bias=True), token_ids(), MoEficationConfig())
    with pytest.raises(ModelLoadError, match="fewer than num_experts=64"):
        moefy(tiny_llama(), token_ids(), MoEficationConfig(num_experts=64))
    model = moefied()
    with pytest.raises(ModelLoadError, match="already MoEfied"):
        moefy(model, token_ids(), MoEficationConfig())
    with pytest.raises(ModelLoadError, match="needs a model returned by moefy"):
        save_moefied(tiny_llama(), tmp_path / "dense")
    with pytest.raises(ModelLoadError, match="moefication.json is missing"):
        load_moefied(tmp_path / "nothing")
    save_moefied(model, tmp_path / "m")
    description = json.loads((tmp_path / "m" / "moefication.json").read_text())
    description["version"] = 99
    (tmp_path / "m" / "moefication.json").write_text(json.dumps(description))
    with pytest.raises(ModelLoadError, match="format version 99"):
        load_moefied(tmp_path / "m")
