"""The UB-SMoE block: a sparse MoE layer over frozen experts with per-expert LoRA, DMR and PG.

It drops in where a transformers sparse MoE block sits: `forward(hidden_states)` maps (..., H) to
(..., H). The frozen router and expert tensors are held by reference (no copies). The number of
experts per token, `top_k`, is set per client (or per call) and only the chosen experts run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.moe.config import UBSMoEConfig, sparsity_factor
from ubsmoe.moe.experts import ExpertLoRA, frozen_parameter, grouped_mm_supported, swiglu_experts
from ubsmoe.moe.extensions import BlockExtension
from ubsmoe.moe.pseudo_gradient import pseudo_gradient_increment
from ubsmoe.moe.routing import range_regularizer, route


class UBSMoEBlock(nn.Module):
    """Sparse MoE block with Dynamic Modulated Routing and the universal pseudo-gradient.

    Args:
        gate_up_proj: (M, 2I, H) frozen fused gate/up expert weights.
        down_proj: (M, H, I) frozen expert down weights.
        router_weight: (M, H) router weight W_r.
        native_top_k: K_max, the model's own number of experts per token.
        config: LoRA, routing, DMR and PG settings.
        shared_expert: optional always-on module (H -> H), e.g. a MoEfied model's shared neurons.
        shared_expert_gate: optional (H -> 1) module whose sigmoid scales the shared expert (Qwen2-MoE).

    Training protocol per local step: forward, `loss + block.range_loss()`, backward, then
    `block.apply_pseudo_gradient()` before the optimizer step.
    """

    def __init__(
        self,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        router_weight: torch.Tensor,
        native_top_k: int,
        config: UBSMoEConfig | None = None,
        *,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    ) -> None:
        super().__init__()
        config = config or UBSMoEConfig()
        num_experts, double_inner, hidden = gate_up_proj.shape
        inner = double_inner // 2
        expected = {"down_proj": (num_experts, hidden, inner), "router_weight": (num_experts, hidden)}
        for name, tensor in (("down_proj", down_proj), ("router_weight", router_weight)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"{name} must have shape {expected[name]} to match gate_up_proj, got {tuple(tensor.shape)}"
                )
        if not 1 <= native_top_k <= num_experts:
            raise ValueError(f"native_top_k must be in [1, {num_experts}], got {native_top_k}")

        self.config = config
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden, inner
        self.native_top_k = native_top_k
        self.num_candidates = config.candidates_for(native_top_k, num_experts)
        self.activation = activation
        self.gate_up_proj = frozen_parameter(gate_up_proj)
        self.down_proj = frozen_parameter(down_proj)
        self.router_weight = frozen_parameter(router_weight)
        self.router_weight.requires_grad_(config.router_trainable)
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate

        parameter_dtype = torch.float32 if gate_up_proj.dtype in (torch.float16, torch.bfloat16) else gate_up_proj.dtype
        self.lora = ExpertLoRA(
            num_experts,
            hidden,
            inner,
            config.lora_rank,
            config.lora_alpha,
            config.lora_targets,
            dtype=parameter_dtype,
            device=gate_up_proj.device,
        )
        self.phi = nn.Parameter(
            torch.zeros(num_experts, dtype=torch.float32, device=gate_up_proj.device), requires_grad=config.dmr
        )
        # pieces a method attaches (`attach_extension`): shared ones, and client-local ones (never aggregated)
        self.extensions = nn.ModuleDict()
        self.local_extensions = nn.ModuleDict()
        self._top_k = native_top_k
        self.track_utilization = True
        # statistics, not model state: excluded from state_dict
        device = gate_up_proj.device
        self.register_buffer(
            "expert_counts", torch.zeros(num_experts, dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer("token_count", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        # PG routing masses in float64: sums over many tokens of small probabilities
        self.register_buffer(
            "_used_mass", torch.zeros(num_experts, dtype=torch.float64, device=device), persistent=False
        )
        self.register_buffer(
            "_scaled_missed_mass", torch.zeros(num_experts, dtype=torch.float64, device=device), persistent=False
        )

    # ---- configuration -------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        """K used by the next forward (the client's K_c)."""
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        if not isinstance(value, int) or not 1 <= value <= self.num_experts:
            raise ValueError(f"top_k must be an integer in [1, {self.num_experts}], got {value!r}")
        self._top_k = value

    @property
    def lora_on_tokens(self) -> bool:
        """Whether the LoRA projections on the hidden side run per token over all experts (see `ubsmoe.moe.experts`)."""
        choice = self.config.lora_projection
        if choice == "auto":
            return self.token_lora_by_default
        return choice == "tokens"

    token_lora_by_default = False
    """`lora_projection = "auto"`: per routed row for native MoE blocks (many experts, GPU grouped_mm)."""

    def implementation_for(self, dtype: torch.dtype) -> str:
        """The expert-matmul implementation a forward in `dtype` uses."""
        choice = self.config.implementation
        if choice != "auto":
            return choice
        sizes = (self.hidden_size, self.intermediate_size, *((self.config.lora_rank,) if self.lora.targets else ()))
        return "grouped_mm" if grouped_mm_supported(dtype, self.gate_up_proj.device, sizes) else "eager"

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_size)
        real = self.real_tokens
        if real is None or real.numel() == x.shape[0] or self.padded_tokens != x.shape[0]:
            return self.compute(x).view_as(hidden_states)
        # Padding positions are skipped: nothing reads their FFN output (they are masked as attention
        # keys and carry no label), and routing them would count padding in the utilization that DMR
        # balances and in PG's routing masses. They leave the block as zeros.
        out = x.new_zeros(x.shape)
        if real.numel():
            out = out.index_copy(0, real, self.compute(x.index_select(0, real)))
        return out.view_as(hidden_states)

    real_tokens: torch.Tensor | None = None
    """Indices of the real (non-padding) tokens among the next forward's flattened `padded_tokens`
    positions, set from the attention mask by `ubsmoe.moe.model.skip_padding`; None computes every position."""

    padded_tokens: int = 0

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output (T, H) for tokens x (T, H), every one of them routed."""
        top_k = self._top_k
        routing = route(
            x,
            self.router_weight,
            top_k,
            phi=self.phi if self.config.dmr else None,
            num_candidates=self.num_candidates,
            normalize_gates=self.config.normalize_gates,
            unit_gates=self.config.unit_gates,
        )
        flat_expert = routing.expert_index.reshape(-1)
        order = flat_expert.argsort(stable=True)
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        token_of_row = order // top_k
        lora = self.lora if self.lora.targets else None
        on_tokens = lora is not None and self.lora_on_tokens
        expert_of_row = flat_expert[order] if on_tokens else None
        rows, down_projection = swiglu_experts(
            x.index_select(0, token_of_row),  # backward is an index_add, unlike x[token_of_row]
            counts,
            self.gate_up_proj,
            self.down_proj,
            lora,
            self.implementation_for(x.dtype),
            self.activation,
            row_scale=routing.gates.reshape(-1)[order],
            lora_inputs=lora.token_inputs(x, token_of_row, expert_of_row) if on_tokens and lora.input_targets else None,
            down_lora=not on_tokens,
        )
        routed = torch.zeros_like(x).index_add_(0, token_of_row, rows.to(x.dtype))
        if down_projection is not None:
            routed = routed + lora.token_down(down_projection, token_of_row, expert_of_row, x.shape[0]).to(x.dtype)
        out = self.routed_output(routed)
        if self.training:
            for extension in self._all_extensions():
                extension.observe_routing(routing.probs, routing.expert_index)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        self._record(routing.probs, routing.expert_index, counts, top_k)
        return out

    def routed_output(self, routed: torch.Tensor) -> torch.Tensor:
        """The routed experts' output as the attached extensions change it (unchanged without any)."""
        for extension in self._all_extensions():
            routed = extension.routed_output(routed)
        return routed

    def attach_extension(self, name: str, extension: BlockExtension) -> None:
        """Attach a method's piece (`ubsmoe.moe.extensions`), on this block's device."""
        extension = extension.to(self.phi.device)
        (self.local_extensions if extension.client_local else self.extensions)[name] = extension

    def _all_extensions(self) -> list[BlockExtension]:
        return [*self.extensions.values(), *self.local_extensions.values()]

    @torch.no_grad()
    def _record(self, probs: torch.Tensor, expert_index: torch.Tensor, counts: torch.Tensor, top_k: int) -> None:
        if self.track_utilization:
            self.expert_counts += counts
            self.token_count += probs.shape[0]
        if self.training and self.config.pseudo_gradient and self.lora.targets:
            probs = probs.to(self._used_mass.dtype)
            used = torch.zeros_like(self._used_mass).index_add_(
                0, expert_index.reshape(-1), probs.gather(1, expert_index).reshape(-1)
            )
            missed = probs.sum(0) - used
            rho = sparsity_factor(self.num_experts, top_k, self.config.pg_rho_form)
            self._used_mass += used
            self._scaled_missed_mass += rho * missed

    @torch.no_grad()
    def record_all_selected(self, tokens: int, probs: torch.Tensor | None = None) -> None:
        """Statistics of a forward in which every expert was active for every token (no missed mass).

        For subclasses with a dense path at K = M; `probs` (T, M) are the routing probabilities, needed
        only for PG's used mass in training.
        """
        if self.track_utilization:
            self.expert_counts += tokens
            self.token_count += tokens
        if probs is not None and self.training and self.config.pseudo_gradient and self.lora.targets:
            self._used_mass += probs.to(self._used_mass.dtype).sum(0)

    # ---- training hooks ------------------------------------------------------------------------
    def range_loss(self) -> torch.Tensor:
        """DMR range regulariser on phi (zero when DMR is off or phi is inside its range)."""
        if not self.config.dmr:
            return self.phi.new_zeros(())
        c = self.config
        return range_regularizer(self.phi, c.phi_min, c.phi_max, c.range_lambda)

    def aux_loss(self) -> torch.Tensor:
        """The attached extensions' loss terms of the last training forward, then forgotten (0 without any)."""
        terms = [t for t in (e.aux_loss() for e in self._all_extensions()) if t is not None]
        return torch.stack(terms).sum() if terms else self.phi.new_zeros(())

    @torch.no_grad()
    def apply_pseudo_gradient(self) -> None:
        """Add the universal pseudo-gradient to the expert-LoRA gradients, then clear the step's masses.

        Call after backward and before the optimizer step; a no-op when PG is off, acts in update
        space (`pg_space = "update"`: see `adapters_before_step`), or nothing was recorded (eval mode).
        """
        if not self.config.pseudo_gradient or self.config.pg_space != "gradient":
            return
        for parameter in self.lora.adapter_parameters():
            if parameter.grad is not None:
                self._add_increment(parameter.grad, parameter.grad.sum(dim=0))
        self.clear_pseudo_gradient_masses()

    def _add_increment(self, tensor: torch.Tensor, summed: torch.Tensor) -> None:
        increment = pseudo_gradient_increment(summed, self._used_mass, self._scaled_missed_mass, self.config.pg_kappa)
        if increment is not None:
            tensor.add_(increment)

    @torch.no_grad()
    def adapters_before_step(self) -> list[torch.Tensor] | None:
        """Each expert-LoRA tensor summed over the experts, before the optimizer step, when PG acts in update
        space (else None).

        Update space: the optimizer steps on the real gradients only; `apply_pseudo_update(before)` then
        adds kappa * (rho_c * q_i) * u_bar to every expert, u_bar = (sum_j Delta_j) / (sum_j mu_j) built
        from the experts' actual updates Delta_j, so Adam's per-coordinate normalisation cannot rescale it.
        sum_j Delta_j is the experts' sum after the step minus this one, so one expert's worth of memory is
        kept instead of a copy of every adapter (the adapters are float32 at least, see __init__, so the
        difference of two sums keeps the update's digits: ~1e-7 relative to weights of ~0.1).
        """
        if not (self.config.pseudo_gradient and self.config.pg_space == "update" and self.lora.targets):
            return None
        return [parameter.detach().sum(dim=0) for parameter in self.lora.adapter_parameters()]

    @torch.no_grad()
    def apply_pseudo_update(self, before: list[torch.Tensor] | None) -> None:
        """After the optimizer step: the pseudo-update in update space (see `adapters_before_step`), then
        clear the step's masses; a no-op for `before = None`."""
        if before is None:
            return
        for parameter, summed_before in zip(self.lora.adapter_parameters(), before, strict=True):
            self._add_increment(parameter, parameter.sum(dim=0) - summed_before)
        self.clear_pseudo_gradient_masses()

    @torch.no_grad()
    def clear_pseudo_gradient_masses(self) -> None:
        """Forget the routing masses recorded since the last step (stale ones from evaluation or an aborted step)."""
        self._used_mass.zero_()
        self._scaled_missed_mass.zero_()

    # ---- statistics ----------------------------------------------------------------------------
    def utilization(self) -> dict[str, torch.Tensor]:
        """Activation counts a_i per expert and the number n of tokens routed, since the last reset."""
        return {"counts": self.expert_counts.detach().cpu().clone(), "tokens": self.token_count.detach().cpu().clone()}

    def reset_utilization(self) -> None:
        self.expert_counts.zero_()
        self.token_count.zero_()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Expert LoRA and phi (and the router where configured), by name."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
            f"top_k={self.top_k}/{self.native_top_k}, candidates={self.num_candidates}, lora_rank={c.lora_rank}, "
            f"dmr={c.dmr}, pseudo_gradient={c.pseudo_gradient}, implementation={c.implementation}"
        )
