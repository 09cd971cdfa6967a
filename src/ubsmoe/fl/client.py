"""One client's local round (DESIGN 2.2 steps 5-6, 2.3, 2.4) as a function over plain payloads.

`client_update(model, global_state, batches, top_k, settings, client_id)`:

1. loads the global adapters and phi into `model` (overwriting whatever it held: the model is a
   work buffer that the next call overwrites again; nothing in the returned update refers to it);
2. sets K_c (`set_top_k`), clears the utilization counters and any stale pseudo-gradient masses;
3. trains `local_steps` steps, cycling over `batches`, with a fresh AdamW (or SGD) over the
   parameters with `requires_grad`: loss = LM loss over the answer tokens (`answer_loss`: the LM
   head runs only where a label is) + `range_loss(model)`,
   backward, `apply_pseudo_gradients(model)` (PG in gradient space), gradient-norm clipping, step,
   `apply_pseudo_updates` (PG in update space, `pseudo_gradient.space = update`);
4. returns a `ClientUpdate`: adapter deltas (local minus global), phi, the counts and tokens of the
   round, num_examples, K_c and metrics, all as detached CPU copies.

Learning rate (FlowerTune-like per-round cosine): constant within a round; round r (0-based, from
`GlobalState.round` unless `ClientSettings.round` is set) of R uses
    lr_r = min_lr + (lr - min_lr) * (1 + cos(pi * r / (R - 1))) / 2,
so the first round trains at `lr` and the last at `min_lr` (R = 1: `lr`). schedule "constant" keeps `lr`.
The optimizer state is not kept across rounds (a new optimizer each round, as in FlowerTune).

num_examples: the number of distinct examples trained on. When the steps cover less than one pass
over `batches` it is the number of examples processed; once the batches are cycled it is the size
of one pass (so repeating a small local set does not inflate its FedAvg weight). Pass
`num_examples=` to set it explicitly (e.g. to |D_c|). `metrics["examples_processed"]` counts repeats.

Batches: an iterable of dicts of tensors as made by `ubsmoe.data.prompts.collate` (`input_ids`,
`attention_mask`, `labels`). A re-iterable (list, DataLoader) is iterated again when it runs out
(a shuffling DataLoader reshuffles); a one-shot iterator is cached during its first pass and replayed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ubsmoe.fl.payload import ClientUpdate, GlobalState, adapter_parameters, load_global_state, local_parameters
from ubsmoe.models.answer_loss import answer_loss
from ubsmoe.moe import (
    adapters_before_step,
    apply_pseudo_gradients,
    apply_pseudo_updates,
    aux_loss,
    clear_pseudo_gradient_masses,
    collect_utilization,
    get_phi,
    model_device,
    range_loss,
    reset_utilization,
    set_top_k,
    uses_pseudo_updates,
)

if TYPE_CHECKING:
    from ubsmoe.config import ExperimentConfig
    from ubsmoe.methods import Method

__all__ = ["ClientSettings", "client_update", "round_lr"]


@dataclass(frozen=True)
class ClientSettings:
    """Local-training settings of one round (`from_config` reads them from an ExperimentConfig)."""

    lr: float = 2e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    local_steps: int = 10
    total_rounds: int = 1
    schedule: Literal["cosine", "constant"] = "cosine"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    round: int | None = None
    """0-based round index for the schedule; None = `GlobalState.round`."""

    def __post_init__(self) -> None:
        problems = []
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr = {self.lr}: must be a finite number > 0")
        if not (0 <= self.min_lr <= self.lr):
            problems.append(f"min_lr = {self.min_lr}: must be in [0, lr]")
        if self.weight_decay < 0:
            problems.append(f"weight_decay = {self.weight_decay}: must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip = {self.grad_clip}: must be > 0 or None")
        if not (isinstance(self.local_steps, int) and self.local_steps >= 1):
            problems.append(f"local_steps = {self.local_steps}: must be an integer >= 1")
        if not (isinstance(self.total_rounds, int) and self.total_rounds >= 1):
            problems.append(f"total_rounds = {self.total_rounds}: must be an integer >= 1")
        if self.schedule not in ("cosine", "constant"):
            problems.append(f"schedule = {self.schedule!r}: must be 'cosine' or 'constant'")
        if self.optimizer not in ("adamw", "sgd"):
            problems.append(f"optimizer = {self.optimizer!r}: must be 'adamw' or 'sgd'")
        if problems:
            raise ValueError("\n".join(problems))

    @classmethod
    def from_config(cls, config: ExperimentConfig, round: int | None = None) -> ClientSettings:
        """federation.optimizer.*, federation.local_steps and federation.rounds of an ExperimentConfig."""
        opt = config.federation.optimizer
        return cls(
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            grad_clip=opt.grad_clip,
            local_steps=config.federation.local_steps,
            total_rounds=config.federation.rounds,
            schedule=opt.schedule,
            optimizer=opt.name,
            round=round,
        )


def round_lr(lr: float, min_lr: float, round: int, total_rounds: int, schedule: str = "cosine") -> float:
    """The learning rate of 0-based round `round` of `total_rounds` (see the module docstring)."""
    if schedule == "constant" or total_rounds <= 1:
        return lr
    progress = min(max(round, 0), total_rounds - 1) / (total_rounds - 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Cycle:
    """Endless iteration over batches; counts the examples of one pass once it wraps."""

    def __init__(self, batches: Iterable[Any]):
        self._source = batches
        self._iterator: Iterator[Any] = iter(batches)  # once: a DataLoader starts its workers per iter()
        self._one_shot = self._iterator is batches
        self._cache: list[Any] = []
        self.wrapped = False
        self.pass_examples = 0

    def __next__(self) -> Any:
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.wrapped is False and self.pass_examples == 0:
                raise ValueError("client_update got no batches to train on") from None
            self.wrapped = True
            self._iterator = iter(self._cache) if self._one_shot else iter(self._source)
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError("the batches were empty when iterated again; pass a list or a DataLoader") from None
        if not self.wrapped:
            self.pass_examples += _batch_size(batch)
            if self._one_shot:
                self._cache.append(batch)
        return batch


def _batch_size(batch: Any) -> int:
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor):
        raise ValueError("every batch must be a dict with an 'input_ids' tensor (see ubsmoe.data.prompts.collate)")
    return int(batch["input_ids"].shape[0])


def _adamw(parameters: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel where it runs (about 5x faster per step than the per-tensor loop on a
    CPU, over the hundreds of small adapter tensors of a model), else the default implementation."""
    fusable = bool(parameters) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters)
    if fusable:
        try:
            return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)


