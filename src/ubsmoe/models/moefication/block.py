"""`MoEfiedBlock`: a dense SwiGLU MLP as a shared group plus M routed experts of equal size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.moe import (
    UBSMoEBlock,
    route,
)
from ubsmoe.moe.experts import gated_product

if TYPE_CHECKING:
    pass


# ---- the MoEfied block -------------------------------------------------------------------------
class MoEfiedBlock(UBSMoEBlock):
    """A UB-SMoE block over the neuron groups of a dense SwiGLU FFN (unit gates, K_max = M).

    At K < M it is the UB-SMoE block: routing with DMR, only the shared group and the K selected
    experts run, PG is recorded. At K = M (with `dense_at_full_k`, the default) it runs the plain
    dense FFN instead: one matmul for all experts' gate/up rows, one for all down columns, each
    expert's LoRA delta batched over the experts (x @ stacked A^T, then one batched B), plus the
    shared group. This equals the grouped path (every expert selected with gate value 1) and is faster
    because it skips routing, sorting and gathering. There:

    - utilization counts every expert once per token;
    - phi gets no gradient: every expert is selected whatever phi is, so the forward does not depend
      on it (the grouped path's straight-through gates would give phi a surrogate gradient);
    - PG adds nothing: no expert misses any routing mass. In training mode the used routing mass is
      still recorded, so that a step that mixes K values over micro-batches stays exact.

    Attributes:
        dense_at_full_k: take the dense path at K = M (set False to force the grouped path).
        shared_neurons / neuron_groups: original neuron indices of the shared group and of each
            expert (metadata, saved with the model).
    """

    token_lora_by_default = True
    """Eight experts: per-token LoRA projections cost little extra and save many small matmuls (docs/decisions.md)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dense_at_full_k = True
        self.shared_neurons: list[int] = []
        self.neuron_groups: list[list[int]] = []

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_at_full_k and self.top_k == self.num_experts:
            return self._dense_forward(x)
        return super().compute(x)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, num_experts, inner_size, hidden = x.shape[0], self.num_experts, self.intermediate_size, self.hidden_size
        gate_up_weight = self.gate_up_proj.reshape(num_experts * 2 * inner_size, hidden)  # a view (contiguous)
        down_weight = self.down_proj.transpose(0, 1).reshape(hidden, num_experts * inner_size)  # a view in our layout
        lora = self.lora
        # LoRA stays factored (never merged into the weights), so the cost per token is the same in
        # training and evaluation and matches ubsmoe.metrics.flops
        factored = bool(lora.targets)
        gate_up = F.linear(x.to(gate_up_weight.dtype), gate_up_weight).view(tokens, num_experts, 2, inner_size)
        input_targets = lora.input_targets if factored else ()
        if input_targets:
            stacked_a = lora.input_a()  # (M, n_t * r, H)
            projected = F.linear(x.to(stacked_a.dtype), stacked_a.reshape(-1, hidden))
            projected = (lora.scaling * projected).view(tokens, num_experts * len(input_targets), lora.rank)
            stacked_b = torch.stack([lora.lora_B[t] for t in input_targets], dim=1)  # (M, n_t, n, r)
            stacked_b = stacked_b.reshape(-1, inner_size, lora.rank).transpose(1, 2)
            deltas = torch.bmm(projected.transpose(0, 1), stacked_b).view(num_experts, len(input_targets), tokens, -1)
            deltas = deltas.permute(2, 0, 1, 3)  # (T, M, n_t, n)
            if len(input_targets) == 2:
                gate_up = gate_up + deltas
            else:
                # F.linear keeps no output for backward, so the one target's rows can be updated in place
                gate_up[:, :, ("gate", "up").index(input_targets[0])] += deltas[:, :, 0]
        inner = gated_product(gate_up, self.activation)  # (T, M, n)
        out = F.linear(inner.reshape(tokens, -1).to(down_weight.dtype), down_weight)
        if factored and "down" in lora.targets:
            lora_a, lora_b = lora.lora_A["down"], lora.lora_B["down"]  # (M, r, n), (M, H, r)
            projected = torch.bmm(inner.transpose(0, 1).to(lora_a.dtype), lora_a.transpose(1, 2))  # (M, T, r)
            projected = (lora.scaling * projected).transpose(0, 1).reshape(tokens, -1)
            out = out + F.linear(projected, lora_b.transpose(0, 1).reshape(hidden, -1))
        out = self.routed_output(out.to(x.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        self._record_dense(x)
        return out

    def _record_dense(self, x: torch.Tensor) -> None:
        probs = None
        if self.training and self.config.pseudo_gradient and self.lora.targets:
            with torch.no_grad():
                probs = route(
                    x,
                    self.router_weight,
                    self.num_experts,
                    phi=self.phi if self.config.dmr else None,
                    num_candidates=self.num_candidates,
                ).probs
        self.record_all_selected(x.shape[0], probs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared={len(self.shared_neurons)}, dense_at_full_k={self.dense_at_full_k}"


def dense_layout(down_proj: torch.Tensor) -> torch.Tensor:
    """The experts' down weights (M, H, n) as a view of an (H, M, n)-contiguous tensor.

    Both paths accept either layout; with this one the dense path reads all experts' down columns as
    one (H, M*n) matrix without copying it (the per-expert matrices of the grouped path are strided).
    """
    return down_proj.transpose(0, 1).contiguous().transpose(0, 1)


def moefied_blocks(model: nn.Module) -> list[tuple[str, MoEfiedBlock]]:
    """(qualified name, block) of every MoEfied block of a model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEfiedBlock)]
