"""A UB-SMoE run's expert LoRA as a peft LoRA adapter of the ORIGINAL transformers model.

`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), directory)` loads what this
module writes, with no ubsmoe code: `adapter_model.safetensors` and `adapter_config.json`, as peft's
`save_pretrained` writes them (`LoraConfig.to_dict()`, `inference_mode` true, `task_type`
CAUSAL_LM), plus a short README.md that says where the adapter comes from.

Native MoE models (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE; transformers 5.x fused experts)
    Each block's expert LoRA becomes a peft `target_parameters` LoRA on the 3D parameters
    `<block>.experts.gate_up_proj` (M, 2I, H) and `<block>.experts.down_proj` (M, H, I). peft's
    `lora.ParamWrapper` stores, for a 3D parameter of M experts and rank R, lora_A as (M*R, in) (expert
    e's A is rows e*R .. (e+1)*R) and lora_B as (out, R*M) (expert e's B is columns e, e+M, e+2M, ...),
    and adds scaling * B_e @ A_e to expert e's (out, in) matrix. Gate and up share the fused
    gate_up_proj, so there they are one LoRA of rank 2r per expert: A_e = [A_gate; A_up] and a
    block-diagonal B_e = [[B_gate, 0], [0, B_up]], whose product is exactly [B_gate A_gate; B_up A_up].
    `rank_pattern` / `alpha_pattern` give gate_up_proj rank 2r and alpha 2*alpha, so every scaling is
    ubsmoe's alpha / r. A trainable router is saved whole (`modules_to_save`). The peft model routes
    as the base router at the model's native top-k: it equals the UB-SMoE model at K = K_max with
    phi = 0 (a warning says when phi is not zero; see `ubsmoe.models.state` for what phi means).
MoEfied dense models (the embedded default, any dense Llama/Mistral/Qwen2/Qwen3)
    At K = M a MoEfied block runs every expert with gate 1 (unit gates), and expert e's gate/up rows
    and down columns are the original FFN's neurons `neuron_groups[e]`: the block is exactly the dense
    FFN (`ubsmoe.models.moefication`). So the per-expert LoRA is exactly a dense LoRA of rank M*r on
    the original `mlp.gate_proj`, `mlp.up_proj` and `mlp.down_proj`: for gate/up, A = [A_1; ...; A_M]
    and B puts B_e on the rows of expert e's neurons (zero on the shared group's); for down, A puts A_e
    on the columns of expert e's neurons and B = [B_1 ... B_M]. With lora_alpha = M*alpha the scaling is
    alpha / r. The peft model is the UB-SMoE model at K = M whatever phi and the router hold (every
    expert is selected at K = M). Lower tiers are not reproduced: a peft user running the dense model
    runs every expert (K = M); the K_c < M tiers need the UB-SMoE model. A MoEfied model made with
    the recovery stage is refused: its experts were trained away from the dense FFN, so no LoRA of the
    original model reproduces them.

What is left out: A3SMoE's output scales are client-local (the server keeps one per client, none is
global); the adapter holds the global expert LoRA, i.e. the model with unit output scales (a warning
says so when the model holds other scales). Tensors that are neither expert LoRA, phi, an output
scale nor a native router are refused.

Entry points: `native_peft_adapter` and `moefied_peft_adapter` (pure: adapter tensors in, a
`PeftAdapter` out), `write_peft_adapter` (atomic), `export_peft` (an in-memory UB-SMoE model),
`export_run` (a finished run's folder, what `ubsmoe export` calls) and `export_run_adapters` (what a
run writes to `OUT/adapters/peft/` at its end).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_FOLDER = "peft"
"""A run writes its final adapters in peft's format to OUT/adapters/peft/."""
README = "README.md"
EXPORT_FORMATS = ("peft", "merged")


def export_refusal(method: str | None) -> str | None:
    """Why a run of `method` has no peft export (`Method.peft_export_refusal`), or None when it has one.

    A method that cannot be found (e.g. a folder written by a method since removed) is not refused here:
    the export then reads the adapters as they are."""
    if not method:
        return None
    from ubsmoe.methods import UnknownMethodError, method_class

    try:
        return method_class(method).peft_export_refusal
    except UnknownMethodError:
        return None


