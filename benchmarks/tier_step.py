"""One full local training step per budget tier of the embedded default, against peft LoRA on the dense model.

A step is what a client runs once per local step in `ubsmoe.fl.client.client_update`: the answer-only LM loss
(`answer_loss`, the LM head at the labelled positions only) + the range regulariser, backward, the pseudo-gradient,
gradient-norm clipping and the AdamW step. It is timed on the embedded default (SmolLM2-135M-Instruct MoEfied into
8 experts + a shared group, `ExperimentConfig()`), at every tier's K (2 / 4 / 6 / 8), with the default batch size
on real batches of the default BIG-bench data, made by the simulation's own `client_batches`. Rows:

  ubsmoe_k{K}               `client_update` itself at K (the step's time is the interval between consecutive
                            `on_step` calls, so it is exactly the loop body of client_update)
  ubsmoe_k8_full_logits     the same at K = 8, with client_update's `answer_loss` swapped for the full-logits
                            `model(**batch).loss` it used before the answer-only loss (the "today's K=8" row)
  ubsmoe_k{K}_pg_gradient   at the lowest and the highest K, the same with the pseudo-gradient in the paper's
                            gradient space (every block's `pg_space` swapped for the call) instead of the runs'
                            update space: what update space's adapter snapshot and pseudo-update cost per step
  peft_answer_only          what a user would pick instead: peft LoRA (the config's rank and alpha, target_modules
                            gate_proj / up_proj / down_proj) on the dense SmolLM2 with plain transformers, the same
                            batches, the same `answer_loss`, the same AdamW / clipping settings
  peft_full_logits          the same with the plain `model(**batch).loss`, what a transformers user would write

Every contender runs one "round" per repeat: a fresh optimizer (as client_update makes), from the same initial
adapters, len(batches) + 1 steps over the batches cycled; the first step (optimizer-state set-up, the round's
load) is not timed, the other len(batches) cover every batch once. A repeat's figure is the mean step time of
that pass; the report gives the median over repeats. Contenders are interleaved within every repeat, in an order
that rotates from repeat to repeat, so machine noise hits all of them. Analytic training FLOPs per step come from
`ubsmoe.metrics.flops.flops_per_token` (the LM head at the labelled share of the tokens). The first step's loss of
every contender is reported as a check: at K = 8 the MoEfied model is the dense one and every LoRA B starts at
zero, so all the K = 8 and peft rows must agree.

One JSON document goes to stdout, progress to stderr:

    python benchmarks/tier_step.py > tier_step.json                      # 4 batches, 5 repeats + 1 warm-up
    python benchmarks/tier_step.py --quick > quick.json                  # under 3 minutes on 2 cores
    python benchmarks/tier_step.py --batches 8 --repeats 9 > big.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

import ubsmoe.fl.client as client_module
from ubsmoe.fl.client import ClientSettings, client_update, round_lr
from ubsmoe.fl.rounds import client_batches
from ubsmoe.methods import Method
from ubsmoe.metrics.flops import ModelDims, flops_per_token
from ubsmoe.models.answer_loss import AnswerLoss, answer_loss, split_causal_lm

PEFT_TARGETS = ["gate_proj", "up_proj", "down_proj"]
QUICK = {"batches": 2, "repeats": 2, "warmup": 0}
FULL = {"batches": 4, "repeats": 5, "warmup": 1}
T_START = time.perf_counter()


def log(*parts: Any) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f}s]", *parts, file=sys.stderr, flush=True)


# ---- batches ------------------------------------------------------------------------------------------------------
def pick_batches(
    client_encoded: Sequence[Sequence[dict[str, Any]]], batch_size: int, seed: int, pad_id: int, count: int
) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """`count` full batches of round 0, as the simulation makes them, taken round-robin over the clients.

    Returns the batches and, for each, the client it came from. Partial (last) batches are skipped so every
    step has the default batch size; when the clients hold fewer full batches, the partial ones are used too.
    """
    per_client = [client_batches(examples, batch_size, seed, 0, c, pad_id) for c, examples in enumerate(client_encoded)]
    picked: list[tuple[dict[str, torch.Tensor], int]] = []
    for full in (True, False):  # full batches first, round-robin over the clients; partial ones only if needed
        queues = [[b for b in batches if (len(b["input_ids"]) == batch_size) == full] for batches in per_client]
        for depth in range(max(map(len, queues), default=0)):
            picked += [(q[depth], c) for c, q in enumerate(queues) if len(q) > depth]
    if not picked:
        raise ValueError("the clients hold no training examples")
    picked = picked[:count]
    return [b for b, _ in picked], [c for _, c in picked]


def batch_shapes(batches: Sequence[dict[str, torch.Tensor]], clients: Sequence[int] | None = None) -> dict[str, Any]:
    """Rows, padded width, real tokens and labelled tokens (positions where the answer-only loss runs the head)."""
    rows = []
    for i, batch in enumerate(batches):
        mask = batch["attention_mask"]
        rows.append(
            {
                "client": None if clients is None else clients[i],
                "rows": int(batch["input_ids"].shape[0]),
                "width": int(batch["input_ids"].shape[1]),
                "tokens": int(mask.sum()),
                "padded_tokens": int(batch["input_ids"].numel()),
                "labelled_tokens": int((batch["labels"][:, 1:] != -100).sum()),
            }
        )
    total = {key: sum(r[key] for r in rows) for key in ("rows", "tokens", "padded_tokens", "labelled_tokens")}
    return {
        "batches": rows,
        "total": total,
        "head_share": total["labelled_tokens"] / total["tokens"],
        "labelled_tokens_means": "labels[:, 1:] != -100: the positions at which the shifted LM loss applies the head",
    }


# ---- FLOPs ---------------------------------------------------------------------------------------------------------
def step_flops(
    model: nn.Module, config: Any, batches: Sequence[dict[str, torch.Tensor]], top_k: int, head_share: float
):
    """Analytic training FLOPs of one pass over `batches` at `top_k` (real tokens; attention at each row's length)."""
    dims = ModelDims.from_model(model)
    options = {
        "lora_rank": config.lora.rank,
        "lora_targets": tuple(config.lora.targets),
        "training": True,
        "dmr": config.dmr_active,
        "pseudo_gradient": config.pseudo_gradient_active,
        "router_trainable": config.moe.router_trainable,
        "head_share": head_share,
    }
    total = 0.0
    for batch in batches:
        for length in batch["attention_mask"].sum(dim=1).tolist():
            total += flops_per_token(dims, top_k, seq_len=int(length), **options)["total"] * int(length)
    return total


# ---- contenders ----------------------------------------------------------------------------------------------------
def _full_logits_loss(calls: list[int]) -> Callable[..., AnswerLoss]:
    """A drop-in for client_update's `answer_loss`: the full-logits `model(**batch).loss` it computed before."""

    def loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask=None) -> AnswerLoss:
        calls.append(1)
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return AnswerLoss(output.loss, int((labels[:, 1:] != -100).sum()))

    return loss


