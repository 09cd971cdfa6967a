"""Operations over every UB-SMoE block of a model (any nn.Module that contains them)."""

from __future__ import annotations

import torch
from torch import nn

from ubsmoe.moe.block import UBSMoEBlock


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def moe_blocks(model: nn.Module) -> list[UBSMoEBlock]:
    """The model's UB-SMoE blocks in module order (one per MoE layer)."""
    return [m for m in model.modules() if isinstance(m, UBSMoEBlock)]


def set_top_k(model: nn.Module, top_k: int) -> None:
    """Set K (experts per token) in every block, e.g. to a client's K_c."""
    for block in moe_blocks(model):
        block.top_k = top_k


def range_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the DMR range regularisers of all blocks (add it to the local loss)."""
    blocks = moe_blocks(model)
    if not blocks:
        return torch.zeros(())
    return torch.stack([b.range_loss() for b in blocks]).sum()


def balance_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the blocks' SMoE-LLB load-balancing losses of the last training forward (zero when off)."""
    blocks = moe_blocks(model)
    if not blocks:
        return torch.zeros(())
    return torch.stack([b.balance_loss() for b in blocks]).sum()


def apply_pseudo_gradients(model: nn.Module) -> None:
    """After backward, before the optimizer step: the universal pseudo-gradient in every block."""
    for block in moe_blocks(model):
        block.apply_pseudo_gradient()


def collect_utilization(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-layer activation counts (L, M) and token counts (L,): the L*(M+1) numbers a client uploads."""
    stats = [b.utilization() for b in moe_blocks(model)]
    if not stats:
        return {"counts": torch.zeros(0, 0, dtype=torch.long), "tokens": torch.zeros(0, dtype=torch.long)}
    return {"counts": torch.stack([s["counts"] for s in stats]), "tokens": torch.stack([s["tokens"] for s in stats])}


def reset_utilization(model: nn.Module) -> None:
    for block in moe_blocks(model):
        block.reset_utilization()


def get_phi(model: nn.Module) -> torch.Tensor:
    """phi of every layer stacked as (L, M)."""
    return torch.stack([b.phi.detach().clone() for b in moe_blocks(model)])


@torch.no_grad()
def set_phi(model: nn.Module, phi: torch.Tensor) -> None:
    blocks = moe_blocks(model)
    if phi.shape != (len(blocks), blocks[0].num_experts if blocks else 0):
        raise ValueError(f"phi must have shape ({len(blocks)}, M), got {tuple(phi.shape)}")
    for block, row in zip(blocks, phi, strict=True):
        block.phi.copy_(row)
