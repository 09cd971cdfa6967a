"""summary.json of a run (the contract of DESIGN section 6) and the other files written at its end.

`build_summary(...)` gathers, from the run's pieces and the simulation's per-round records:
config, seed, method, package versions, model, data (clients with their tier, K_c, label and task
histograms), the evaluation protocol, per tier {budget, K_c (or rank), clients, accuracy per task and
mean with 95% intervals (after the last evaluated round, and before training), answer and held-out
perplexity, training FLOPs per sample (analytic and measured), step time, upload / download bytes per
client and per round}, the mean over tiers, expert-utilization balance per layer (coefficient of
variation, dead experts) after the last round, the per-round records, and timings.

`write_outputs(summary, model, out, config, note)` writes summary.json (atomically), the plots, TensorBoard
scalars and the final adapters: `OUT/adapters/` (ubsmoe's format, `ubsmoe.models.load_trainable_state`)
and `OUT/adapters/peft/` (a peft LoRA adapter of the original model, `ubsmoe.models.peft_export`; not
for FLoRA/FLoRIST, whose update is merged into the experts). `note(line)` receives a line saying why
there is no peft adapter, or what it leaves out (phi, output scales); summary.json's `peft_adapters`
is its path or null.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ubsmoe.paths import write_text_atomic

__all__ = ["SUMMARY_FILE", "build_summary", "package_versions", "write_outputs", "write_summary"]

SUMMARY_FILE = "summary.json"
_PACKAGES = ("ubsmoe", "torch", "transformers", "numpy", "pydantic", "flwr")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["platform"] = platform.platform()
    return versions


def _mean(values: Sequence[Any]) -> float | None:
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def _last_eval(records: Sequence[Mapping[str, Any]]) -> tuple[int | None, Mapping[str, Any] | None]:
    for record in reversed(records):
        if record.get("eval"):
            return record["round"], record["eval"]
    return None, None


def _tier_accuracy(entry: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not entry:
        return None
    result = {"mean": entry["accuracy"], "ci95": entry["ci95"], "per_task": entry.get("per_task", {})}
    if "unmatched" in entry:  # generate protocol: the share of generations that named no option
        result["unmatched"] = entry["unmatched"]
    return result


def _tier_lines(records: Sequence[Mapping[str, Any]], clients: set[int]) -> list[Mapping[str, Any]]:
    return [line for r in records for line in r.get("client_metrics", []) if line.get("client_id") in clients]


def build_summary(
    *,
    config: Any,
    loaded: Any,
    data: Any,
    tiers: Sequence[Any],
    top_ks: Sequence[int],
    flops: Sequence[Mapping[str, Any]],
    initial: Mapping[str, Any] | None,
    records: Sequence[Mapping[str, Any]],
    timing: Mapping[str, float],
) -> dict[str, Any]:
    """The summary dict (JSON-able); see the module docstring."""
    eval_round, final = _last_eval(records)
    client_tier = config.client_tiers()
    ranks = config.client_ranks()
    tier_rows = []
    for tier, tier_flops in zip(tiers, flops, strict=True):
        lines = _tier_lines(records, set(tier.clients))
        final_entry = final["tiers"][tier.index] if final else None
        initial_entry = initial["tiers"][tier.index] if initial else None
        rounds = len(records) or 1
        tier_rows.append(
            {
                "tier": tier.index,
                "budget": tier.budget,
                "top_k": tier.top_k,  # K_max for every tier of a rank method
                "rank": None if config.budgets_set_top_k else tier.rank,
                # the rank the tier's clients held at that evaluation (HetLoRA's pruning lowers it)
                "evaluated_rank": final_entry.get("evaluated_rank") if final_entry else None,
                "clients": list(tier.clients),
                "accuracy": _tier_accuracy(final_entry),
                "initial_accuracy": _tier_accuracy(initial_entry),
                "answer_perplexity": final_entry.get("answer_perplexity") if final_entry else None,
                "initial_answer_perplexity": initial_entry.get("answer_perplexity") if initial_entry else None,
                "heldout_perplexity": final_entry.get("heldout_perplexity") if final_entry else None,
                "initial_heldout_perplexity": initial_entry.get("heldout_perplexity") if initial_entry else None,
                "flops_per_sample": dict(tier_flops),
                "step_time_s": _mean([line.get("step_time_s") for line in lines]),
                # analytic training FLOPs of the tier's clients in each round, from the tokens they trained on
                "train_flops_per_round": [
                    tier_flops["per_token"]["total"]
                    * sum(x.get("tokens_processed") or 0 for x in lines if x.get("round") == r.get("round"))
                    for r in records
                ],
                "train_lm_loss_last_round": _mean(
                    [line.get("train_lm_loss") for line in lines if line.get("round") == len(records) - 1]
                ),
                "upload_bytes_per_client_round": _mean([line.get("upload_bytes") for line in lines]),
                "download_bytes_per_client_round": _mean([line.get("download_bytes") for line in lines]),
                "upload_bytes_per_round": sum(line.get("upload_bytes") or 0 for line in lines) / rounds,
                "download_bytes_per_round": sum(line.get("download_bytes") or 0 for line in lines) / rounds,
            }
        )
    last = records[-1] if records else {}
    balance = {
        "round": last.get("round"),
        "per_layer": [
            {"layer": i, "cv": cv, "dead_experts": dead}
            for i, (cv, dead) in enumerate(
                zip(last.get("utilization_cv", []), last.get("dead_experts", []), strict=True)
            )
        ],
        "mean_cv": last.get("mean_utilization_cv"),
        "dead_experts_total": sum(last.get("dead_experts", [])),
    }
    clients = [
        {
            "client_id": c,
            "tier": client_tier[c],
            "budget": config.client_budgets()[c],
            "top_k": top_ks[c],
            "rank": None if config.budgets_set_top_k else ranks[c],
            "num_examples": len(data.client_encoded[c]),
            "label_histogram": data.label_histograms[c],
            "task_histogram": data.task_histograms[c],
        }
        for c in range(config.num_clients)
    ]
    return {
        "format": 1,
        "method": config.method,
        "seed": config.seed,
        "config": config.to_dict(),
        "versions": package_versions(),
        "command": " ".join(sys.argv),
        "model": dict(loaded.info),
        "data": {
            "source": config.data.source,
            "partition": config.data.partition,
            "dirichlet_alpha": config.data.dirichlet_alpha if config.data.partition == "dirichlet" else None,
            "seed": config.data.seed,
            **data.describe(),
            "clients": clients,
        },
        "evaluation": {
            "protocol": config.evaluation.protocol,
            "examples_per_task": config.evaluation.examples_per_task,
            "split": config.evaluation.split,
            "dev_fraction": config.evaluation.dev_fraction,
            "data_seed": config.data.seed,
            "round": eval_round,
            "chance": (final or initial or {}).get("chance"),
            "heldout_tokens": config.evaluation.heldout_tokens,
        },
        "tiers": tier_rows,
        "mean_over_tiers": {
            "accuracy": final.get("mean_accuracy") if final else None,
            "ci95": final.get("mean_ci95") if final else None,
            "initial_accuracy": initial.get("mean_accuracy") if initial else None,
            "answer_perplexity": _mean([t["answer_perplexity"] for t in tier_rows]),
        },
        "balance": balance,
        "initial": initial,
        "rounds": list(records),
        "resumed_from": getattr(records, "resumed_from", None),
        "timing": {**timing, "train_s": sum(r.get("round_time_s", 0.0) for r in records)},
    }


def write_summary(summary: Mapping[str, Any], out: Path) -> Path:
    path = out / SUMMARY_FILE
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    return path


def write_outputs(
    summary: dict[str, Any], model: Any, out: Path, config: Any, note: Callable[[str], None] | None = None
) -> None:
    """summary.json, plots, TensorBoard scalars and the final adapters (see the module docstring)."""
    from ubsmoe.models.peft_export import export_run_adapters
    from ubsmoe.models.state import save_trainable_state

    adapters = save_trainable_state(
        model, out / "adapters", metadata={"base_model": config.model.name, "method": config.method}
    )
    summary["adapters"] = str(adapters)
    peft_adapters, lines = export_run_adapters(model, adapters, config, summary.get("model"))
    summary["peft_adapters"] = str(peft_adapters) if peft_adapters is not None else None
    for line in lines:
        if note is not None:
            note(line)
    summary["plots"] = []
    if config.output.plots:
        from ubsmoe.report.plots import write_plots

        summary["plots"] = [str(p) for p in write_plots(summary, out / "plots")]
    summary["tensorboard"] = None
    if config.output.tensorboard:
        from ubsmoe.report.tensorboard import write_scalars

        summary["tensorboard"] = write_scalars(summary, out / "tensorboard")
    write_summary(summary, out)
