"""The comparison of several methods over seeds: one JSON-able dict, a Markdown table and plots.

`build_comparison(summaries)` takes {method label: [summary.json of each seed]} and returns, per method,
per-tier accuracy (mean and sample std over seeds), the mean over tiers, training FLOPs per sample per
tier (analytic and measured, which do not depend on the seed), communication per round (bytes up and
down, all clients together) and the utilization CV after the last round. Pure: no file is read here.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_comparison", "comparison_markdown", "write_comparison_plots"]


def _mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "n": len(present)}


def _accuracy(tier: Mapping[str, Any]) -> float | None:
    accuracy = tier.get("accuracy") or {}
    return accuracy.get("mean")


def _method_row(label: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    first = runs[0]
    tiers = []
    for index, tier in enumerate(first["tiers"]):
        per_seed = [run["tiers"][index] for run in runs]
        flops = tier.get("flops_per_sample", {})
        tiers.append(
            {
                "tier": tier["tier"],
                "budget": tier["budget"],
                "top_k": tier.get("top_k"),
                "rank": tier.get("rank"),
                "accuracy": _mean_std([_accuracy(t) for t in per_seed]),
                "initial_accuracy": _mean_std([(t.get("initial_accuracy") or {}).get("mean") for t in per_seed]),
                "answer_perplexity": _mean_std([t.get("answer_perplexity") for t in per_seed]),
                "flops_per_sample": {"analytic": flops.get("analytic"), "measured": flops.get("measured")},
                "step_time_s": _mean_std([t.get("step_time_s") for t in per_seed]),
            }
        )
    per_round_up = [sum(t.get("upload_bytes_per_round") or 0 for t in run["tiers"]) for run in runs]
    per_round_down = [sum(t.get("download_bytes_per_round") or 0 for t in run["tiers"]) for run in runs]
    return {
        "label": label,
        "method": first.get("method"),
        "seeds": [run.get("seed") for run in runs],
        "tiers": tiers,
        "mean_over_tiers": _mean_std([(run.get("mean_over_tiers") or {}).get("accuracy") for run in runs]),
        "communication_per_round": {
            "upload_bytes": _mean_std(per_round_up)["mean"],
            "download_bytes": _mean_std(per_round_down)["mean"],
        },
        "utilization_cv": _mean_std([(run.get("balance") or {}).get("mean_cv") for run in runs]),
        "dead_experts": _mean_std([(run.get("balance") or {}).get("dead_experts_total") for run in runs]),
        "wall_clock_s": sum((run.get("timing") or {}).get("total_s") or 0.0 for run in runs),
        "chance": (first.get("evaluation") or {}).get("chance"),
        "protocol": (first.get("evaluation") or {}).get("protocol"),
    }


def build_comparison(summaries: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """{"methods": [row per method label, in the given order], "protocol", "chance"}; see the module docstring."""
    rows = [_method_row(label, runs) for label, runs in summaries.items() if runs]
    if not rows:
        raise ValueError("no finished run to compare")
    budgets = [[t["budget"] for t in row["tiers"]] for row in rows]
    if any(b != budgets[0] for b in budgets):
        raise ValueError("the methods were run with different budget tiers; they cannot share one table")
    return {
        "protocol": rows[0]["protocol"],
        "chance": rows[0]["chance"],
        "budgets": budgets[0],
        "methods": rows,
    }


def _pct(stat: Mapping[str, Any]) -> str:
    if stat.get("mean") is None:
        return "-"
    text = f"{100 * stat['mean']:.1f}"
    return f"{text} ± {100 * stat['std']:.1f}" if stat.get("n", 0) > 1 else text


def comparison_markdown(comparison: Mapping[str, Any]) -> str:
    """The Markdown table: per-tier accuracy (mean ± std over seeds), mean over tiers, GFLOPs per sample
    per tier, MB per round (all clients, up + down) and the utilization CV; then the gold-answer
    perplexity per tier and the paired differences to the first method, where the runs have them."""
    budgets = comparison["budgets"]
    header = (
        ["method", "seeds"]
        + [f"β={b:g} acc %" for b in budgets]
        + ["mean acc %"]
        + [f"β={b:g} GFLOP" for b in budgets]
        + ["MB/round", "util. CV"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in comparison["methods"]:
        gflops = []
        for tier in row["tiers"]:
            value = tier["flops_per_sample"].get("analytic")
            size = f"r{tier['rank']}" if tier.get("rank") is not None else f"K{tier['top_k']}"
            gflops.append(f"{value / 1e9:.1f} ({size})" if value is not None else "-")
        comm = row["communication_per_round"]
        megabytes = ((comm["upload_bytes"] or 0) + (comm["download_bytes"] or 0)) / 1e6
        cv = row["utilization_cv"]["mean"]
        lines.append(
            "| "
            + " | ".join(
                [row["label"], str(len(row["seeds"]))]
                + [_pct(t["accuracy"]) for t in row["tiers"]]
                + [_pct(row["mean_over_tiers"])]
                + gflops
                + [f"{megabytes:.1f}", f"{cv:.3f}" if cv is not None else "-"]
            )
            + " |"
        )
    chance = comparison.get("chance")
    note = f"\n{comparison.get('protocol')} accuracy; chance {100 * chance:.1f}%." if chance is not None else ""
    return (
        "\n".join(lines)
        + "\n"
        + note
        + "\n"
        + _perplexity_markdown(comparison["methods"], budgets)
        + _paired_markdown(comparison.get("paired"), budgets)
    )


def _perplexity_markdown(rows: Sequence[Mapping[str, Any]], budgets: Sequence[float]) -> str:
    """Per tier, the gold-answer perplexity (mean ± std over seeds): the accuracy's companion, which moves
    long before the ranking of the options does; empty when no run recorded it."""
    if not any(t["answer_perplexity"]["mean"] is not None for row in rows for t in row["tiers"]):
        return ""

    def cell(stat: Mapping[str, Any]) -> str:
        if stat.get("mean") is None:
            return "-"
        return f"{stat['mean']:.2f} ± {stat['std']:.2f}" if stat.get("n", 0) > 1 else f"{stat['mean']:.2f}"

    header = ["method"] + [f"β={b:g} answer ppl" for b in budgets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([row["label"]] + [cell(t["answer_perplexity"]) for t in row["tiers"]]) + " |")
    return (
        "\nGold-answer perplexity per tier (exp of the mean NLL per answer token, mean ± std over seeds; lower "
        "is better):\n\n" + "\n".join(lines) + "\n"
    )


def paired_cell(entry: Mapping[str, Any], scale: float, digits: int, seeds: bool = False) -> str:
    """One paired difference as `+m [low, high]`, ` *` where the interval excludes zero, and with
    `seeds` each seed pair's own difference after it when there are several; `-` when nothing was paired."""
    if entry.get("mean") is None:
        return "-"
    mark = " *" if entry["low"] > 0 or entry["high"] < 0 else ""
    text = f"{scale * entry['mean']:+.{digits}f} [{scale * entry['low']:+.{digits}f}, {scale * entry['high']:+.{digits}f}]{mark}"
    per_seed = [value for value in entry.get("per_seed") or [] if value is not None]
    if seeds and len(per_seed) > 1:
        text += " (seeds " + ", ".join(f"{scale * value:+.{digits}f}" for value in per_seed) + ")"
    return text


