"""SwiGLU experts with per-expert LoRA, computed only for the tokens routed to them.

Weights follow transformers 5.x's fused layout: gate_up (M, 2I, H), down (M, H, I), i.e. one
(out, in) matrix per expert. Rows arrive sorted by expert; `counts[e]` rows belong to expert e.
Two interchangeable implementations of the per-expert matmul sit behind one switch:

- `grouped_mm`: one `torch.nn.functional.grouped_mm` call per projection (fast; needs float32/16
  and inner sizes whose byte length is a multiple of 16);
- `eager`: a plain Python loop over the experts that received tokens (obviously correct; any dtype).

Where the LoRA projections that touch the hidden size run is a second, independent choice
(`UBSMoEConfig.lora_projection`): per routed row (`rows`: each (token, expert) pair projects through
its own expert's A_gate/A_up, and its down LoRA through B_down, in grouped matmuls of rank-wide
shapes), or per token over all M experts (`tokens`: one ordinary matmul x @ [A_1; ...; A_M]^T per
layer, from which each row picks its expert's r columns, and one matmul that applies every expert's
B_down to the scattered per-token projections). `tokens` computes M/K times the FLOPs of those two
small terms but replaces about 8 rank-wide grouped matmuls per expert and step (mostly call
overhead and memory traffic on a CPU) by three dense ones; it pays where M is small (MoEfied models).
Either way the gate and up LoRA B run as one grouped matmul with a block-diagonal (2I, 2r) weight,
and SiLU(gate) * up runs as one fused function whose backward writes a single (rows, 2I) gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

GroupedLinear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(rows (N, in), weights (M, out, in)) -> (N, out), each row multiplied by its own expert's weight."""

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...]) -> bool:
    """Whether `grouped_mm` can run these shapes (every inner size 16-byte aligned) here."""
    if not hasattr(F, "grouped_mm") or dtype not in _GROUPED_MM_DTYPES:
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return False
    return all(size * dtype.itemsize % 16 == 0 for size in sizes)


