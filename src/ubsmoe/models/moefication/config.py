"""Settings of a MoEfication (`MoEficationConfig`) and the constants of the saved format."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from ubsmoe.moe import (
    budget_to_top_k,
)
from ubsmoe.moe.config import dataclass_from_dict

if TYPE_CHECKING:
    pass


GROUPINGS = ("coactivation", "gate_kmeans", "contiguous")
ROUTERS = ("ridge", "centroid")
DEFAULT_BUDGETS = (0.25, 0.5, 0.75, 1.0)
DENSE_FAMILIES: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
"""model_type -> family name of the dense SwiGLU models `moefy` accepts (mlp.gate_proj/up_proj/down_proj)."""

FORMAT_NAME = "ubsmoe-moefied"
FORMAT_VERSION = 1
"""Bumped whenever calibration or the saved layout changes; part of the cache key."""
CONFIG_FILE = "moefication.json"
WEIGHTS_FILE = "model.safetensors"

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total); moefy reports stage "moefy" once per finished layer."""


# ---- configuration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MoEficationConfig:
    """How a dense model is split into experts and routed (DESIGN section 3).

    Attributes:
        num_experts: M routed experts per layer (K_max = M).
        shared_fraction: share of the intermediate neurons in the always-on shared group, chosen by
            highest mean |activation| (plus the remainder that makes the routed count divide by M).
        grouping: "coactivation" (balanced k-means on |activation| profiles), "gate_kmeans"
            (balanced k-means on gate rows) or "contiguous" (index order).
        router: "ridge" (FFN input -> expert output norm) or "centroid" (mean gate row of each expert).
        ridge_lambda: ridge penalty relative to the mean eigenvalue of X^T X (scale-free).
        router_logit_std: the router's logits are scaled to this mean spread across experts; None
            keeps the raw fit (ridge: output-norm units).
        calibration_tokens: at most this many (non-padding) calibration tokens are used.
        kmeans_iterations: maximum iterations of balanced k-means (it stops early at convergence).
        seed: seeds k-means initialisation and the recovery stage.
        recovery: run the layer-local distillation stage after building each layer.
        recovery_tokens: calibration tokens cached per layer for recovery (a seeded random subset).
        recovery_steps / recovery_batch_size / recovery_lr: Adam steps (cosine schedule), tokens per
            step and peak learning rate of the recovery stage.
        recovery_top_ks: K values sampled (uniformly, one per step) during recovery; None -> the K of
            the budgets 0.25 / 0.5 / 0.75 / 1.0.
        recovery_train_shared: also train the shared group in the recovery stage.
    """

    num_experts: int = 8
    shared_fraction: float = 0.25
    grouping: Literal["coactivation", "gate_kmeans", "contiguous"] = "coactivation"
    router: Literal["ridge", "centroid"] = "ridge"
    ridge_lambda: float = 0.1
    router_logit_std: float | None = 1.0
    calibration_tokens: int = 8192
    kmeans_iterations: int = 30
    seed: int = 0
    recovery: bool = False
    recovery_tokens: int = 8192
    recovery_steps: int = 200
    recovery_batch_size: int = 256
    recovery_lr: float = 1e-4
    recovery_top_ks: tuple[int, ...] | None = None
    recovery_train_shared: bool = True

    def __post_init__(self) -> None:
        if self.recovery_top_ks is not None:
            object.__setattr__(self, "recovery_top_ks", tuple(self.recovery_top_ks))
        problems = []

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        if not is_int(self.num_experts) or self.num_experts < 2:
            problems.append(f"num_experts must be an integer >= 2, got {self.num_experts!r}")
        if not is_number(self.shared_fraction) or not 0.0 <= self.shared_fraction < 1.0:
            problems.append(f"shared_fraction must be in [0, 1), got {self.shared_fraction!r}")
        if self.grouping not in GROUPINGS:
            problems.append(f"grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}")
        if self.router not in ROUTERS:
            problems.append(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if not is_number(self.ridge_lambda) or self.ridge_lambda < 0:
            problems.append(f"ridge_lambda must be a number >= 0, got {self.ridge_lambda!r}")
        if self.router_logit_std is not None and (not is_number(self.router_logit_std) or self.router_logit_std <= 0):
            problems.append(f"router_logit_std must be > 0 or None, got {self.router_logit_std!r}")
        for name in ("calibration_tokens", "kmeans_iterations", "recovery_tokens", "recovery_steps"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if not is_int(self.recovery_batch_size) or self.recovery_batch_size < 1:
            problems.append(f"recovery_batch_size must be an integer >= 1, got {self.recovery_batch_size!r}")
        if not is_int(self.seed):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if not is_number(self.recovery_lr) or self.recovery_lr <= 0:
            problems.append(f"recovery_lr must be > 0, got {self.recovery_lr!r}")
        if self.recovery_top_ks is not None:
            ks = self.recovery_top_ks
            m = self.num_experts if is_int(self.num_experts) else 0
            if not ks or not all(is_int(k) and 1 <= k <= m for k in ks):
                problems.append(f"recovery_top_ks must be a non-empty list of integers in [1, {m}], got {list(ks)}")
        if problems:
            raise ValueError("invalid MoEficationConfig: " + "; ".join(problems))

    def top_ks(self) -> tuple[int, ...]:
        """K values of the recovery stage (default: the four budget tiers)."""
        if self.recovery_top_ks is not None:
            return self.recovery_top_ks
        return tuple(sorted({budget_to_top_k(b, self.num_experts) for b in DEFAULT_BUDGETS}))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.recovery_top_ks is not None:
            data["recovery_top_ks"] = list(self.recovery_top_ks)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoEficationConfig:
        return dataclass_from_dict(cls, data)
