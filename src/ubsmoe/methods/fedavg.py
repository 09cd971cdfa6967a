"""FedAvg: the num-examples-weighted mean of client tensors, key by key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ubsmoe.moe.dmr import normalized_weights


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_c w_c * state_c[k] for every key k, with w normalised to sum to one.

    All states must carry the same keys and shapes (UB-SMoE clients share one adapter shape).
    """
    if not states:
        raise ValueError("fedavg needs at least one client state")
    if len(states) != len(weights):
        raise ValueError(f"need one weight per client state, got {len(states)} states and {len(weights)} weights")
    w = normalized_weights(weights)
    keys = set(states[0])
    for index, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            raise ValueError(
                f"client {index} carries keys {sorted(set(state) ^ keys)} that client 0 does not (or lacks)"
            )
    averaged = {}
    for key in states[0]:
        shapes = {tuple(s[key].shape) for s in states}
        if len(shapes) != 1:
            raise ValueError(f"tensor {key!r} has different shapes across clients: {sorted(shapes)}")
        total = torch.stack([wc * s[key].double() for wc, s in zip(w, states, strict=True)]).sum(0)
        averaged[key] = total.to(states[0][key].dtype)
    return averaged
