"""FLAME-style A3SMoE aggregation (the baseline of DESIGN section 2.5): activation-aware, per-expert client weights.

Client c, with |D_c| local examples and activation frequency freq_{c,i} of expert i (e.g. the share of
its routed tokens that chose expert i), gets on expert i the weight

    w_{c,i} = freq_{c,i}^t |D_c| / sum_{c'} freq_{c',i}^t |D_{c'}|,

so clients that used an expert more count more for it; t = 0 gives plain FedAvg weights |D_c| / sum |D|.
An expert that no client activated (all freq_{c,i}^t |D_c| = 0) falls back to the |D_c| weights.
Each expert's slice of every expert-stacked tensor (leading dim M) is then averaged with its own
weights:  out[key][i] = sum_c w_{c,i} delta_c[key][i].  Tensors without an expert dim (shared
parameters) are for `fedavg`.

In the federation (`A3SMoE`): heterogeneous K_c as SMoE-naive; freq_{c,i} is the share of client c's
routed tokens that chose expert i in the layer (from its utilization counts), |D_c| its examples; each
block gets a learnable output scale on its routed experts that stays with the client (a client-local
tensor: the server keeps it for the client, and a tier is evaluated with its clients' mean).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ubsmoe.fl.payload import ClientUpdate, GlobalState
from ubsmoe.methods.base import Aggregate, Method
from ubsmoe.methods.fedavg import fedavg
from ubsmoe.methods.lora import layer_of
from ubsmoe.moe.extensions import BlockExtension

if TYPE_CHECKING:
    from ubsmoe.config import ExperimentConfig


def activation_aware_weights(
    frequencies: Sequence[torch.Tensor] | torch.Tensor, num_examples: Sequence[float], t: float = 1.0
) -> torch.Tensor:
    """Per-expert client weights w_{c,i}, shape (C, M), float64, each column summing to one.

    `frequencies` is (C, M) or one (M,) tensor per client; num_examples has one |D_c| per client.
    Note 0^0 = 1, so with t = 0 an unused expert still gets the |D_c| weights.
    """
    if len(frequencies) == 0:
        raise ValueError("need at least one client's expert activation frequencies")
    freq = torch.stack([torch.as_tensor(f) for f in frequencies]).double()
    if freq.dim() != 2:
        raise ValueError(f"frequencies must be (C, M) or one (M,) vector per client, got shape {tuple(freq.shape)}")
    if len(num_examples) != freq.shape[0]:
        raise ValueError(f"need one example count per client, got {len(num_examples)} for {freq.shape[0]} clients")
    if t < 0:
        raise ValueError(f"t must be non-negative, got {t}")
    if (freq < 0).any() or not torch.isfinite(freq).all():
        raise ValueError("activation frequencies must be finite and non-negative")
    sizes = torch.tensor([float(n) for n in num_examples], dtype=torch.float64, device=freq.device)
    if (sizes < 0).any() or sizes.sum() <= 0:
        raise ValueError(f"num_examples must be non-negative with a positive sum, got {list(num_examples)}")
    fallback = (sizes / sizes.sum())[:, None].expand_as(freq)
    raw = freq.pow(t) * sizes[:, None]
    total = raw.sum(0, keepdim=True)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, raw / safe_total, fallback)


def a3smoe_aggregate(
    deltas: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor | Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """out[key][i] = sum_c w_{c,i} deltas[c][key][i] for expert-stacked tensors of shape (M, ...).

    `weights` is a (C, M) tensor from `activation_aware_weights` for every key, or a mapping from key to
    its own (C, M) weights (e.g. one per MoE layer). All clients must share keys and shapes.
    """
    if not deltas:
        raise ValueError("a3smoe_aggregate needs at least one client delta")
    keys = set(deltas[0])
    for index, delta in enumerate(deltas[1:], start=1):
        if set(delta) != keys:
            raise ValueError(
                f"client {index} carries keys {sorted(set(delta) ^ keys)} that client 0 does not (or lacks)"
            )
    averaged = {}
    for key in deltas[0]:
        if isinstance(weights, Mapping) and key not in weights:
            raise ValueError(f"no aggregation weights given for tensor {key!r}")
        w = weights[key] if isinstance(weights, Mapping) else weights
        w = torch.as_tensor(w, dtype=torch.float64)
        shapes = {tuple(d[key].shape) for d in deltas}
        if len(shapes) != 1:
            raise ValueError(f"tensor {key!r} has different shapes across clients: {sorted(shapes)}")
        shape = next(iter(shapes))
        if w.dim() != 2 or w.shape[0] != len(deltas):
            raise ValueError(f"weights for {key!r} must be (C={len(deltas)}, M), got shape {tuple(w.shape)}")
        if len(shape) == 0 or shape[0] != w.shape[1]:
            raise ValueError(f"tensor {key!r} of shape {shape} needs a leading expert dim M = {w.shape[1]}")
        stacked = torch.stack([d[key].double() for d in deltas])  # (C, M, ...)
        w = w.to(stacked.device).reshape(*w.shape, *([1] * (stacked.dim() - 2)))
        averaged[key] = (w * stacked).sum(0).to(deltas[0][key].dtype)
    return averaged


class OutputScale(BlockExtension):
    """One learnable scalar per block on the routed experts' output (a shared group is not rescaled);
    client-local: each client keeps its own."""

    client_local = True

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float32))

    def routed_output(self, routed: torch.Tensor) -> torch.Tensor:
        return routed * self.scale.to(routed.dtype)


@dataclass(frozen=True)
class A3SMoE(Method):
    """A3SMoE (FLAME-style): activation-aware per-expert averaging and client-local output scales."""

    exponent: float = 1.0
    """t, the power of the activation frequency in the weights (0: FedAvg)."""

    @classmethod
    def options(cls, config: ExperimentConfig) -> dict[str, Any]:
        return {"exponent": config.baselines.a3smoe_exponent}

    @classmethod
    def block_extensions(cls, config: ExperimentConfig) -> dict[str, Callable[[], BlockExtension]]:
        return {"output_scale": OutputScale}

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> Aggregate:
        """Expert LoRA: per-layer weights freq^t |D_c| (`activation_aware_weights`); the rest: FedAvg."""
        sizes = [float(u.num_examples) for u in updates]
        layers = layer_of(state.adapters)
        frequencies = [u.counts.double() / u.tokens.double().clamp_min(1)[:, None] for u in updates]  # (L, M) each
        per_layer = [
            activation_aware_weights([f[layer] for f in frequencies], sizes, self.exponent)
            for layer in range(state.phi.shape[0])
        ]
        expert_keys = [k for k in state.adapters if k in layers]
        other_keys = [k for k in state.adapters if k not in layers]
        delta = a3smoe_aggregate(
            [{k: u.adapter_deltas[k] for k in expert_keys} for u in updates],
            {k: per_layer[layers[k]] for k in expert_keys},
        )
        if other_keys:
            delta.update(fedavg([{k: u.adapter_deltas[k] for k in other_keys} for u in updates], sizes))
        adapters = {k: v + delta[k].to(v.dtype) for k, v in state.adapters.items()}
        return Aggregate(adapters, self.keep_local_state(state, updates))
