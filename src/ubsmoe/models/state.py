"""Trainable state of a UB-SMoE model: save, load and export as a plain transformers checkpoint.

Adapters (`save_trainable_state` / `load_trainable_state`)
    The trainable state is everything with `requires_grad` (each UB-SMoE block's expert LoRA and,
    with DMR, its phi; a trainable router or any other adapter, e.g. attention LoRA) plus every
    block's expert LoRA and phi even where frozen, keyed by module path
    (`model.layers.3.mlp.lora.lora_A.gate`, `model.layers.3.mlp.phi`, ...). A save writes two files,
    each atomically (temporary file in the same directory, then `os.replace`):
    `adapter.safetensors` (the tensors) and `adapter_config.json` (format version, package version,
    `UBSMoEConfig.to_dict()` of the blocks, number of MoE layers, M, LoRA rank/alpha/targets, K_max,
    the base model's name or path and the caller's metadata). A load checks the configuration
    (rank, alpha, targets, number of layers, M) and then every key and shape before it changes
    anything, and raises one `AdapterStateError` (a ValueError) naming the first problem.

Merged export (`export_merged`)
    For native MoE bases (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE adapted with `adapt_moe_model`) each
    expert's LoRA is folded into a copy of its expert weights (gate_up rows [:I] += s * B_gate A_gate,
    rows [I:] += s * B_up A_up, down += s * B_down A_down, with s = alpha / r, computed in at least
    float32 and cast to the base dtype) and the model is written as a plain transformers checkpoint in
    the original module layout (`...mlp.gate.weight`, `...mlp.experts.gate_up_proj`,
    `...mlp.experts.down_proj`, Qwen2-MoE's `...mlp.shared_expert.*` and `...mlp.shared_expert_gate.*`)
    with its config, so that `AutoModelForCausalLM.from_pretrained(directory)` loads it with no ubsmoe
    code. Nothing is deep-copied: non-expert tensors are written from the model's own parameters and
    merged expert copies are made one layer at a time, while the shard that holds them is written.
    The key set is checked against the original class instantiated on the meta device.

    What phi means for an exported model: phi is DMR's additive routing modulation, applied only to
    each token's top-N_p candidate experts. transformers' routers (a bias-free linear layer, softmax,
    top-k) cannot express it, so the export drops it: the exported model routes exactly as the base
    router does. It is therefore equal to the adapted model when phi = 0 (in particular at the start
    and whenever DMR is off) and an approximation otherwise; `export_merged` warns when a phi is
    non-zero. In the full-candidate case (N_p >= M) the modulation is the same for every token,
    m = W_r x + phi, i.e. a router bias, so it could be exported exactly to routers that have a bias
    (these four families' routers have none; a custom router or a non-transformers runtime could).
    With N_p < M no fixed linear router reproduces it (which experts get phi depends on the token).
    The exported model runs at the config's top-k: the native K by default, or the `top_k` given to
    `export_merged` (written as the family's `num_experts_per_tok`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ubsmoe.moe import UBSMoEBlock
from ubsmoe.paths import atomic_write, write_text_atomic

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "ubsmoe-adapter"
ADAPTER_FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 5 * 2**30


class AdapterStateError(ValueError):
    """Saved trainable state that does not fit the model (or cannot be read); the message says why."""


class ExportError(ValueError):
    """The model cannot be exported as a plain transformers checkpoint; the message says why."""


class LoadResult(NamedTuple):
    """Keys left out by a non-strict load (both empty after a strict one)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# ---- atomic files ----------------------------------------------------------------------------------
def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ---- trainable state -------------------------------------------------------------------------------
def _blocks(model: nn.Module) -> list[tuple[str, UBSMoEBlock]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, UBSMoEBlock)]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every block's expert LoRA and phi, then everything else with requires_grad, in module order."""
    block_owned: set[int] = set()
    for _, block in _blocks(model):
        block_owned.update(id(p) for p in (*block.lora.parameters(), block.phi))
    return {
        name: parameter
        for name, parameter in model.named_parameters()
        if parameter.requires_grad or id(parameter) in block_owned
    }


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the trainable state, keyed by module path (see the module docstring)."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in trainable_parameters(model).items()}


