"""The tiers of an experiment: each budget tier's K_c, clients and LoRA rank, its training FLOPs (counted on
real batches), and its evaluation with the model its clients hold after a round (`TierEvaluator`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ubsmoe.config import ExperimentConfig
from ubsmoe.data.federated import FederatedData
from ubsmoe.data.prompts import collate
from ubsmoe.fl.payload import GlobalState, load_global_state
from ubsmoe.metrics.evaluation import evaluate_tasks, perplexity
from ubsmoe.metrics.flops import ModelDims, count_flops, flops_per_token
from ubsmoe.models.answer_loss import answer_loss
from ubsmoe.models.loading import LoadedModel
from ubsmoe.moe import model_device, moe_blocks, set_top_k
from ubsmoe.paths import write_text_atomic

FLOP_SAMPLES = 2


@dataclasses.dataclass(frozen=True)
class Tier:
    index: int
    budget: float
    top_k: int
    clients: tuple[int, ...]
    rank: int
    """The tier's LoRA rank (r_c under a rank method, else lora.rank)."""


def experiment_tiers(config: ExperimentConfig, top_ks: list[int]) -> list[Tier]:
    tier_of = config.client_tiers()
    ranks = config.client_ranks()
    return [
        Tier(
            i,
            t.budget,
            top_ks[tier_of.index(i)],
            tuple(c for c, ti in enumerate(tier_of) if ti == i),
            ranks[tier_of.index(i)],
        )
        for i, t in enumerate(config.moe.tiers)
    ]


@contextlib.contextmanager
def _countable(model: nn.Module) -> Iterator[None]:
    """Eager experts and eager attention for the duration: the FLOP counter sees neither grouped_mm nor CPU SDPA."""
    blocks = moe_blocks(model)
    configs = [b.config for b in blocks]
    attention = getattr(model.config, "_attn_implementation", None)
    try:
        for block in blocks:
            block.config = dataclasses.replace(block.config, implementation="eager")
        if attention is not None and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        yield
    finally:
        for block, config in zip(blocks, configs, strict=True):
            block.config = config
        if attention is not None and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attention)


def tier_flops(
    model: nn.Module, config: ExperimentConfig, tiers: list[Tier], data: FederatedData
) -> list[dict[str, Any]]:
    """Training FLOPs per sample of each tier: analytic and measured on the same real sequences.

    A training step is what `client_update` runs: the answer-only loss (`answer_loss`), so the LM head
    costs FLOPs only at the labelled positions.
    """
    encoded = [e for client in data.client_encoded for e in client]
    lengths = [len(e["input_ids"]) for e in encoded]
    mean_length = statistics.fmean(lengths)
    head_share = sum(_answer_positions(e) for e in encoded) / sum(lengths)
    samples = [e for client in data.client_encoded for e in client][:FLOP_SAMPLES]
    dims = ModelDims.from_model(model)
    options = {
        "lora_rank": config.lora.rank,
        "lora_targets": config.lora.targets,
        "training": True,
        "dmr": config.dmr_active,
        "pseudo_gradient": config.pseudo_gradient_active,
        "router_trainable": config.moe.router_trainable,
    }
    was_training = model.training
    device = model_device(model)
    rows = []
    for tier in tiers:
        set_top_k(model, tier.top_k)

        tier_options = {**options, "lora_rank": tier.rank}

        def per_sample(length: int, share: float, top_k: int = tier.top_k, tier_options: dict = tier_options) -> float:
            return flops_per_token(dims, top_k, seq_len=length, head_share=share, **tier_options)["total"] * length

        measured = 0
        model.train()
        with _countable(model):
            for sample in samples if config.evaluation.measure_flops else []:
                batch = {k: v.to(device) for k, v in collate([sample], 0).items()}

                def step(batch: dict[str, torch.Tensor] = batch) -> None:
                    answer_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"]).loss.backward()

                measured += count_flops(step)
        model.zero_grad(set_to_none=True)
        rows.append(
            {
                "analytic": per_sample(round(mean_length), head_share),
                "measured": measured / len(samples) if config.evaluation.measure_flops else None,
                "analytic_same_samples": sum(
                    per_sample(len(s["input_ids"]), _answer_positions(s) / len(s["input_ids"])) for s in samples
                )
                / len(samples),
                "tokens_per_sample": mean_length,
                "head_share": head_share,
                "per_token": flops_per_token(
                    dims, tier.top_k, seq_len=round(mean_length), head_share=head_share, **tier_options
                ),
            }
        )
    model.train(was_training)
    return rows


def _answer_positions(example: dict[str, Any]) -> int:
    """Positions at which the answer-only loss applies the LM head: labelled tokens after the shift."""
    return sum(1 for label in example["labels"][1:] if label != -100)