_EXPERT_KEY = re.compile(r"^(?P<prefix>.+)\.lora\.lora_(?P<factor>[AB])\.(?P<target>gate|up|down)$")
_TARGET_ORDER = ("gate", "up", "down")
_NATIVE_PARAMETERS = ("gate_up_proj", "down_proj")  # registration order of transformers' fused experts
_DENSE_PROJECTIONS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_PEFT_PREFIX = "base_model.model."


class PeftExportError(ValueError):
    """The adapters cannot be written as a peft adapter of the original model; the message says why."""


@dataclass(frozen=True)
class PeftAdapter:
    """A peft LoRA adapter: its state dict (peft's saved keys) and its `LoraConfig` keyword arguments.

    `notes`: what the adapter leaves out of the UB-SMoE model (phi, output scales), one sentence each.
    """

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    notes: tuple[str, ...] = ()

    def lora_config(self) -> Any:
        """peft's `LoraConfig` for this adapter (needs peft)."""
        peft = _require_peft()
        return peft.LoraConfig(**self.config)

    def config_dict(self) -> dict[str, Any]:
        """The adapter_config.json content, as `PeftModel.save_pretrained` writes it."""
        output = self.lora_config().to_dict()
        for key, value in output.items():
            if isinstance(value, set):
                output[key] = sorted(value)
        output["inference_mode"] = True
        return output


@dataclass(frozen=True)
class NeuronGroups:
    """Where a MoEfied block's experts sit in the dense FFN it came from.

    module: the block's module path (that of the dense MLP it replaced, e.g. `model.layers.3.mlp`);
    groups: the original neuron indices of each expert, in the order of the expert's rows;
    intermediate_size: I, the dense FFN's number of neurons.
    """

    module: str
    groups: list[list[int]]
    intermediate_size: int


@dataclass
class _ExpertLoRA:
    prefix: str
    lora_A: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_B: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in _TARGET_ORDER if t in self.lora_A)

    @property
    def owner(self) -> str:
        """The block's own attribute name (`mlp`), the tail of its module path."""
        return self.prefix.rpartition(".")[2]


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise PeftExportError(
            f"the peft export needs peft: pip install 'ubsmoe[hf]' (or peft>=0.18) ({error})"
        ) from None
    return peft


def _number(value: float) -> int | float:
    """An integral float as an int (LoraConfig's `r` / `lora_alpha` are ints in peft's own files)."""
    return int(value) if float(value).is_integer() else float(value)


# ---- splitting the adapter tensors -------------------------------------------------------------------
def _split(adapters: Mapping[str, torch.Tensor], rank: int) -> tuple[list[_ExpertLoRA], dict[str, torch.Tensor]]:
    """Each block's expert LoRA (in key order) and the remaining tensors, checked for shape and rank."""
    layers: dict[str, _ExpertLoRA] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in adapters.items():
        match = _EXPERT_KEY.match(key)
        if match is None:
            rest[key] = tensor
            continue
        layer = layers.setdefault(match["prefix"], _ExpertLoRA(match["prefix"]))
        (layer.lora_A if match["factor"] == "A" else layer.lora_B)[match["target"]] = tensor
    if not layers:
        raise PeftExportError("the adapters hold no expert LoRA (lora.rank 0 or no LoRA targets): nothing to export")
    for layer in layers.values():
        if set(layer.lora_A) != set(layer.lora_B):
            raise PeftExportError(f"{layer.prefix}: the expert LoRA lacks A or B of some target")
        if layer.targets != next(iter(layers.values())).targets:
            raise PeftExportError(f"{layer.prefix}: its LoRA targets differ from the first block's")
        for target in layer.targets:
            a, b = layer.lora_A[target], layer.lora_B[target]
            if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != rank or b.shape[2] != rank:
                raise PeftExportError(
                    f"{layer.prefix}.lora.{target}: A {tuple(a.shape)} and B {tuple(b.shape)} are not M expert "
                    f"LoRA pairs of rank {rank}"
                )
    return list(layers.values()), rest