def client_update(
    model: nn.Module,
    global_state: GlobalState,
    batches: Iterable[dict[str, torch.Tensor]],
    top_k: int,
    settings: ClientSettings | ExperimentConfig,
    client_id: str | int,
    *,
    num_examples: int | None = None,
    on_step: Callable[[int], None] | None = None,
    method: Method | None = None,
    rank: int | None = None,
) -> ClientUpdate:
    """Train `model` from `global_state` for one local round at K_c = `top_k`; see the module docstring.

    `on_step(n)` is called after the n-th local step (for progress bars). The method (`ubsmoe.methods`;
    default the base method, which adds nothing) contributes its `extra_loss`, its `after_step` and its
    `client_report`; `rank` is the LoRA rank the server assigned (None: the full rank). The client's
    local tensors (a client-local block extension's, e.g. A3SMoE's output scales) come in through
    `global_state.method_state` (ones when absent) and go back in `ClientUpdate.local_state`. The
    blocks' extension losses (e.g. SMoE-LLB's load balancing) come from the blocks (`aux_loss`).
    """
    if method is None:
        from ubsmoe.methods.base import Method

        method = Method()
    if not isinstance(settings, ClientSettings):
        settings = ClientSettings.from_config(settings)
    round_index = global_state.round if settings.round is None else settings.round
    lr = round_lr(settings.lr, settings.min_lr, round_index, settings.total_rounds, settings.schedule)

    load_global_state(model, global_state)
    local = local_parameters(model)
    with torch.no_grad():
        for key, parameter in local.items():
            parameter.copy_(global_state.method_state.get(key, torch.ones_like(parameter)))
    set_top_k(model, top_k)
    reset_utilization(model)
    was_training = model.training
    model.train()
    device = model_device(model)

    parameters = [p for p in model.parameters() if p.requires_grad]
    adapters = adapter_parameters(model)
    if settings.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = _adamw(parameters, lr, settings.weight_decay)
    else:
        optimizer = torch.optim.SGD(parameters, lr=lr, weight_decay=settings.weight_decay)
    optimizer.zero_grad(set_to_none=True)
    clear_pseudo_gradient_masses(model)  # stale masses of forwards outside this round
    pseudo_updates = uses_pseudo_updates(model)  # decided once: the default step takes no adapter snapshot

    cycle = _Cycle(batches)
    losses: list[float] = []
    lm_losses: list[float] = []
    processed = 0
    tokens = 0  # real (unpadded) tokens trained on, for FLOPs per round
    start = time.perf_counter()
    try:
        for _ in range(settings.local_steps):
            batch = next(cycle)
            processed += _batch_size(batch)
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if isinstance(mask, torch.Tensor) else batch["input_ids"].numel()
            if not isinstance(batch.get("labels"), torch.Tensor):
                raise ValueError("every batch needs 'labels' (the answer tokens; -100 elsewhere)")
            mask = mask.to(device) if isinstance(mask, torch.Tensor) else None
            lm_loss = answer_loss(model, batch["input_ids"].to(device), batch["labels"].to(device), mask).loss
            loss = lm_loss + range_loss(model).to(lm_loss.device) + aux_loss(model).to(lm_loss.device)
            extra = method.extra_loss(adapters, rank, global_state.adapters)
            if extra is not None:
                loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            apply_pseudo_gradients(model)  # PG in gradient space (the paper's form)
            if settings.grad_clip is not None and parameters:
                torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
            before = adapters_before_step(model) if pseudo_updates else None
            optimizer.step()
            if before is not None:  # PG in update space (pseudo_gradient.space = update)
                apply_pseudo_updates(model, before)
            method.after_step(adapters, rank)
            losses.append(float(loss.detach()))
            lm_losses.append(float(lm_loss.detach()))
            if on_step is not None:
                on_step(len(losses))
    finally:
        elapsed = time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)

    with torch.no_grad():
        deltas = {
            key: parameter.detach().to("cpu", dtype=global_state.adapters[key].dtype, copy=True)
            - global_state.adapters[key]
            for key, parameter in adapters.items()
        }
        local_state = {key: parameter.detach().to("cpu", copy=True) for key, parameter in local.items()}
    utilization = collect_utilization(model)
    distinct = cycle.pass_examples if cycle.wrapped else processed
    steps = len(losses)
    metrics = {
        "train_loss": sum(losses) / steps,
        "train_lm_loss": sum(lm_losses) / steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "step_time_s": elapsed / steps,
        "lr": lr,
        "local_steps": float(steps),
        "examples_processed": float(processed),
        "tokens_processed": float(tokens),
    }
    if rank is not None:
        metrics["rank"] = float(rank)
    metrics.update(method.client_report(adapters, rank))
    return ClientUpdate(
        client_id=client_id,
        adapter_deltas=deltas,
        phi=get_phi(model).cpu().to(global_state.phi.dtype),
        counts=utilization["counts"],
        tokens=utilization["tokens"],
        num_examples=int(num_examples) if num_examples is not None else distinct,
        top_k=top_k,
        metrics=metrics,
        rank=rank,
        local_state=local_state,
    )