def ubsmoe_round(
    model: nn.Module,
    global_state: Any,
    settings: ClientSettings,
    method: Method,
    top_k: int,
    batches: Sequence[dict[str, torch.Tensor]],
    full_logits: bool = False,
) -> dict[str, Any]:
    """One client_update of len(batches) + 1 steps; the times of steps 2.. from its on_step calls."""
    stamps: list[float] = []
    steps = len(batches) + 1
    calls: list[int] = []
    swap = (
        mock.patch.object(client_module, "answer_loss", _full_logits_loss(calls))
        if full_logits
        else contextlib.nullcontext()
    )
    with swap:
        update = client_update(
            model,
            global_state,
            list(batches),
            top_k,
            dataclasses.replace(settings, local_steps=steps),
            "tier_step",
            on_step=lambda _n: stamps.append(time.perf_counter()),
            method=method,
        )
    if full_logits and len(calls) != steps:
        raise RuntimeError("client_update no longer calls `answer_loss` once per step: the full-logits swap is stale")
    return {
        "step_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "first_loss": update.metrics["first_loss"],
        "client_update_step_time_s": update.metrics["step_time_s"],
    }


@contextlib.contextmanager
def pg_space(model: nn.Module, space: str):
    """Every UB-SMoE block's pseudo-gradient in `space` for the duration (the block reads its config each step)."""
    from ubsmoe.moe.model import moe_blocks

    blocks = moe_blocks(model)
    saved = [block.config for block in blocks]
    try:
        for block in blocks:
            block.config = dataclasses.replace(block.config, pg_space=space)
        yield
    finally:
        for block, config in zip(blocks, saved, strict=True):
            block.config = config


