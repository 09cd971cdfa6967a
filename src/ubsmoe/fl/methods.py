"""How each method of DESIGN 2.5 starts a client and aggregates a round, over plain payloads.

UB-SMoE, its ablations, SMoE-naive, SMoE-LLB and FedIT aggregate by FedAvg (`ubsmoe.fl.server`);
their differences live in the model (DMR, PG, the load-balancing loss: `ExperimentConfig.ubsmoe_config`)
and in K_c. The other baselines change what a client starts from and how the server combines the
updates; this module is that difference, as functions of (`MethodSettings`, `GlobalState`, updates),
called the same way by the in-process simulation and the Flower app.

Rank baselines (HetLoRA, FlexLoRA, FLoRA, FLoRIST) run every client at K_max with a LoRA rank r_c
(`ExperimentConfig.client_ranks`). The model's expert LoRA has rank r_max = `lora.rank`; a rank-r_c
client holds the first r_c components and zeros in the rest (`zero_tail`), which computes exactly a
rank-r_c adapter. Every rank shares the scaling s = alpha / r_max (our choice: HetLoRA's truncation
and zero-padding need one scaling for all ranks).

- HetLoRA: the global pair has rank r_max; a client starts from its first r_c components, trains with
  the self-pruning penalty on its tail, and may lower its rank for the next round when that tail holds
  less than `hetlora_prune_ratio` of its components' total size (the ranks live in the method state);
  the server zero-pads and averages A and B with weights ||B_c A_c||_F per expert.
- FlexLoRA: the server averages the full updates s B_c A_c (weights |D_c|) and keeps the top-r_max
  SVD triplets as the global pair; a client starts from the first r_c of them (= its top-r_c SVD).
- FLoRA: the server stacks the clients' factors (exact weighted sum of s B_c A_c) and merges the result
  into the frozen expert weights; clients start fresh adapters (seeded A, B = 0) every round.
- FLoRIST: as FLoRA, but the stack is compressed to one global pair of the smallest rank p reaching the
  energy threshold tau before the merge (our reading: clients merge it and start fresh, as in FLoRA).
  Merges accumulate as factors in the method state (`merged_A.<key>`, `merged_B.<key>`), so the base
  is rebuilt exactly from the original weights (`BaseMerger`), e.g. after a resume.
- A3SMoE (FLAME-style): expert LoRA averaged per expert with weights freq_{c,i}^t |D_c|; each client's
  learnable output scales stay with the client (kept for it in the method state as `local.<c>.<key>`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ubsmoe.fl.aggregation.a3smoe import activation_aware_weights
from ubsmoe.fl.aggregation.fedavg import fedavg
from ubsmoe.fl.aggregation.flexlora import svd_factors
from ubsmoe.fl.aggregation.flora import flora_stack
from ubsmoe.fl.aggregation.florist import florist_aggregate
from ubsmoe.fl.aggregation.hetlora import hetlora_aggregate, self_pruning_penalty
from ubsmoe.fl.aggregation.lora_factors import weighted_product_sum
from ubsmoe.fl.payload import ClientUpdate, GlobalState

if TYPE_CHECKING:
    from ubsmoe.config import ExperimentConfig

__all__ = [
    "BaseMerger",
    "MethodSettings",
    "aggregate_adapters",
    "client_rank",
    "client_start",
    "initial_method_state",
    "lora_pairs",
    "next_rank",
    "rank_penalty",
    "sent_tensors",
    "uploaded_tensors",
    "tier_view",
    "zero_tail",
]

_LORA_A, _LORA_B = ".lora_A.", ".lora_B."
_FRESH = ("flora", "florist")
_TRUNCATED = ("hetlora", "flexlora")


@dataclass(frozen=True)
class MethodSettings:
    """The method and the baseline hyper-parameters the federated core needs (`from_config`)."""

    name: str = "ubsmoe"
    seed: int = 0
    scaling: float = 2.0
    """s = alpha / r_max, the LoRA scaling every rank shares."""
    hetlora_penalty: float = 1e-3
    hetlora_gamma: float = 0.5
    hetlora_prune_ratio: float = 0.05
    florist_energy: float = 0.9
    a3smoe_exponent: float = 1.0

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> MethodSettings:
        b = config.baselines
        return cls(
            name=config.method,
            seed=config.seed,
            scaling=config.lora.alpha / config.lora.rank,
            hetlora_penalty=b.hetlora_penalty,
            hetlora_gamma=b.hetlora_gamma,
            hetlora_prune_ratio=b.hetlora_prune_ratio,
            florist_energy=b.florist_energy,
            a3smoe_exponent=b.a3smoe_exponent,
        )

    @property
    def aggregation(self) -> str:
        """'fedavg' or the baseline's own rule (hetlora, flexlora, flora, florist, a3smoe)."""
        return self.name if self.name in (*_FRESH, *_TRUNCATED, "a3smoe") else "fedavg"

    @property
    def uses_ranks(self) -> bool:
        return self.name in (*_FRESH, *_TRUNCATED)

    @property
    def merges_into_base(self) -> bool:
        return self.name in _FRESH