def _leftovers(
    rest: Mapping[str, torch.Tensor], prefixes: set[str], *, phi_matters: bool
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The trainable router weights by block, and notes on phi and output scales; refuses anything else."""
    routers: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for key, tensor in rest.items():
        prefix, _, name = key.rpartition(".")
        if prefix not in prefixes:
            raise PeftExportError(
                f"{key!r} is trainable but is no UB-SMoE block's expert LoRA, phi, output scale or router; the peft "
                "export has no place for it"
            )
        if name == "router_weight":
            routers[prefix] = tensor
        elif name == "phi":
            if phi_matters and bool(tensor.ne(0).any()) and "phi" not in " ".join(notes):
                notes.append(
                    "phi is non-zero: the peft model routes as the base router (phi dropped), an approximation of the "
                    "UB-SMoE model"
                )
        elif name == "output_scale":
            if bool(tensor.ne(1).any()) and "output scale" not in " ".join(notes):
                notes.append(
                    "the model holds A3SMoE output scales other than 1: they are client-local and not part of the "
                    "export, which is the global expert LoRA (the model with unit output scales)"
                )
        else:
            raise PeftExportError(f"{key!r}: the peft export has no place for a block's {name!r}")
    return routers, notes


def _peft_3d(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert LoRA A (M, R, in), B (M, out, R) in peft's ParamWrapper layout: A (M*R, in), B (out, R*M)."""
    experts, rank, inner = a.shape
    return a.reshape(experts * rank, inner).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], -1).contiguous()


