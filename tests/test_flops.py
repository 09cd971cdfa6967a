"""Analytic FLOPs per token (ubsmoe.metrics.flops) against torch's FlopCounterMode on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ubsmoe.metrics import COMPONENTS, OLMOE_1B_7B, ModelDims, count_flops, flops_per_token, olmoe_1b_7b_table
from ubsmoe.moe import SwiGLU, UBSMoEBlock, UBSMoEConfig, experts_from_dense, set_top_k

transformers = pytest.importorskip("transformers")

from ubsmoe.models import adapt_moe_model, tiny_config  # noqa: E402

BATCH, SEQ = 2, 12
RANK = 4


def build(model_type: str, config: UBSMoEConfig | None = None, attn: str = "eager", **overrides):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_config(model_type, **overrides), attn_implementation=attn
    )
    return adapt_moe_model(model, config or UBSMoEConfig(lora_rank=RANK, implementation="eager"))


def ids() -> torch.Tensor:
    return torch.randint(3, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def measured(model, training: bool) -> int:
    tokens = ids()
    if not training:
        model.eval()
        with torch.no_grad():
            return count_flops(lambda: model(tokens))
    model.train()

    def step():
        model(tokens, labels=tokens).loss.backward()

    total = count_flops(step)
    model.zero_grad(set_to_none=True)
    return total


def analytic(model, top_k: int, training: bool, **kwargs) -> dict[str, int]:
    dims = ModelDims.from_model(model, seq_len=SEQ)
    return flops_per_token(dims, top_k, RANK, training=training, **kwargs)


# ---- the analytic count equals the counter's, exactly ---------------------------------------------------
@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe"])
def test_matches_flop_counter_at_several_k(model_type):
    model = build(model_type)
    tokens = BATCH * SEQ
    for top_k in (1, 2, 5, 8):
        set_top_k(model, top_k)
        for training in (False, True):
            expected = analytic(model, top_k, training)["total"] * tokens
            assert measured(model, training) == expected, (model_type, top_k, training)


@pytest.mark.parametrize(
    ("model_type", "config", "overrides", "kwargs"),
    [
        # a dense first layer gets no backward; the first MoE layer only a partial one
        ("qwen2_moe", UBSMoEConfig(lora_rank=RANK, implementation="eager"), {"mlp_only_layers": [0]}, {}),
        # down-only LoRA: with DMR the first layer's gates (phi) still need the down projection's input gradient
        ("olmoe", UBSMoEConfig(lora_rank=RANK, lora_targets=("down",), implementation="eager"), {}, {}),
        ("olmoe", UBSMoEConfig(lora_rank=RANK, lora_targets=("down",), dmr=False, implementation="eager"), {}, {}),
        ("olmoe", UBSMoEConfig(lora_rank=RANK, lora_targets=("up",), implementation="eager"), {}, {}),
        (
            "qwen3_moe",
            UBSMoEConfig(lora_rank=RANK, dmr=False, router_trainable=True, implementation="eager"),
            {"num_hidden_layers": 3},
            {},
        ),
    ],
)
def test_matches_flop_counter_variants(model_type, config, overrides, kwargs):
    model = build(model_type, config, **overrides)
    set_top_k(model, 3)
    for training in (False, True):
        expected = flops_per_token(
            ModelDims.from_model(model, seq_len=SEQ),
            3,
            RANK,
            config.lora_targets,
            training=training,
            dmr=config.dmr,
            router_trainable=config.router_trainable,
        )
        assert measured(model, training) == expected["total"] * BATCH * SEQ, training


def test_cpu_sdpa_attention_is_invisible_to_the_counter():
    """On CPU, FlopCounterMode counts 0 for SDPA; everything else still matches exactly."""
    model = build("olmoe", attn="sdpa")
    for training in (False, True):
        expected = analytic(model, 2, training)
        assert measured(model, training) == (expected["total"] - expected["attention_scores"]) * BATCH * SEQ


def moefied_llama():
    """A dense Llama whose FFNs are UB-SMoE blocks with a SwiGLU shared expert and unit gates (K_max = M).

    Uses ubsmoe.models.moefication's MoEfiedBlock (dense path at K = M) where it exists.
    """
    try:
        from ubsmoe.models.moefication import MoEfiedBlock as block_type
    except ImportError:
        block_type = UBSMoEBlock
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager")
    dense_dims = ModelDims.from_hf_config(config, seq_len=SEQ)
    assert measured(model, training=False) == flops_per_token(dense_dims, training=False)["total"] * BATCH * SEQ
    model.requires_grad_(False)
    block_config = UBSMoEConfig(lora_rank=RANK, unit_gates=True, implementation="eager")
    for layer in model.model.layers:
        mlp = layer.mlp
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        shared, routed = torch.arange(16), torch.arange(16, 64).view(8, 6)
        gate_up, down_experts = experts_from_dense(gate, up, down, list(routed))
        shared_expert = SwiGLU(gate[shared], up[shared], down[:, shared])
        layer.mlp = block_type(gate_up, down_experts, torch.randn(8, 32), 8, block_config, shared_expert=shared_expert)
    return model, dense_dims


def test_moefied_dense_model_matches_counter():
    model, dense_dims = moefied_llama()
    dims = ModelDims.from_model(model, seq_len=SEQ)
    assert (dims.experts, dims.expert_intermediate, dims.shared_intermediate, dims.native_top_k) == (8, 6, 16, 8)
    assert not dims.shared_expert_gate and dims.moe_layers == (0, 1)
    # at K = M the MoEfied FFN costs what the dense one did, without LoRA
    full = flops_per_token(dims, 8, 0, training=False)
    assert full["routed_experts"] + full["shared_expert"] == flops_per_token(dense_dims, training=False)["dense_ffn"]
    for top_k in (2, 8):
        set_top_k(model, top_k)
        for training in (False, True):
            expected = flops_per_token(dims, top_k, RANK, training=training)["total"]
            assert measured(model, training) == expected * BATCH * SEQ, (top_k, training)


def test_answer_only_training_counts_the_head_at_the_labelled_positions():
    """Training with the answer-only loss: the LM head's FLOPs follow the labelled share of the tokens."""
    from ubsmoe.models.answer_loss import answer_loss

    model, _ = moefied_llama()
    dims = ModelDims.from_model(model, seq_len=SEQ)
    tokens = ids()
    labels = torch.full_like(tokens, -100)
    labels[:, SEQ - 4 :] = tokens[:, SEQ - 4 :]  # four answer tokens per row: four head positions after the shift
    model.train()
    for top_k in (2, 8):
        set_top_k(model, top_k)
        total = count_flops(lambda: answer_loss(model, tokens, labels).loss.backward())
        model.zero_grad(set_to_none=True)
        share = 4 / SEQ
        expected = flops_per_token(dims, top_k, RANK, head_share=share)
        assert total == pytest.approx(expected["total"] * BATCH * SEQ, rel=1e-12), top_k
        full = flops_per_token(dims, top_k, RANK)
        assert full["total"] - expected["total"] == pytest.approx(full["lm_head"] * (1 - share), rel=1e-12)
    with pytest.raises(ValueError, match="head_share"):
        flops_per_token(dims, 2, RANK, head_share=1.5)


