"""Native sparse-MoE models from transformers 5.x turned into UB-SMoE models (DESIGN section 3).

`adapt_moe_model` replaces, in place, every sparse MoE block of a supported model by a
`ubsmoe.moe.UBSMoEBlock` that holds the pretrained router weight and fused expert tensors *by
reference* (the very same `nn.Parameter` objects, no copies), follows the family's gate
normalisation and native top-k, and freezes every base parameter, so that only the blocks' expert
LoRA and DMR vector phi (and the router, where `UBSMoEConfig.router_trainable`) train.
`load_moe_model` loads a checkpoint with `AutoModelForCausalLM` and adapts it.

Routing of the supported families in transformers 5.x (each `<Family>TopKRouter.forward`): logits
`F.linear(x, W_r)` in the model dtype (no bias), softmax in float32, top-k of the probabilities,
then renormalisation of the chosen probabilities over the top-k (Mixtral: always; OLMoE,
Qwen2-MoE, Qwen3-MoE: when `config.norm_topk_prob`). The UB-SMoE block routes the same way (its
softmax also runs in at least float32), so with phi = 0, zero LoRA-B and K = the native top-k the
adapted model computes the original function. (One half-precision nuance: Mixtral's router keeps its
gate weights in float32 when multiplying the expert outputs, the block casts them to the model dtype
first; in bfloat16 the logits may differ by about one bf16 rounding step. Mixtral's training-time
`router_jitter_noise` is not reproduced; a warning says so when it is set.) Qwen2-MoE adds an always-on shared expert scaled by
`sigmoid(shared_expert_gate(x))`; both modules are kept as they are (frozen) inside the block.
Qwen2/3-MoE layers listed in `mlp_only_layers` (or skipped by `decoder_sparse_step`) are dense
MLPs and stay untouched.

Router logits: transformers records `router_logits` (for its Switch-style load-balancing aux loss)
with forward hooks on the router class. After adaptation those modules are gone, so the recorded
tuple would be empty and `load_balancing_loss_func` would fail with a bare IndexError.
`adapt_moe_model` therefore sets `config.output_router_logits = False` and makes a forward that asks
for router logits fail with a clear error; expert balance is DMR's job (or an explicit balancing
loss over the blocks' routing).

Adding a family is one `FamilySpec` entry in `NATIVE_FAMILIES`.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ubsmoe.moe import UBSMoEBlock, UBSMoEConfig, moe_blocks, skip_padding

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


# ---- errors ------------------------------------------------------------------------------------
class ModelLoadError(ValueError):
    """A model could not be loaded or adapted; the message says why and what to do."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture is not one of the supported native MoE families."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A local model path does not exist."""


# ---- registry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FamilySpec:
    """Where a transformers MoE family keeps its sparse blocks and how it routes.

    Attributes:
        name: human-readable family name used in messages.
        modeling_module: the transformers module that defines `block_class`.
        block_class: class name of the sparse MoE block (found anywhere in the model).
        router_attr / experts_attr: the block's router (weight (M, H), no bias) and fused experts
            (gate_up_proj (M, 2I, H), down_proj (M, H, I), act_fn) attributes.
        shared_expert_attr / shared_expert_gate_attr: always-on shared expert (H -> H) and its
            sigmoid gate (H -> 1), where the family has them.
        top_k_key: config key of the native number of experts per token.
        normalize_key: config key saying whether the chosen gates are renormalised over the top-k;
            None when the family's router does not read one.
        normalize_default: the convention when `normalize_key` is None or absent from the config.
        ignored_options: config keys of training-time router features the UB-SMoE block does not
            reproduce; a warning is given when one is set (truthy).
    """

    name: str
    modeling_module: str
    block_class: str
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_expert_attr: str | None = None
    shared_expert_gate_attr: str | None = None
    top_k_key: str = "num_experts_per_tok"
    normalize_key: str | None = "norm_topk_prob"
    normalize_default: bool = False
    ignored_options: tuple[str, ...] = ()

    def normalize_gates(self, hf_config: PretrainedConfig) -> bool:
        """The family's gate renormalisation for this checkpoint."""
        if self.normalize_key is None:
            return self.normalize_default
        return bool(getattr(hf_config, self.normalize_key, self.normalize_default))

    def native_top_k(self, hf_config: PretrainedConfig) -> int:
        value = getattr(hf_config, self.top_k_key, None)
        if not isinstance(value, int) or value < 1:
            raise ModelLoadError(f"{self.name} config has no valid {self.top_k_key!r} (got {value!r})")
        return value

    def block_type(self) -> type[nn.Module]:
        module = importlib.import_module(self.modeling_module)
        return getattr(module, self.block_class)