def _paired_markdown(paired: Mapping[str, Any] | None, budgets: Sequence[float]) -> str:
    """Per tier, each method minus the reference on the same examples and seeds, with paired 95% intervals
    (`ubsmoe.report.paired`); empty when no run wrote per-example records."""
    if not paired or not paired.get("methods"):
        return ""

    header = ["method"] + [f"β={b:g} Δacc pts" for b in budgets] + [f"β={b:g} ΔNLL/token" for b in budgets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, tiers in paired["methods"].items():
        lines.append(
            "| "
            + " | ".join(
                [label]
                + [paired_cell(t["accuracy"], 100, 1) for t in tiers]
                + [paired_cell(t["answer_nll"], 1, 3) for t in tiers]
            )
            + " |"
        )
    return (
        f"\nPaired differences to {paired['reference']} on the same examples and seeds (mean [95% bootstrap "
        "interval, resampling the seeds and the examples]; * where the interval excludes zero; a lower answer NLL "
        "is better):\n\n" + "\n".join(lines) + "\n"
    )


def write_comparison_plots(comparison: Mapping[str, Any], folder: Path) -> list[Path]:
    """accuracy_by_tier.png (bars, ± std), accuracy_vs_flops.png (per tier), utilization_cv.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rows, budgets = comparison["methods"], comparison["budgets"]
    written = []
    # one distinct colour per method: tab10 repeats after ten, and a comparison with ablations has twelve
    palette = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    colours = {row["label"]: palette(i % palette.N) for i, row in enumerate(rows)}

    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) * len(budgets)) + 2, 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        means = [100 * (t["accuracy"]["mean"] or 0) for t in row["tiers"]]
        stds = [100 * (t["accuracy"]["std"] or 0) for t in row["tiers"]]
        ax.bar(
            [j + i * width for j in range(len(budgets))],
            means,
            width,
            yerr=stds,
            label=row["label"],
            capsize=2,
            color=colours[row["label"]],
        )
    if comparison.get("chance") is not None:
        ax.axhline(100 * comparison["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(budgets))], [f"β={b:g}" for b in budgets])
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy per budget tier (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach the top
    fig.tight_layout()
    written.append(folder / "accuracy_by_tier.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in rows:
        points = [
            (t["flops_per_sample"]["analytic"] / 1e9, 100 * t["accuracy"]["mean"])
            for t in row["tiers"]
            if t["flops_per_sample"].get("analytic") is not None and t["accuracy"]["mean"] is not None
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=row["label"], color=colours[row["label"]])
    ax.set_xlabel("training GFLOPs per sample (analytic)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs compute, one point per tier")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(folder / "accuracy_vs_flops.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(rows)), 3.5))
    cvs = [row["utilization_cv"]["mean"] or 0 for row in rows]
    errors = [row["utilization_cv"]["std"] or 0 for row in rows]
    ax.bar([row["label"] for row in rows], cvs, yerr=errors, capsize=2, color="tab:purple")
    ax.set_ylabel("utilization CV (last round)")
    ax.set_title("expert balance per method (lower is more even)")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    written.append(folder / "utilization_cv.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
