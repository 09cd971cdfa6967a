"""Calibration: what the dense model does on calibration tokens (its inspection, the data, the passes) and diagnostics of a MoEfied layer."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.models.moefication.block import moefied_blocks
from ubsmoe.models.moefication.config import DENSE_FAMILIES, MoEficationConfig
from ubsmoe.models.native import NATIVE_FAMILIES, ModelLoadError, UnsupportedModelError
from ubsmoe.moe import (
    UBSMoEBlock,
)

if TYPE_CHECKING:
    pass


# ---- diagnostics -------------------------------------------------------------------------------
@torch.no_grad()
def expert_outputs(block: UBSMoEBlock, x: torch.Tensor) -> torch.Tensor:
    """Each routed expert's output (T, M, H) for inputs x (T, H), frozen weights only (no LoRA)."""
    x = x.reshape(-1, block.hidden_size).to(block.gate_up_proj.dtype)
    gate_up = torch.einsum("th,mnh->tmn", x, block.gate_up_proj)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.einsum("tmn,mhn->tmh", block.activation(gate) * up, block.down_proj)


@torch.no_grad()
def reconstruction_error(
    block: UBSMoEBlock,
    x: torch.Tensor,
    target: torch.Tensor,
    top_k: int,
    *,
    router: Literal["block", "oracle"] = "block",
) -> float:
    """Relative squared error sum ||y_K - y||^2 / sum ||y||^2 of the block at K (frozen weights, no LoRA).

    router="block" selects by the block's router weight (phi ignored); "oracle" selects the K experts
    with the largest output norm for each token (an upper bound on any router).
    """
    x = x.reshape(-1, block.hidden_size)
    outputs = expert_outputs(block, x)
    if router == "oracle":
        scores = outputs.norm(dim=-1)
    elif router == "block":
        scores = F.linear(x.to(block.router_weight.dtype), block.router_weight)
    else:
        raise ValueError(f"router must be 'block' or 'oracle', got {router!r}")
    chosen = scores.topk(top_k, dim=-1).indices
    mask = torch.zeros_like(scores, dtype=outputs.dtype).scatter_(1, chosen, 1.0)
    out = (outputs * mask.unsqueeze(-1)).sum(1)
    if block.shared_expert is not None:
        out = out + block.shared_expert(x.to(out.dtype))
    target = target.reshape(out.shape).to(out.dtype)
    return float((out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30))


# ---- model inspection --------------------------------------------------------------------------
def _supported_text() -> str:
    return ", ".join(f"{key} ({name})" for key, name in DENSE_FAMILIES.items())


def dense_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every dense SwiGLU FFN of a supported model, in layer order.

    Raises UnsupportedModelError for other architectures (listing the supported ones) and
    ModelLoadError for a model that is already MoEfied or has no FFN of the expected layout.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if moefied_blocks(model):
        raise ModelLoadError("this model is already MoEfied (it contains MoEfied blocks)")
    if model_type in NATIVE_FAMILIES:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) is a native MoE model: adapt it with "
            "ubsmoe.models.adapt_moe_model instead of MoEfying it. MoEfication supports dense models with "
            f"model_type: {_supported_text()}"
        )
    if model_type not in DENSE_FAMILIES:
        what = f"{type(model).__name__} (model_type {model_type!r})" if model_type else type(model).__name__
        raise UnsupportedModelError(
            f"{what} cannot be MoEfied. Supported dense families (config.model_type): {_supported_text()}; "
            f"native MoE families ({', '.join(NATIVE_FAMILIES)}) are adapted with ubsmoe.models.adapt_moe_model."
        )
    found = []
    for name, module in model.named_modules():
        projections = [getattr(module, key, None) for key in ("gate_proj", "up_proj", "down_proj")]
        if all(isinstance(p, nn.Linear) for p in projections):
            if any(p.bias is not None for p in projections):
                raise UnsupportedModelError(f"{name}: FFNs with biases (mlp_bias=True) cannot be MoEfied")
            if not callable(getattr(module, "act_fn", None)):
                raise UnsupportedModelError(f"{name}: the FFN has no act_fn")
            found.append((name, module))
    if not found:
        raise ModelLoadError(
            f"no dense FFN (mlp.gate_proj / up_proj / down_proj) found in this {DENSE_FAMILIES[model_type]} model"
        )
    return found


# ---- calibration data --------------------------------------------------------------------------
Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids (B, S) long, attention_mask (B, S) bool), on CPU

CalibrationData = torch.Tensor | Iterable[torch.Tensor | Mapping[str, torch.Tensor]]