NATIVE_FAMILIES: dict[str, FamilySpec] = {
    "olmoe": FamilySpec(
        name="OLMoE",
        modeling_module="transformers.models.olmoe.modeling_olmoe",
        block_class="OlmoeSparseMoeBlock",
    ),
    "mixtral": FamilySpec(
        name="Mixtral",
        modeling_module="transformers.models.mixtral.modeling_mixtral",
        block_class="MixtralSparseMoeBlock",
        normalize_key=None,  # MixtralTopKRouter always renormalises the top-k probabilities
        normalize_default=True,
        ignored_options=("router_jitter_noise",),
    ),
    "qwen2_moe": FamilySpec(
        name="Qwen2-MoE",
        modeling_module="transformers.models.qwen2_moe.modeling_qwen2_moe",
        block_class="Qwen2MoeSparseMoeBlock",
        shared_expert_attr="shared_expert",
        shared_expert_gate_attr="shared_expert_gate",
    ),
    "qwen3_moe": FamilySpec(
        name="Qwen3-MoE",
        modeling_module="transformers.models.qwen3_moe.modeling_qwen3_moe",
        block_class="Qwen3MoeSparseMoeBlock",
    ),
}


def supported_families() -> list[str]:
    """The `model_type`s that `adapt_moe_model` and `load_moe_model` accept."""
    return list(NATIVE_FAMILIES)


def _supported_text() -> str:
    return ", ".join(f"{key} ({spec.name})" for key, spec in NATIVE_FAMILIES.items())


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{what} is not a supported native MoE model. Supported families (config.model_type): {_supported_text()}. "
        "Dense models can be turned into MoE models by MoEfication instead."
    )


