"""FLoRIST (Ramesh and Dass 2025): FLoRA's exact stacking, compressed to one shared low-rank pair.

Stack the clients as FLoRA does (`flora_stack`): B_stack @ A_stack = sum_k w_k s_k B_k A_k =: delta W,
with R = sum_k r_k. Without ever forming the out x in delta W, take thin QR decompositions of the
stacked factors (QR plays the role of the paper's thin SVDs; only the orthonormal bases matter),

    B_stack = Q_B R_B,    A_stack^T = Q_A R_A,    so  delta W = Q_B (R_B R_A^T) Q_A^T,

then the SVD of the small core C = R_B R_A^T = U S V^T (at most R x R). The singular values of
delta W are S. Keep the smallest rank p whose energy reaches tau,

    sum_{j < p} S_j^2 >= tau * sum_j S_j^2,

and return ONE global pair (scaling 1)

    B_g = Q_B U_p sqrt(S_p)    (..., out, p),      A_g = sqrt(S_p) V_p^T Q_A^T    (..., p, in),

so B_g @ A_g is the best rank-p approximation of delta W, and delta W itself at tau = 1. Cost is
O((out + in) R^2 + R^3) per weight instead of O(out * in * R). With a leading (e.g. expert) shape each
slice gets its own energy rank and the returned rank is their maximum (so every slice reaches tau).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ubsmoe.methods.flora import FLoRA, flora_stack
from ubsmoe.methods.lora import check_factors

if TYPE_CHECKING:
    from ubsmoe.config import ExperimentConfig


def energy_rank(singular_values: torch.Tensor, tau: float) -> torch.Tensor:
    """Smallest p (>= 1) with sum_{j<p} S_j^2 >= tau * sum_j S_j^2, per slice; S (..., n) in descending order.

    tau = 1 keeps all n components (no round-off can drop one); an all-zero slice gets p = 1.
    Returns a long tensor of shape (...).
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    n = singular_values.shape[-1]
    if n == 0:
        raise ValueError("need at least one singular value")
    if tau >= 1.0:
        return torch.full(singular_values.shape[:-1], n, dtype=torch.long, device=singular_values.device)
    energy = singular_values.double().square()
    cumulative = energy.cumsum(-1)
    total = cumulative[..., -1:]
    below = (cumulative < tau * total).sum(-1) + 1  # components needed before the energy reaches tau
    return below.clamp(1, n)


def florist_aggregate(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[float] | float,
    weights: Sequence[float],
    tau: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A_g (..., p, in), B_g (..., out, p), p) with B_g @ A_g ~ sum_k w_k s_k B_k A_k (exact at tau = 1).

    The global pair carries scaling 1 (the client scalings and weights are inside it). dtype of As[0].
    """
    check_factors(As, Bs)
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    A_stack, B_stack = flora_stack([A.double() for A in As], [B.double() for B in Bs], scalings, weights)
    Q_B, R_B = torch.linalg.qr(B_stack, mode="reduced")  # (..., out, m_b), (..., m_b, R)
    Q_A, R_A = torch.linalg.qr(A_stack.transpose(-1, -2), mode="reduced")  # (..., in, m_a), (..., m_a, R)
    core = R_B @ R_A.transpose(-1, -2)  # (..., m_b, m_a)
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    rank = int(energy_rank(S, tau).max())
    root = S[..., :rank].sqrt()
    B_g = (Q_B @ U[..., :rank]) * root[..., None, :]
    A_g = root[..., :, None] * (Vh[..., :rank, :] @ Q_A.transpose(-1, -2))
    dtype = As[0].dtype
    return A_g.to(dtype), B_g.to(dtype), rank


@dataclass(frozen=True)
class FLoRIST(FLoRA):
    """FLoRIST: as FLoRA, but each round's stack is compressed to one pair of the energy rank p before
    the merge (our reading: clients then start fresh, as in FLoRA)."""

    peft_export_refusal: ClassVar[str | None] = (
        "FLoRIST merges every round's update into the frozen expert weights; its final adapters are "
        "fresh (zero) and the learned update is not a LoRA on the original model"
    )

    energy: float = 0.9
    """tau, the share of the update's energy the kept rank p must reach."""

    @classmethod
    def options(cls, config: ExperimentConfig) -> dict[str, Any]:
        return {"energy": config.baselines.florist_energy}

    def compress(
        self, As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        A, B, _ = florist_aggregate(As, Bs, self.scaling, weights, self.energy)
        return A, B
