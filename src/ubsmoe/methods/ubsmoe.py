"""UB-SMoE (the paper's method) and its ablations.

Each client runs at K_c = floor(K_max beta_c) and trains the expert LoRA; Dynamic Modulated Routing
rebalances expert utilization through phi (learned on the client, aggregated by DMR's rule on the
server, with the range regulariser), and the universal pseudo-gradient gives the experts a client
never activates a learning signal. Both live in the MoE block and the server (`ubsmoe.moe`,
`ubsmoe.fl.server`); the method switches them on, each still subject to `dmr.enabled` and
`pseudo_gradient.enabled`. The expert LoRA is averaged by FedAvg. The ablations each switch one
mechanism off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ubsmoe.methods.base import Method

__all__ = ["UBSMoE", "UBSMoENoDMR", "UBSMoENoPG", "UBSMoENoReg"]


@dataclass(frozen=True)
class UBSMoE(Method):
    """UB-SMoE: DMR, the range regulariser and the pseudo-gradient."""

    uses_dmr: ClassVar[bool] = True
    uses_pseudo_gradient: ClassVar[bool] = True
    uses_range_regulariser: ClassVar[bool] = True


@dataclass(frozen=True)
class UBSMoENoDMR(UBSMoE):
    """Ablation: no DMR (phi stays at zero), hence no range regulariser; the pseudo-gradient stays."""

    uses_dmr: ClassVar[bool] = False
    uses_range_regulariser: ClassVar[bool] = False


@dataclass(frozen=True)
class UBSMoENoPG(UBSMoE):
    """Ablation: no pseudo-gradient; DMR stays."""

    uses_pseudo_gradient: ClassVar[bool] = False


@dataclass(frozen=True)
class UBSMoENoReg(UBSMoE):
    """Ablation: DMR without its range regulariser."""

    uses_range_regulariser: ClassVar[bool] = False
