"""Trainable state (save / load of expert LoRA and phi) and merged export to plain transformers checkpoints."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import ubsmoe  # noqa: E402
from ubsmoe.models import adapt_moe_model, tiny_config  # noqa: E402
from ubsmoe.models.state import (  # noqa: E402
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterStateError,
    ExportError,
    export_merged,
    load_trainable_state,
    read_adapter_config,
    save_trainable_state,
    trainable_state,
)
from ubsmoe.moe import UBSMoEConfig, moe_blocks, set_top_k  # noqa: E402

FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe"]


def build(model_type: str, rank: int = 4, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny adapted model whose MoE layers matter (scaled init) with non-zero LoRA."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mlp." in name:
                scale = 2.0 if name.endswith(("gate.weight", "shared_expert_gate.weight")) else 1.0
                parameter.normal_(0.0, scale / parameter.shape[-1] ** 0.5)
    adapt_moe_model(model, UBSMoEConfig(lora_rank=rank, lora_alpha=8.0))
    torch.manual_seed(seed)
    with torch.no_grad():
        for block in moe_blocks(model):
            for parameter in block.lora.adapter_parameters():
                parameter.normal_(0.0, 0.3)
    return model.eval()


def ids(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model, top_k: int | None = None) -> torch.Tensor:
    if top_k is not None:
        set_top_k(model, top_k)
    with torch.no_grad():
        return model(ids()).logits


def set_phi_random(model) -> None:
    with torch.no_grad():
        for block in moe_blocks(model):
            block.phi.uniform_(-1.0, 1.0)


# ---- trainable state ----------------------------------------------------------------------------------
def test_trainable_state_keys():
    model = build("olmoe")
    state = trainable_state(model)
    assert list(state)[:7] == [
        "model.layers.0.mlp.phi",
        "model.layers.0.mlp.lora.lora_A.gate",
        "model.layers.0.mlp.lora.lora_A.up",
        "model.layers.0.mlp.lora.lora_A.down",
        "model.layers.0.mlp.lora.lora_B.gate",
        "model.layers.0.mlp.lora.lora_B.up",
        "model.layers.0.mlp.lora.lora_B.down",
    ]
    assert len(state) == 2 * 7
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    assert state["model.layers.1.mlp.lora.lora_B.down"].shape == (8, 32, 4)
    # a copy: changing it leaves the model alone
    state["model.layers.0.mlp.phi"].add_(1.0)
    assert moe_blocks(model)[0].phi.abs().sum() == 0
    # any other trainable parameter (e.g. a future attention LoRA) is part of the state
    model.model.layers[1].self_attn.q_proj.weight.requires_grad_(True)
    assert "model.layers.1.self_attn.q_proj.weight" in trainable_state(model)


def test_save_load_roundtrip_restores_exactly(tmp_path):
    model = build("qwen2_moe")
    set_phi_random(model)
    expected = logits(model)
    save_trainable_state(model, tmp_path / "adapter", {"base_model": "/models/tiny-qwen2-moe", "round": 3})
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])

    config = read_adapter_config(tmp_path / "adapter")
    assert config["base_model"] == "/models/tiny-qwen2-moe" and config["metadata"]["round"] == 3
    assert (config["num_layers"], config["num_experts"], config["lora_rank"]) == (2, 8, 4)
    assert config["lora_targets"] == ["gate", "up", "down"] and config["ubsmoe_version"] == ubsmoe.__version__
    assert UBSMoEConfig.from_dict(config["ubsmoe_config"]).lora_alpha == 8.0

    fresh = build("qwen2_moe", seed=5)  # other LoRA values, phi = 0
    assert not torch.equal(logits(fresh), expected)
    result = load_trainable_state(fresh, tmp_path / "adapter")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(logits(fresh), expected)
    for key, tensor in trainable_state(model).items():
        assert torch.equal(trainable_state(fresh)[key], tensor)


def test_base_model_defaults_to_config_name(tmp_path):
    model = build("olmoe")
    model.config.name_or_path = "/models/olmoe-tiny"
    save_trainable_state(model, tmp_path, {})
    assert read_adapter_config(tmp_path)["base_model"] == "/models/olmoe-tiny"


def rewrite_weights(directory, change) -> None:
    path = directory / ADAPTER_WEIGHTS
    tensors = safetensors_torch.load_file(str(path))
    change(tensors)
    safetensors_torch.save_file(tensors, str(path))


def test_wrong_rank_is_named(tmp_path):
    save_trainable_state(build("olmoe", rank=4), tmp_path)
    with pytest.raises(AdapterStateError, match=r"does not fit this model \(LoRA rank: adapter 4, model 2\)"):
        load_trainable_state(build("olmoe", rank=2), tmp_path)


def test_wrong_targets_are_named(tmp_path):
    save_trainable_state(build("olmoe"), tmp_path)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("olmoe"))
    adapt_moe_model(model, UBSMoEConfig(lora_rank=4, lora_alpha=8.0, lora_targets=("down",)))
    with pytest.raises(AdapterStateError, match=r"LoRA targets: adapter \['gate', 'up', 'down'\], model \['down'\]"):
        load_trainable_state(model, tmp_path)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    model = build("olmoe")
    save_trainable_state(model, tmp_path)
    key = "model.layers.1.mlp.lora.lora_A.up"

    def shrink(tensors):
        tensors[key] = tensors[key][..., :31].contiguous()

    rewrite_weights(tmp_path, shrink)
    before = trainable_state(model)
    with pytest.raises(AdapterStateError) as error:
        load_trainable_state(model, tmp_path)
    message = str(error.value)
    assert f"shape mismatch for {key!r}" in message and "(8, 4, 31)" in message and "(8, 4, 32)" in message
    assert error.value.__cause__ is None
    # nothing was loaded
    after = trainable_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_missing_and_unexpected_keys(tmp_path):
    model = build("olmoe")
    save_trainable_state(model, tmp_path)
    missing = "model.layers.1.mlp.phi"
    rewrite_weights(tmp_path, lambda tensors: tensors.pop(missing))
    with pytest.raises(
        AdapterStateError, match=rf"lacks 1 tensor\(s\) the model trains, first '{missing}' \(shape \(8,\)\)"
    ):
        load_trainable_state(model, tmp_path)
    result = load_trainable_state(model, tmp_path, strict=False)
    assert result.missing_keys == [missing] and result.unexpected_keys == []

    rewrite_weights(tmp_path, lambda tensors: tensors.update({missing: torch.zeros(8), "extra.weight": torch.ones(2)}))
    with pytest.raises(AdapterStateError, match="does not train, first 'extra.weight' \\(shape \\(2,\\)\\)"):
        load_trainable_state(model, tmp_path)
    assert load_trainable_state(model, tmp_path, strict=False).unexpected_keys == ["extra.weight"]


def test_unreadable_adapters(tmp_path):
    model = build("olmoe")
    with pytest.raises(AdapterStateError, match="holds no saved UB-SMoE adapter"):
        load_trainable_state(model, tmp_path / "nowhere")
    save_trainable_state(model, tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterStateError, match="cannot read"):
        load_trainable_state(model, tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text("{", encoding="utf-8")
    with pytest.raises(AdapterStateError, match="cannot read"):
        load_trainable_state(model, tmp_path)
    with pytest.raises(AdapterStateError, match="JSON-serialisable"):
        save_trainable_state(model, tmp_path, {"bad": object()})


def test_atomic_writes_leave_no_temporary_files(tmp_path, monkeypatch):
    model = build("olmoe")
    save_trainable_state(model, tmp_path)
    save_trainable_state(model, tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    good = (tmp_path / ADAPTER_WEIGHTS).read_bytes()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_trainable_state(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert (tmp_path / ADAPTER_WEIGHTS).read_bytes() == good


# ---- merged export ------------------------------------------------------------------------------------
def reload(directory) -> transformers.PreTrainedModel:
    plain, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return plain.eval()


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("olmoe", {}),
        ("mixtral", {}),
        ("qwen2_moe", {}),
        ("qwen3_moe", {}),
        ("qwen3_moe", {"tie_word_embeddings": True}),
    ],
)
def test_export_merged_reloads_as_plain_transformers(tmp_path, model_type, overrides):
    model = build(model_type, **overrides)
    expected = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # phi = 0: no approximation warning
        export_merged(model, tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    keys = safetensors_torch.load_file(str(tmp_path / "model.safetensors")).keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and "model.layers.0.mlp.gate.weight" in keys
    assert not any("lora" in k or k.endswith(".phi") or "router_weight" in k for k in keys)
    plain = reload(tmp_path)
    assert type(plain) is type(model)
    torch.testing.assert_close(logits(plain), expected, rtol=0, atol=1e-5)
    # the LoRA was really folded in: zeroing it changes the adapted model's output
    with torch.no_grad():
        for block in moe_blocks(model):
            for parameter in block.lora.lora_B.values():
                parameter.zero_()
    assert (logits(model) - expected).abs().max() > 1e-3


def test_export_at_another_top_k_and_sharded(tmp_path):
    model = build("olmoe")
    expected = logits(model, top_k=3)
    export_merged(model, tmp_path, top_k=3, max_shard_bytes=40_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    plain = reload(tmp_path)
    assert plain.config.num_experts_per_tok == 3
    torch.testing.assert_close(logits(plain), expected, rtol=0, atol=1e-5)
    # re-exporting into the same directory as one file removes the stale shards and index
    export_merged(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert not list(tmp_path.glob(".*.tmp"))
    assert json.loads((tmp_path / "config.json").read_text())["num_experts_per_tok"] == 2


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral"])
def test_export_in_hub_format(tmp_path, model_type):
    model = build(model_type)
    expected = logits(model)
    export_merged(model, tmp_path, hub_format=True, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    expert = "block_sparse_moe.experts.7.w1" if model_type == "mixtral" else "mlp.experts.7.gate_proj"
    assert f"model.layers.1.{expert}.weight" in index["weight_map"]
    assert not any("gate_up_proj" in key for key in index["weight_map"])
    torch.testing.assert_close(logits(reload(tmp_path)), expected, rtol=0, atol=1e-5)


def test_export_with_phi_warns_and_routes_as_base(tmp_path):
    model = build("mixtral")
    at_zero = logits(model)
    set_phi_random(model)
    assert not torch.allclose(logits(model), at_zero, atol=1e-5)
    with pytest.warns(UserWarning, match="phi is non-zero"):
        export_merged(model, tmp_path)
    torch.testing.assert_close(logits(reload(tmp_path)), at_zero, rtol=0, atol=1e-5)


def test_export_refuses_what_it_cannot_express(tmp_path):
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(ExportError, match="native MoE checkpoints only"):
        export_merged(llama, tmp_path)
    plain = transformers.AutoModelForCausalLM.from_config(tiny_config("olmoe"))
    with pytest.raises(ExportError, match="no UB-SMoE blocks"):
        export_merged(plain, tmp_path)
    mixtral = transformers.AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    adapt_moe_model(mixtral, UBSMoEConfig(lora_rank=2), normalize_gates=False)
    with pytest.raises(ExportError, match="cannot be configured"):
        export_merged(mixtral, tmp_path)
    assert not list(tmp_path.iterdir())