def make_peft(dense: nn.Module, config: Any) -> nn.Module:
    """peft LoRA with the config's rank and alpha on every gate/up/down projection of the dense model."""
    import peft

    lora = peft.LoraConfig(
        r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=0.0, target_modules=list(PEFT_TARGETS)
    )
    model = peft.get_peft_model(dense, lora)
    model.train()
    return model


class PeftRunner:
    """The plain-transformers training loop a user would write, with client_update's optimizer settings."""

    def __init__(self, model: nn.Module, settings: ClientSettings):
        self.model, self.settings = model, settings
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.parameters]
        self.answer_only_splits = split_causal_lm(model) is not None

    def round(self, batches: Sequence[dict[str, torch.Tensor]], full_logits: bool) -> dict[str, Any]:
        model, settings = self.model, self.settings
        with torch.no_grad():
            for parameter, start in zip(self.parameters, self.initial, strict=True):
                parameter.copy_(start)
        lr = round_lr(settings.lr, settings.min_lr, 0, settings.total_rounds, settings.schedule)
        if settings.optimizer == "adamw":
            # fused, as client_update's AdamW (and transformers' Trainer default, adamw_torch_fused)
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.parameters, lr=lr, weight_decay=settings.weight_decay, fused=True
            )
        else:
            optimizer = torch.optim.SGD(self.parameters, lr=lr, weight_decay=settings.weight_decay)
        model.train()
        times, losses = [], []
        for step, batch in enumerate([*batches, batches[0]]):
            start = time.perf_counter()
            input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
            if full_logits:
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            else:
                loss = answer_loss(model, input_ids, labels, mask).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.parameters, settings.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if step:
                times.append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)
        return {"step_s": times, "first_loss": losses[0]}


def contenders(
    model: nn.Module, peft_model: nn.Module, config: Any, ks: Sequence[int], batches: Sequence[dict[str, torch.Tensor]]
) -> tuple[dict[str, Callable[[], dict[str, Any]]], PeftRunner]:
    from ubsmoe.fl.experiment import initial_global_state

    settings = ClientSettings.from_config(config, round=0)
    method = config.method_instance()
    state = initial_global_state(model, config)
    k_max = max(ks)
    runs: dict[str, Callable[[], dict[str, Any]]] = {}
    for k in ks:
        runs[f"ubsmoe_k{k}"] = lambda k=k: ubsmoe_round(model, state, settings, method, k, batches)
    runs[f"ubsmoe_k{k_max}_full_logits"] = lambda: ubsmoe_round(model, state, settings, method, k_max, batches, True)
    if config.pseudo_gradient_active and config.pseudo_gradient.space != "gradient":
        for k in sorted({min(ks), k_max}):

            def in_gradient_space(k: int = k) -> dict[str, Any]:
                with pg_space(model, "gradient"):
                    return ubsmoe_round(model, state, settings, method, k, batches)

            runs[f"ubsmoe_k{k}_pg_gradient"] = in_gradient_space
    runner = PeftRunner(peft_model, settings)
    runs["peft_answer_only"] = lambda: runner.round(batches, full_logits=False)
    runs["peft_full_logits"] = lambda: runner.round(batches, full_logits=True)
    return runs, runner


