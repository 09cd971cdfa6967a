"""`Method`: what a federated fine-tuning method is to the rest of the package.

A method decides, on the server, what each sampled client starts from and how the replies become the
next global state; on the client, what it adds to the loss, what it does after each optimizer step
and what it reports. Everything else (loading the model, data, the round's bookkeeping, DMR's update
of phi, checkpoints, evaluation, the Flower transport) is shared and calls these hooks, so a method
lives in one module. The base class is the plain heterogeneous-K method: each client runs at
K_c = floor(K_max beta_c), trains the expert LoRA, and the server averages the deltas (FedAvg) —
that is SMoE-naive; UB-SMoE switches on DMR and the pseudo-gradient (`uses_*` flags), and each
baseline overrides the hooks it changes.

Class attributes describe the method to the configuration (no model needed); instance fields are its
hyper-parameters (`from_config` fills them: `seed` and the LoRA `scaling` for everyone, the rest from
`options(config)`, by default the config's `method_options`). Hooks are pure over the payloads of
`ubsmoe.fl.payload` (`GlobalState`, `ClientUpdate`) unless they say otherwise; the state a method
keeps between rounds is `GlobalState.method_state`, a dict of tensors (so checkpoints and Flower
records carry it unchanged), read and written only by the method's own module.

Client-local tensors (the parameters of client-local block extensions, `ubsmoe.fl.payload.is_local_key`)
are handled here for every method: the server stores each client's under `local.<client>.<key>` and
hands them back in `client_start`; a tier is evaluated with the mean of its clients' (`tier_view`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ubsmoe.fl.payload import ClientUpdate, GlobalState
from ubsmoe.methods.fedavg import fedavg
from ubsmoe.moe.extensions import BlockExtension

if TYPE_CHECKING:
    from ubsmoe.config import ExperimentConfig
    from ubsmoe.fl.server import Assignment

__all__ = ["Aggregate", "Method", "MethodOptionsError"]

_LOCAL = "local."
_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}
"""Option types `options` checks (a field annotated otherwise is passed as given)."""


class MethodOptionsError(ValueError):
    """`method_options` that the method does not take (the message names them and the ones it takes)."""


@dataclass
class Aggregate:
    """A round's result under a method: the new adapters, the new method state, and what to report."""

    adapters: dict[str, torch.Tensor]
    method_state: dict[str, torch.Tensor]
    report: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """Heterogeneous K_c, FedAvg of the expert LoRA (SMoE-naive); see the module docstring for the hooks."""

    # ---- what the configuration needs to know (class attributes) --------------------------------
    top_k_from_budget: ClassVar[bool] = True
    """K_c = max(1, floor(K_max beta_c)); False: every client runs at K_max."""
    rank_from_budget: ClassVar[bool] = False
    """r_c = max(1, round(r beta_c)): the budget sets the LoRA rank (the client trains the first r_c
    components of the rank-r pair, the rest stay zero)."""
    uses_dmr: ClassVar[bool] = False
    """Dynamic Modulated Routing (when `dmr.enabled`): phi is learned and aggregated by DMR's rule."""
    uses_pseudo_gradient: ClassVar[bool] = False
    """The universal pseudo-gradient for inactive experts (when `pseudo_gradient.enabled`)."""
    uses_range_regulariser: ClassVar[bool] = False
    """DMR's range regulariser on phi (only with DMR)."""
    peft_export_refusal: ClassVar[str | None] = None
    """Why the run's adapters cannot be exported for peft (None: they can)."""

    # ---- hyper-parameters (instance fields) ------------------------------------------------------
    seed: int = 0
    scaling: float = 2.0
    """s = alpha / r, the LoRA scaling every rank shares."""

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> Method:
        return cls(seed=config.seed, scaling=config.lora.alpha / config.lora.rank, **cls.options(config))

    @classmethod
    def options(cls, config: ExperimentConfig) -> dict[str, Any]:
        """The method's own hyper-parameters from a configuration: by default its `method_options`,
        checked against the method's fields (MethodOptionsError names what it does not take)."""
        given = dict(config.method_options)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("seed", "scaling")}
        unknown = sorted(set(given) - set(fields))
        if unknown:
            takes = ", ".join(fields) if fields else "no options"
            raise MethodOptionsError(f"method {config.method} does not take {', '.join(unknown)} (it takes {takes})")
        for name, value in given.items():
            wanted = _SIMPLE_TYPES.get(str(fields[name].type))
            if wanted is not None and (isinstance(value, bool) != (wanted == (bool,)) or not isinstance(value, wanted)):
                raise MethodOptionsError(
                    f"method {config.method}: option {name} = {value!r} must be {fields[name].type}"
                )
        return given

    @classmethod
    def block_extensions(cls, config: ExperimentConfig) -> dict[str, Callable[[], BlockExtension]]:
        """Pieces this method attaches to every MoE block, by name: a factory each (`ubsmoe.moe.extensions`;
        e.g. SMoE-LLB's load-balancing loss, A3SMoE's client-local output scale)."""
        return {}

    # ---- server: before the round ---------------------------------------------------------------
    def initial_state(self, client_ranks: Sequence[int]) -> dict[str, torch.Tensor]:
        """The method state before round 0."""
        return {}

    def client_rank(self, state: GlobalState, client: int, configured: int) -> int | None:
        """The LoRA rank client `client` trains at this round (None: the full rank, no rank method)."""
        return None

    def client_start(self, state: GlobalState, rank: int | None, client: Any) -> GlobalState:
        """The state client `client` starts its round from: the adapters, phi, and its own local tensors.

        Deterministic in (self, state, rank, client): the server recomputes it to read an update's deltas.
        """
        adapters = {k: v.clone() for k, v in state.adapters.items()}
        prefix = f"{_LOCAL}{client}."
        local = {k[len(prefix) :]: v.clone() for k, v in state.method_state.items() if k.startswith(prefix)}
        return GlobalState(adapters=adapters, phi=state.phi.clone(), round=state.round, method_state=local)

    def sent_state(self, state: GlobalState) -> dict[str, torch.Tensor]:
        """The part of the method state every client is sent with its start (clients' local tensors
        stay with the client that owns them)."""
        return {}

    def sent_tensors(self, state: GlobalState, rank: int | None) -> list[torch.Tensor]:
        """The adapter tensors the server really sends a client (for the byte counts)."""
        return list(state.adapters.values())

    # ---- client ---------------------------------------------------------------------------------
    def extra_loss(
        self, adapters: Mapping[str, torch.Tensor], rank: int | None, start: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """A term added to the client's loss at every step (None: nothing). `adapters` are the live
        parameters, `start` their values at the round's start (CPU tensors, the same keys)."""
        return None

    def after_step(self, adapters: Mapping[str, torch.Tensor], rank: int | None) -> None:
        """Called after every optimizer step with the live adapter parameters (in place)."""

    def client_report(self, adapters: Mapping[str, torch.Tensor], rank: int | None) -> dict[str, float]:
        """Numbers the client adds to its update's metrics after training (read back in `aggregate`)."""
        return {}

    def uploaded_tensors(self, update: ClientUpdate) -> list[torch.Tensor]:
        """The adapter tensors a client really uploads (for the byte counts)."""
        return list(update.adapter_deltas.values())

    # ---- server: after the round ----------------------------------------------------------------
    def update_problem(self, update: ClientUpdate, state: GlobalState, assignment: Assignment | None) -> str | None:
        """Why an otherwise well-formed update does not fit this method (None: it does)."""
        return None

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> Aggregate:
        """The new adapters and method state from one round's accepted updates: FedAvg of the deltas."""
        averaged = fedavg([u.adapter_deltas for u in updates], [float(u.num_examples) for u in updates])
        adapters = {k: v + averaged[k].to(v.dtype) for k, v in state.adapters.items()}
        return Aggregate(adapters, self.keep_local_state(state, updates))

    @staticmethod
    def keep_local_state(state: GlobalState, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """The method state with each client's local tensors (`ClientUpdate.local_state`) kept for it."""
        method_state = {k: v.clone() for k, v in state.method_state.items()}
        for update in updates:
            for key, value in update.local_state.items():
                method_state[f"{_LOCAL}{update.client_id}.{key}"] = value.detach().cpu().clone()
        return method_state

    def tier_view(self, state: GlobalState, rank: int | None, clients: Sequence[int]) -> GlobalState:
        """The model a tier is evaluated with: what its clients hold after the round (their local
        tensors averaged; a client without any yet contributes none)."""
        adapters = {k: v.clone() for k, v in state.adapters.items()}
        local: dict[str, torch.Tensor] = {}
        for client in clients:
            prefix = f"{_LOCAL}{client}."
            for key, value in state.method_state.items():
                if key.startswith(prefix):
                    name = key[len(prefix) :]
                    local[name] = local.get(name, 0) + value.double() / len(clients)
        return GlobalState(adapters=adapters, phi=state.phi.clone(), round=state.round, method_state=local)

    def base_merger(self, model: nn.Module) -> Any | None:
        """An object whose `apply(state)` rebuilds the frozen base from the method state before a
        client trains or a tier is evaluated (FLoRA/FLoRIST merge into the base); None: no merging."""
        return None


def budget_top_k(k_max: int, budget: float) -> int:
    """K_c = max(1, floor(K_max beta_c)) (the tolerance keeps 0.75 * 8 at 6 despite rounding)."""
    return max(1, math.floor(k_max * budget + 1e-9))
