"""A self-contained demonstration of the UB-SMoE block in a small synthetic federation.

One sparse MoE layer with OLMoE's proportions (64 experts, native top-8) scaled down to run on a
laptop CPU in about a minute, and a deliberately skewed router. Four clients, one per budget tier
(beta = 0.25 / 0.5 / 0.75 / 1.0, so K = 2 / 4 / 6 / 8), each with its own input distribution, learn
per-expert LoRA adapters (and phi) that make the layer match a teacher: the same frozen experts with
a hidden LoRA update, mixing all experts (K = M). Clients train with `ubsmoe.fl.client_update` and the
server aggregates with `ubsmoe.fl.aggregate_round` (FedAvg, DMR), the same code as the simulation. The same federation runs twice: UB-SMoE (DMR + range regulariser + PG) and
SMoE-naive (plain Top-K, neither mechanism), and the demo reports, per tier and method, the held-out
loss relative to the untrained layer, the measured training FLOPs per token, and expert balance.

It is synthetic: it shows the mechanisms at work, not the accuracy of a fine-tuned language model.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ubsmoe.fl import ClientSettings, aggregate_round, client_update, global_state_from_model, load_global_state
from ubsmoe.moe import UBSMoEBlock, UBSMoEConfig, budget_to_top_k


@dataclass(frozen=True)
class DemoSettings:
    experts: int = 64
    native_top_k: int = 8
    hidden: int = 64
    intermediate: int = 32
    lora_rank: int = 4
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    rounds: int = 10
    local_steps: int = 10
    batch: int = 128
    lr: float = 2e-2
    router_skew: float = 2.0
    seed: int = 0


@dataclass
class Federation:
    """The shared frozen layer plus each client's data; built once, reused by every method."""

    base: UBSMoEBlock
    teacher: UBSMoEBlock
    train: list[torch.Tensor]
    test: list[torch.Tensor]
    top_ks: list[int]


def build_federation(s: DemoSettings) -> Federation:
    gen = torch.Generator().manual_seed(s.seed)
    M, H, I = s.experts, s.hidden, s.intermediate
    gate_up = torch.randn(M, 2 * I, H, generator=gen) / H**0.5
    down = torch.randn(M, H, I, generator=gen) / I**0.5
    router = torch.randn(M, H, generator=gen) / H**0.5
    # skew: feature 0 (always 1) adds a bias that favours low-numbered experts
    router[:, 0] = torch.linspace(s.router_skew, -s.router_skew, M)
    config = UBSMoEConfig(lora_rank=s.lora_rank, lora_alpha=2.0 * s.lora_rank)
    base = UBSMoEBlock(gate_up, down, router, s.native_top_k, config)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for p in teacher.lora.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def client_data(shift: torch.Tensor, n: int) -> torch.Tensor:
        x = torch.randn(n, H, generator=gen) + shift
        x[:, 0] = 1.0
        return x

    shifts = [torch.randn(H, generator=gen) * 0.5 for _ in s.budgets]
    train = [client_data(shift, s.batch * s.local_steps) for shift in shifts]
    test = [client_data(shift, 512) for shift in shifts]
    top_ks = [budget_to_top_k(b, s.native_top_k) for b in s.budgets]
    return Federation(base, teacher, train, test, top_ks)


