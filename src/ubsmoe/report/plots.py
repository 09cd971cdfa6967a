"""PNG plots of one federated run, drawn from its summary dict (the content of OUT/summary.json).

- `accuracy_by_round.png`: mean accuracy of each tier after every evaluated round (0 = before training), with a
  +-ci95 band per tier, the mean over tiers as a thick black line and chance as a dashed grey line.
- `utilization_heatmap.png`: global expert utilization, layer x expert, for up to six rounds spread over the run
  (always the first and the last), on one shared colour scale.
- `balance_by_round.png`: mean utilization coefficient of variation and total dead experts per round.
- `compute_vs_accuracy.png`: final accuracy (+-ci95) of each tier against its analytic training GFLOPs per sample,
  with the accuracy before training as hollow markers.
- `train_loss_by_round.png`: aggregated training loss per round and the mean client training loss of each tier.

Every plot returns None instead of raising when the summary lacks its data, so a partial run still gets a report.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "plot_accuracy_by_round",
    "plot_balance_by_round",
    "plot_compute_vs_accuracy",
    "plot_loss_by_round",
    "plot_utilization_heatmaps",
    "spread_rounds",
    "write_plots",
]

DPI = 110


def _get(obj: Any, *keys: Any) -> Any:
    """obj[k0][k1]..., or None as soon as a level is missing or of the wrong kind."""
    for key in keys:
        if isinstance(obj, Mapping):
            obj = obj.get(key)
        elif isinstance(obj, list | tuple) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return None
    return obj


def _list(obj: Any) -> list:
    return list(obj) if isinstance(obj, list | tuple) else []


def _num(value: Any) -> float | None:
    """A finite float, or None (None, NaN, inf and non-numbers all mean "no point here")."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _round_no(rnd: Mapping[str, Any], position: int) -> int:
    """The 1-based round number people read (records store 0-based indices), as the CLI prints it."""
    value = rnd.get("round")
    return (value if isinstance(value, int) and not isinstance(value, bool) else position) + 1


def _tier_label(tier: Mapping[str, Any], position: int) -> str:
    details = [f"β={tier['budget']:g}" if _num(tier.get("budget")) is not None else "", _size_label(tier)]
    return f"tier {tier.get('tier', position)}: " + ", ".join(d for d in details if d)


def _size_label(tier: Mapping[str, Any]) -> str:
    # Rank-method tiers all run at K_max: their rank is what tells them apart.
    if tier.get("rank") is not None:
        return f"r={tier['rank']}"
    return f"K={tier['top_k']}" if tier.get("top_k") is not None else ""


def _final_tier_labels(summary: Mapping[str, Any]) -> dict[Any, str]:
    """Labels keyed by tier index, from the final tiers (which know the rank) when the summary has them."""
    return {
        t.get("tier", i): _tier_label(t, i) for i, t in enumerate(_list(summary.get("tiers"))) if isinstance(t, Mapping)
    }


def _figure(figsize: tuple[float, float], **kwargs: Any) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained", **kwargs)
    FigureCanvasAgg(fig)  # Agg canvas per figure: no pyplot, no global backend switch
    return fig


def _title(summary: Mapping[str, Any], text: str) -> str:
    method = summary.get("method")
    return f"{method}: {text}" if method else text


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    fig.clear()
    return path


def spread_rounds(n_rounds: int, at_most: int = 6) -> list[int]:
    """Up to `at_most` sorted, distinct indices in range(n_rounds), evenly spread, always the first and the last."""
    if n_rounds <= 0 or at_most <= 0:
        return []
    if n_rounds <= at_most:
        return list(range(n_rounds))
    if at_most == 1:
        return [n_rounds - 1]
    step = (n_rounds - 1) / (at_most - 1)  # > 1 here, so rounding keeps the indices distinct
    return [int(math.floor(i * step + 0.5)) for i in range(at_most)]


