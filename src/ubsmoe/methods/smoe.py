"""The sparse-MoE baselines without UB-SMoE's mechanisms: SMoE-naive and SMoE-LLB.

Both run each client at K_c = floor(K_max beta_c) with plain Top-K routing and average the expert
LoRA by FedAvg (the base `Method`). SMoE-LLB adds the Switch load-balancing loss of every MoE block
to the client's loss, with weight `baselines.load_balance_coef`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ubsmoe.methods.base import Method

if TYPE_CHECKING:
    from ubsmoe.config import ExperimentConfig

__all__ = ["SMoELLB", "SMoENaive"]


@dataclass(frozen=True)
class SMoENaive(Method):
    """Heterogeneous K_c, plain Top-K, FedAvg: neither DMR nor the pseudo-gradient."""


@dataclass(frozen=True)
class SMoELLB(Method):
    """SMoE-naive plus the Switch load-balancing loss in every block."""

    @classmethod
    def block_options(cls, config: ExperimentConfig) -> dict[str, Any]:
        return {"load_balance_coef": config.baselines.load_balance_coef}
