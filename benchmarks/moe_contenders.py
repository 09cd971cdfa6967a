"""The contenders of the MoE-layer benchmarks, built in one place (moe_block.py on a CPU, gpu_check.py on a GPU).

- `hf_olmoe_block`: transformers' `OlmoeSparseMoeBlock` with random frozen weights and peft `target_parameters`
  LoRA on its fused experts (`experts.gate_up_proj`, `experts.down_proj`), what a transformers + peft user runs;
- `ubsmoe_block`: a UB-SMoE block over the very same frozen router and expert tensors (no copies);
- `hf_step` / `ub_step`: one training step of each (forward, backward of a fixed output gradient, the
  pseudo-gradient for UB-SMoE, zeroing the gradients);
- `copy_peft_lora`: peft's LoRA factors written into UB-SMoE blocks (gate and up share peft's fused A), so both
  compute the same function;
- `analytic_step_flops`: the matmul FLOPs of one UB-SMoE step; `environment`: the machine and versions.

Benchmarks import this module by path (`benchmarks/` is not a package): scripts run from anywhere find it beside
themselves.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ubsmoe.moe import UBSMoEBlock, UBSMoEConfig

FLOPS_FORMULA = "T * (4*M*H + K * (12*H*I + 18*r*(H+I)))"
"""Matmul FLOPs of one UB-SMoE training step (forward + backward) over T tokens, per `analytic_step_flops`."""


class Wrapper(nn.Module):
    """peft wants a model around the block."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.mlp = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


@dataclass
class HFContender:
    """transformers' OLMoE block (`wrapper.mlp`) under peft LoRA (`peft_model`), and its frozen tensors."""

    config: Any  # OlmoeConfig; its `_experts_implementation` is read by the experts at every forward
    wrapper: Wrapper
    peft_model: nn.Module
    experts: nn.Module  # the OlmoeExperts under peft's ParamWrappers: gate_up_proj (M, 2I, H), down_proj (M, H, I)

    @property
    def router_weight(self) -> torch.Tensor:
        return self.wrapper.mlp.gate.weight


def hf_olmoe_block(
    hidden: int,
    intermediate: int,
    experts: int,
    top_k: int,
    rank: int,
    alpha: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    init_std: float = 0.02,
) -> HFContender:
    """An `OlmoeSparseMoeBlock` (weights ~ N(0, init_std), OLMoE's initialiser) with peft LoRA on its experts."""
    import peft
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    config = OlmoeConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=False,
    )
    wrapper = Wrapper(OlmoeSparseMoeBlock(config)).to(device=device, dtype=dtype)
    with torch.no_grad():
        for parameter in wrapper.parameters():
            parameter.normal_(0.0, init_std)
    lora_config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    peft_model = peft.get_peft_model(wrapper, lora_config)
    base_experts = wrapper.mlp.experts.get_base_layer()  # the OlmoeExperts under both ParamWrappers
    return HFContender(config, wrapper, peft_model, base_experts)


def ubsmoe_block(hf: HFContender, rank: int, alpha: float, implementation: str = "auto", **changes: Any) -> UBSMoEBlock:
    """A UB-SMoE block over `hf`'s frozen router and expert tensors (held by reference)."""
    return UBSMoEBlock(
        hf.experts.gate_up_proj,
        hf.experts.down_proj,
        hf.router_weight,
        hf.config.num_experts_per_tok,
        UBSMoEConfig(lora_rank=rank, lora_alpha=alpha, implementation=implementation, **changes),
    )


def only_adapters_train(module: nn.Module) -> bool:
    """Whether LoRA (and UB-SMoE's phi) are the only trainable parameters."""
    return all("lora" in name or name == "phi" for name, p in module.named_parameters() if p.requires_grad)


def hf_step(hf: HFContender, x: torch.Tensor, grad_out: torch.Tensor, k: int, implementation: str) -> None:
    """One transformers + peft training step at top-k `k` with the experts kernel `implementation`."""
    hf.config._experts_implementation = implementation  # read by the experts forward at every call
    hf.wrapper.mlp.gate.top_k = k
    hf.peft_model(x).backward(grad_out)
    hf.peft_model.zero_grad(set_to_none=True)
    x.grad = None


def ub_step(block: UBSMoEBlock, x: torch.Tensor, grad_out: torch.Tensor, k: int) -> None:
    """One UB-SMoE training step at K = `k`: forward, backward, pseudo-gradient, zeroed gradients."""
    block.top_k = k
    block(x).backward(grad_out)
    block.apply_pseudo_gradient()
    block.zero_grad(set_to_none=True)
    x.grad = None


def copy_peft_lora(hf: HFContender, blocks: list[UBSMoEBlock], b_std: float = 0.02) -> None:
    """Draw peft's LoRA B ~ N(0, b_std) and write peft's factors into `blocks` (gate and up share peft's A)."""
    import peft

    inner = hf.experts.down_proj.shape[-1]
    with torch.no_grad():
        wrappers = {
            w.parameter_name: w for w in hf.peft_model.modules() if isinstance(w, peft.tuners.lora.ParamWrapper)
        }
        for w in wrappers.values():
            w.lora_B["default"].weight.normal_(0.0, b_std)
        factors = {name: w.get_delta_factors("default")[:2] for name, w in wrappers.items()}  # B (M,out,r), A (M,r,in)
        (b_gu, a_gu), (b_d, a_d) = factors["gate_up_proj"], factors["down_proj"]
        for block in blocks:
            for target, a, b in (("gate", a_gu, b_gu[:, :inner]), ("up", a_gu, b_gu[:, inner:]), ("down", a_d, b_d)):
                block.lora.lora_A[target].copy_(a)
                block.lora.lora_B[target].copy_(b)


def analytic_step_flops(tokens: int, hidden: int, intermediate: int, experts: int, k: int, rank: int) -> int:
    """`FLOPS_FORMULA`: router (forward + input gradient), K experts' SwiGLU and their rank-r LoRA, per token."""
    return tokens * (4 * experts * hidden + k * (12 * hidden * intermediate + 18 * rank * (hidden + intermediate)))


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """The machine and the versions a benchmark ran with (the GPU's name and memory where `device` is CUDA)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "ubsmoe": _version("ubsmoe"),
        "cuda_available": torch.cuda.is_available(),
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = os.getloadavg()
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    return info
