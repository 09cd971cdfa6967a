"""UB-SMoE layer: routing with DMR, experts with per-expert LoRA, the pseudo-gradient, statistics.

Depends on torch only.
"""

from ubsmoe.moe.block import UBSMoEBlock
from ubsmoe.moe.config import UBSMoEConfig, budget_to_top_k, sparsity_factor
from ubsmoe.moe.dmr import dmr_target, dmr_update, global_utilization, mean_top_k
from ubsmoe.moe.experts import ExpertLoRA, SwiGLU, experts_from_dense, swiglu_experts
from ubsmoe.moe.extensions import BlockExtension
from ubsmoe.moe.model import (
    adapters_before_step,
    apply_pseudo_gradients,
    apply_pseudo_updates,
    attach_extensions,
    aux_loss,
    clear_pseudo_gradient_masses,
    collect_utilization,
    get_phi,
    model_device,
    moe_blocks,
    range_loss,
    reset_utilization,
    set_phi,
    set_top_k,
    skip_padding,
    uses_pseudo_updates,
)
from ubsmoe.moe.pseudo_gradient import pseudo_gradient_increment
from ubsmoe.moe.routing import Routing, modulated_logits, range_regularizer, route
from ubsmoe.moe.stats import dead_experts, utilization_cv

__all__ = [
    "BlockExtension",
    "ExpertLoRA",
    "Routing",
    "SwiGLU",
    "UBSMoEBlock",
    "UBSMoEConfig",
    "adapters_before_step",
    "apply_pseudo_gradients",
    "apply_pseudo_updates",
    "attach_extensions",
    "aux_loss",
    "budget_to_top_k",
    "clear_pseudo_gradient_masses",
    "collect_utilization",
    "dead_experts",
    "dmr_target",
    "dmr_update",
    "experts_from_dense",
    "get_phi",
    "global_utilization",
    "mean_top_k",
    "modulated_logits",
    "moe_blocks",
    "pseudo_gradient_increment",
    "range_loss",
    "range_regularizer",
    "reset_utilization",
    "route",
    "set_phi",
    "model_device",
    "set_top_k",
    "skip_padding",
    "uses_pseudo_updates",
    "sparsity_factor",
    "swiglu_experts",
    "utilization_cv",
]