# ---- native MoE models -------------------------------------------------------------------------------
def native_peft_adapter(
    adapters: Mapping[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    experts_attr: str = "experts",
    router_attr: str = "gate",
    base_model: str | None = None,
) -> PeftAdapter:
    """The peft adapter (target_parameters on the fused experts) of a native MoE model's UB-SMoE adapters.

    `adapters`: the trainable state (`ubsmoe.models.state.trainable_state`, or a saved
    `adapter.safetensors`) keyed by module path; `rank` / `alpha`: the expert LoRA's (scaling alpha / rank);
    `experts_attr` / `router_attr`: the family's attribute names (`FamilySpec`).
    """
    layers, rest = _split(adapters, rank)
    routers, notes = _leftovers(rest, {layer.prefix for layer in layers}, phi_matters=True)
    targets = layers[0].targets
    inputs = tuple(t for t in ("gate", "up") if t in targets)
    parameters = [
        p for p in _NATIVE_PARAMETERS if (p == "gate_up_proj" and inputs) or (p == "down_proj" and "down" in targets)
    ]
    state: dict[str, torch.Tensor] = {}
    for layer in layers:
        for index, parameter in enumerate(parameters):
            # each targeted parameter wraps the experts module once more: the first one ends up innermost
            nesting = "base_layer." * (len(parameters) - 1 - index)
            if parameter == "gate_up_proj":
                a = torch.cat([layer.lora_A[t] for t in inputs], dim=1)  # (M, n*r, H)
                experts, inner = layer.lora_B[inputs[0]].shape[:2]
                b = a.new_zeros(experts, 2 * inner, len(inputs) * rank)
                for column, target in enumerate(inputs):
                    rows = slice(0, inner) if target == "gate" else slice(inner, 2 * inner)
                    b[:, rows, column * rank : (column + 1) * rank] = layer.lora_B[target]
            else:
                a, b = layer.lora_A["down"], layer.lora_B["down"]
            peft_a, peft_b = _peft_3d(a, b)
            where = f"{_PEFT_PREFIX}{layer.prefix}.{experts_attr}.{nesting}"
            state[f"{where}lora_A.weight"] = peft_a
            state[f"{where}lora_B.weight"] = peft_b
        if layer.prefix in routers:
            state[f"{_PEFT_PREFIX}{layer.prefix}.{router_attr}.weight"] = routers[layer.prefix].contiguous()
    owners = sorted({layer.owner for layer in layers})
    widths = {"gate_up_proj": len(inputs), "down_proj": 1}
    config: dict[str, Any] = {
        "r": rank * widths[parameters[0]] if len(parameters) == 1 else rank,
        "lora_alpha": _number(alpha * widths[parameters[0]] if len(parameters) == 1 else alpha),
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": [],
        "target_parameters": [f"{o}.{experts_attr}.{p}" for o in owners for p in parameters],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
    }
    if len(parameters) == 2 and len(inputs) > 1:
        config["rank_pattern"] = {"gate_up_proj": rank * len(inputs)}
        config["alpha_pattern"] = {"gate_up_proj": _number(alpha * len(inputs))}
    if routers:
        config["modules_to_save"] = sorted(f"{o}.{router_attr}" for o in owners)
    return PeftAdapter(state, config, tuple(notes))


# ---- MoEfied dense models ----------------------------------------------------------------------------
def moefied_peft_adapter(
    adapters: Mapping[str, torch.Tensor],
    layers: Sequence[NeuronGroups],
    *,
    rank: int,
    alpha: float,
    base_model: str | None = None,
) -> PeftAdapter:
    """The dense peft LoRA (rank M*r on gate_proj/up_proj/down_proj) equal to a MoEfied model at K = M.

    `layers`: every MoEfied block's neuron groups (`NeuronGroups`); the other arguments as in
    `native_peft_adapter`. phi, the router and the routing do not matter at K = M.
    """
    expert_layers, rest = _split(adapters, rank)
    by_module = {layer.module: layer for layer in layers}
    missing = [layer.prefix for layer in expert_layers if layer.prefix not in by_module]
    if missing:
        raise PeftExportError(f"no neuron groups for the MoEfied block {missing[0]!r}")
    routers, notes = _leftovers(rest, {layer.prefix for layer in expert_layers}, phi_matters=False)
    del routers  # every expert is selected at K = M: the router does not change the output
    state: dict[str, torch.Tensor] = {}
    num_experts = None
    for layer in expert_layers:
        groups = by_module[layer.prefix]
        index = torch.tensor(groups.groups, dtype=torch.long)  # (M, n)
        num_experts, size = index.shape
        if index.numel() != len(set(index.reshape(-1).tolist())) or int(index.max()) >= groups.intermediate_size:
            raise PeftExportError(f"{layer.prefix}: the neuron groups are not disjoint neurons of the FFN")
        for target in layer.targets:
            a, b = layer.lora_A[target], layer.lora_B[target]
            neurons = b.shape[1] if target != "down" else a.shape[2]
            if a.shape[0] != num_experts or neurons != size:
                raise PeftExportError(
                    f"{layer.prefix}.lora.{target}: {a.shape[0]} experts of {neurons} neurons, but the neuron groups "
                    f"are {num_experts} of {size}"
                )
            if target == "down":
                dense_a = a.new_zeros(num_experts * rank, groups.intermediate_size)
                for expert in range(num_experts):
                    dense_a[expert * rank : (expert + 1) * rank, index[expert]] = a[expert]
                dense_b = b.permute(1, 0, 2).reshape(b.shape[1], num_experts * rank)
            else:
                dense_a = a.reshape(num_experts * rank, a.shape[2])
                dense_b = b.new_zeros(groups.intermediate_size, num_experts * rank)
                for expert in range(num_experts):
                    dense_b[index[expert], expert * rank : (expert + 1) * rank] = b[expert]
            where = f"{_PEFT_PREFIX}{layer.prefix}.{_DENSE_PROJECTIONS[target]}."
            state[f"{where}lora_A.weight"] = dense_a.contiguous()
            state[f"{where}lora_B.weight"] = dense_b.contiguous()
    owners = sorted({layer.owner for layer in expert_layers})
    config = {
        "r": rank * num_experts,
        "lora_alpha": _number(alpha * num_experts),
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(f"{o}.{_DENSE_PROJECTIONS[t]}" for o in owners for t in expert_layers[0].targets),
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
    }
    return PeftAdapter(state, config, tuple(notes))


# ---- writing -----------------------------------------------------------------------------------------
def _readme(adapter: PeftAdapter, source: str | None) -> str:
    base = adapter.config.get("base_model_name_or_path") or "BASE_MODEL"
    lines = ["# peft LoRA adapter exported by ubsmoe", ""]
    if source:
        lines += [f"From {source}.", ""]
    lines += [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
        "```",
        "",
    ]
    if adapter.config.get("target_parameters"):
        lines.append(
            "The expert LoRA of every MoE layer on the fused expert weights (`target_parameters`): the UB-SMoE "
            "model at the native top-k with phi = 0, routed by the base router."
        )
        if adapter.config.get("rank_pattern"):
            lines.append("")
            lines.append(
                "peft may warn that the rank_pattern / alpha_pattern key `gate_up_proj` 'did not match any targeted "
                "module and was ignored': its check looks at target_modules only; the pattern is applied to the "
                "targeted parameter (otherwise the weights would not load)."
            )
    else:
        lines.append(
            "The MoEfied model's per-expert LoRA as one dense LoRA of rank M x r on the original FFN: exactly the "
            "UB-SMoE model at K = M (every expert runs). Budget tiers with K < M need the UB-SMoE model."
        )
    for note in adapter.notes:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _fsync_files(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _check_target(directory: Path, replace: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise PeftExportError(f"{directory} is a file; pass a new or empty folder")
    if not replace and directory.is_dir() and any(directory.iterdir()):
        raise PeftExportError(f"{directory} is not empty; pass a new or empty folder")


def _publish(staging: Path, directory: Path, replace: bool) -> None:
    """Move the finished `staging` folder to `directory` (an empty one is replaced; a full one only with `replace`)."""
    _check_target(directory, replace)
    retired = None
    if directory.is_dir():
        if any(directory.iterdir()):
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, retired / "old")
        else:
            directory.rmdir()
    os.rename(staging, directory)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def _staging(directory: Path, replace: bool):
    """A temporary folder next to `directory`, published there on success and removed on failure."""
    _check_target(directory, replace)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield staging
        _publish(staging, directory, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_peft_adapter(
    adapter: PeftAdapter, directory: str | os.PathLike[str], *, replace: bool = False, source: str | None = None
) -> Path:
    """Write `adapter_model.safetensors`, `adapter_config.json` (as peft's `save_pretrained`) and README.md.

    The files are written to a temporary folder next to `directory`, which is then renamed into place:
    a reader sees the whole adapter or none. A non-empty `directory` is refused unless `replace`.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    config = adapter.config_dict()
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in adapter.state_dict.items()}
    with _staging(directory, replace) as staging:
        save_file(tensors, str(staging / PEFT_WEIGHTS), metadata={"format": "pt"})
        (staging / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        (staging / README).write_text(_readme(adapter, source), encoding="utf-8")
        _fsync_files(staging)
    return directory


# ---- from an in-memory UB-SMoE model -----------------------------------------------------------------
def model_peft_adapter(model: nn.Module, base_model: str | None = None) -> PeftAdapter:
    """The peft adapter of a UB-SMoE model (native or MoEfied) from its current trainable state."""
    from ubsmoe.models.moefication import MoEfiedBlock
    from ubsmoe.models.native import UnsupportedModelError, family_spec
    from ubsmoe.models.state import trainable_state
    from ubsmoe.moe import UBSMoEBlock

    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, UBSMoEBlock)]
    if not blocks:
        raise PeftExportError("the model has no UB-SMoE blocks: adapt or MoEfy it first")
    first = blocks[0][1]
    rank, alpha = first.config.lora_rank, first.config.lora_alpha
    hf_config = getattr(model, "config", None)
    if base_model is None:
        base_model = getattr(hf_config, "name_or_path", None) or None
    adapters = trainable_state(model)
    if isinstance(first, MoEfiedBlock):
        moefication = getattr(model, "moefication_config", None)
        if moefication is not None and moefication.recovery:
            raise PeftExportError(_RECOVERY_REFUSAL)
        intermediate = getattr(hf_config, "intermediate_size", None)
        if not isinstance(intermediate, int):
            raise PeftExportError("the MoEfied model's config has no intermediate_size (the dense FFN's width)")
        layers = []
        for name, block in blocks:
            if not block.neuron_groups:
                raise PeftExportError(f"the MoEfied block {name!r} does not record its neuron groups")
            layers.append(NeuronGroups(name, [list(g) for g in block.neuron_groups], intermediate))
        return moefied_peft_adapter(adapters, layers, rank=rank, alpha=alpha, base_model=base_model)
    try:
        spec = family_spec(model)
    except UnsupportedModelError as error:
        raise PeftExportError(str(error)) from None
    _check_native_routing(spec, hf_config, first.config.normalize_gates, first.config.unit_gates)
    return native_peft_adapter(
        adapters,
        rank=rank,
        alpha=alpha,
        experts_attr=spec.experts_attr,
        router_attr=spec.router_attr,
        base_model=base_model,
    )


_RECOVERY_REFUSAL = (
    "the model was MoEfied with the recovery stage (model.moefication.recovery), which trains the experts away "
    "from the dense FFN: at K = M it is no longer the original model, so no LoRA of the original model reproduces "
    "it. MoEfy without recovery to export for peft"
)


def _check_native_routing(spec: Any, hf_config: Any, normalize: bool, unit_gates: bool) -> None:
    """The peft model routes as the base config says: refuse blocks that route otherwise."""
    if unit_gates:
        raise PeftExportError(f"the blocks use unit (straight-through) gates, which {spec.name}'s router does not")
    if hf_config is not None and normalize != spec.normalize_gates(hf_config):
        raise PeftExportError(
            f"the blocks {'' if normalize else 'do not '}renormalise the top-k gates (moe.normalize_gates), the base "
            f"{spec.name} config does {'not ' if normalize else ''}: peft on the original model would route "
            "differently. Use `ubsmoe export --format merged`, which writes the setting into the model's config"
        )


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    replace: bool = False,
) -> Path:
    """Write a UB-SMoE model's adapters as a peft adapter of the original model (see the module docstring).

    `base_model` is recorded as `base_model_name_or_path` (default: the model config's `name_or_path`).
    What the export leaves out (non-zero phi of a native model, A3SMoE output scales) is warned about.
    """
    adapter = model_peft_adapter(model, base_model)
    for note in adapter.notes:
        warnings.warn(note, stacklevel=2)
    return write_peft_adapter(adapter, directory, replace=replace)


# ---- from a finished run -----------------------------------------------------------------------------
def base_model_path(name: str) -> str:
    """Where the base model of `model.name` lives: the embedded default's converted checkpoint, or the folder."""
    from ubsmoe.config import EMBEDDED_MODEL

    if name == EMBEDDED_MODEL:
        from ubsmoe.models.embedded import CACHE_NAME
        from ubsmoe.paths import cache_dir

        return str(cache_dir() / "models" / CACHE_NAME)
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def base_model_of_run(name: str, model_info: Mapping[str, Any] | None = None) -> tuple[str, str | None]:
    """(`base_model_name_or_path`, `revision`) of a run's base model, from summary.json's `model` entry.

    A hub id with the commit it resolved to (so peft loads the very weights the run used), else the
    folder the run read, else `base_model_path(name)`.
    """
    info = model_info or {}
    if info.get("hub_id"):
        return str(info["hub_id"]), info.get("commit") or info.get("revision")
    if info.get("path"):
        return str(info["path"]), None
    return base_model_path(name), None


def export_run_adapters(
    model: nn.Module,
    adapters_dir: str | os.PathLike[str],
    config: Any,
    model_info: Mapping[str, Any] | None = None,
) -> tuple[Path | None, list[str]]:
    """At the end of a run: `adapters_dir/peft/`, or None; and the lines to log (notes, or why not).

    `model_info`: summary.json's `model` entry (where the base model was read). Never raises for what it
    cannot export (a run's end must not fail on it): the reason is returned.
    """
    directory = Path(adapters_dir) / PEFT_FOLDER
    reason = export_refusal(config.method)
    if reason is None:
        try:
            base_model, revision = base_model_of_run(config.model.name, model_info)
            adapter = model_peft_adapter(model, base_model)
            if revision:
                adapter.config["revision"] = revision
            write_peft_adapter(adapter, directory, replace=True, source=f"a ubsmoe run, method {config.method}")
        except Exception as error:  # an optional extra: the run's own outputs must still be written
            reason = str(error) if isinstance(error, PeftExportError | OSError) else f"{type(error).__name__}: {error}"
        else:
            return directory, [f"peft adapter: {note}" for note in adapter.notes]
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(directory)  # a resumed run must not leave an earlier export that no longer matches
    return None, [f"no peft adapter in {directory}: {reason}"]


def _resolve_run(path: Path) -> tuple[Path, Path | None]:
    """(the adapters folder, the run folder or None) of RUN_DIR or of an adapters folder."""
    from ubsmoe.models.state import ADAPTER_CONFIG

    if not path.exists():
        raise PeftExportError(f"{path}: no such folder")
    if not path.is_dir():
        raise PeftExportError(f"{path} is a file; pass the folder of a finished `ubsmoe run`")
    if (path / "adapters" / ADAPTER_CONFIG).is_file():
        return path / "adapters", path
    if (path / ADAPTER_CONFIG).is_file():
        return path, path.parent if (path.parent / "config.yaml").is_file() else None
    if (path / "config.yaml").is_file():
        raise PeftExportError(
            f"{path} holds a run without final adapters (adapters/{ADAPTER_CONFIG}): it has not finished; finish it "
            f"with `ubsmoe run --resume {path}`"
        )
    raise PeftExportError(f"{path} is not the folder of a finished `ubsmoe run` (no adapters/{ADAPTER_CONFIG})")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PeftExportError(f"cannot read {path}: {error}") from None


def _saved_neuron_groups(run: Path | None) -> tuple[list[NeuronGroups], bool] | None:
    """The MoEfied blocks' neuron groups (and whether recovery ran) from the run's cached MoEfied model."""
    from ubsmoe.models.moefication import CONFIG_FILE

    if run is None or not (run / "summary.json").is_file():
        return None
    summary = _read_json(run / "summary.json")
    cache = ((summary.get("model") if isinstance(summary, dict) else None) or {}).get("moefication_cache") or {}
    description_file = Path(cache.get("path") or "") / CONFIG_FILE
    if not cache.get("path") or not description_file.is_file():
        return None
    description = _read_json(description_file)
    try:
        intermediate = int(description["base_config"]["intermediate_size"])
        layers = [NeuronGroups(layer["module"], layer["groups"], intermediate) for layer in description["layers"]]
        recovery = bool(description["moefication"].get("recovery", False))
    except (KeyError, TypeError, ValueError) as error:
        raise PeftExportError(f"{description_file} is not a MoEfied model description ({error})") from None
    return layers, recovery


def _run_config(run: Path | None, what: str) -> Any:
    from ubsmoe.config import ConfigError, load_config

    if run is None:
        raise PeftExportError(f"{what} needs the run's config.yaml: pass the run folder, not its adapters folder")
    try:
        return load_config(run / "config.yaml")
    except ConfigError as error:
        raise PeftExportError(f"{run / 'config.yaml'}: {error}") from None


def _loaded_model(run: Path | None, adapters_dir: Path, what: str, progress: Callable[[str], None] | None) -> Any:
    """The run's UB-SMoE model (loaded, or MoEfied from its cache) with its final adapters."""
    from ubsmoe.models.loading import load_experiment_model
    from ubsmoe.models.state import load_trainable_state

    config = _run_config(run, what)
    if progress:
        progress(f"loading the run's model ({config.model.name})")
    loaded = load_experiment_model(config, progress=progress)
    loaded.model.to("cpu")
    load_trainable_state(loaded.model, adapters_dir)
    return loaded.model, config


def export_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    format: str = "peft",
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, list[str]]:
    """Export a finished run's final adapters to `out_dir` (a new or empty folder); returns it and notes.

    `run_dir`: the run's folder (or its `adapters/` folder). `format`: "peft" (a peft LoRA adapter of the
    original model, see the module docstring) or "merged" (native MoE models: the LoRA folded into a
    plain transformers checkpoint, `ubsmoe.models.state.export_merged`). Errors are `PeftExportError`s,
    `ubsmoe.models.state.AdapterStateError` / `ExportError` and `ubsmoe.models.native.ModelLoadError`
    (all ValueErrors), each one line.
    """
    from safetensors.torch import load_file

    from ubsmoe.models.moefication import DENSE_FAMILIES
    from ubsmoe.models.native import NATIVE_FAMILIES
    from ubsmoe.models.state import ADAPTER_WEIGHTS, export_merged, read_adapter_config

    if format not in EXPORT_FORMATS:
        raise PeftExportError(f"--format {format}: use one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out_dir)
    _check_target(out, replace=False)
    adapters_dir, run = _resolve_run(Path(run_dir))
    saved = read_adapter_config(adapters_dir)
    model_type = saved.get("model_type")
    native = model_type in NATIVE_FAMILIES
    if not native and model_type not in DENSE_FAMILIES:
        raise PeftExportError(f"{adapters_dir}: adapters of an unknown model type {model_type!r}")
    method = (saved.get("metadata") or {}).get("method")
    refusal = export_refusal(method)
    if refusal is not None:
        raise PeftExportError(f"{adapters_dir}: {refusal}; nothing to export")
    summary = _read_json(run / "summary.json") if run is not None and (run / "summary.json").is_file() else {}
    model_info = summary.get("model") if isinstance(summary, dict) else None
    base_model, revision = base_model_of_run(str(saved.get("base_model") or ""), model_info)
    source = f"ubsmoe run {run if run is not None else adapters_dir}"

    if format == "merged":
        if not native:
            raise PeftExportError(
                "--format merged writes native MoE checkpoints; a MoEfied model's adapters are exported with "
                "--format peft (load them with peft and call merge_and_unload() for a merged dense model)"
            )
        model, _ = _loaded_model(run, adapters_dir, "--format merged", progress)
        with _staging(out, replace=False) as staging, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_merged(model, staging)
        return out, [str(w.message) for w in caught]

    rank, alpha = saved.get("lora_rank"), saved.get("lora_alpha")
    if not isinstance(rank, int) or not isinstance(alpha, int | float):
        raise PeftExportError(f"{adapters_dir / 'adapter_config.json'} has no valid lora_rank / lora_alpha")
    try:
        tensors = load_file(str(adapters_dir / ADAPTER_WEIGHTS))
    except Exception as error:  # safetensors raises its own error types for missing or corrupt files
        raise PeftExportError(f"cannot read {adapters_dir / ADAPTER_WEIGHTS}: {error}") from None
    block_config = saved.get("ubsmoe_config") or {}
    if native:
        spec = NATIVE_FAMILIES[model_type]
        base_config = Path(base_model) / "config.json"
        hf_config = SimpleNamespace(**_read_json(base_config)) if base_config.is_file() else None
        _check_native_routing(
            spec, hf_config, bool(block_config.get("normalize_gates")), bool(block_config.get("unit_gates"))
        )
        adapter = native_peft_adapter(
            tensors,
            rank=rank,
            alpha=alpha,
            experts_attr=spec.experts_attr,
            router_attr=spec.router_attr,
            base_model=base_model,
        )
    else:
        groups = _saved_neuron_groups(run)
        if groups is None:
            model, _ = _loaded_model(run, adapters_dir, "a MoEfied model's export", progress)
            adapter = model_peft_adapter(model, base_model)
        else:
            layers, recovery = groups
            if recovery:
                raise PeftExportError(_RECOVERY_REFUSAL)
            adapter = moefied_peft_adapter(tensors, layers, rank=rank, alpha=alpha, base_model=base_model)
    if revision:
        adapter.config["revision"] = revision
    write_peft_adapter(adapter, out, source=source)
    return out, list(adapter.notes)


__all__ = [
    "EXPORT_FORMATS",
    "export_refusal",
    "PEFT_CONFIG",
    "PEFT_FOLDER",
    "PEFT_WEIGHTS",
    "NeuronGroups",
    "PeftAdapter",
    "PeftExportError",
    "base_model_of_run",
    "base_model_path",
    "export_peft",
    "export_run",
    "export_run_adapters",
    "model_peft_adapter",
    "moefied_peft_adapter",
    "native_peft_adapter",
    "write_peft_adapter",
]
