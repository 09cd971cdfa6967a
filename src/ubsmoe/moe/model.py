"""Operations over every UB-SMoE block of a model (any nn.Module that contains them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ubsmoe.moe.block import UBSMoEBlock
from ubsmoe.moe.extensions import BlockExtension


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


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the blocks' extension loss terms of the last training forward (zero without any)."""
    blocks = moe_blocks(model)
    if not blocks:
        return torch.zeros(())
    return torch.stack([b.aux_loss() for b in blocks]).sum()


def attach_extensions(model: nn.Module, factories: Mapping[str, Callable[[], BlockExtension]]) -> None:
    """Attach one fresh extension per factory to every block (a method's pieces, `Method.block_extensions`)."""
    for block in moe_blocks(model):
        for name, make in factories.items():
            block.attach_extension(name, make())


def apply_pseudo_gradients(model: nn.Module) -> None:
    """After backward, before the optimizer step: the universal pseudo-gradient in every block (gradient space)."""
    for block in moe_blocks(model):
        block.apply_pseudo_gradient()


def uses_pseudo_updates(model: nn.Module) -> bool:
    """Whether any block applies PG in update space (so the client step must snapshot the adapters)."""
    return any(block.config.pseudo_gradient and block.config.pg_space == "update" for block in moe_blocks(model))


def adapters_before_step(model: nn.Module) -> list[list[torch.Tensor] | None]:
    """Before the optimizer step: every block's expert adapters where PG acts in update space (else None)."""
    return [block.adapters_before_step() for block in moe_blocks(model)]


def apply_pseudo_updates(model: nn.Module, before: list[list[torch.Tensor] | None]) -> None:
    """After the optimizer step: the pseudo-update of every block that PG acts on in update space."""
    for block, previous in zip(moe_blocks(model), before, strict=True):
        block.apply_pseudo_update(previous)


def clear_pseudo_gradient_masses(model: nn.Module) -> None:
    """Forget every block's PG routing masses (before the first local step)."""
    for block in moe_blocks(model):
        block.clear_pseudo_gradient_masses()


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


def skip_padding(model: nn.Module) -> nn.Module:
    """Make the model's UB-SMoE blocks skip the padding positions of every forward, in place.

    Hooks on the transformers backbone (`model.base_model`, which the causal-LM forward and
    `ubsmoe.models.answer_loss` both call) read the forward's 2-D `attention_mask` and hand each block
    the indices of the real tokens among the forward's positions (the mask's last S columns with a
    KV cache); the blocks route and compute only those. Real tokens' outputs are unchanged, padding
    no longer counts in the expert utilization and PG masses, and padded batches cost less. Idempotent.
    """
    backbone = getattr(model, "base_model", model)
    if getattr(backbone, "_ubsmoe_skips_padding", False):
        return model
    backbone.register_forward_pre_hook(_set_real_tokens, with_kwargs=True)
    backbone.register_forward_hook(_clear_real_tokens, always_call=True)
    backbone._ubsmoe_skips_padding = True
    return model


def _set_real_tokens(backbone: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    mask = kwargs.get("attention_mask")
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("inputs_embeds")
    real = None
    positions = 0
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
        rows, length = inputs.shape[0], inputs.shape[1]
        if mask.shape[0] == rows and mask.shape[1] >= length:
            keep = mask[:, mask.shape[1] - length :].reshape(-1).bool()
            if not bool(keep.all()):
                real, positions = keep.nonzero().squeeze(1), keep.numel()
    for block in moe_blocks(backbone):
        block.real_tokens, block.padded_tokens = real, positions


def _clear_real_tokens(backbone: nn.Module, args: tuple, output: Any) -> None:
    for block in moe_blocks(backbone):
        block.real_tokens, block.padded_tokens = None, 0