def _targets(fed: Federation, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        fed.teacher.top_k = fed.teacher.num_experts
        return fed.teacher(x)


def _loss(block: UBSMoEBlock, fed: Federation, x: torch.Tensor, top_k: int) -> float:
    block.top_k = top_k
    block.eval()
    with torch.no_grad():
        return F.mse_loss(block(x), _targets(fed, x)).item()


def training_flops_per_token(block: UBSMoEBlock, x: torch.Tensor, top_k: int) -> float:
    """Measured FLOPs of one forward + backward (+ PG) divided by the number of tokens."""
    block.top_k = top_k
    block.train()
    with FlopCounterMode(display=False) as counter:
        block(x).square().mean().backward()
        block.apply_pseudo_gradient()
    block.zero_grad(set_to_none=True)
    block.reset_utilization()
    return counter.get_total_flops() / x.shape[0]


class _RegressionTask(nn.Module):
    """The block as a model the federated client step trains: `model(input_ids=x, labels=y).loss` is the MSE.

    (`input_ids` carries the layer's float inputs; the client step reads it only for the batch size.)
    """

    def __init__(self, block: UBSMoEBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=F.mse_loss(self.block(input_ids), labels))


def run_method(
    fed: Federation, s: DemoSettings, config: UBSMoEConfig, on_steps: Callable[[int], None] | None = None
) -> dict:
    """Federated rounds for one method through the shared client and server code; per-round metrics."""
    block = UBSMoEBlock(fed.base.gate_up_proj, fed.base.down_proj, fed.base.router_weight, s.native_top_k, config)
    block.lora.load_state_dict(fed.base.lora.state_dict())  # identical start for every method
    model = _RegressionTask(block)
    state = global_state_from_model(model)
    settings = ClientSettings(
        lr=s.lr, min_lr=s.lr, grad_clip=None, local_steps=s.local_steps, total_rounds=s.rounds, schedule="constant"
    )
    client_batches = [
        [{"input_ids": x, "labels": _targets(fed, x)} for x in x_train.split(s.batch)] for x_train in fed.train
    ]
    initial = [_loss(block, fed, x, k) for x, k in zip(fed.test, fed.top_ks, strict=True)]
    history = []
    for _ in range(s.rounds):
        updates = []
        for client, (batches, top_k) in enumerate(zip(client_batches, fed.top_ks, strict=True)):
            updates.append(client_update(model, state, batches, top_k, settings, client))
            if on_steps:
                on_steps(s.local_steps)
        state, report = aggregate_round(state, updates, dmr=config.dmr)
        load_global_state(model, state)
        relative = [_loss(block, fed, x, k) / l0 for x, k, l0 in zip(fed.test, fed.top_ks, initial, strict=True)]
        (layer,) = report["utilization"]
        history.append(
            {
                "relative_test_loss": relative,
                "utilization_cv": layer["cv"],
                "dead_experts": layer["dead_experts"],
                "phi_min": state.phi.min().item(),
                "phi_max": state.phi.max().item(),
            }
        )
    return {"initial_test_loss": initial, "rounds": history}


def run_demo(s: DemoSettings, out: Path | None = None, progress: Callable[[int], Callable[[int], None]] | None = None):
    """Run both methods; return (and optionally write) the summary dict."""
    torch.manual_seed(s.seed)
    fed = build_federation(s)
    methods = {
        "ubsmoe": UBSMoEConfig(lora_rank=s.lora_rank, lora_alpha=2.0 * s.lora_rank),
        "smoe-naive": UBSMoEConfig(
            lora_rank=s.lora_rank, lora_alpha=2.0 * s.lora_rank, dmr=False, pseudo_gradient=False
        ),
    }
    probe = fed.test[0][:256]
    # FlopCounterMode does not see grouped_mm, so count on the eager path (same arithmetic)
    counted = UBSMoEBlock(
        fed.base.gate_up_proj,
        fed.base.down_proj,
        fed.base.router_weight,
        s.native_top_k,
        replace(methods["ubsmoe"], implementation="eager"),
    )
    flops = {k: training_flops_per_token(counted, probe, k) for k in fed.top_ks}
    steps = s.rounds * len(s.budgets) * s.local_steps
    results = {}
    for name, config in methods.items():
        start = time.perf_counter()
        results[name] = run_method(fed, s, config, progress(steps) if progress else None)
        results[name]["wall_s"] = round(time.perf_counter() - start, 2)
    summary = {
        "kind": "synthetic single-layer demonstration of the UB-SMoE block",
        "settings": asdict(s),
        "top_k_per_tier": fed.top_ks,
        "training_flops_per_token": flops,
        "flops_relative_to_full_k": {k: flops[k] / flops[max(fed.top_ks)] for k in fed.top_ks},
        "methods": results,
        "torch": torch.__version__,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.json").write_text(json.dumps(summary, indent=2))
        plot_demo(summary, out / "demo.png")
    return summary


def plot_demo(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_cv) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"ubsmoe": "-", "smoe-naive": "--"}
    for name, result in summary["methods"].items():
        rounds = range(1, len(result["rounds"]) + 1)
        for tier, k in enumerate(summary["top_k_per_tier"]):
            losses = [r["relative_test_loss"][tier] for r in result["rounds"]]
            ax_loss.plot(rounds, losses, styles.get(name, "-"), color=f"C{tier}", label=f"{name} K={k}")
        ax_cv.plot(rounds, [r["utilization_cv"] for r in result["rounds"]], styles.get(name, "-"), label=name)
    ax_loss.set(xlabel="round", ylabel="test loss / untrained loss", title="Per-tier loss (lower is better)")
    ax_loss.legend(fontsize=7, ncol=2)
    ax_cv.set(xlabel="round", ylabel="coefficient of variation", title="Expert utilization imbalance")
    ax_cv.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
