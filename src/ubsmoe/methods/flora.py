"""FLoRA (Wang et al. 2024): stack the clients' LoRA factors so the product is the exact weighted sum.

With client pairs A_k (..., r_k, in), B_k (..., out, r_k), scalings s_k = alpha / r_k and weights w_k
(normalised to sum to one), concatenate along the rank axis

    A_stack = [A_1; A_2; ...; A_K]            shape (..., sum_k r_k, in),
    B_stack = [w_1 s_1 B_1, ..., w_K s_K B_K]  shape (..., out, sum_k r_k),

so that B_stack @ A_stack = sum_k w_k s_k B_k @ A_k exactly (no cross terms, unlike averaging A and B
separately). The stacked update is merged into the frozen base weight, W <- W + B_stack @ A_stack,
and clients start fresh adapters of their own ranks next round.

In the federation (`FLoRA`): the merges accumulate as factors in the method state
(`merged_A.<key>`, `merged_B.<key>`, concatenated along the rank axis round after round), and
`BaseMerger` rebuilds every adapted base weight as original + merged_B @ merged_A, so the base is
exact after a resume and never drifts by repeated adds. A client's fresh A is drawn from a seed of
(run seed, round, client, key), so the server recomputes the client's start to read its deltas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ubsmoe.fl.payload import ClientUpdate, GlobalState
from ubsmoe.fl.seeds import derive_seed
from ubsmoe.methods.base import Aggregate
from ubsmoe.methods.lora import (
    block_path,
    check_factors,
    check_pair,
    client_scalings,
    client_weights,
    fresh_a,
    lora_pairs,
    non_lora_keys,
    zero_tail,
)
from ubsmoe.methods.rank import RankMethod

_MERGED_A, _MERGED_B, _LAST_WIDTH = "merged_A.", "merged_B.", "last_merge_rank"


@dataclass
class Merges:
    """FLoRA's state between rounds: the merged factors of every adapted weight so far (concatenated along
    the rank axis, B @ A = the sum of the merged updates) and the rank of the last round's merge.

    It travels as the method state's tensors `merged_A.<key>`, `merged_B.<key>` and `last_merge_rank`
    (`read` / `tensors`), so checkpoints and Flower records carry it unchanged.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    last_width: int = 0

    @classmethod
    def read(cls, method_state: Mapping[str, torch.Tensor]) -> Merges:
        factors = {
            name[len(_MERGED_A) :]: (A, method_state[_MERGED_B + name[len(_MERGED_A) :]])
            for name, A in method_state.items()
            if name.startswith(_MERGED_A)
        }
        return cls(factors, int(method_state.get(_LAST_WIDTH, torch.tensor(0))))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The factors as method-state tensors (without `last_merge_rank`)."""
        out = {}
        for key, (A, B) in self.factors.items():
            out[_MERGED_A + key], out[_MERGED_B + key] = A, B
        return out

    def write(self, method_state: dict[str, torch.Tensor]) -> None:
        method_state.update(self.tensors())
        if self.last_width:
            method_state[_LAST_WIDTH] = torch.tensor(self.last_width)

    def append(self, key: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Add one round's merged update of the weight of LoRA key `key`."""
        old = self.factors.get(key)
        self.factors[key] = (A, B) if old is None else (torch.cat([old[0], A], -2), torch.cat([old[1], B], -1))

    def last(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last round's merged update of one weight (None before any merge)."""
        if key not in self.factors or not self.last_width:
            return None
        A, B = self.factors[key]
        return A[..., -self.last_width :, :], B[..., -self.last_width :]


def flora_stack(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[float] | float,
    weights: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_stack (..., sum r_k, in), B_stack (..., out, sum r_k)); w_k s_k sits on the B side.

    B_stack @ A_stack == sum_k w_k s_k B_k @ A_k (scaling 1 on the stacked pair). dtype of As[0].
    """
    check_factors(As, Bs)
    w = client_weights(weights, len(As))
    s = client_scalings(scalings, len(As))
    dtype = As[0].dtype
    A_stack = torch.cat([A.double() for A in As], dim=-2)
    B_stack = torch.cat([(wk * sk) * B.double() for B, wk, sk in zip(Bs, w, s, strict=True)], dim=-1)
    return A_stack.to(dtype), B_stack.to(dtype)


def merge_into(
    weight: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """W + scaling * B_stack @ A_stack for a base weight W (..., out, in); returns a new tensor, W's dtype."""
    check_pair(A_stack, B_stack)
    expected = (*A_stack.shape[:-2], B_stack.shape[-2], A_stack.shape[-1])
    if tuple(weight.shape) != expected:
        raise ValueError(f"base weight has shape {tuple(weight.shape)}, but the stacked update is {expected}")
    return (weight.double() + scaling * (B_stack.double() @ A_stack.double())).to(weight.dtype)


# ---- the method ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FLoRA(RankMethod):
    """FLoRA: clients train fresh rank-r_c adapters every round; the server stacks them exactly and
    merges the stack into the frozen experts (accumulated factors in the method state)."""

    peft_export_refusal: ClassVar[str | None] = (
        "FLoRA merges every round's update into the frozen expert weights; its final adapters are fresh "
        "(zero) and the learned update is not a LoRA on the original model"
    )

    def client_start(self, state: GlobalState, rank: int | None, client: Any) -> GlobalState:
        start = super().client_start(state, None, client)
        for key_a, key_b in lora_pairs(start.adapters):
            seed = derive_seed(self.seed, "fresh-lora", state.round, client, key_a)
            start.adapters[key_a] = fresh_a(start.adapters[key_a].shape, start.adapters[key_a].dtype, seed)
            start.adapters[key_b].zero_()
        if rank is not None:
            zero_tail(start.adapters, rank)
        return start

    def compress(
        self, As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The round's update of one weight as one pair (A, B), B @ A = the update (FLoRA: the exact stack)."""
        return flora_stack(As, Bs, self.scaling, weights)

    def combine_pairs(self, result, key_a, key_b, As, Bs, weights) -> None:
        dtype = result.adapters[key_a].dtype
        A_new, B_new = self.compress(As, Bs, weights)
        merges = Merges.read(result.method_state)
        merges.append(key_a, A_new.to(dtype), B_new.to(dtype))
        merges.write(result.method_state)
        result.report.setdefault("_widths", []).append(A_new.shape[-2])

    def finish_round(self, result: Aggregate, updates: Sequence[ClientUpdate]) -> None:
        """The merge's rank (FLoRA: the sum of the client ranks; FLoRIST: p, the max over weights)."""
        widths = result.report.pop("_widths", [])
        if widths:
            merges = Merges.read(result.method_state)
            merges.last_width = max(widths)
            merges.write(result.method_state)
            result.report["merge_rank"] = {"max": max(widths), "mean": sum(widths) / len(widths)}

    def sent_state(self, state: GlobalState) -> dict[str, torch.Tensor]:
        """Every merge so far: a client rebuilds its base from the original weights (`BaseMerger`)."""
        return Merges.read(state.method_state).tensors()

    def sent_tensors(self, state: GlobalState, rank: int | None) -> list[torch.Tensor]:
        """Last round's merged update (the stacked factors, or FLoRIST's rank-p pair) plus any non-LoRA
        adapter; the fresh adapters are drawn on the client."""
        merges = Merges.read(state.method_state)
        sent = [state.adapters[k] for k in non_lora_keys(state.adapters)]
        for key_a, _ in lora_pairs(state.adapters):
            last = merges.last(key_a)
            if last is not None:
                sent += list(last)
        return sent

    def tier_view(self, state: GlobalState, rank: int | None, clients: Sequence[int]) -> GlobalState:
        """No adapter at all: the merged base is the model."""
        view = super().tier_view(state, rank, clients)
        for _, key_b in lora_pairs(view.adapters):
            view.adapters[key_b].zero_()
        return view

    def base_merger(self, model: nn.Module) -> BaseMerger:
        return BaseMerger(model)


class BaseMerger:
    """Sets every adapted expert weight to original + merged_B @ merged_A from a state's method state.

    The original weights are copied once, on the first `apply` that has something to merge, so the
    base is always rebuilt from them (identical after a resume) and never drifts by repeated adds.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.originals: dict[str, torch.Tensor] = {}

    def _weight(self, key_a: str) -> torch.Tensor:
        """The frozen weight slice (M, out, in) that the LoRA pair of `key_a` adapts."""
        block = self.model.get_submodule(block_path(key_a))
        target = key_a.rsplit(".", 1)[-1]
        inner = block.intermediate_size
        if target == "gate":
            return block.gate_up_proj[:, :inner, :]
        if target == "up":
            return block.gate_up_proj[:, inner:, :]
        return block.down_proj

    @torch.no_grad()
    def apply(self, state: GlobalState) -> None:
        for key_a, (A, B) in Merges.read(state.method_state).factors.items():
            weight = self._weight(key_a)
            if key_a not in self.originals:
                self.originals[key_a] = weight.detach().to("cpu", copy=True)
            merged = merge_into(self.originals[key_a], A, B)
            weight.copy_(merged.to(weight.dtype))