def _block_summary(model: nn.Module) -> dict[str, Any]:
    """The blocks' common LoRA settings and shapes (they must agree across blocks)."""
    blocks = [block for _, block in _blocks(model)]
    if not blocks:
        return {"num_layers": 0}
    first = blocks[0]
    for name, block in _blocks(model):
        same = (block.config.lora_rank, block.config.lora_alpha, tuple(block.lora.targets), block.num_experts) == (
            first.config.lora_rank,
            first.config.lora_alpha,
            tuple(first.lora.targets),
            first.num_experts,
        )
        if not same:
            raise AdapterStateError(
                f"UB-SMoE block {name!r} has LoRA settings or experts that differ from the first block"
            )
    return {
        "num_layers": len(blocks),
        "num_experts": first.num_experts,
        "native_top_k": first.native_top_k,
        "lora_rank": first.config.lora_rank,
        "lora_alpha": first.config.lora_alpha,
        "lora_targets": list(first.lora.targets),
        "ubsmoe_config": first.config.to_dict(),
    }


def save_trainable_state(
    model: nn.Module, directory: str | os.PathLike[str], metadata: dict[str, Any] | None = None
) -> Path:
    """Write `adapter.safetensors` and `adapter_config.json` to `directory` (created if needed).

    `metadata` must be JSON-serialisable; its `base_model` (or `base_model_name_or_path`) entry, or
    else the model config's `name_or_path`, is recorded as the base model. Returns the directory.
    """
    from ubsmoe import __version__

    metadata = dict(metadata or {})
    directory = Path(directory)
    try:
        metadata_text = json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise AdapterStateError(f"adapter metadata must be JSON-serialisable: {error}") from error
    hf_config = getattr(model, "config", None)
    base_model = metadata.get("base_model") or metadata.get("base_model_name_or_path")
    if base_model is None and hf_config is not None:
        base_model = getattr(hf_config, "name_or_path", None) or None
    tensors = trainable_state(model)
    config = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "ubsmoe_version": __version__,
        "base_model": str(base_model) if base_model is not None else None,
        "model_type": getattr(hf_config, "model_type", None),
        **_block_summary(model),
        "num_tensors": len(tensors),
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "metadata": json.loads(metadata_text),
    }
    directory.mkdir(parents=True, exist_ok=True)
    _write_safetensors(directory / ADAPTER_WEIGHTS, tensors, {"format": "pt", "producer": ADAPTER_FORMAT})
    write_text_atomic(directory / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The `adapter_config.json` of a saved trainable state, checked for format."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterStateError(f"{Path(directory)} holds no saved UB-SMoE adapter: {ADAPTER_CONFIG} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterStateError(f"cannot read {path}: {error}") from error
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise AdapterStateError(f"{path} is not a UB-SMoE adapter config (format {ADAPTER_FORMAT!r} expected)")
    if config.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise AdapterStateError(
            f"{path} has adapter format version {config.get('format_version')!r}; this ubsmoe reads version "
            f"{ADAPTER_FORMAT_VERSION}"
        )
    return config


def _check_config(saved: dict[str, Any], model: nn.Module, where: Path) -> None:
    current = _block_summary(model)
    checks = [
        ("number of UB-SMoE layers", "num_layers"),
        ("experts per layer", "num_experts"),
        ("LoRA rank", "lora_rank"),
        ("LoRA targets", "lora_targets"),
        ("LoRA alpha", "lora_alpha"),
    ]
    for label, key in checks:
        if saved.get(key) != current.get(key):
            raise AdapterStateError(
                f"the adapter in {where} does not fit this model ({label}: adapter {saved.get(key)!r}, "
                f"model {current.get(key)!r})"
            )


def load_trainable_state(model: nn.Module, directory: str | os.PathLike[str], strict: bool = True) -> LoadResult:
    """Load a state written by `save_trainable_state` into `model`, in place.

    Checks the saved configuration against the model's blocks, then every key and shape, before
    changing anything. With `strict` every trainable key must be present and no other key may be;
    otherwise the common keys are loaded and the others returned. Shapes must always match.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    saved_config = read_adapter_config(directory)
    _check_config(saved_config, model, directory)
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterStateError(f"{directory} holds no adapter weights: {ADAPTER_WEIGHTS} is missing")
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise AdapterStateError(f"cannot read {path}: {error}") from error

    parameters = trainable_parameters(model)
    missing = [k for k in parameters if k not in tensors]
    unexpected = [k for k in tensors if k not in parameters]
    if strict and missing:
        raise AdapterStateError(
            f"the adapter in {directory} lacks {len(missing)} tensor(s) the model trains, first {missing[0]!r} "
            f"(shape {tuple(parameters[missing[0]].shape)})"
        )
    if strict and unexpected:
        raise AdapterStateError(
            f"the adapter in {directory} has {len(unexpected)} tensor(s) the model does not train, first "
            f"{unexpected[0]!r} (shape {tuple(tensors[unexpected[0]].shape)})"
        )
    for key, parameter in parameters.items():
        if key in tensors and tensors[key].shape != parameter.shape:
            raise AdapterStateError(
                f"shape mismatch for {key!r}: the adapter in {directory} has {tuple(tensors[key].shape)}, "
                f"the model has {tuple(parameter.shape)}"
            )
    with torch.no_grad():
        for key, parameter in parameters.items():
            if key in tensors:
                parameter.copy_(tensors[key])
    return LoadResult(missing, unexpected)


# ---- merged export ---------------------------------------------------------------------------------
@dataclass
class _Entry:
    """One tensor of the exported checkpoint, made when its shard is written."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _merged(block: UBSMoEBlock, which: str) -> torch.Tensor:
    """A copy of the block's fused gate_up (or down) experts with each expert's LoRA folded in."""
    base = block.gate_up_proj if which == "gate_up" else block.down_proj
    lora = block.lora
    parts = [("gate", slice(0, block.intermediate_size)), ("up", slice(block.intermediate_size, None))]
    if which == "down":
        parts = [("down", slice(None))]
    parts = [(t, rows) for t, rows in parts if t in lora.targets]
    if not parts:
        return base.detach()
    compute = torch.promote_types(torch.promote_types(base.dtype, lora.lora_A[parts[0][0]].dtype), torch.float32)
    with torch.no_grad():
        merged = base.detach().to(compute, copy=True)
        for target, rows in parts:
            delta = torch.bmm(lora.lora_B[target].to(compute), lora.lora_A[target].to(compute))
            merged[:, rows] += lora.scaling * delta.to(merged.device)
        return merged.to(base.dtype)


def _export_entries(model: nn.Module, spec: Any) -> tuple[list[_Entry], list[str]]:
    """Tensors of the exported checkpoint in state-dict order, and the keys left out as tied aliases."""
    blocks = dict(_blocks(model))
    entries: list[_Entry] = []
    tied: list[str] = []
    seen: dict[tuple, str] = {}

    def reference(key: str, tensor: torch.Tensor) -> None:
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if tensor.device.type != "meta" and identity in seen:
            tied.append(key)
            return
        seen[identity] = key
        entries.append(_Entry(key, tuple(tensor.shape), tensor.dtype, lambda t=tensor: t.detach()))

    for key, tensor in model.state_dict(keep_vars=True).items():
        owner = _owning_block(key, blocks)
        if owner is None:
            reference(key, tensor)
            continue
        prefix, block = owner
        local = key[len(prefix) + 1 :]
        if local == "router_weight":
            reference(f"{prefix}.{spec.router_attr}.weight", tensor)
        elif local in ("gate_up_proj", "down_proj"):
            which = "gate_up" if local == "gate_up_proj" else "down"
            entries.append(
                _Entry(
                    f"{prefix}.{spec.experts_attr}.{local}",
                    tuple(tensor.shape),
                    tensor.dtype,
                    lambda b=block, w=which: _merged(b, w),
                )
            )
        elif local == "phi" or local.startswith("lora."):
            continue
        elif spec.shared_expert_attr and local.startswith("shared_expert."):
            reference(f"{prefix}.{spec.shared_expert_attr}.{local[len('shared_expert.') :]}", tensor)
        elif spec.shared_expert_gate_attr and local.startswith("shared_expert_gate."):
            reference(f"{prefix}.{spec.shared_expert_gate_attr}.{local[len('shared_expert_gate.') :]}", tensor)
        else:
            raise ExportError(f"cannot map {key!r} of a UB-SMoE block back to the {spec.name} layout")
    return entries, tied


def _owning_block(key: str, blocks: dict[str, UBSMoEBlock]) -> tuple[str, UBSMoEBlock] | None:
    prefix = key
    while "." in prefix:
        prefix = prefix.rpartition(".")[0]
        if prefix in blocks:
            return prefix, blocks[prefix]
    return None


def _exported_config(model: nn.Module, spec: Any, blocks: list[UBSMoEBlock], top_k: int | None) -> Any:
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    first = blocks[0]
    if top_k is not None:
        if not isinstance(top_k, int) or not 1 <= top_k <= first.num_experts:
            raise ExportError(f"top_k must be an integer in [1, {first.num_experts}], got {top_k!r}")
        setattr(config, spec.top_k_key, top_k)
    normalize = first.config.normalize_gates
    if normalize != spec.normalize_gates(config):
        if spec.normalize_key is None:
            raise ExportError(
                f"the blocks {'do' if normalize else 'do not'} renormalise the top-k gates, which {spec.name}'s "
                "router cannot be configured to do; the export would route differently"
            )
        setattr(config, spec.normalize_key, normalize)
    if first.config.unit_gates:
        raise ExportError(f"unit (straight-through) gates cannot be expressed by {spec.name}'s router")
    return config


def _shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _reference_model(model: nn.Module, config: Any) -> nn.Module:
    """The original class built from `config` on the meta device (no memory)."""
    with torch.device("meta"):
        return type(model)(config)


def _to_hub_format(reference: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' own reversal of its load-time conversion: fused experts -> one module per expert."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError as error:  # pragma: no cover - depends on the transformers version
        raise ExportError(f"hub_format needs transformers' revert_weight_conversion ({error})") from error
    converted = revert_weight_conversion(reference, tensors)
    # the per-expert pieces are views of one fused tensor; safetensors stores no aliases
    return {key: t.clone(memory_format=torch.contiguous_format) for key, t in converted.items()}


def _check_coverage(entries: list[_Entry], tied: list[str], expected: dict[str, tuple[int, ...]], name: str) -> None:
    produced = {e.key: e.shape for e in entries}
    for key, shape in expected.items():
        if key not in produced and key not in tied:
            raise ExportError(f"the export lacks {key!r} (shape {shape}) that {name} expects")
        if key in produced and produced[key] != shape:
            raise ExportError(f"shape mismatch for {key!r}: the export has {produced[key]}, {name} expects {shape}")
    extra = [k for k in [*produced, *tied] if k not in expected]
    if extra:
        raise ExportError(f"the export has {extra[0]!r}, which {name} does not have")


def export_merged(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    top_k: int | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    hub_format: bool = False,
) -> Path:
    """Fold each expert's LoRA into its weights and write a plain transformers checkpoint to `directory`.

    `model` is a native MoE model adapted with `ubsmoe.models.adapt_moe_model`. Writes `config.json`
    (the original config; `top_k`, if given, as the family's experts-per-token), `generation_config.json`
    where the model has one, and the weights as `model.safetensors` (or shards of at most
    `max_shard_bytes` with `model.safetensors.index.json`), each file atomically; stale weight files
    of an earlier export in the directory are removed. phi is dropped (see the module docstring).

    The weights are in transformers 5.x's module layout (fused `experts.gate_up_proj`, ...) by
    default. With `hub_format` they are written as `save_pretrained` writes them, in the families'
    published per-expert layout (`experts.<e>.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.<e>.w1`,
    ...), through transformers' own reversal of its load-time conversion: what older transformers and
    other runtimes read. Both load with `from_pretrained`. Returns the directory.
    """
    from ubsmoe.models.native import UnsupportedModelError, family_spec

    try:
        spec = family_spec(model)
    except UnsupportedModelError as error:
        raise ExportError(
            f"export_merged writes native MoE checkpoints only: {error} Save the adapters with save_trainable_state."
        ) from None
    blocks = [block for _, block in _blocks(model)]
    if not blocks:
        raise ExportError(f"this {spec.name} model has no UB-SMoE blocks: adapt it with adapt_moe_model first")
    config = _exported_config(model, spec, blocks, top_k)
    if any(block.config.dmr and bool(block.phi.detach().ne(0).any()) for block in blocks):
        warnings.warn(
            "phi is non-zero: the exported model routes as the base router (phi dropped), an approximation of "
            "the adapted model",
            stacklevel=2,
        )
    entries, tied = _export_entries(model, spec)
    reference = _reference_model(model, config)
    expected = {key: tuple(t.shape) for key, t in reference.state_dict().items()}
    _check_coverage(entries, tied, expected, type(model).__name__)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _shards(entries, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards, strict=True):
        tensors = {e.key: e.make().to("cpu").contiguous() for e in shard}
        if hub_format:
            tensors = _to_hub_format(reference, tensors)
        _write_safetensors(directory / name, tensors, {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = directory / "model.safetensors.index.json"
    if len(shards) > 1:
        total = sum(e.nbytes for e in entries)
        write_text_atomic(
            index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
    for stale in _stale_weight_files(directory, set(names) | ({index.name} if len(shards) > 1 else set())):
        stale.unlink()
    write_text_atomic(directory / "config.json", config.to_json_string(use_diff=True))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        write_text_atomic(directory / "generation_config.json", generation_config.to_json_string(use_diff=True))
    return directory


def _stale_weight_files(directory: Path, keep: set[str]) -> Iterator[Path]:
    pattern = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
    for path in directory.iterdir():
        if path.is_file() and pattern.fullmatch(path.name) and path.name not in keep:
            yield path


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterStateError",
    "ExportError",
    "LoadResult",
    "export_merged",
    "load_trainable_state",
    "read_adapter_config",
    "save_trainable_state",
    "trainable_state",
]