def calibration_batches(
    calibration: CalibrationData, max_tokens: int, batch_size: int = 8, vocab_size: int | None = None
) -> list[Batch]:
    """Normalise calibration data to a list of (input_ids, attention_mask) holding at most `max_tokens` tokens.

    Accepts a tensor of token ids (S,) or (B, S), or an iterable of such tensors or of mappings with
    "input_ids" and optional "attention_mask"; every batch is cut into forwards of at most
    `batch_size` rows. Tokens beyond `max_tokens` (counting non-padding tokens in order) are masked
    out and trimmed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if isinstance(calibration, torch.Tensor | Mapping):
        items = [calibration]
    else:
        try:
            items = iter(calibration)
        except TypeError:
            raise ValueError(
                f"calibration data must be token ids (a tensor) or an iterable of batches, got {type(calibration).__name__}"
            ) from None
    batches: list[Batch] = []
    remaining = max_tokens
    for index, item in enumerate(items):
        if remaining <= 0:
            break
        all_ids, all_mask = _batch_tensors(item, index)
        if vocab_size is not None and all_ids.numel():
            low, high = int(all_ids.min()), int(all_ids.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(
                    f"calibration batch {index}: token ids must be in [0, {vocab_size}), got [{low}, {high}]"
                )
        for ids, mask in zip(all_ids.split(batch_size), all_mask.split(batch_size), strict=True):
            if remaining <= 0:
                break
            kept = mask & (mask.reshape(-1).cumsum(0).view_as(mask) <= remaining)
            if not kept.any():
                continue
            rows = kept.any(1)
            ids, kept = ids[rows], kept[rows]
            last = int(kept.any(0).nonzero().max()) + 1
            ids, kept = ids[:, :last], kept[:, :last]
            remaining -= int(kept.sum())
            batches.append((ids, kept))
    if not batches:
        raise ValueError("calibration data holds no tokens")
    return batches


def _batch_tensors(item: Any, index: int) -> Batch:
    if isinstance(item, tuple) and len(item) == 2:  # (input_ids, attention_mask), as calibration_batches returns
        ids, mask = item
    elif isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"calibration batch {index} has no 'input_ids'")
        ids, mask = item["input_ids"], item.get("attention_mask")
    else:
        ids, mask = item, None
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() > 2:
        raise ValueError(f"calibration batch {index}: input_ids must be an integer tensor (S,) or (B, S)")
    ids = ids.detach().cpu().long().reshape(-1, ids.shape[-1] if ids.dim() else 1)
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = torch.as_tensor(mask).detach().cpu().reshape(-1, mask.shape[-1]).bool()
        if mask.shape != ids.shape:
            raise ValueError(
                f"calibration batch {index}: attention_mask {tuple(mask.shape)} != input_ids {tuple(ids.shape)}"
            )
    return ids, mask


def calibration_fingerprint(batches: Sequence[Batch]) -> str:
    """A hash of the calibration tokens actually used: each row's ids and mask up to its last used token.

    It does not depend on how the rows are grouped into forwards (`batch_size`).
    """
    digest = hashlib.blake2b(digest_size=16)
    for ids, mask in batches:
        for row_ids, row_mask in zip(ids, mask, strict=True):
            end = int(row_mask.nonzero().max()) + 1
            digest.update(f"{end};".encode())
            digest.update(row_ids[:end].numpy().tobytes())
            digest.update(row_mask[:end].numpy().tobytes())
    return digest.hexdigest()


# ---- calibration passes ------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by a hook once the last layer of interest has run (skips the rest of the forward)."""


@dataclass
class _LayerPlan:
    name: str
    mlp: nn.Module
    abs_sum: torch.Tensor | None = None  # (I,) float64
    gram: torch.Tensor | None = None  # (I, I) float32, |A|^T |A|
    tokens: int = 0
    shared: torch.Tensor | None = None
    groups: list[torch.Tensor] | None = None
    gate_up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    down_gram: torch.Tensor | None = None  # (M, n, n): W_d,g^T W_d,g of each expert
    group_index: torch.Tensor | None = None  # (M, n) long
    xtx: torch.Tensor | None = None
    xty: torch.Tensor | None = None
    recovery_x: list[torch.Tensor] | None = None
    recovery_y: list[torch.Tensor] | None = None