def make_grouped_linear(counts: torch.Tensor, implementation: str) -> GroupedLinear:
    """A matmul that applies expert e's weight to its `counts[e]` consecutive rows."""
    if implementation == "grouped_mm":
        offsets = counts.cumsum(0).to(torch.int32)

        def grouped(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return F.grouped_mm(rows.to(weight.dtype), weight.transpose(-2, -1), offs=offsets)

        return grouped
    if implementation != "eager":
        raise ValueError(f"unknown expert implementation {implementation!r}; use 'grouped_mm' or 'eager'")
    sizes = counts.tolist()

    def eager(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # unbind gives per-expert views whose backward stacks once, instead of M full-size zero grads
        pieces = [
            chunk.to(weight.dtype) @ expert_weight.T
            for chunk, expert_weight, size in zip(rows.split(sizes), weight.unbind(0), sizes, strict=True)
            if size
        ]
        return torch.cat(pieces) if pieces else rows.new_zeros(0, weight.shape[1], dtype=weight.dtype)

    return eager


def _is_silu(activation: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    return activation is F.silu or isinstance(activation, nn.SiLU) or type(activation).__name__ == "SiLUActivation"


class _SiLUGatedProduct(torch.autograd.Function):
    """SiLU(gate) * up (* a per-row scale) of a fused (..., 2, I) gate/up tensor.

    The composed version (two slices, silu, two muls) makes autograd allocate a zero (..., 2, I)
    gradient per slice and add them; this backward writes the one (..., 2, I) gradient directly.
    """

    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        gate, up = gate_up.unbind(-2)
        product = F.silu(gate) * up
        ctx.save_for_backward(gate_up, scale)
        return product if scale is None else product * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate_up, scale = ctx.saved_tensors
        gate, up = gate_up.unbind(-2)
        silu = F.silu(gate)
        scaled = grad if scale is None else grad * scale
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.unbind(-2)
        torch.mul(scaled, silu, out=grad_up)
        # one fused kernel for d silu(g) / dg, written straight into the gate half
        torch.ops.aten.silu_backward.grad_input(scaled * up, gate, grad_input=grad_gate)
        grad_scale = None
        if scale is not None and ctx.needs_input_grad[1]:
            grad_scale = (grad * silu * up).sum(-1, keepdim=True).sum_to_size(scale.shape)
        return grad_gate_up, grad_scale


def gated_product(
    gate_up: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(gate) * up (* scale) for gate_up laid out (..., 2, I): index 0 the gate, 1 the up projection.

    SiLU (every supported family) takes the fused function; any other activation the plain composition.
    """
    if _is_silu(activation):
        return _SiLUGatedProduct.apply(gate_up, scale)
    gate, up = gate_up.unbind(-2)
    product = activation(gate) * up
    return product if scale is None else product * scale


class ExpertLoRA(nn.Module):
    """One LoRA (A_i, B_i) of rank r per expert and projection, stored fused over experts.

    lora_A[t] is (M, r, in_t) and lora_B[t] is (M, out_t, r); delta W_i = scaling * B_i @ A_i with
    scaling = alpha / r. A is Kaiming-uniform (as in LoRA), B starts at zero so the adapted model
    starts equal to the base.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        rank: int,
        alpha: float,
        targets: tuple[str, ...] = ("gate", "up", "down"),
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.targets = tuple(targets) if rank > 0 else ()
        self.scaling = alpha / rank if rank > 0 else 0.0
        shapes = {
            "gate": (intermediate_size, hidden_size),
            "up": (intermediate_size, hidden_size),
            "down": (hidden_size, intermediate_size),
        }
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for target in self.targets:
            out_features, in_features = shapes[target]
            self.lora_A[target] = nn.Parameter(torch.empty(num_experts, rank, in_features, dtype=dtype, device=device))
            self.lora_B[target] = nn.Parameter(torch.zeros(num_experts, out_features, rank, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for target in self.targets:
            # same bound as nn.init.kaiming_uniform_(a=sqrt(5)) on each (r, in) matrix
            bound = 1.0 / math.sqrt(self.lora_A[target].shape[-1])
            with torch.no_grad():
                self.lora_A[target].uniform_(-bound, bound)
                self.lora_B[target].zero_()

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for t in self.targets for p in (self.lora_A[t], self.lora_B[t])]

    @property
    def input_targets(self) -> tuple[str, ...]:
        """The targets whose LoRA reads the expert input (gate, up), in that order."""
        return tuple(t for t in ("gate", "up") if t in self.targets)

    def input_a(self) -> torch.Tensor:
        """(M, t*r, H): the input targets' A matrices stacked, so one matmul projects for all of them."""
        return torch.cat([self.lora_A[t] for t in self.input_targets], dim=1)

    def input_b(self) -> torch.Tensor:
        """(M, 2I, t*r): the input targets' B matrices as one block-diagonal weight over the fused gate/up rows.

        Row block 0 (gate) reads the gate projection's r columns, row block 1 (up) the up projection's;
        a target without LoRA leaves its row block zero. One grouped matmul then gives both deltas.
        """
        targets = self.input_targets
        reference = self.lora_B[targets[0]]
        num_experts, inner, rank = reference.shape
        zero = reference.new_zeros(num_experts, inner, rank)
        columns = []
        for target in targets:
            columns.append(torch.cat([self.lora_B[target] if t == target else zero for t in ("gate", "up")], dim=1))
        return torch.cat(columns, dim=2)

    def token_inputs(self, x: torch.Tensor, token_of_row: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """Scaled A projections (rows, t*r) of the input targets, computed per token for all M experts.

        x: (T, H); row i belongs to token `token_of_row[i]` and expert `expert_of_row[i]`.
        """
        stacked = self.input_a()  # (M, t*r, H)
        num_experts, width, hidden = stacked.shape
        projected = F.linear(x.to(stacked.dtype), stacked.reshape(num_experts * width, hidden))
        projected = projected.view(x.shape[0], num_experts, width)
        return (self.scaling * projected[token_of_row, expert_of_row]).contiguous()

    def token_down(
        self, projected: torch.Tensor, token_of_row: torch.Tensor, expert_of_row: torch.Tensor, tokens: int
    ) -> torch.Tensor:
        """(T, H): every row's B_down applied to its scaled down projection (rows, r), summed per token.

        The rows are scattered into a (T, M*r) matrix (a token's unchosen experts stay zero) and one
        matmul with [B_1 ... B_M] applies all experts' B_down at once.
        """
        lora_b = self.lora_B["down"]  # (M, H, r)
        num_experts, hidden, rank = lora_b.shape
        scattered = projected.new_zeros(tokens, num_experts, rank).index_put((token_of_row, expert_of_row), projected)
        return F.linear(scattered.view(tokens, num_experts * rank), lora_b.permute(1, 0, 2).reshape(hidden, -1))


def swiglu_experts(
    rows: torch.Tensor,
    counts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    lora: ExpertLoRA | None,
    implementation: str,
    activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    row_scale: torch.Tensor | None = None,
    *,
    lora_inputs: torch.Tensor | None = None,
    down_lora: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """row_scale * down_i(act(gate_i x) * up_i x) (+ LoRA) for rows already sorted by expert.

    Returns (out, down_projection). The scale (the routing gate of each row) is applied to the
    (rows, I) activations rather than the (rows, H) outputs: the down projection and its LoRA are
    linear, and I is the smaller side.

    lora_inputs: the scaled gate/up A projections (rows, t*r) when the caller computed them per token
        (`ExpertLoRA.token_inputs`); None projects each row through its own expert here.
    down_lora: add the down LoRA to `out` here (per row). False leaves B_down to the caller and returns
        the scaled down A projections (rows, r) as `down_projection` (`ExpertLoRA.token_down`).
    """
    linear = make_grouped_linear(counts, implementation)
    gate_up = linear(rows, gate_up_proj)
    if lora is not None and lora.input_targets:
        if lora_inputs is None:
            lora_inputs = (lora.scaling * linear(rows, lora.input_a())).contiguous()
        # grouped_mm and cat keep no output for backward, so the delta can be added in place
        gate_up.add_(linear(lora_inputs, lora.input_b()))
    scale = row_scale.unsqueeze(-1).to(gate_up.dtype) if row_scale is not None else None
    inner = gated_product(gate_up.view(rows.shape[0], 2, gate_up.shape[-1] // 2), activation, scale)
    out = linear(inner, down_proj)
    projection = None
    if lora is not None and "down" in lora.targets:
        projection = (lora.scaling * linear(inner, lora.lora_A["down"])).contiguous()
        if down_lora:
            out.add_(linear(projection, lora.lora_B["down"]))
            projection = None
    return out, projection


class SwiGLU(nn.Module):
    """A dense SwiGLU FFN over frozen weights held by reference (used as an always-on shared expert)."""

    def __init__(
        self,
        gate_weight: torch.Tensor,
        up_weight: torch.Tensor,
        down_weight: torch.Tensor,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    ) -> None:
        super().__init__()
        self.gate_weight = frozen_parameter(gate_weight)
        self.up_weight = frozen_parameter(up_weight)
        self.down_weight = frozen_parameter(down_weight)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.activation(F.linear(x, self.gate_weight)) * F.linear(x, self.up_weight), self.down_weight)


def experts_from_dense(
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    groups: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a dense SwiGLU FFN (gate/up (I, H), down (H, I)) into fused experts by neuron groups.

    `groups` lists equal-sized index tensors over the I intermediate neurons. Returns
    gate_up (M, 2 * I/M, H) and down (M, H, I/M). With every group active and unit gates the
    experts' outputs sum to the dense FFN's output, because SwiGLU is separable over neurons.
    """
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"expert groups must have equal sizes, got {sorted(sizes)}")
    gate_up = torch.stack([torch.cat([gate_weight[g], up_weight[g]], dim=0) for g in groups])
    down = torch.stack([down_weight[:, g] for g in groups])
    return gate_up, down


def frozen_parameter(weight: torch.Tensor) -> nn.Parameter:
    """Wrap (without copying) a frozen weight so it moves with the module."""
    parameter = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    parameter.requires_grad_(False)
    return parameter