def family_spec(model_or_config: Any) -> FamilySpec:
    """The registry entry for a model or config, or UnsupportedModelError listing the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in NATIVE_FAMILIES:
        kind = type(model_or_config).__name__
        raise _unsupported(f"{kind} (model_type {model_type!r})" if model_type else kind)
    return NATIVE_FAMILIES[model_type]


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ModelLoadError(
            "ubsmoe's model support needs transformers 5.x: pip install 'ubsmoe[hf]' (or transformers>=5,<6)"
        ) from error
    return transformers


# ---- adaptation --------------------------------------------------------------------------------
def adapt_moe_model(
    model: PreTrainedModel,
    config: UBSMoEConfig | None = None,
    *,
    normalize_gates: bool | None = None,
) -> PreTrainedModel:
    """Replace every sparse MoE block of `model` by a UB-SMoE block, in place, and freeze the base.

    Args:
        model: an OLMoE, Mixtral, Qwen2-MoE or Qwen3-MoE model from transformers 5.x (any head).
        config: the blocks' LoRA/DMR/PG settings; its `normalize_gates` is replaced by the family's
            convention (see `FamilySpec.normalize_gates`) unless `normalize_gates` is given.
        normalize_gates: force gate renormalisation on or off, overriding the family's convention.

    Returns the same model object. Every block starts at the native top-k (`set_top_k` changes it);
    with phi = 0 and zero LoRA-B the adapted model computes what the original did. The frozen
    tensors keep their identity but move in the module tree (`...mlp.experts.gate_up_proj` becomes
    `...mlp.gate_up_proj`), so `save_pretrained` of an adapted model is not a transformers
    checkpoint: save the adapters with `ubsmoe.models.save_trainable_state`, or fold them into a
    plain transformers checkpoint with `ubsmoe.models.export_merged`.
    """
    spec = family_spec(model)
    if moe_blocks(model):
        raise ModelLoadError(f"this {spec.name} model is already adapted (it contains UB-SMoE blocks)")
    hf_config = model.config
    block_type = spec.block_type()
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, block_type)]
    if not targets:
        raise ModelLoadError(f"no {spec.block_class} found in this {spec.name} model: it has no sparse MoE layers")

    base_config = config or UBSMoEConfig()
    layer_config = replace(
        base_config, normalize_gates=spec.normalize_gates(hf_config) if normalize_gates is None else normalize_gates
    )
    native_top_k = spec.native_top_k(hf_config)
    for option in spec.ignored_options:
        if getattr(hf_config, option, None):
            warnings.warn(
                f"{spec.name}: {option}={getattr(hf_config, option)!r} is not applied by the UB-SMoE block",
                stacklevel=2,
            )

    parts = [_block_parts(spec, name, block) for name, block in targets]  # validate all before changing anything
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for (name, _), block_parts in zip(targets, parts, strict=True):
        replacement = _ubsmoe_block(name, block_parts, native_top_k, layer_config)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacement)

    _disable_router_logits(model)
    skip_padding(model)
    return model


def _block_parts(spec: FamilySpec, name: str, block: nn.Module) -> dict[str, Any]:
    """The frozen pieces of one transformers sparse block, checked against what the UB-SMoE block expects."""
    router = getattr(block, spec.router_attr, None)
    experts = getattr(block, spec.experts_attr, None)
    where = f"{spec.name} block {name!r}"
    fused = all(isinstance(getattr(experts, key, None), torch.Tensor) for key in ("gate_up_proj", "down_proj"))
    if not fused or not isinstance(getattr(router, "weight", None), torch.Tensor):
        raise UnsupportedModelError(
            f"{where}: expected a router weight and fused experts (gate_up_proj, down_proj) as in transformers 5.x"
        )
    if getattr(router, "bias", None) is not None:
        raise UnsupportedModelError(f"{where}: routers with a bias are not supported")
    # transformers' experts-implementation flags: the block expects concatenated [gate; up], (out, in) layout
    if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
        raise UnsupportedModelError(f"{where}: experts with biases or transposed weights are not supported")
    if not getattr(experts, "is_concatenated", True) or not getattr(experts, "has_gate", True):
        raise UnsupportedModelError(f"{where}: experts must have a concatenated gate_up_proj")
    return {
        "where": where,
        "gate_up_proj": experts.gate_up_proj,
        "down_proj": experts.down_proj,
        "router_weight": router.weight,
        "activation": experts.act_fn,
        "shared_expert": getattr(block, spec.shared_expert_attr) if spec.shared_expert_attr else None,
        "shared_expert_gate": getattr(block, spec.shared_expert_gate_attr) if spec.shared_expert_gate_attr else None,
    }


def _ubsmoe_block(name: str, parts: dict[str, Any], native_top_k: int, layer_config: UBSMoEConfig) -> UBSMoEBlock:
    try:
        return UBSMoEBlock(
            parts["gate_up_proj"],
            parts["down_proj"],
            parts["router_weight"],
            native_top_k,
            layer_config,
            shared_expert=parts["shared_expert"],
            shared_expert_gate=parts["shared_expert_gate"],
            activation=parts["activation"],
        )
    except ValueError as error:
        raise ModelLoadError(f"{parts['where']}: {error}") from error


_ROUTER_LOGITS_MESSAGE = (
    "output_router_logits is not available on a UB-SMoE-adapted model: its routers were replaced by UB-SMoE "
    "blocks, so nothing records router logits and transformers' load-balancing aux loss cannot be computed. Leave "
    "output_router_logits off; expert balance comes from DMR (ubsmoe.moe)."
)


def _refuse_router_logits(module: nn.Module, args: tuple, kwargs: dict) -> None:
    requested = kwargs.get("output_router_logits")
    if requested is None:
        requested = getattr(module.config, "output_router_logits", False)
    if requested:
        raise ValueError(_ROUTER_LOGITS_MESSAGE)


def _disable_router_logits(model: nn.Module) -> None:
    """Turn off router-logit recording and make any request for it fail clearly (see module docstring)."""
    transformers = require_transformers()
    configs = {id(m.config): m.config for m in model.modules() if isinstance(m, transformers.PreTrainedModel)}
    for hf_config in configs.values():
        if getattr(hf_config, "output_router_logits", False):
            warnings.warn("output_router_logits was on; it is turned off for the UB-SMoE-adapted model", stacklevel=3)
        if hasattr(hf_config, "output_router_logits"):
            hf_config.output_router_logits = False
    for module in model.modules():
        if isinstance(module, transformers.PreTrainedModel):
            module.register_forward_pre_hook(_refuse_router_logits, with_kwargs=True)


# ---- loading -----------------------------------------------------------------------------------
def _looks_like_path(name: str) -> bool:
    """A string that can only mean a local path (a hub id is 'name' or 'owner/name')."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name)


