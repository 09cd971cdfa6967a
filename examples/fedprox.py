"""A method defined outside the package: FedProx's proximal term on the expert adapters.

FedProx (Li et al. 2020) adds (mu / 2) ||w - w_global||^2 to each client's loss, so that clients with
very different data (or, here, very different K_c) drift less from the global adapters during their
local steps. Everything else is UB-SMoE's: DMR, the pseudo-gradient, FedAvg of the deltas.

Use it from a configuration, with this folder on PYTHONPATH (docs/extending.md):

    PYTHONPATH=examples ubsmoe run --set method=fedprox:FedProx --set method_options.mu=0.01

The same path works for `ubsmoe compare --methods ubsmoe,fedprox:FedProx` and for the Flower app
(the SuperNodes import it by the path the configuration carries).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ubsmoe.methods.ubsmoe import UBSMoE


@dataclass(frozen=True)
class FedProx(UBSMoE):
    """UB-SMoE plus a proximal term (mu / 2) * sum ||adapter - its value at the round's start||^2."""

    mu: float = 0.01
    """Weight of the proximal term (0: plain UB-SMoE)."""

    def extra_loss(
        self, adapters: Mapping[str, torch.Tensor], rank: int | None, start: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        if self.mu == 0:
            return None
        terms = [(value - start[key].to(value.device, value.dtype)).square().sum() for key, value in adapters.items()]
        return 0.5 * self.mu * torch.stack(terms).sum() if terms else None
