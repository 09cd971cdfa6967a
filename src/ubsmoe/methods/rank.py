"""`RankMethod`: the shared half of the heterogeneous-rank baselines (HetLoRA, FlexLoRA, FLoRA, FLoRIST).

Every client runs at K_max; the budget sets its LoRA rank r_c = max(1, round(r beta_c)). The model's
expert LoRA has rank r_max = `lora.rank`; a rank-r_c client holds the first r_c components and zeros
in the rest (`zero_tail`), which computes exactly a rank-r_c adapter, and it uploads only those r_c
components. Every rank shares the scaling s = alpha / r_max (our choice: truncation and zero-padding
need one scaling for all ranks). The subclasses say how the clients' pairs combine (`combine_pairs`);
tensors outside the LoRA pairs (e.g. a trainable router) are averaged by FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ubsmoe.fl.payload import ClientUpdate, GlobalState
from ubsmoe.methods.base import Aggregate, Method
from ubsmoe.methods.fedavg import fedavg
from ubsmoe.methods.lora import lora_pairs, non_lora_keys, rank_sliced, zero_tail

if TYPE_CHECKING:
    from ubsmoe.fl.server import Assignment

__all__ = ["RankMethod"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RankMethod(Method):
    """A heterogeneous-rank baseline; subclasses implement `combine_pairs`."""

    top_k_from_budget: ClassVar[bool] = False
    rank_from_budget: ClassVar[bool] = True

    def client_rank(self, state: GlobalState, client: int, configured: int) -> int | None:
        return configured

    def client_start(self, state: GlobalState, rank: int | None, client: Any) -> GlobalState:
        start = super().client_start(state, rank, client)
        if rank is not None:
            zero_tail(start.adapters, rank)
        return start

    def sent_tensors(self, state: GlobalState, rank: int | None) -> list[torch.Tensor]:
        return list((state.adapters if rank is None else rank_sliced(state.adapters, rank)).values())

    def after_step(self, adapters: Mapping[str, torch.Tensor], rank: int | None) -> None:
        if rank is not None:
            zero_tail(adapters, rank)

    def uploaded_tensors(self, update: ClientUpdate) -> list[torch.Tensor]:
        if _is_int(update.rank):
            return list(rank_sliced(update.adapter_deltas, update.rank).values())
        return list(update.adapter_deltas.values())

    def update_problem(self, update: ClientUpdate, state: GlobalState, assignment: Assignment | None) -> str | None:
        ranks = {int(v.shape[-2]) for k, v in state.adapters.items() if ".lora_A." in k}
        r_max = max(ranks) if ranks else 0
        if not _is_int(update.rank) or not 1 <= update.rank <= r_max:
            return f"rank must be an integer in [1, {r_max}] for a rank method, got {update.rank!r}"
        if assignment is not None and assignment.rank is not None and update.rank != assignment.rank:
            return f"rank = {update.rank!r}, but the server assigned this client rank {assignment.rank}"
        return None

    def tier_view(self, state: GlobalState, rank: int | None, clients: Sequence[int]) -> GlobalState:
        view = super().tier_view(state, rank, clients)
        if rank is not None:
            zero_tail(view.adapters, rank)
        return view

    # ---- aggregation ----------------------------------------------------------------------------
    def final_adapters(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> list[dict[str, torch.Tensor]]:
        """Each client's adapters after its round: its start plus its deltas."""
        finals = []
        for update in updates:
            start = self.client_start(state, update.rank, update.client_id).adapters
            finals.append({k: start[k] + update.adapter_deltas[k].to(start[k].dtype) for k in start})
        return finals

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> Aggregate:
        weights = [float(u.num_examples) for u in updates]
        result = Aggregate({k: v.clone() for k, v in state.adapters.items()}, self.keep_local_state(state, updates))
        others = non_lora_keys(state.adapters)
        if others:
            averaged = fedavg([{k: u.adapter_deltas[k] for k in others} for u in updates], weights)
            result.adapters.update({k: state.adapters[k] + averaged[k].to(state.adapters[k].dtype) for k in others})
        finals = self.final_adapters(state, updates)
        ranks = [int(u.rank) for u in updates]
        for key_a, key_b in lora_pairs(state.adapters):
            As = [f[key_a][..., :r, :] for f, r in zip(finals, ranks, strict=True)]
            Bs = [f[key_b][..., :r] for f, r in zip(finals, ranks, strict=True)]
            self.combine_pairs(result, key_a, key_b, As, Bs, weights)
        self.finish_round(result, updates)
        return result

    def combine_pairs(
        self,
        result: Aggregate,
        key_a: str,
        key_b: str,
        As: Sequence[torch.Tensor],
        Bs: Sequence[torch.Tensor],
        weights: Sequence[float],
    ) -> None:
        """Fold the clients' rank-r_c pairs (As, Bs) of one adapted weight into `result` (in place)."""
        raise NotImplementedError

    def finish_round(self, result: Aggregate, updates: Sequence[ClientUpdate]) -> None:
        """After every pair is combined: method-state bookkeeping and the round's report (in place)."""
