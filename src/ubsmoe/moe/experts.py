"""SwiGLU experts with per-expert LoRA, computed only for the tokens routed to them.

Weights follow transformers 5.x's fused layout: gate_up (M, 2I, H), down (M, H, I), i.e. one
(out, in) matrix per expert. Rows arrive sorted by expert; `counts[e]` rows belong to expert e.
Two interchangeable implementations of the per-expert matmul sit behind one switch:

- `grouped_mm`: one `torch.nn.functional.grouped_mm` call per projection (fast; needs float32/16
  and inner sizes whose byte length is a multiple of 16);
- `eager`: a plain Python loop over the experts that received tokens (obviously correct; any dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable

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

    def project_a(self, rows: torch.Tensor, targets: tuple[str, ...], linear: GroupedLinear) -> list[torch.Tensor]:
        """rows @ A_t^T for each target, sharing one matmul across targets with the same input."""
        stacked = torch.cat([self.lora_A[t] for t in targets], dim=1)
        return list(linear(rows, stacked).split(self.rank, dim=-1))

    def project_b(self, hidden: torch.Tensor, target: str, linear: GroupedLinear) -> torch.Tensor:
        # scale the narrow (rows, r) input, not the wide (rows, out) result
        return linear((self.scaling * hidden).contiguous(), self.lora_B[target])


def swiglu_experts(
    rows: torch.Tensor,
    counts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    lora: ExpertLoRA | None,
    implementation: str,
    activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """row_scale * down_i(act(gate_i x) * up_i x) (+ LoRA) for rows already sorted by expert.

    The scale (the routing gate of each row) is applied to the (rows, I) activations rather than
    the (rows, H) outputs: the down projection and its LoRA are linear, and I is the smaller side.
    The down LoRA is added in place: grouped_mm and cat do not keep their outputs for backward.
    """
    linear = make_grouped_linear(counts, implementation)
    gate_up = linear(rows, gate_up_proj)
    half = gate_up.shape[-1] // 2
    gate, up = gate_up[:, :half], gate_up[:, half:]
    if lora is not None:
        input_targets = tuple(t for t in ("gate", "up") if t in lora.targets)
        if input_targets:
            hidden = dict(zip(input_targets, lora.project_a(rows, input_targets, linear), strict=True))
            if "gate" in hidden:
                gate = gate + lora.project_b(hidden["gate"], "gate", linear)
            if "up" in hidden:
                up = up + lora.project_b(hidden["up"], "up", linear)
    inner = activation(gate) * up
    if row_scale is not None:
        inner = inner * row_scale.unsqueeze(-1).to(inner.dtype)
    out = linear(inner, down_proj)
    if lora is not None and "down" in lora.targets:
        (hidden,) = lora.project_a(inner, ("down",), linear)
        out.add_(lora.project_b(hidden, "down", linear))
    return out


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
