"""The peft tensors and config of a UB-SMoE expert LoRA: native MoE models (target_parameters on the fused experts) and MoEfied dense ones (a rank M*r LoRA on the original MLP)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ubsmoe.moe.extensions import LOCAL_EXTENSIONS

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_FOLDER = "peft"
"""A run writes its final adapters in peft's format to OUT/adapters/peft/."""
README = "README.md"
EXPORT_FORMATS = ("peft", "merged")


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
    """The trainable router weights by block, and notes on phi and client-local parameters; refuses anything else."""
    routers: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for key, tensor in rest.items():
        block, local, _ = key.partition(f".{LOCAL_EXTENSIONS}.")
        if local and block in prefixes:  # a client-local extension's parameter (A3SMoE's output scale)
            if bool(tensor.ne(1).any()) and "client-local" not in " ".join(notes):
                notes.append(
                    "the model holds client-local block parameters (A3SMoE's output scales) other than 1: they are "
                    "not part of the export, which is the global expert LoRA (the model without them)"
                )
            continue
        prefix, _, name = key.rpartition(".")
        if prefix not in prefixes:
            raise PeftExportError(
                f"{key!r} is trainable but is no UB-SMoE block's expert LoRA, phi, client-local parameter or router; the peft "
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
