"""The readable final table of a run (rich), from its summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

__all__ = ["summary_table"]


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, int | float) else "-"


def _accuracy(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "-"
    return f"{_pct(entry.get('mean'))}±{_pct(entry.get('ci95'))}"


def _number(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    return f"{value / scale:.{digits}f}" if isinstance(value, int | float) else "-"


def summary_table(summary: Mapping[str, Any]) -> Table:
    """One row per tier: budget and K_c (or rank), accuracy before and after, answer perplexity, compute, step time, bytes."""
    evaluation = summary.get("evaluation", {})
    table = Table(
        title=f"{summary.get('method')} · {evaluation.get('protocol')} accuracy (%) per tier, "
        f"after round {(evaluation.get('round') or 0) + 1}",
        caption=f"chance {_pct(evaluation.get('chance'))}% · ± = 95% interval · GFLOP = analytic training "
        "GFLOPs per sample (measured ones in summary.json) · MB per client and round · expert balance after the "
        f"last round: mean CV {_number(summary.get('balance', {}).get('mean_cv'))}, "
        f"dead experts {summary.get('balance', {}).get('dead_experts_total', '-')}",
    )
    # short headers: the table must stay readable in an 80-column terminal
    for name in ("tier", "before", "after", "ans.ppl", "GFLOP", "step s", "MB up/dn"):
        table.add_column(name, justify="right", no_wrap=True)
    for tier in summary.get("tiers", []):
        flops = tier.get("flops_per_sample", {})
        size = f"r={tier['rank']}" if tier.get("rank") is not None else f"K={tier.get('top_k')}"
        table.add_row(
            f"β{tier['budget']:g} {size}",
            _accuracy(tier.get("initial_accuracy")),
            _accuracy(tier.get("accuracy")),
            _number(tier.get("answer_perplexity")),
            _number(flops.get("analytic"), 1e9, 3),
            _number(tier.get("step_time_s")),
            f"{_number(tier.get('upload_bytes_per_client_round'), 1e6)}/"
            f"{_number(tier.get('download_bytes_per_client_round'), 1e6)}",
        )
    mean = summary.get("mean_over_tiers", {})
    table.add_section()
    table.add_row(
        "mean",
        _pct(mean.get("initial_accuracy")),
        f"{_pct(mean.get('accuracy'))}±{_pct(mean.get('ci95'))}",
        _number(mean.get("answer_perplexity")),
        "",
        "",
        "",
    )
    return table