# ---- LoRA layout -------------------------------------------------------------------------------
def lora_pairs(adapters: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(A key, B key) of every expert-LoRA pair, in the adapters' order."""
    return [
        (k, k.replace(_LORA_A, _LORA_B)) for k in adapters if _LORA_A in k and k.replace(_LORA_A, _LORA_B) in adapters
    ]


def _block_path(key: str) -> str:
    """'model.layers.3.mlp.lora.lora_A.gate' -> 'model.layers.3.mlp' (the UB-SMoE block owning the LoRA)."""
    return key.split(".lora.")[0]


def _natural(path: str) -> list[Any]:
    """Sort key that orders 'layers.2' before 'layers.10' (module order), whatever order the keys came in."""
    return [int(part) if part.isdigit() else part for part in path.split(".")]


def _layer_of(adapters: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Layer index (row of phi and of the utilization counts) of every expert-LoRA key.

    Blocks are numbered in module order, read from their paths, so a state read back from a checkpoint
    (whose keys come sorted as text) maps the same way.
    """
    keys = [k for k in adapters if _LORA_A in k or _LORA_B in k]
    blocks = sorted({_block_path(k) for k in keys}, key=_natural)
    index = {path: i for i, path in enumerate(blocks)}
    return {k: index[_block_path(k)] for k in keys}


def zero_tail(adapters: Mapping[str, torch.Tensor], rank: int) -> None:
    """Zero the components past `rank` of every expert-LoRA pair, in place (A rows, B columns)."""
    with torch.no_grad():
        for key_a, key_b in lora_pairs(adapters):
            adapters[key_a][..., rank:, :].zero_()
            adapters[key_b][..., rank:].zero_()


# ---- method state ------------------------------------------------------------------------------
def initial_method_state(settings: MethodSettings, client_ranks: Sequence[int]) -> dict[str, torch.Tensor]:
    """What the server keeps besides the adapters before round 0 (HetLoRA: every client's rank)."""
    if settings.name == "hetlora":
        return {"ranks": torch.tensor(list(client_ranks), dtype=torch.long)}
    return {}


def client_rank(settings: MethodSettings, state: GlobalState, client: int, configured: int) -> int:
    """The rank client `client` trains at this round (HetLoRA's may have been pruned below `configured`)."""
    ranks = state.method_state.get("ranks")
    if settings.name == "hetlora" and ranks is not None and client < ranks.numel():
        return int(ranks[client])
    return configured


def _fresh_a(shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A freshly initialised LoRA A (Kaiming-uniform bound of ExpertLoRA), reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


def _client_seed(settings: MethodSettings, round: int, client: Any, key: str) -> int:
    from ubsmoe.fl.simulation import derive_seed

    return derive_seed(settings.seed, "fresh-lora", round, client, key)


def client_start(settings: MethodSettings, state: GlobalState, rank: int | None, client: Any) -> GlobalState:
    """The state client `client` starts its round from: adapters (rank-truncated or fresh), phi, local state.

    Deterministic in (settings, state, rank, client), so the server recomputes it to read an update's
    deltas (`aggregate_adapters`).
    """
    adapters = {k: v.clone() for k, v in state.adapters.items()}
    if settings.merges_into_base:
        for key_a, key_b in lora_pairs(adapters):
            seed = _client_seed(settings, state.round, client, key_a)
            adapters[key_a] = _fresh_a(adapters[key_a].shape, adapters[key_a].dtype, seed)
            adapters[key_b].zero_()
    if settings.uses_ranks and rank is not None:
        zero_tail(adapters, rank)
    prefix = f"local.{client}."
    local = {k[len(prefix) :]: v.clone() for k, v in state.method_state.items() if k.startswith(prefix)}
    return GlobalState(adapters=adapters, phi=state.phi.clone(), round=state.round, method_state=local)


def tier_view(settings: MethodSettings, state: GlobalState, rank: int, clients: Sequence[int]) -> GlobalState:
    """The model a tier is evaluated with: what its clients hold after the round.

    Rank methods: the global adapters truncated to the tier's rank (FLoRA/FLoRIST: no adapter at all,
    the merged base is the model). A3SMoE: the mean output scales of the tier's clients (1 before any).
    """
    adapters = {k: v.clone() for k, v in state.adapters.items()}
    if settings.merges_into_base:
        for _, key_b in lora_pairs(adapters):
            adapters[key_b].zero_()
    elif settings.uses_ranks:
        zero_tail(adapters, rank)
    local: dict[str, torch.Tensor] = {}
    for client in clients:
        prefix = f"local.{client}."
        for key, value in state.method_state.items():
            if key.startswith(prefix):
                name = key[len(prefix) :]
                local[name] = local.get(name, 0) + value.double() / len(clients)
    return GlobalState(adapters=adapters, phi=state.phi.clone(), round=state.round, method_state=local)


# ---- client-side loss ----------------------------------------------------------------------------
def rank_penalty(settings: MethodSettings, parameters: Mapping[str, torch.Tensor], rank: int) -> torch.Tensor | None:
    """HetLoRA's self-pruning penalty over every expert-LoRA pair at `rank` (None for other methods)."""
    if settings.name != "hetlora" or settings.hetlora_penalty == 0:
        return None
    terms = [
        self_pruning_penalty(parameters[a][..., :rank, :], parameters[b][..., :rank], rank, settings.hetlora_gamma)
        for a, b in lora_pairs(parameters)
    ]
    return settings.hetlora_penalty * torch.stack(terms).sum() if terms else None


@torch.no_grad()
def next_rank(settings: MethodSettings, parameters: Mapping[str, torch.Tensor], rank: int) -> int:
    """HetLoRA's rank for the next round: floor(gamma r) when the tail components are small, else r."""
    if settings.name != "hetlora" or rank <= 1:
        return rank
    start = max(1, math.floor(settings.hetlora_gamma * rank))
    tail = total = 0.0
    for a, b in lora_pairs(parameters):
        A, B = parameters[a][..., :rank, :].double(), parameters[b][..., :rank].double()
        sizes = B.norm(dim=-2) * A.norm(dim=-1)  # (..., rank): ||B[:, j]|| ||A[j, :]|| = ||B_j A_j||_F
        tail += float(sizes[..., start:].sum())
        total += float(sizes.sum())
    return start if total > 0 and tail < settings.hetlora_prune_ratio * total else rank


# ---- server-side aggregation ---------------------------------------------------------------------
def _finals(
    settings: MethodSettings, state: GlobalState, updates: Sequence[ClientUpdate]
) -> list[dict[str, torch.Tensor]]:
    """Each client's adapters after its round: its start plus its deltas."""
    finals = []
    for update in updates:
        start = client_start(settings, state, update.rank, update.client_id).adapters
        finals.append({k: start[k] + update.adapter_deltas[k].to(start[k].dtype) for k in start})
    return finals


def aggregate_adapters(
    settings: MethodSettings, state: GlobalState, updates: Sequence[ClientUpdate]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(new adapters, new method state, report) of one round's validated updates under the method's rule."""
    weights = [float(u.num_examples) for u in updates]
    method_state = {k: v.clone() for k, v in state.method_state.items()}
    for update in updates:  # the clients' own tensors, kept for them
        for key, value in update.local_state.items():
            method_state[f"local.{update.client_id}.{key}"] = value.detach().cpu().clone()
    report: dict[str, Any] = {}
    rule = settings.aggregation
    if rule == "fedavg":
        averaged = fedavg([u.adapter_deltas for u in updates], weights)
        adapters = {k: v + averaged[k].to(v.dtype) for k, v in state.adapters.items()}
        return adapters, method_state, report
    if rule == "a3smoe":
        return _a3smoe(settings, state, updates, weights), method_state, report

    finals = _finals(settings, state, updates)
    ranks = [int(u.rank) for u in updates]
    pairs = lora_pairs(state.adapters)
    paired = {k for pair in pairs for k in pair}
    others = [k for k in state.adapters if k not in paired]  # e.g. a trainable router: FedAvg
    adapters = {k: v.clone() for k, v in state.adapters.items()}
    if others:
        averaged = fedavg([{k: u.adapter_deltas[k] for k in others} for u in updates], weights)
        adapters.update({k: state.adapters[k] + averaged[k].to(state.adapters[k].dtype) for k in others})
    merged_ranks = []
    for key_a, key_b in pairs:
        r_max = state.adapters[key_a].shape[-2]
        As = [f[key_a][..., :r, :] for f, r in zip(finals, ranks, strict=True)]
        Bs = [f[key_b][..., :r] for f, r in zip(finals, ranks, strict=True)]
        dtype = state.adapters[key_a].dtype
        if rule == "hetlora":
            A, B = hetlora_aggregate(As, Bs, r_max=r_max)
            adapters[key_a], adapters[key_b] = A.to(dtype), B.to(dtype)
        elif rule == "flexlora":
            full = weighted_product_sum(As, Bs, settings.scaling, weights)
            A, B = svd_factors(full, r_max, settings.scaling)
            adapters[key_a], adapters[key_b] = A.to(dtype), B.to(dtype)
        else:  # flora, florist: merge the round's update into the base, as accumulated factors
            if rule == "flora":
                A_new, B_new = flora_stack(As, Bs, settings.scaling, weights)
            else:
                A_new, B_new, _ = florist_aggregate(As, Bs, settings.scaling, weights, settings.florist_energy)
            merged_ranks.append(A_new.shape[-2])
            for name, new, dim in (("merged_A", A_new, -2), ("merged_B", B_new, -1)):
                old = method_state.get(f"{name}.{key_a}")
                method_state[f"{name}.{key_a}"] = new.to(dtype) if old is None else torch.cat([old, new.to(dtype)], dim)
    if settings.name == "hetlora":
        ranks_now = method_state["ranks"].clone()
        for update in updates:
            proposed = update.metrics.get("next_rank")
            if isinstance(proposed, int | float) and 1 <= int(proposed) <= int(ranks_now[int(update.client_id)]):
                ranks_now[int(update.client_id)] = int(proposed)
        method_state["ranks"] = ranks_now
        report["client_ranks"] = ranks_now.tolist()
    if merged_ranks:  # FLoRA: sum of the client ranks; FLoRIST: the energy rank p (max over experts)
        method_state["last_merge_rank"] = torch.tensor(max(merged_ranks))
        report["merge_rank"] = {"max": max(merged_ranks), "mean": sum(merged_ranks) / len(merged_ranks)}
    return adapters, method_state, report


def _a3smoe(
    settings: MethodSettings, state: GlobalState, updates: Sequence[ClientUpdate], weights: list[float]
) -> dict[str, torch.Tensor]:
    """Expert LoRA: per-expert weights freq^t |D_c| from each client's utilization; the rest: FedAvg."""
    layer_of = _layer_of(state.adapters)
    frequencies = [u.counts.double() / u.tokens.double().clamp_min(1)[:, None] for u in updates]  # (L, M) each
    per_layer = [
        activation_aware_weights([f[layer] for f in frequencies], weights, settings.a3smoe_exponent)
        for layer in range(state.phi.shape[0])
    ]
    plain = fedavg([u.adapter_deltas for u in updates], weights)
    adapters = {}
    for key, value in state.adapters.items():
        if key in layer_of:
            w = per_layer[layer_of[key]]  # (C, M)
            stacked = torch.stack([u.adapter_deltas[key].double() for u in updates])  # (C, M, ...)
            delta = (w.reshape(*w.shape, *([1] * (stacked.dim() - 2))) * stacked).sum(0)
        else:
            delta = plain[key]
        adapters[key] = value + delta.to(value.dtype)
    return adapters


# ---- merging into the frozen base (FLoRA, FLoRIST) -----------------------------------------------
class BaseMerger:
    """Sets every adapted expert weight to original + (merged_B @ merged_A) from a state's method state.

    The original weights are copied once, on the first `apply` that has something to merge, so the
    base is always rebuilt from them (identical after a resume) and never drifts by repeated adds.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.originals: dict[str, torch.Tensor] = {}

    def _weight(self, key_a: str) -> torch.Tensor:
        """The frozen weight slice (M, out, in) that the LoRA pair of `key_a` adapts."""
        block = self.model.get_submodule(_block_path(key_a))
        target = key_a.rsplit(".", 1)[-1]
        inner = block.intermediate_size
        if target == "gate":
            return block.gate_up_proj[:, :inner, :]
        if target == "up":
            return block.gate_up_proj[:, inner:, :]
        return block.down_proj

    @torch.no_grad()
    def apply(self, state: GlobalState) -> None:
        for name, A in state.method_state.items():
            if not name.startswith("merged_A."):
                continue
            key_a = name[len("merged_A.") :]
            B = state.method_state[f"merged_B.{key_a}"]
            weight = self._weight(key_a)
            if key_a not in self.originals:
                self.originals[key_a] = weight.detach().to("cpu", copy=True)
            original = self.originals[key_a]
            merged = original.double() + B.double() @ A.double()
            weight.copy_(merged.to(weight.dtype))


# ---- communication ---------------------------------------------------------------------------------
def _rank_sliced(adapters: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    sliced = dict(adapters)
    for key_a, key_b in lora_pairs(adapters):
        sliced[key_a], sliced[key_b] = adapters[key_a][..., :rank, :], adapters[key_b][..., :rank]
    return sliced


def sent_tensors(settings: MethodSettings, state: GlobalState, rank: int | None) -> list[torch.Tensor]:
    """The adapter tensors the server really sends a client of `rank` (for the byte counts).

    FedAvg methods and A3SMoE: the global adapters. HetLoRA/FlexLoRA: the first r_c components.
    FLoRA/FLoRIST: last round's merged update (the stacked factors, or FLoRIST's rank-p pair) plus any
    non-LoRA adapter; fresh adapters are drawn on the client.
    """
    if settings.merges_into_base:
        pairs = lora_pairs(state.adapters)
        paired = {k for pair in pairs for k in pair}
        width = int(state.method_state.get("last_merge_rank", torch.tensor(0)))
        sent = [v for k, v in state.adapters.items() if k not in paired]
        for key_a, _ in pairs:
            A, B = state.method_state.get(f"merged_A.{key_a}"), state.method_state.get(f"merged_B.{key_a}")
            if A is not None and B is not None and width:
                sent += [A[..., -width:, :], B[..., -width:]]
        return sent
    if settings.uses_ranks and rank is not None:
        return list(_rank_sliced(state.adapters, rank).values())
    return list(state.adapters.values())


def uploaded_tensors(settings: MethodSettings, update: ClientUpdate) -> list[torch.Tensor]:
    """The adapter tensors a client really uploads: its first r_c components under a rank method."""
    if settings.uses_ranks and isinstance(update.rank, int):
        return list(_rank_sliced(update.adapter_deltas, update.rank).values())
    return list(update.adapter_deltas.values())