def time_contenders(
    runs: dict[str, Callable[[], dict[str, Any]]], repeats: int, warmup: int
) -> dict[str, list[dict[str, Any]]]:
    """Every contender once per repeat, the order rotating; warm-up repeats are dropped."""
    names = list(runs)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rep in range(warmup + repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            result = runs[name]()
            if rep >= warmup:
                results[name].append(result)
            log(f"repeat {rep + 1}/{warmup + repeats}{' (warm-up)' if rep < warmup else ''} {name}:", _fmt(result))
    return results


def _fmt(result: dict[str, Any]) -> str:
    return " ".join(f"{t:.3f}" for t in result["step_s"]) + " s"


# ---- the measurement -----------------------------------------------------------------------------------------------
def measure(
    model: nn.Module,
    peft_model: nn.Module,
    config: Any,
    ks: Sequence[int],
    batches: Sequence[dict[str, torch.Tensor]],
    repeats: int,
    warmup: int,
    clients: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Time every contender and put the report together (everything but the machine and the versions)."""
    ks = sorted(set(ks))
    k_max = ks[-1]
    runs, runner = contenders(model, peft_model, config, ks, batches)
    if not runner.answer_only_splits:
        raise RuntimeError("answer_loss cannot split the peft model into backbone and head: it would use full logits")
    raw = time_contenders(runs, repeats, warmup)
    per_repeat = {name: [statistics.fmean(r["step_s"]) for r in results] for name, results in raw.items()}
    median = {name: statistics.median(values) for name, values in per_repeat.items()}
    shapes = batch_shapes(batches, clients)
    share = shapes["head_share"]
    flops = {k: step_flops(model, config, batches, k, share) for k in ks}
    full_name = f"ubsmoe_k{k_max}_full_logits"
    flops_full = step_flops(model, config, batches, k_max, 1.0)
    peft_s, peft_full_s = median["peft_answer_only"], median["peft_full_logits"]
    tiers = []
    for k in ks:
        t = median[f"ubsmoe_k{k}"]
        tiers.append(
            {
                "k": k,
                "median_step_s": t,
                "time_ratio_to_k_max": t / median[f"ubsmoe_k{k_max}"],
                "flop_ratio_to_k_max": flops[k] / flops[k_max],
                "training_flops_per_step": flops[k] / len(batches),
                "speedup_vs_peft": peft_s / t,
                "speedup_vs_peft_full_logits": peft_full_s / t,
            }
        )
    references = [
        {
            "name": full_name,
            "what": f"client_update at K = {k_max} with the full-logits loss model(**batch).loss (before issue 12)",
            "median_step_s": median[full_name],
            "time_ratio_to_k_max": median[full_name] / median[f"ubsmoe_k{k_max}"],
            "flop_ratio_to_k_max": flops_full / flops[k_max],
            "training_flops_per_step": flops_full / len(batches),
            "speedup_vs_peft": peft_s / median[full_name],
            "speedup_vs_peft_full_logits": peft_full_s / median[full_name],
        },
        *[
            {
                "name": name,
                "what": f"client_update at K = {name.split('_')[1][1:]} with PG in gradient space (runs: update space)",
                "median_step_s": median[name],
                "time_ratio_to_k_max": median[name] / median[f"ubsmoe_k{k_max}"],
                "update_space_cost": median[name.removesuffix("_pg_gradient")] / median[name] - 1,
            }
            for name in median
            if name.endswith("_pg_gradient")
        ],
        {
            "name": "peft_answer_only",
            "what": "peft LoRA on the dense model, plain transformers, answer_loss (head at the labelled positions)",
            "median_step_s": peft_s,
            "time_ratio_to_k_max": peft_s / median[f"ubsmoe_k{k_max}"],
        },
        {
            "name": "peft_full_logits",
            "what": "peft LoRA on the dense model, plain transformers, model(**batch).loss (head at every position)",
            "median_step_s": peft_full_s,
            "time_ratio_to_k_max": peft_full_s / median[f"ubsmoe_k{k_max}"],
        },
    ]
    spread = {name: (max(v) - min(v)) / statistics.median(v) if len(v) > 1 else 0.0 for name, v in per_repeat.items()}
    trainable_peft = sum(p.numel() for p in runner.parameters)
    trainable_ubsmoe = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "k_max": k_max,
        "tiers": tiers,
        "reference_rows": references,
        "headline": {
            f"k{k_max}_answer_only_vs_full_logits_speedup": median[full_name] / median[f"ubsmoe_k{k_max}"],
            f"k{ks[0]}_speedup_vs_peft": peft_s / median[f"ubsmoe_k{ks[0]}"],
            f"k{ks[0]}_speedup_vs_peft_full_logits": peft_full_s / median[f"ubsmoe_k{ks[0]}"],
        },
        "batches": shapes,
        "first_step_loss": {name: [r["first_loss"] for r in results] for name, results in raw.items()},
        "per_repeat_mean_step_s": per_repeat,
        "per_step_s": {name: [r["step_s"] for r in results] for name, results in raw.items()},
        "client_update_step_time_s": {
            name: [r["client_update_step_time_s"] for r in results]
            for name, results in raw.items()
            if name.startswith("ubsmoe")
        },
        "max_relative_spread": spread,
        "trainable_parameters": {"ubsmoe": trainable_ubsmoe, "peft": trainable_peft},
        "timing": {
            "repeats": repeats,
            "warmup": warmup,
            "statistic": "median over repeats of the mean step time over one pass of the batches",
            "interleaved": True,
            "order": "all contenders once per repeat, the order rotating by one each repeat",
            "round": f"fresh optimizer, same initial adapters, {len(batches) + 1} steps; the first is not timed",
            "ubsmoe_path": (
                "client_update itself (not factored, not replicated): a step's time is the interval between "
                "consecutive on_step calls (answer_loss + range/balance loss, zero_grad, backward, "
                "apply_pseudo_gradients, clip_grad_norm_, optimizer.step, float(loss))"
            ),
            "ubsmoe_full_logits_path": (
                "client_update with ubsmoe.fl.client.answer_loss patched to model(input_ids, attention_mask, "
                "labels).loss for the call (checked to be called once per step)"
            ),
            "peft_path": (
                "the same step written in the benchmark for the peft model: loss, zero_grad, backward, "
                "clip_grad_norm_, optimizer.step, float(loss); no regulariser and no pseudo-gradient"
            ),
        },
        "flops": {
            "source": "ubsmoe.metrics.flops.flops_per_token(ModelDims.from_model(model), K, training=True)",
            "tokens": "real (unpadded) tokens, attention at each row's length",
            "head_share": share,
            "lora_rank": config.lora.rank,
            "lora_targets": list(config.lora.targets),
            "dmr": config.dmr_active,
            "pseudo_gradient": config.pseudo_gradient_active,
            "router_trainable": config.moe.router_trainable,
        },
        "config": {
            "model": config.model.name,
            "batch_size": config.federation.batch_size,
            "optimizer": config.federation.optimizer.name,
            "lr": ClientSettings.from_config(config, round=0).lr,
            "weight_decay": config.federation.optimizer.weight_decay,
            "grad_clip": config.federation.optimizer.grad_clip,
            "lora_rank": config.lora.rank,
            "lora_alpha": config.lora.alpha,
            "peft_target_modules": PEFT_TARGETS,
            "method": config.method,
            "ks": list(ks),
        },
    }


# ---- machine and versions ------------------------------------------------------------------------------------------
def environment(load_start: tuple[float, float, float]) -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    root = Path(__file__).resolve().parent.parent
    git = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        run = {"cwd": root, "capture_output": True, "text": True, "timeout": 10}
        git["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.split("\n")
        git["modified"] = sorted(line[3:] for line in dirty if line.strip())
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "ubsmoe": version("ubsmoe"),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "git": git,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="Defaults: " + json.dumps(FULL) + "; --quick: " + json.dumps(QUICK)
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (rounds) per contender")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repeats before them")
    parser.add_argument("--batches", type=int, default=None, help="distinct real batches cycled in every round")
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats: under 3 minutes on 2 cores")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1 or args.warmup < 0 or args.batches < 1:
        parser.error("--repeats and --batches must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from ubsmoe.config import ExperimentConfig
    from ubsmoe.data.federated import federated_data
    from ubsmoe.data.prompts import pad_token_id
    from ubsmoe.models import load_embedded_default
    from ubsmoe.models.loading import load_experiment_model

    transformers.logging.set_verbosity_error()
    config = ExperimentConfig()
    torch.manual_seed(config.seed)
    log("loading the MoEfied default model")
    loaded = load_experiment_model(config, progress=log)
    log("loading the dense default model for peft")
    dense, _ = load_embedded_default(dtype=getattr(torch, config.model.dtype))
    peft_model = make_peft(dense, config)
    log("loading the data")
    data = federated_data(config.data, config.num_clients, loaded.tokenizer, config.evaluation.examples_per_task)
    batches, clients = pick_batches(
        data.client_encoded, config.federation.batch_size, config.seed, pad_token_id(loaded.tokenizer), args.batches
    )
    ks = sorted(set(config.client_top_ks(loaded.k_max)))
    log(f"timing K = {ks}, {len(batches)} batches, {args.repeats} repeats + {args.warmup} warm-up")
    result = {"benchmark": "tier_step: one full local training step per tier vs peft LoRA on the dense model"}
    result.update(measure(loaded.model, peft_model, config, ks, batches, args.repeats, args.warmup, clients))
    result["environment"] = environment(load_start)
    result["command"] = shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    result["arguments"] = vars(args)
    result["wall_time_s"] = time.perf_counter() - T_START
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
