"""An independent, deliberately naive per-token reference of the UB-SMoE layer (tests only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_moe(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    router: torch.Tensor,
    top_k: int,
    *,
    phi: torch.Tensor | None = None,
    num_candidates: int | None = None,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    scaling: float = 1.0,
    normalize: bool = False,
    unit_gates: bool = False,
) -> torch.Tensor:
    """Loop over tokens, then over that token's chosen experts; LoRA as explicit W + s * B A."""
    num_experts, double_inner, _ = gate_up.shape
    inner = double_inner // 2
    lora = lora or {}
    outputs = []
    for token in x:
        scores = router @ token
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        if phi is not None:
            n_p = min(num_candidates or num_experts, num_experts)
            candidates = set(torch.argsort(scores, descending=True)[:n_p].tolist())
            scores = torch.stack([scores[i] + (phi[i] if i in candidates else 0) for i in range(num_experts)])
        probs = torch.softmax(scores, dim=0)
        chosen = torch.argsort(probs, descending=True)[:top_k]
        weights = probs[chosen]
        if normalize:
            weights = weights / weights.sum()
        if unit_gates:
            weights = torch.ones_like(weights)
        total = torch.zeros_like(token)
        for e, w in zip(chosen.tolist(), weights, strict=True):
            w_gate, w_up, w_down = gate_up[e, :inner], gate_up[e, inner:], down[e]
            if "gate" in lora:
                w_gate = w_gate + scaling * lora["gate"][1][e] @ lora["gate"][0][e]
            if "up" in lora:
                w_up = w_up + scaling * lora["up"][1][e] @ lora["up"][0][e]
            if "down" in lora:
                w_down = w_down + scaling * lora["down"][1][e] @ lora["down"][0][e]
            total = total + w.to(x.dtype) * (w_down @ (F.silu(w_gate @ token) * (w_up @ token)))
        outputs.append(total)
    return torch.stack(outputs)