def _run_batches(model: nn.Module, batches: Sequence[Batch], device: torch.device, state: dict[str, Any]) -> None:
    """Forward every batch (the hooks do the work); `state` tells the hooks which rows are real tokens."""
    for index, (ids, mask) in enumerate(batches):
        state["mask"] = mask.reshape(-1).to(device)
        state["batch"] = index
        with contextlib.suppress(_StopForward):
            model(input_ids=ids.to(device), attention_mask=mask.to(device).long(), use_cache=False)


def _profile_pass(
    model: nn.Module, plans: list[_LayerPlan], batches: Sequence[Batch], config: MoEficationConfig, device: torch.device
) -> None:
    """Pass 1: per neuron sum |a| and (co-activation grouping) the Gram matrix |A|^T |A|."""
    state: dict[str, Any] = {}
    handles = []
    for position, plan in enumerate(plans):
        size = plan.mlp.down_proj.in_features
        plan.abs_sum = torch.zeros(size, dtype=torch.float64, device=device)
        if config.grouping == "coactivation":
            plan.gram = torch.zeros(size, size, dtype=torch.float32, device=device)

        def hook(module: nn.Module, args: tuple, plan: _LayerPlan = plan, last: bool = position == len(plans) - 1):
            a = args[0].reshape(-1, args[0].shape[-1])[state["mask"]].abs().float()
            plan.abs_sum += a.sum(0, dtype=torch.float64)
            plan.tokens += a.shape[0]
            if plan.gram is not None:
                plan.gram.addmm_(a.T, a)
            if last:
                raise _StopForward

        handles.append(plan.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        _run_batches(model, batches, device, state)
    finally:
        for handle in handles:
            handle.remove()


def _router_pass(
    model: nn.Module,
    plans: list[_LayerPlan],
    batches: Sequence[Batch],
    config: MoEficationConfig,
    device: torch.device,
    recovery_rows: list[torch.Tensor] | None,
) -> None:
    """Pass 2: X^T X, X^T Y (Y = per-expert output norms) and, for recovery, cached (x, dense output) rows."""
    state: dict[str, Any] = {}
    handles = []
    for position, plan in enumerate(plans):
        hidden = plan.mlp.gate_proj.in_features
        plan.xtx = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        plan.xty = torch.zeros(hidden, config.num_experts, dtype=torch.float64, device=device)
        plan.tokens = 0
        if recovery_rows is not None:
            plan.recovery_x, plan.recovery_y = [], []

        def input_hook(module: nn.Module, args: tuple, plan: _LayerPlan = plan) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])[state["mask"]].float()
            plan.xtx += (x.T @ x).double()
            plan.tokens += x.shape[0]
            state[f"x{id(plan)}"] = x

        def inner_hook(module: nn.Module, args: tuple, plan: _LayerPlan = plan) -> None:
            a = args[0].reshape(-1, args[0].shape[-1])[state["mask"]].float()
            grouped = a[:, plan.group_index].transpose(0, 1)  # (M, T, n)
            squared = (torch.bmm(grouped, plan.down_gram) * grouped).sum(-1)  # ||W_d,g a_g||^2, (M, T)
            norms = squared.clamp_min(0).sqrt().T.double()
            plan.xty += state[f"x{id(plan)}"].double().T @ norms

        def output_hook(
            module: nn.Module,
            args: tuple,
            output: torch.Tensor,
            plan: _LayerPlan = plan,
            last: bool = position == len(plans) - 1,
        ) -> None:
            if recovery_rows is not None:
                rows = recovery_rows[state["batch"]].to(device)
                x = state[f"x{id(plan)}"]
                y = output.reshape(-1, output.shape[-1])[state["mask"]]
                plan.recovery_x.append(x[rows].cpu())
                plan.recovery_y.append(y[rows].float().cpu())
            state.pop(f"x{id(plan)}", None)
            if last:
                raise _StopForward

        handles.append(plan.mlp.register_forward_pre_hook(input_hook))
        handles.append(plan.mlp.down_proj.register_forward_pre_hook(inner_hook))
        handles.append(plan.mlp.register_forward_hook(output_hook))
    try:
        _run_batches(model, batches, device, state)
    finally:
        for handle in handles:
            handle.remove()


def _recovery_rows(batches: Sequence[Batch], count: int, seed: int) -> list[torch.Tensor]:
    """Per batch, the positions (among its non-padding tokens) cached for recovery: a seeded random subset."""
    sizes = [int(mask.sum()) for _, mask in batches]
    total = sum(sizes)
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 7919))[: min(count, total)]
    selected = torch.zeros(total, dtype=torch.bool)
    selected[chosen] = True
    return [part.nonzero().reshape(-1) for part in selected.split(sizes)]
