"""Native transformers MoE models (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE) adapted to UB-SMoE blocks."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ubsmoe.models import (  # noqa: E402
    NATIVE_FAMILIES,
    ModelLoadError,
    ModelNotFoundError,
    UnsupportedModelError,
    adapt_moe_model,
    load_moe_model,
    supported_families,
    tiny_config,
)
from ubsmoe.moe import (  # noqa: E402
    UBSMoEBlock,
    UBSMoEConfig,
    apply_pseudo_gradients,
    moe_blocks,
    range_loss,
    set_top_k,
)

FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe"]
CONFIG = UBSMoEConfig(lora_rank=4, lora_alpha=8.0)


def build(model_type: str, **overrides) -> transformers.PreTrainedModel:
    """A tiny random model whose MoE layers matter (the default init, std 0.02, leaves them negligible)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mlp." in name:
                fan_in = parameter.shape[-1]
                scale = 2.0 if name.endswith(("gate.weight", "shared_expert_gate.weight")) else 1.0
                parameter.normal_(0.0, scale / fan_in**0.5)
    return model.eval()


def hf_blocks(model) -> list[torch.nn.Module]:
    block_type = NATIVE_FAMILIES[model.config.model_type].block_type()
    return [m for m in model.modules() if isinstance(m, block_type)]


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_registry_lists_the_four_families():
    assert supported_families() == FAMILIES