def plot_accuracy_by_round(summary: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """Accuracy of each tier against rounds completed, from the initial and the per-round evaluations."""
    evals = []
    if _list(_get(summary, "initial", "tiers")):
        evals.append((0, summary["initial"]))
    for pos, rnd in enumerate(_list(summary.get("rounds"))):
        if isinstance(rnd, Mapping) and _list(_get(rnd, "eval", "tiers")):
            evals.append((_round_no(rnd, pos), rnd["eval"]))
    labels = _final_tier_labels(summary)
    series: dict[Any, list[tuple[int, float, float]]] = {}
    mean_points = []
    for x, ev in evals:
        accs = []
        for pos, t in enumerate(_list(ev.get("tiers"))):
            if not isinstance(t, Mapping) or (acc := _num(t.get("accuracy"))) is None:
                continue
            key = t.get("tier", pos)
            labels.setdefault(key, _tier_label(t, pos))
            ci = _num(t.get("ci95"))
            series.setdefault(key, []).append((x, acc, math.nan if ci is None else ci))
            accs.append(acc)
        mean = _num(ev.get("mean_accuracy"))
        if mean is None and accs:
            mean = float(np.mean(accs))
        if mean is not None:
            mean_points.append((x, mean))
    if not series and not mean_points:
        return None

    fig = _figure((8, 5))
    ax = fig.add_subplot()
    for j, key in enumerate(sorted(series, key=str)):
        x, y, ci = (np.array(v, dtype=float) for v in zip(*series[key], strict=True))
        color = f"C{j % 10}"
        ax.plot(x, y, marker="o", color=color, label=labels.get(key, f"tier {key}"))
        ax.fill_between(x, y - ci, y + ci, where=np.isfinite(ci), color=color, alpha=0.15, linewidth=0)
    if mean_points:
        mx, my = zip(*mean_points, strict=True)
        ax.plot(mx, my, color="black", linewidth=3, label="mean over tiers", zorder=5)
    chance = _num(_get(summary, "evaluation", "chance"))
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1.2, label=f"chance ({chance:.2f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rounds completed (0 = before training)")
    ax.set_ylabel("accuracy (mean over tasks)")
    ax.set_title(_title(summary, "accuracy by round"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _matrix(value: Any) -> np.ndarray | None:
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):  # ragged or non-numeric
        return None
    return arr if arr.ndim == 2 and arr.size and np.isfinite(arr).any() else None


def plot_utilization_heatmaps(summary: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """Layer x expert heatmaps of the global expert utilization for up to six rounds, one colour scale."""
    rows = []
    for pos, rnd in enumerate(_list(summary.get("rounds"))):
        if isinstance(rnd, Mapping) and (util := _matrix(rnd.get("utilization"))) is not None:
            rows.append((_round_no(rnd, pos), _num(rnd.get("mean_utilization_cv")), util))
    if not rows:
        return None
    picked = [rows[i] for i in spread_rounds(len(rows))]
    ncols = min(3, len(picked))
    nrows = math.ceil(len(picked) / ncols)
    vmax = max(float(np.nanmax(util)) for _, _, util in picked)
    vmax = vmax if vmax > 0 else 1.0

    fig = _figure((4.2 * ncols + 1.2, 3.2 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    image = None
    for ax, (round_no, cv, util) in zip(axes, picked, strict=False):
        image = ax.imshow(util, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"round {round_no}" + (f" (mean CV {cv:.2f})" if cv is not None else ""), fontsize="medium")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(picked) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[: len(picked)]), label="activation rate", shrink=0.9)
    fig.suptitle(_title(summary, "global expert utilization"))
    return _save(fig, path)


def plot_balance_by_round(summary: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """Mean utilization CV and total dead experts per round, in two stacked panels."""
    cv_points, dead_points = [], []
    for pos, rnd in enumerate(_list(summary.get("rounds"))):
        if not isinstance(rnd, Mapping):
            continue
        x = _round_no(rnd, pos)
        if (cv := _num(rnd.get("mean_utilization_cv"))) is not None:
            cv_points.append((x, cv))
        dead = [d for d in map(_num, _list(rnd.get("dead_experts"))) if d is not None]
        if dead:
            dead_points.append((x, sum(dead)))
    if not cv_points and not dead_points:
        return None

    fig = _figure((7, 6))
    ax_cv, ax_dead = fig.subplots(2, 1, sharex=True)
    for ax, points, color, ylabel in (
        (ax_cv, cv_points, "C0", "mean utilization CV"),
        (ax_dead, dead_points, "C3", "dead experts (all layers)"),
    ):
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", color=color)
        else:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    # at least 0..1 so that "no dead experts" reads as a flat line on whole numbers
    ax_dead.set_ylim(0, max([1.0] + [d for _, d in dead_points]) * 1.1)
    ax_dead.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_dead.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_dead.set_xlabel("round")
    ax_cv.set_title(_title(summary, "expert load balance by round"))
    return _save(fig, path)


def plot_compute_vs_accuracy(summary: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """Final accuracy (+-ci95) of each tier against its analytic training GFLOPs per sample."""
    initial = {
        t.get("tier", i): _num(t.get("accuracy"))
        for i, t in enumerate(_list(_get(summary, "initial", "tiers")))
        if isinstance(t, Mapping)
    }
    points = []
    for pos, tier in enumerate(_list(summary.get("tiers"))):
        if not isinstance(tier, Mapping):
            continue
        flops = _num(_get(tier, "flops_per_sample", "analytic"))
        acc = _num(_get(tier, "accuracy", "mean"))
        if flops is None or acc is None:
            continue
        ci = _num(_get(tier, "accuracy", "ci95"))
        points.append((flops / 1e9, acc, ci or 0.0, initial.get(tier.get("tier", pos)), _size_label(tier)))
    if not points:
        return None

    fig = _figure((7, 5))
    ax = fig.add_subplot()
    for j, (gflops, acc, ci, before, text) in enumerate(points):
        color = f"C{j % 10}"
        ax.errorbar(gflops, acc, yerr=ci, fmt="o", color=color, markersize=8, capsize=4)
        if text:
            ax.annotate(text, (gflops, acc), xytext=(7, 7), textcoords="offset points")
        if before is not None:
            ax.plot([gflops, gflops], [before, acc], color=color, linestyle=":", linewidth=1)
            ax.scatter([gflops], [before], s=64, facecolors="none", edgecolors=color, linewidths=1.5)
    # Proxy artists: one legend entry per marker style instead of one per tier.
    ax.scatter([], [], s=64, color="grey", label="after training (±ci95)")
    if any(p[3] is not None for p in points):
        ax.scatter([], [], s=64, facecolors="none", edgecolors="grey", label="before training")
    chance = _num(_get(summary, "evaluation", "chance"))
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1.2, label=f"chance ({chance:.2f})")
    ax.set_xlabel("training GFLOPs per sample (analytic)")
    ax.set_ylabel("final accuracy (mean over tasks)")
    ax.set_title(_title(summary, "compute vs accuracy per tier"))
    ax.margins(x=0.15, y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _client_tiers(summary: Mapping[str, Any]) -> dict[Any, Any]:
    return {
        c.get("client_id", i): c.get("tier")
        for i, c in enumerate(_list(_get(summary, "data", "clients")))
        if isinstance(c, Mapping) and c.get("tier") is not None
    }


def plot_loss_by_round(summary: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """Aggregated training loss per round, and the mean training loss of each tier's clients."""
    client_tier = _client_tiers(summary)
    aggregated = []
    per_tier: dict[Any, list[tuple[int, float]]] = {}
    for pos, rnd in enumerate(_list(summary.get("rounds"))):
        if not isinstance(rnd, Mapping):
            continue
        x = _round_no(rnd, pos)
        if (loss := _num(_get(rnd, "train", "train_lm_loss"))) is not None:
            aggregated.append((x, loss))
        losses: dict[Any, list[float]] = {}
        for line in _list(rnd.get("client_metrics")):
            tier = client_tier.get(_get(line, "client_id"))
            if tier is not None and (loss := _num(_get(line, "train_lm_loss"))) is not None:
                losses.setdefault(tier, []).append(loss)
        for tier, values in losses.items():
            per_tier.setdefault(tier, []).append((x, float(np.mean(values))))
    if not aggregated and not per_tier:
        return None

    labels = _final_tier_labels(summary)
    fig = _figure((8, 5))
    ax = fig.add_subplot()
    for j, tier in enumerate(sorted(per_tier, key=str)):
        label = labels.get(tier, f"tier {tier}") + " clients"
        ax.plot(*zip(*per_tier[tier], strict=True), marker="o", linestyle="--", color=f"C{j % 10}", label=label)
    if aggregated:
        ax.plot(*zip(*aggregated, strict=True), color="black", linewidth=3, marker="s", label="aggregated")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("training LM loss")
    ax.set_title(_title(summary, "training loss by round"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


_PLOTS = (
    (plot_accuracy_by_round, "accuracy_by_round.png"),
    (plot_utilization_heatmaps, "utilization_heatmap.png"),
    (plot_balance_by_round, "balance_by_round.png"),
    (plot_compute_vs_accuracy, "compute_vs_accuracy.png"),
    (plot_loss_by_round, "train_loss_by_round.png"),
)


def write_plots(summary: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Draw every plot the summary has data for into out_dir (created); returns the written paths, in order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for plot, name in _PLOTS:
        if (path := plot(summary, out / name)) is not None:
            written.append(path)
    return written