# ---- dimensions --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("olmoe", {}), ("mixtral", {}), ("qwen2_moe", {}), ("qwen2_moe", {"decoder_sparse_step": 2}), ("qwen3_moe", {})],
)
def test_dims_from_config_and_from_model_agree(model_type, overrides):
    config = tiny_config(model_type, **overrides)
    from_config = ModelDims.from_hf_config(config)
    model = build(model_type, **overrides)
    assert ModelDims.from_model(model) == from_config
    if model_type == "qwen2_moe":
        assert (from_config.shared_intermediate, from_config.shared_expert_gate) == (32, True)
    if overrides.get("decoder_sparse_step") == 2:
        assert from_config.moe_layers == (1,) and from_config.dense_intermediate == 32


def test_unsupported_config_and_invalid_arguments():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ModelDims.from_hf_config(transformers.GPT2Config())
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, 64\\]"):
        flops_per_token(OLMOE_1B_7B, 65, 16)
    with pytest.raises(ValueError, match="lora_targets"):
        flops_per_token(OLMOE_1B_7B, 2, 16, ("q_proj",))
    with pytest.raises(ValueError, match="native_top_k"):
        ModelDims(hidden=8, layers=1, heads=1, kv_heads=1, head_dim=8, vocab=8, experts=4, expert_intermediate=4)


# ---- the paper's model -------------------------------------------------------------------------------
def test_olmoe_table_closed_form():
    h, layers, m, i, v, s, r = 2048, 16, 64, 1024, 50304, 512, 16
    table = olmoe_1b_7b_table()
    assert [row["top_k"] for row in table["rows"]] == [2, 4, 6, 8]
    for row in table["rows"]:
        k = row["top_k"]
        # per routed row: experts, gate/up LoRA A (H -> 2r), their B as one block-diagonal (2r -> 2I), down A and B
        moe = 2 * h * m + k * 6 * h * i + k * (2 * h * 2 * r + 2 * 2 * r * 2 * i + 2 * r * i + 2 * r * h)
        per_layer = 8 * h * h + 4 * h * s + moe
        assert row["inference_total"] == layers * per_layer + 2 * h * v
        assert row["inference_moe"] == layers * moe
        assert sum(row["training_breakdown"][c] for c in COMPONENTS) == row["training_total"]
        # training: about 2x inference (frozen weights get no weight gradients)
        assert 1.9 < row["training_total"] / row["inference_total"] < 2.1
    reduction = table["reduction_k2_vs_k8"]
    assert 0.49 < reduction["training_total"] < 0.51 and 0.74 < reduction["inference_moe"] < 0.76
    json.dumps(table)


def test_module_prints_the_table_as_json():
    result = subprocess.run(
        [sys.executable, "-m", "ubsmoe.metrics.flops"], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(result.stdout)["model"] == "OLMoE-1B-7B"
    assert "RuntimeWarning" not in result.stderr