# ---- 1. the adapted model computes the original function at its native top-k --------------------------
@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("olmoe", {}),
        ("olmoe", {"norm_topk_prob": True}),
        ("mixtral", {}),
        ("qwen2_moe", {}),
        ("qwen2_moe", {"mlp_only_layers": [1]}),  # one dense layer stays a plain MLP
        ("qwen3_moe", {"norm_topk_prob": True}),
        ("qwen3_moe", {"decoder_sparse_step": 2}),
    ],
)
def test_adapted_model_equals_original(model_type, overrides):
    original = build(model_type, **overrides)
    num_sparse = len(hf_blocks(original))
    adapted = adapt_moe_model(copy.deepcopy(original), CONFIG)
    ids = tokens()
    with torch.no_grad():
        expected = original(ids).logits
        got = adapted(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    blocks = moe_blocks(adapted)
    assert len(blocks) == num_sparse >= 1 and not hf_blocks(adapted)
    expected_norm = model_type == "mixtral" or bool(overrides.get("norm_topk_prob", False))
    for block in blocks:
        assert block.top_k == block.native_top_k == original.config.num_experts_per_tok
        assert block.config.normalize_gates is expected_norm
        assert (block.shared_expert is not None) is (model_type == "qwen2_moe")

    # the comparison is sensitive: the opposite normalisation changes the logits clearly
    flipped = adapt_moe_model(copy.deepcopy(original), CONFIG, normalize_gates=not expected_norm)
    with torch.no_grad():
        assert (flipped(ids).logits - expected).abs().max() > 1e-3

    # cached greedy decoding goes through the blocks too
    prompt = tokens(1, 5, seed=2)
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(adapted.generate(prompt, **kwargs), original.generate(prompt, **kwargs))


# ---- 2. a LoRA update changes the function --------------------------------------------------------------
@pytest.mark.parametrize("model_type", FAMILIES)
def test_lora_update_changes_logits(model_type):
    original = build(model_type)
    adapted = adapt_moe_model(copy.deepcopy(original), CONFIG)
    ids = tokens()
    with torch.no_grad():
        before = adapted(ids).logits
        torch.testing.assert_close(before, original(ids).logits, rtol=1e-5, atol=1e-5)
        for block in moe_blocks(adapted):
            block.lora.lora_B["down"].normal_(0.0, 0.5)
        after = adapted(ids).logits
    assert (after - before).abs().max() > 1e-3


# ---- 3. it trains: loss goes down at the native top-k and below it --------------------------------------
@pytest.mark.parametrize("top_k", [None, 1], ids=["native", "k1"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_trains_with_range_loss_and_pseudo_gradient(model_type, top_k):
    model = adapt_moe_model(build(model_type), CONFIG).train()
    if top_k is not None:
        set_top_k(model, top_k)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = tokens(4, 16)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss + range_loss(model)
        optimizer.zero_grad()
        loss.backward()
        apply_pseudo_gradients(model)
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p, frozen[name]), name
    for block in moe_blocks(model):
        assert block.top_k == (top_k or block.native_top_k)
        assert block.lora.lora_B["down"].abs().sum() > 0
        assert int(block.token_count) > 0


# ---- 4. frozen tensors are shared by reference; only adapters (and phi) train ---------------------------
@pytest.mark.parametrize("model_type", FAMILIES)
def test_weights_shared_by_reference_and_base_frozen(model_type):
    model = build(model_type)
    originals = []
    for block in hf_blocks(model):
        shared = getattr(block, "shared_expert", None)
        gate = getattr(block, "shared_expert_gate", None)
        originals.append((block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, shared, gate))
    base_elements = sum(p.numel() for p in model.parameters())
    pointers = {p.data_ptr() for p in model.parameters()}

    adapted = adapt_moe_model(model, CONFIG)
    assert adapted is model
    blocks = moe_blocks(model)
    assert len(blocks) == len(originals)
    for block, (router, gate_up, down, shared, gate) in zip(blocks, originals, strict=True):
        assert block.router_weight is router and block.gate_up_proj is gate_up and block.down_proj is down
        assert block.gate_up_proj.data_ptr() == gate_up.data_ptr()
        assert block.shared_expert is shared and block.shared_expert_gate is gate

    adapter_elements = sum(p.numel() for b in blocks for p in [*b.lora.adapter_parameters(), b.phi])
    assert sum(p.numel() for p in model.parameters()) == base_elements + adapter_elements  # no copies
    assert pointers <= {p.data_ptr() for p in model.parameters()}
    for name, p in model.named_parameters():
        is_adapter = ".lora." in name or name.endswith(".phi")
        assert p.requires_grad is is_adapter, name


def test_router_trainable_flag():
    model = adapt_moe_model(build("olmoe"), replace_config(router_trainable=True))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    routers = {name for name in trainable if name.endswith("router_weight")}
    assert len(routers) == len(moe_blocks(model)) == 2
    assert all(".lora." in n or n.endswith((".phi", "router_weight")) for n in trainable)


def replace_config(**changes) -> UBSMoEConfig:
    return UBSMoEConfig(**{**CONFIG.to_dict(), **changes})


# ---- router logits, repeated adaptation, family-specific options --------------------------------------
def test_router_logits_are_disabled_with_a_clear_error():
    model = build("qwen3_moe")
    model.config.output_router_logits = True
    with pytest.warns(UserWarning, match="output_router_logits"):
        adapt_moe_model(model, CONFIG)
    assert model.config.output_router_logits is False
    ids = tokens()
    assert torch.isfinite(model(ids, labels=ids).loss)
    with pytest.raises(ValueError, match="output_router_logits is not available"):
        model(ids, labels=ids, output_router_logits=True)
    model.config.output_router_logits = True  # re-enabled by hand: still refused clearly
    with pytest.raises(ValueError, match="output_router_logits is not available"):
        model(ids)


def test_adapting_twice_is_refused():
    model = adapt_moe_model(build("olmoe"), CONFIG)
    with pytest.raises(ModelLoadError, match="already adapted"):
        adapt_moe_model(model, CONFIG)


def test_mixtral_router_jitter_warns():
    with pytest.warns(UserWarning, match="router_jitter_noise"):
        adapt_moe_model(build("mixtral", router_jitter_noise=0.1), CONFIG)


# ---- unsupported architectures and loading ------------------------------------------------------------
def tiny_llama() -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config)


def test_unsupported_architecture_lists_supported_families():
    with pytest.raises(UnsupportedModelError) as caught:
        adapt_moe_model(tiny_llama())
    message = str(caught.value)
    assert "'llama'" in message and isinstance(caught.value, ValueError)
    for family in FAMILIES:
        assert family in message
    with pytest.raises(UnsupportedModelError, match="olmoe"):
        adapt_moe_model(torch.nn.Linear(2, 2))


def test_load_refuses_unsupported_checkpoints_before_reading_weights(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedModelError, match="qwen3_moe"):
        load_moe_model(tmp_path / "llama")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    with pytest.raises(UnsupportedModelError, match="'not_a_model'.*mixtral"):
        load_moe_model(unknown)


def test_missing_or_invalid_local_path_gives_a_clear_error(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelNotFoundError, match="does not exist") as caught:
        load_moe_model(missing)
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, ValueError)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_moe_model("./no-such-model-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_moe_model(tmp_path / "empty")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_moe_model(tmp_path / "weights.safetensors")


def test_unreachable_hub_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not be fetched from the Hugging Face hub"):
        load_moe_model("ubsmoe-tests/definitely-not-a-model", local_files_only=True)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_load_from_local_directory(tmp_path, model_type):
    original = build(model_type)
    original.save_pretrained(tmp_path)
    model = load_moe_model(tmp_path, CONFIG)
    assert all(isinstance(b, UBSMoEBlock) for b in moe_blocks(model)) and len(moe_blocks(model)) == 2
    assert next(model.parameters()).dtype == torch.float32
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)


def test_unexpected_block_layout_is_refused_before_any_change():
    model = build("qwen2_moe")
    del hf_blocks(model)[-1].experts.gate_up_proj  # e.g. a transformers 4.x-style or patched block
    with pytest.raises(UnsupportedModelError, match="fused experts"):
        adapt_moe_model(model, CONFIG)
    assert len(hf_blocks(model)) == 2 and not moe_blocks(model)
    assert all(p.requires_grad for p in model.parameters())
