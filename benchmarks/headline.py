"""The headline of docs/results.md: per tier, UB-SMoE against SMoE-naive and against the best rank baseline.

    python benchmarks/headline.py runs/benchmark-test [--markdown table.md]

reads a finished (or partly finished) `ubsmoe compare` folder, or its committable copy from
`benchmarks/collect_runs.py`, and prints JSON: per tier, each method's accuracy (mean and std over
its finished seeds) and the paired differences `reference - other` on the same examples and seeds
(`ubsmoe.report.paired`: accuracy in points and answer NLL per token, with the 95% interval that
resamples seeds and examples, and each seed pair's own difference). The "best rank baseline" is
chosen per tier as the rank method with the highest mean accuracy on this very split, which favours
the baseline: UB-SMoE's margin over it is, if anything, understated. FedIT is not among them: it trains
every client at the full rank whatever its budget, so it is the no-budget reference (`ubsmoe compare`'s
paired table has it), not a way to fit a budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ubsmoe.report.comparison import paired_cell
from ubsmoe.report.paired import finished_records, paired_runs

RANK_BASELINES = ("hetlora", "flexlora", "flora", "florist")
"""The heterogeneous-rank methods: each client trains at the rank its budget allows."""


def _finished_seeds(folder: Path, label: str) -> dict[str, dict[str, Any]]:
    """seed folder name -> {summary, records} for each finished run that wrote per-example records."""
    return {
        name: {
            "summary": json.loads((folder / label / name / "summary.json").read_text(encoding="utf-8")),
            "records": records,
        }
        for name, records in finished_records(folder / label).items()
    }


def _accuracy(runs: dict[str, dict[str, Any]], tier: int) -> dict[str, Any]:
    """The tier's accuracy (each task weighing the same, as in summary.json): mean and std over seeds."""
    per_seed = [
        next(t for t in run["summary"]["tiers"] if t["tier"] == tier)["accuracy"]["mean"] for run in runs.values()
    ]
    mean = sum(per_seed) / len(per_seed)
    std = (sum((a - mean) ** 2 for a in per_seed) / (len(per_seed) - 1)) ** 0.5 if len(per_seed) > 1 else 0.0
    return {"mean": mean, "std": std, "seeds": len(per_seed)}


def _difference(reference, other, tier: int) -> dict[str, Any]:
    """`reference - other` on the seeds both have, for one tier."""
    (entry,) = paired_runs(
        {name: run["records"] for name, run in other.items()},
        {name: run["records"] for name, run in reference.items()},
        [tier],
    )
    return {
        "seeds": len(entry["accuracy"]["per_seed"]),
        "accuracy": entry["accuracy"],
        "answer_nll": entry["answer_nll"],
    }


def headline(folder: Path, reference: str, against: str, baselines: tuple[str, ...]) -> dict[str, Any]:
    records = {label: _finished_seeds(folder, label) for label in (reference, against, *baselines)}
    missing = [label for label, seeds in records.items() if not seeds]
    if not records[reference]:
        raise SystemExit(f"{folder}: no finished run of {reference} with per-example records")
    present = [b for b in baselines if records[b]]
    first = next(iter(records[reference].values()))["summary"]
    tiers = [t["tier"] for t in first["tiers"]]
    top_k = {t["tier"]: t.get("top_k") for t in first["tiers"]}
    rows = []
    for tier in tiers:
        row: dict[str, Any] = {"tier": tier, "top_k": top_k[tier], reference: _accuracy(records[reference], tier)}
        if records[against]:
            row[against] = _accuracy(records[against], tier)
            row[f"{reference} - {against}"] = _difference(records[reference], records[against], tier)
        if present:
            scores = {b: _accuracy(records[b], tier) for b in present}
            best = max(present, key=lambda b: scores[b]["mean"])
            row["best_rank_baseline"] = {"method": best, **scores[best]}
            row["rank_baselines"] = scores
            row[f"{reference} - best rank baseline"] = _difference(records[reference], records[best], tier)
        rows.append(row)
    return {"folder": str(folder), "reference": reference, "against": against, "tiers": rows, "missing": missing}


def markdown(result: dict[str, Any]) -> str:
    reference, against = result["reference"], result["against"]
    lines = [
        f"| tier | {reference} acc % | {against} acc % | Δacc pts vs {against} | ΔNLL/token vs {against} "
        f"| best rank baseline (acc %) | Δacc pts vs it | ΔNLL/token vs it |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def acc(entry: dict[str, Any] | None) -> str:
        return "-" if not entry else f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"

    for row in result["tiers"]:
        versus, best = row.get(f"{reference} - {against}"), row.get(f"{reference} - best rank baseline")
        baseline = row.get("best_rank_baseline")
        lines.append(
            "| "
            + " | ".join(
                [
                    f"K={row['top_k']}",
                    acc(row[reference]),
                    acc(row.get(against)),
                    paired_cell(versus["accuracy"], 100, 1, seeds=True) if versus else "-",
                    paired_cell(versus["answer_nll"], 1, 3, seeds=True) if versus else "-",
                    f"{baseline['method']} ({acc(baseline)})" if baseline else "-",
                    paired_cell(best["accuracy"], 100, 1, seeds=True) if best else "-",
                    paired_cell(best["answer_nll"], 1, 3, seeds=True) if best else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a `ubsmoe compare` output folder or its collected copy")
    parser.add_argument("--reference", default="ubsmoe")
    parser.add_argument("--against", default="smoe-naive")
    parser.add_argument("--baselines", default=",".join(RANK_BASELINES), help="the rank methods to pick the best from")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"{args.folder}: no such folder", file=sys.stderr)
        return 2
    result = headline(args.folder, args.reference, args.against, tuple(b for b in args.baselines.split(",") if b))
    print(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
