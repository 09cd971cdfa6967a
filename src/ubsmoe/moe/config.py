"""Settings of one UB-SMoE layer.

Plain dataclasses so that `ubsmoe.moe` depends on torch only; the experiment-level schema
(`ubsmoe.config`) builds these. Defaults follow DESIGN.md section 2; every choice the paper leaves
open ([C] there) is a field here so that it can be changed and ablated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

LORA_TARGETS = ("gate", "up", "down")
RHO_FORMS = ("complement", "inverse")
PG_SPACES = ("gradient", "update")
IMPLEMENTATIONS = ("auto", "grouped_mm", "eager")
LORA_PROJECTIONS = ("auto", "rows", "tokens")
T = TypeVar("T")


def budget_to_top_k(budget: float, native_top_k: int) -> int:
    """K_c = max(1, floor(K_max * beta_c)) (paper's rule)."""
    if not (0.0 < budget <= 1.0) or math.isnan(budget):
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    if native_top_k < 1:
        raise ValueError(f"native top-k must be >= 1, got {native_top_k!r}")
    return max(1, math.floor(native_top_k * budget + 1e-9))


def sparsity_factor(num_experts: int, top_k: int, form: str = "complement") -> float:
    """Client sparsity factor rho_c: grows as K_c shrinks.

    complement: (M - K) / K  (default; zero when every expert is active, so PG switches itself off)
    inverse:    M / K
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if form == "complement":
        return (num_experts - top_k) / top_k
    if form == "inverse":
        return num_experts / top_k
    raise ValueError(f"unknown rho form {form!r}; allowed: {', '.join(RHO_FORMS)}")


_RETIRED_FIELDS = frozenset({"load_balance_coef", "output_rescale"})


@dataclass(frozen=True)
class UBSMoEConfig:
    """Per-layer settings of the UB-SMoE block (DESIGN 2.1-2.3)."""

    # expert LoRA (uniform rank for every expert, which PG needs)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # routing
    normalize_gates: bool = False  # OLMoE: False, Mixtral: True
    unit_gates: bool = False  # MoEfied models: straight-through gates of value 1
    router_trainable: bool = False
    # Dynamic Modulated Routing
    dmr: bool = True
    num_candidates: int | None = None  # N_p; None -> 2 * K_max clipped to M
    phi_min: float = -1.0
    phi_max: float = 1.0
    range_lambda: float = 1e-2
    # Universal pseudo-gradient
    pseudo_gradient: bool = True
    pg_kappa: float = 1.0
    pg_rho_form: Literal["complement", "inverse"] = "complement"
    # where PG acts: on the gradients before the optimizer (the paper's form) or on the optimizer's
    # actual updates after its step (survives Adam's per-coordinate normalisation; docs/decisions.md).
    # The layer's default is the paper's form because it needs nothing from the training loop (a
    # backward hook adds it); update space needs the loop to call `apply_pseudo_updates` after each
    # optimizer step, which the engine does and makes its default (`pseudo_gradient.space`).
    pg_space: Literal["gradient", "update"] = "gradient"
    # compute
    implementation: Literal["auto", "grouped_mm", "eager"] = "auto"
    # where the hidden-side LoRA projections (A of gate/up, B of down) run: per routed row or per token
    # over all experts (ubsmoe.moe.experts); auto = tokens for MoEfied blocks, rows for native ones
    lora_projection: Literal["auto", "rows", "tokens"] = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        problems = []
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            problems.append(f"lora_rank must be an integer >= 0, got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            problems.append(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad or len(set(self.lora_targets)) != len(self.lora_targets):
            problems.append(f"lora_targets must be distinct names from {LORA_TARGETS}, got {self.lora_targets}")
        if self.num_candidates is not None and self.num_candidates < 1:
            problems.append(f"num_candidates must be >= 1 or None, got {self.num_candidates!r}")
        if not self.phi_min < self.phi_max:
            problems.append(f"phi_min must be < phi_max, got [{self.phi_min}, {self.phi_max}]")
        if self.range_lambda < 0:
            problems.append(f"range_lambda must be >= 0, got {self.range_lambda!r}")
        if self.pg_kappa < 0:
            problems.append(f"pg_kappa must be >= 0, got {self.pg_kappa!r}")
        if self.pg_space not in PG_SPACES:
            problems.append(f"pg_space must be one of {PG_SPACES}, got {self.pg_space!r}")
        if self.pg_rho_form not in RHO_FORMS:
            problems.append(f"pg_rho_form must be one of {RHO_FORMS}, got {self.pg_rho_form!r}")
        if self.lora_projection not in LORA_PROJECTIONS:
            problems.append(f"lora_projection must be one of {LORA_PROJECTIONS}, got {self.lora_projection!r}")
        if self.implementation not in IMPLEMENTATIONS:
            problems.append(f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")
        if problems:
            raise ValueError("invalid UBSMoEConfig: " + "; ".join(problems))

    def candidates_for(self, native_top_k: int, num_experts: int) -> int:
        """N_p for a layer: the explicit value or 2 * K_max, clipped to M."""
        n = self.num_candidates if self.num_candidates is not None else 2 * native_top_k
        return max(1, min(n, num_experts))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UBSMoEConfig:
        # fields of earlier versions, now pieces the methods attach (ubsmoe.moe.extensions): a saved model
        # or adapter folder that still names them reads as before (off here; the method attaches its own)
        data = {k: v for k, v in data.items() if k not in _RETIRED_FIELDS}
        return dataclass_from_dict(cls, data)


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build a config dataclass from a dict, naming unknown fields in one error (not a TypeError)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)
