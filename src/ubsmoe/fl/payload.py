"""Plain payloads exchanged by the federated core (DESIGN 2.4, 5): dicts of CPU tensors and numbers.

The in-process simulation and the Flower apps send exactly these structures:

`GlobalState` (server -> clients)
    `adapters`: every trainable tensor of the model except phi, keyed by module path as in
    `ubsmoe.models.state.trainable_state` (expert LoRA, a trainable router, any other adapter);
    `phi`: the DMR modulation of every layer stacked as (L, M); `round`: the 0-based index of the
    round these tensors are sent for (it also drives the client's learning-rate schedule).

`ClientUpdate` (client -> server)
    `adapter_deltas` (local minus global, same keys, shapes and dtypes as `GlobalState.adapters`),
    the client's `phi` (L, M) after local training, its utilization `counts` (L, M) and `tokens` (L,)
    (DESIGN 2.2 step 6), `num_examples` (its FedAvg weight), its `top_k` (K_c) and `metrics`; for
    the rank baselines its LoRA `rank` (the deltas are then relative to the adapters it started from,
    `Method.client_start`), and `local_state`, tensors the client keeps for itself
    (client-local block extensions', e.g. A3SMoE's output scales; the server stores them for it).

Every tensor in a payload is a detached CPU copy: no payload shares storage with a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ubsmoe.models.state import trainable_parameters, trainable_state
from ubsmoe.moe import get_phi, moe_blocks, set_phi
from ubsmoe.moe.extensions import LOCAL_EXTENSIONS

PHI_SUFFIX = ".phi"
LOCAL_MARK = f".{LOCAL_EXTENSIONS}."
"""Trainable tensors a client keeps for itself (never aggregated): those of client-local block
extensions (`ubsmoe.moe.extensions`, e.g. A3SMoE's output scales)."""

__all__ = [
    "PHI_SUFFIX",
    "ClientUpdate",
    "GlobalState",
    "adapter_parameters",
    "global_state_from_model",
    "is_local_key",
    "is_phi_key",
    "local_parameters",
    "load_global_state",
    "phi_range",
    "split_trainable_state",
]


@dataclass
class GlobalState:
    """What the server broadcasts each round (see the module docstring)."""

    adapters: dict[str, torch.Tensor]
    phi: torch.Tensor
    round: int = 0
    method_state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """What one client returns after its local round (see the module docstring)."""

    client_id: str | int
    adapter_deltas: dict[str, torch.Tensor]
    phi: torch.Tensor
    counts: torch.Tensor
    tokens: torch.Tensor
    num_examples: int
    top_k: int
    metrics: dict[str, float] = field(default_factory=dict)
    rank: int | None = None
    local_state: dict[str, torch.Tensor] = field(default_factory=dict)


def is_phi_key(key: str) -> bool:
    """Whether a trainable-state key is a block's phi (`....phi`)."""
    return key == "phi" or key.endswith(PHI_SUFFIX)


def is_local_key(key: str) -> bool:
    """Whether a trainable-state key is client-local (see LOCAL_MARK)."""
    return LOCAL_MARK in key


def split_trainable_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapters, phis): the aggregated non-phi tensors and the per-block phi tensors (local tensors left out)."""
    adapters = {k: v for k, v in state.items() if not is_phi_key(k) and not is_local_key(k)}
    phis = {k: v for k, v in state.items() if is_phi_key(k)}
    return adapters, phis


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters behind `GlobalState.adapters` (the trainable state without phi), by key."""
    return {k: p for k, p in trainable_parameters(model).items() if not is_phi_key(k) and not is_local_key(k)}


def local_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's client-local trainable parameters (client-local block extensions'), by key."""
    return {k: p for k, p in trainable_parameters(model).items() if is_local_key(k)}


def global_state_from_model(model: nn.Module, round: int = 0) -> GlobalState:
    """The model's current adapters and phi as a `GlobalState` (detached CPU copies)."""
    adapters, _ = split_trainable_state(trainable_state(model))
    phi = get_phi(model).cpu() if moe_blocks(model) else torch.zeros(0, 0)
    return GlobalState(adapters=adapters, phi=phi, round=round)


def phi_range(model: nn.Module) -> tuple[float, float]:
    """[phi_min, phi_max] of the model's MoE blocks (their range regulariser's), what the server clips phi to.

    Blocks with different ranges give the widest ((-1, 1), DESIGN 2.2's default, for a model without blocks).
    """
    blocks = moe_blocks(model)
    if not blocks:
        return (-1.0, 1.0)
    return (min(float(b.config.phi_min) for b in blocks), max(float(b.config.phi_max) for b in blocks))


def load_global_state(model: nn.Module, state: GlobalState) -> None:
    """Copy the state's adapters and phi into the model, in place.

    Every key and shape is checked before anything changes; a mismatch raises one ValueError naming
    the first problem. Values are cast to each parameter's dtype and device.
    """
    parameters = adapter_parameters(model)
    missing = [k for k in parameters if k not in state.adapters]
    extra = [k for k in state.adapters if k not in parameters]
    if missing:
        raise ValueError(f"the global state lacks {len(missing)} adapter tensor(s) of the model, first {missing[0]!r}")
    if extra:
        raise ValueError(f"the global state has {len(extra)} adapter tensor(s) the model lacks, first {extra[0]!r}")
    for key, parameter in parameters.items():
        if tuple(state.adapters[key].shape) != tuple(parameter.shape):
            raise ValueError(
                f"shape mismatch for {key!r}: global state {tuple(state.adapters[key].shape)}, "
                f"model {tuple(parameter.shape)}"
            )
    blocks = moe_blocks(model)
    expected_phi = (len(blocks), blocks[0].num_experts if blocks else 0)
    if tuple(state.phi.shape) != expected_phi:
        raise ValueError(f"phi must have shape {expected_phi} (layers, experts), got {tuple(state.phi.shape)}")
    with torch.no_grad():
        for key, parameter in parameters.items():
            parameter.copy_(state.adapters[key])
    if blocks:
        set_phi(model, state.phi)