class TierEvaluator:
    """Evaluates every tier at its K_c with the model its clients hold (`Method.tier_view`).

    K and the adapters are left at the last tier's; the simulation reloads the global state after it.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: ExperimentConfig,
        data: FederatedData,
        tiers: list[Tier],
        reporter: Any,
        records_dir: Path | None = None,
    ):
        self.loaded, self.config, self.data, self.tiers, self.reporter = loaded, config, data, tiers, reporter
        self.records_dir = records_dir
        """Where each evaluation's per-example records go (`evaluation_file`); None: nowhere."""
        self.heldout: list[list[int]] = []
        if config.evaluation.heldout_tokens:
            from ubsmoe.data.calibration import HELDOUT_TASKS, task_texts, token_blocks

            texts = task_texts(HELDOUT_TASKS, progress=reporter.stage)
            self.heldout = token_blocks(loaded.tokenizer, texts, 256, config.evaluation.heldout_tokens, config.seed)
        per_example = (lambda e: len(e.choices)) if config.evaluation.protocol == "loglik" else (lambda e: 1)
        self.units = sum(per_example(e) for examples in data.test.values() for e in examples)
        self.method = config.method_instance()

    def __call__(self, model: nn.Module, round: int | None, state: GlobalState | None = None) -> dict[str, Any]:
        label = "before training" if round is None else f"after round {round + 1}"
        self.reporter.evaluation_started(f"evaluating {len(self.tiers)} tiers {label}", self.units * len(self.tiers))
        results: list[dict[str, Any]] = []
        examples: list[dict[str, Any]] = []
        try:
            for tier in self.tiers:
                evaluated_rank = None
                if state is not None:
                    evaluated_rank = self.method.client_rank(state, tier.clients[0], tier.rank)
                    view = self.method.tier_view(state, evaluated_rank, tier.clients)
                    load_global_state(model, view)
                    _load_local(model, view)
                set_top_k(model, tier.top_k)
                result = evaluate_tasks(
                    model,
                    self.loaded.tokenizer,
                    self.data.test,
                    self.config.evaluation.protocol,
                    self.config.evaluation.batch_size,
                    self.config.evaluation.max_new_tokens,
                    on_batch=self.reporter.evaluation_advanced,
                )
                if self.heldout:
                    result["heldout_perplexity"] = perplexity(model, self.heldout)
                rank = None if self.config.budgets_set_top_k else tier.rank  # as summary.json: K tiers have no rank
                where = {"tier": tier.index, "budget": tier.budget, "top_k": tier.top_k, "rank": rank}
                if rank is not None and evaluated_rank is not None:
                    # HetLoRA prunes ranks during training: the tier is named by its budget's rank but its
                    # clients hold (and are evaluated at) the pruned one
                    where["evaluated_rank"] = evaluated_rank
                examples += [{**where, **record} for record in result.pop("examples")]
                results.append({**where, **result})
        finally:
            self.reporter.evaluation_finished()
        if self.records_dir is not None:
            self._write_examples(examples, round)
        accuracies = [r["accuracy"] for r in results]
        intervals = [r["ci95"] for r in results]
        return {
            "protocol": self.config.evaluation.protocol,
            "tiers": results,
            "mean_accuracy": statistics.fmean(accuracies),
            # tiers evaluate the same examples, so their errors are correlated: the mean's interval is
            # bounded by the mean of the tiers' intervals rather than shrunk by sqrt(number of tiers)
            "mean_ci95": statistics.fmean(intervals),
            "chance": results[0]["chance"],
        }

    def _write_examples(self, examples: list[dict[str, Any]], round: int | None) -> None:
        """One JSON line per (tier, example): what each tier answered, whether it was right, the gold
        answer's NLL, and under `generate` the generated text; the same examples for every tier."""
        path = evaluation_file(self.records_dir, round)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(record, sort_keys=True) + "\n" for record in examples))


EVALUATIONS_DIR = "evaluations"
"""Where a run writes each evaluation's per-example records (`TierEvaluator`, `records_dir`)."""


def evaluation_file(records_dir: Path, round: int | None) -> Path:
    """The per-example records of the evaluation before training (`initial.jsonl`) or after round `round`
    (0-based; `round_0001.jsonl` after the first, as the checkpoints are named)."""
    return records_dir / ("initial.jsonl" if round is None else f"round_{round + 1:04d}.jsonl")


@torch.no_grad()
def _load_local(model: nn.Module, view: GlobalState) -> None:
    """A tier's client-local tensors (A3SMoE's mean output scales; ones when its clients have none yet)."""
    from ubsmoe.fl.payload import local_parameters

    for key, parameter in local_parameters(model).items():
        parameter.copy_(view.method_state.get(key, torch.ones_like(parameter)))


def evaluation_due(config: ExperimentConfig, round: int) -> bool:
    last = round == config.federation.rounds - 1
    return last or (round + 1) % config.evaluation.every == 0
