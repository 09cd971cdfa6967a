"""The sparse-MoE baselines without UB-SMoE's mechanisms: SMoE-naive and SMoE-LLB.

Both run each client at K_c = floor(K_max beta_c) with plain Top-K routing and average the expert
LoRA by FedAvg (the base `Method`). SMoE-LLB adds the Switch load-balancing loss of every MoE block
to the client's loss, with weight `baselines.load_balance_coef`: a block extension (`SwitchBalance`) that
sees each training forward's routing. The loss counts every token of the batch (padding included)
and only routed forwards: the dense K = M path of a MoEfied block routes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ubsmoe.methods.base import Method
from ubsmoe.moe.extensions import BlockExtension
from ubsmoe.moe.load_balancing import switch_load_balancing_loss

if TYPE_CHECKING:
    from ubsmoe.config import ExperimentConfig

__all__ = ["SMoELLB", "SMoENaive", "SwitchBalance"]


@dataclass(frozen=True)
class SMoENaive(Method):
    """Heterogeneous K_c, plain Top-K, FedAvg: neither DMR nor the pseudo-gradient."""


class SwitchBalance(BlockExtension):
    """coef x the Switch load-balancing loss of the block's last training forward (`aux_loss`)."""

    def __init__(self, coef: float):
        super().__init__()
        self.coef = coef
        self._loss: torch.Tensor | None = None

    def observe_routing(self, probs: torch.Tensor, expert_index: torch.Tensor) -> None:
        if self.coef > 0:
            self._loss = self.coef * switch_load_balancing_loss(probs, expert_index, probs.shape[-1])

    def aux_loss(self) -> torch.Tensor | None:
        loss, self._loss = self._loss, None
        return loss


@dataclass(frozen=True)
class SMoELLB(Method):
    """SMoE-naive plus the Switch load-balancing loss in every block."""

    @classmethod
    def block_extensions(cls, config: ExperimentConfig) -> dict[str, Callable[[], BlockExtension]]:
        coef = config.baselines.load_balance_coef
        return {"switch_balance": lambda: SwitchBalance(coef)}
