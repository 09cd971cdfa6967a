"""Turning a dense model into a MoE one (`moefy`), with the optional recovery of each block."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ubsmoe.models.moefication.block import MoEfiedBlock, dense_layout
from ubsmoe.models.moefication.calibration import (
    CalibrationData,
    _LayerPlan,
    _profile_pass,
    _recovery_rows,
    _router_pass,
    calibration_batches,
    calibration_fingerprint,
    dense_mlps,
)
from ubsmoe.models.moefication.config import MoEficationConfig, Progress
from ubsmoe.models.moefication.grouping import (
    centroid_router,
    fit_ridge_router,
    group_neurons,
    scale_router,
    split_shared,
)
from ubsmoe.models.native import ModelLoadError
from ubsmoe.moe import (
    SwiGLU,
    UBSMoEConfig,
    experts_from_dense,
    skip_padding,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


# ---- recovery ----------------------------------------------------------------------------------
def recover_block(
    block: MoEfiedBlock,
    x: torch.Tensor,
    target: torch.Tensor,
    config: MoEficationConfig,
    *,
    seed: int = 0,
) -> list[float]:
    """Layer-local distillation: train the block's experts (and shared group) toward the dense output.

    Minimises sum ||block_K(x) - y||^2 / sum ||y||^2 over mini-batches of the cached inputs x (N, H)
    and dense outputs y, with K drawn uniformly from `config.top_ks()` per step, Adam with a cosine
    learning-rate schedule. The router, phi and LoRA are left unchanged (within `moefy` LoRA-B is
    still zero, so the adapters do not take part). Returns the per-step losses.
    """
    trained = [block.gate_up_proj, block.down_proj]
    if config.recovery_train_shared and block.shared_expert is not None:
        trained += list(block.shared_expert.parameters())
    flags = {id(p): p.requires_grad for p in block.parameters()}
    top_k, tracking, mode = block.top_k, block.track_utilization, block.training
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    dtype = block.gate_up_proj.dtype
    x, target = x.to(block.gate_up_proj.device, dtype), target.to(block.gate_up_proj.device, dtype)
    optimizer = torch.optim.Adam(trained, lr=config.recovery_lr)
    generator = torch.Generator().manual_seed(seed)
    top_ks = config.top_ks()
    losses = []
    block.track_utilization = False
    block.eval()  # no PG bookkeeping
    try:
        with torch.enable_grad():
            for step in range(config.recovery_steps):
                for group in optimizer.param_groups:
                    group["lr"] = config.recovery_lr * 0.5 * (1 + math.cos(math.pi * step / config.recovery_steps))
                rows = torch.randint(x.shape[0], (min(config.recovery_batch_size, x.shape[0]),), generator=generator)
                block.top_k = top_ks[int(torch.randint(len(top_ks), (1,), generator=generator))]
                y = target[rows.to(x.device)]
                loss = (block(x[rows.to(x.device)]) - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        for parameter in block.parameters():
            parameter.grad = None
            parameter.requires_grad_(flags[id(parameter)])
        block.top_k, block.track_utilization = top_k, tracking
        block.train(mode)
    return losses


# ---- MoEfication -------------------------------------------------------------------------------
def moefy(
    model: PreTrainedModel,
    calibration: CalibrationData,
    config: MoEficationConfig | None = None,
    ubsmoe_config: UBSMoEConfig | None = None,
    *,
    batch_size: int = 8,
    max_statistics_bytes: int = 2**31,
    progress: Progress | None = None,
) -> PreTrainedModel:
    """Turn a dense Llama-family model into a UB-SMoE model in place, calibrated on `calibration`.

    Args:
        model: a Llama, Mistral, Qwen2 or Qwen3 model from transformers 5.x (any head).
        calibration: token ids (S,) / (B, S), or an iterable of tensors or of mappings with
            "input_ids" and optional "attention_mask"; at most `config.calibration_tokens`
            non-padding tokens are used (see `calibration_batches`).
        config: grouping, shared fraction, M, router and recovery options.
        ubsmoe_config: the blocks' LoRA/DMR/PG settings; `unit_gates` is forced on.
        batch_size: rows per forward when `calibration` is one tensor.
        max_statistics_bytes: bound on the calibration statistics held at once; layers are
            calibrated in as many passes as needed to stay under it.
        progress: optional callback progress(stage, done, total).

    Returns the same model object, its FFNs replaced by `MoEfiedBlock`s at K = M (the dense
    function), every base parameter frozen. When the routed neuron count does not divide by M, the
    remainder joins the shared group (see `split_shared`); an FFN with fewer routed neurons than M
    is a ModelLoadError. The dense FFNs' weights are released: the experts and
    the shared group are new tensors in group order. Calibration runs two passes over the tokens per
    chunk of layers (the forward stops after the chunk's last layer).
    """
    config = config or MoEficationConfig()
    layer_config = replace(ubsmoe_config or UBSMoEConfig(), unit_gates=True)
    # sizes, not modules: holding the dense FFNs here would keep their weights alive until the end
    layers = [(name, mlp.down_proj.in_features, mlp.gate_proj.in_features) for name, mlp in dense_mlps(model)]
    for name, inner, _ in layers:
        try:
            split_shared(torch.zeros(inner), config.shared_fraction, config.num_experts)
        except ValueError as error:
            raise ModelLoadError(f"{name}: {error}") from error
    try:
        device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters is not a dense LM
        raise ModelLoadError("the model has no parameters") from None
    vocab = getattr(model.config, "vocab_size", None)
    batches = calibration_batches(calibration, config.calibration_tokens, batch_size, vocab)
    total_tokens = sum(int(mask.sum()) for _, mask in batches)
    if total_tokens < config.calibration_tokens:
        warnings.warn(
            f"MoEfication calibrates on {total_tokens} tokens, fewer than calibration_tokens={config.calibration_tokens}",
            stacklevel=2,
        )
    recovery_rows = _recovery_rows(batches, config.recovery_tokens, config.seed) if config.recovery else None

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    training = model.training
    model.eval()
    done = 0
    try:
        with torch.no_grad():
            for chunk in _layer_chunks(layers, config, max_statistics_bytes, total_tokens):
                plans = [_LayerPlan(name, model.get_submodule(name)) for name in chunk]
                _profile_pass(model, plans, batches, config, device)
                for index, plan in enumerate(plans):
                    _plan_groups(plan, config, seed=config.seed + 1000 * (done + index))
                _router_pass(model, plans, batches, config, device, recovery_rows)
                for plan in plans:
                    block = _build_block(plan, config, layer_config)
                    parent_name, _, child_name = plan.name.rpartition(".")
                    setattr(model.get_submodule(parent_name), child_name, block)
                    plan.mlp = None  # the dense FFN's weights are released here
                    if config.recovery:
                        x, y = torch.cat(plan.recovery_x), torch.cat(plan.recovery_y)
                        plan.recovery_x = plan.recovery_y = None
                        recover_block(block, x, y, config, seed=config.seed + done)
                    done += 1
                    if progress is not None:
                        progress("moefy", done, len(layers))
                del plans
    finally:
        model.train(training)
    model.moefication_config = config
    model.moefication_calibration = {"tokens": total_tokens, "fingerprint": calibration_fingerprint(batches)}
    return skip_padding(model)


def _layer_chunks(
    layers: list[tuple[str, int, int]], config: MoEficationConfig, budget: int, tokens: int
) -> list[list[str]]:
    """Consecutive layers whose calibration statistics fit in `budget` bytes together (at least one each)."""
    chunks: list[list[str]] = [[]]
    used = 0
    for name, inner, hidden in layers:
        size = 8 * inner + 8 * hidden * (hidden + config.num_experts)
        if config.grouping == "coactivation":
            size += 4 * inner * inner
        if config.recovery:
            size += 8 * min(config.recovery_tokens, tokens) * hidden
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks


def _plan_groups(plan: _LayerPlan, config: MoEficationConfig, seed: int) -> None:
    mlp = plan.mlp
    mean_abs = plan.abs_sum.cpu() / max(plan.tokens, 1)
    plan.shared, routed = split_shared(mean_abs, config.shared_fraction, config.num_experts)
    gram = plan.gram.cpu() if plan.gram is not None else None
    plan.gram = None
    plan.groups = group_neurons(
        routed,
        config.num_experts,
        config.grouping,
        coactivation_gram=gram,
        gate_weight=mlp.gate_proj.weight.detach().cpu() if config.grouping == "gate_kmeans" else None,
        iterations=config.kmeans_iterations,
        seed=seed,
    )
    device = mlp.down_proj.weight.device
    plan.gate_up, down = experts_from_dense(
        mlp.gate_proj.weight.detach(),
        mlp.up_proj.weight.detach(),
        mlp.down_proj.weight.detach(),
        [g.to(device) for g in plan.groups],
    )
    plan.down = dense_layout(down)
    down = plan.down.float()
    plan.down_gram = down.transpose(1, 2) @ down  # (M, n, n)
    plan.group_index = torch.stack(plan.groups).to(device)


def _build_block(plan: _LayerPlan, config: MoEficationConfig, layer_config: UBSMoEConfig) -> MoEfiedBlock:
    mlp = plan.mlp
    gate, up, down = (p.weight.detach() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    if config.router == "ridge":
        router = fit_ridge_router(plan.xtx.cpu(), plan.xty.cpu(), config.ridge_lambda)
    else:
        router = centroid_router(gate.cpu(), plan.groups)
    router = scale_router(router, plan.xtx.cpu(), plan.tokens, config.router_logit_std)
    shared_index = plan.shared.to(gate.device)
    shared = (
        SwiGLU(gate[shared_index], up[shared_index], down[:, shared_index].contiguous(), mlp.act_fn)
        if plan.shared.numel()
        else None
    )
    block = MoEfiedBlock(
        plan.gate_up,
        plan.down,
        router.to(device=gate.device, dtype=gate.dtype),
        config.num_experts,
        layer_config,
        shared_expert=shared,
        activation=mlp.act_fn,
    )
    block.shared_neurons = plan.shared.tolist()
    block.neuron_groups = [g.tolist() for g in plan.groups]
    plan.gate_up = plan.down = plan.down_gram = plan.xtx = plan.xty = None
    return block