def _local_model_type(directory: Path) -> str | None:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{directory} is not a transformers model directory: it has no config.json")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {config_file}: {error}") from error
    return data.get("model_type") if isinstance(data, dict) else None


def load_moe_model(
    path_or_id: str | os.PathLike[str],
    config: UBSMoEConfig | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    normalize_gates: bool | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Load a native MoE causal LM from a local directory (or the hub where reachable) and adapt it.

    The architecture is checked from the config before any weights are read. `dtype` is passed to
    `from_pretrained` (float32 by default, the safe choice on CPUs; "auto" keeps the checkpoint's
    dtype); other keyword arguments (device_map, revision, ...) go to `from_pretrained` as well.
    Errors: `ModelNotFoundError` for a missing local path, `UnsupportedModelError` for another
    architecture, `ModelLoadError` for anything else that prevents loading (all ValueErrors).
    """
    transformers = require_transformers()
    source = os.fspath(path_or_id)
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"{local} is a file; pass the model directory (with config.json and weights)")
        model_type = _local_model_type(local)
        if model_type not in NATIVE_FAMILIES:
            raise _unsupported(f"the model in {local} (model_type {model_type!r})")
        location = str(local)
    elif _looks_like_path(source):
        raise ModelNotFoundError(f"model path {source} does not exist (resolved to {local.resolve()})")
    else:
        try:
            hf_config = transformers.AutoConfig.from_pretrained(source, **_config_kwargs(from_pretrained_kwargs))
        except Exception as error:  # transformers raises OSError/ValueError/HTTP errors here
            raise ModelLoadError(
                f"{source!r} is not a local directory and could not be fetched from the Hugging Face hub "
                f"({first_line(error)}). Download the model and pass its local path."
            ) from error
        family_spec(hf_config)
        location = source

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **from_pretrained_kwargs)
    except Exception as error:
        raise ModelLoadError(f"could not load the model from {location}: {first_line(error)}") from error
    return adapt_moe_model(model, config, normalize_gates=normalize_gates)


def _config_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "subfolder")
    return {k: v for k, v in kwargs.items() if k in keys}


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---- tiny configs (tests, examples) ------------------------------------------------------------
def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A tiny randomly-initialisable config of a supported family (tests only).

    hidden 32, expert intermediate 16 (multiples of 4, as transformers' grouped_mm experts need),
    2 layers, 8 experts, top-2, vocab 128. Qwen2-MoE gets a shared expert of width 32.
    """
    transformers = require_transformers()
    if model_type not in NATIVE_FAMILIES:
        raise _unsupported(f"model_type {model_type!r}")
    common: dict[str, Any] = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    per_family: dict[str, dict[str, Any]] = {
        "olmoe": {"num_experts": 8},
        "mixtral": {"num_local_experts": 8, "head_dim": 8},
        "qwen2_moe": {
            "num_experts": 8,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
            "intermediate_size": 32,
        },
        "qwen3_moe": {"num_experts": 8, "moe_intermediate_size": 16, "head_dim": 8},
    }
    values = {**common, **per_family[model_type], **overrides}
    return transformers.AutoConfig.for_model(model_type, **values)
