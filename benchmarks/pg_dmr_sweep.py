"""UB-SMoE's open choices (PG's scale and space, DMR's momentum and range) measured on the dev split.

Every variant is the benchmark preset (`ubsmoe.config.presets`, evaluation on the dev half) run by
UB-SMoE with a few `--set` overrides; all run through `ubsmoe.compare.run_comparison`, so a sweep
interrupted at any point continues where it stopped when the same command runs again, and each
variant is paired, example by example, against the first (`default`, the paper's settings, pinned by
REFERENCE below whatever the package's defaults become), and each variant with a PARENT also against
it (the settings it changes one thing of).

    python benchmarks/pg_dmr_sweep.py --out runs/sweep              # every variant, resumable
    python benchmarks/pg_dmr_sweep.py --out runs/sweep --only default,pg-off
    python benchmarks/pg_dmr_sweep.py --out runs/sweep --finished-only   # the table so far, runs nothing

Prints JSON (and writes OUT/sweep.json, and the tables as OUT/sweep.md): per variant and tier, the accuracy and answer perplexity of its
last evaluation and the paired differences to `default` and to its PARENT (accuracy
and per-token answer NLL) with their 95% bootstrap intervals; the utilization CV and dead experts after the last round. N_p is not swept:
on the embedded default K_max = M = 8, so every N_p in [K_max, M] is the same model (docs/decisions.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

UPDATE = "pseudo_gradient.space=update"
KAPPA4 = [UPDATE, "pseudo_gradient.kappa=4.0"]

VARIANTS: dict[str, list[str]] = {
    "default": ["evaluation.initial=true"],  # also scores the untrained model: the preset's lift over it
    "pg-off": ["pseudo_gradient.enabled=false"],
    "pg-update": [UPDATE],
    "update-kappa-0.25": [UPDATE, "pseudo_gradient.kappa=0.25"],
    "update-kappa-4": KAPPA4,
    "update-kappa-16": [UPDATE, "pseudo_gradient.kappa=16.0"],  # where does the kappa-4 gain stop?
    "update-kappa-64": [UPDATE, "pseudo_gradient.kappa=64.0"],  # kappa 16 went on lowering the NLL
    # a control: is a larger kappa only a larger step? kappa 1 with 4x the learning rate of every round
    "update-lr-4x": [UPDATE, "federation.optimizer.lr=0.004", "federation.optimizer.min_lr=0.0004"],
    "update-dmr-off": [UPDATE, "dmr.enabled=false"],
    "k4-dmr-off": [*KAPPA4, "dmr.enabled=false"],
    "k4-dmr-zeta-0.5": [*KAPPA4, "dmr.zeta=0.5"],
    "k4-dmr-range-0.5": [*KAPPA4, "dmr.phi_min=-0.5", "dmr.phi_max=0.5"],
    "k4-dmr-zeta-0.99": [*KAPPA4, "dmr.zeta=0.99"],
    "k4-dmr-range-2": [*KAPPA4, "dmr.phi_min=-2.0", "dmr.phi_max=2.0"],
    "pg-kappa-0.25": ["pseudo_gradient.kappa=0.25"],
    "pg-kappa-4": ["pseudo_gradient.kappa=4.0"],
}
"""The sweep started from the paper's settings (`default`: kappa = 1 in gradient space, zeta = 0.9, phi in
[-1, 1]; its extra evaluation before training changes nothing in its training) and first measured PG's
space: pg-off is kappa = 0, pg-update applies PG to AdamW's actual updates. Two seeds put PG in update
space ahead at every tier (docs/decisions.md), so kappa was measured on top of it (`update-*`, each also
paired against pg-update); two seeds then put kappa 4 ahead, so DMR's choices are measured on top of
that (`k4-*`, each also paired against update-kappa-4): every change is measured from the settings the
evidence so far chose. Two seeds later put kappa 16 ahead of 4 on the answer NLL (one put 64 behind 16 at
K = 2), but 16 cost the default run's K = 8 accuracy, so runs keep 4 (docs/decisions.md). The gradient-space kappa variants come last: they are no longer a choice to make,
only a record of how kappa acts under the paper's form."""

PARENT = {
    **{label: "pg-update" for label in VARIANTS if label.startswith("update-")},
    **{label: "update-kappa-4" for label in VARIANTS if label.startswith("k4-")},
}
"""The variant each change is measured against, besides the pinned reference."""

REFERENCE = [
    "method=ubsmoe",
    "pseudo_gradient.enabled=true",
    "pseudo_gradient.kappa=1.0",
    "pseudo_gradient.space=gradient",
    "pseudo_gradient.rho_form=complement",
    "dmr.enabled=true",
    "dmr.zeta=0.9",
    "dmr.phi_min=-1.0",
    "dmr.phi_max=1.0",
    "dmr.range_lambda=0.01",
]
"""The settings the variants change, pinned to the values the sweep started from, so that a later change of the
package's defaults (the sweep's purpose) leaves a half-finished sweep resumable and its reference the same."""


def sweep_table(comparison: dict[str, Any], out: Path) -> dict[str, Any]:
    """Per variant and tier: accuracy, answer NLL, the paired difference to the reference variant and,
    for a variant with a PARENT, to it (`vs_parent`, on the seeds both finished)."""
    from ubsmoe.report.paired import finished_records, paired_runs

    paired = (comparison.get("paired") or {}).get("methods", {})
    table: dict[str, Any] = {}
    for row in comparison["methods"]:
        label = row["label"]
        parent = PARENT.get(label)
        tier_ids = [tier["tier"] for tier in row["tiers"]]
        versus_parent = None
        if parent is not None:
            versus_parent = paired_runs(finished_records(out / parent), finished_records(out / label), tier_ids)
        tiers = []
        for index, tier in enumerate(row["tiers"]):
            keys = ("tier", "budget", "top_k", "accuracy", "initial_accuracy", "answer_perplexity")
            entry = {key: tier.get(key) for key in keys}
            if label in paired:
                entry["vs_default"] = paired[label][index]
            if versus_parent is not None:
                entry["vs_parent"] = versus_parent[index]
            tiers.append(entry)
        table[label] = {
            "overrides": VARIANTS.get(label, []),
            "parent": parent,
            "seeds": row["seeds"],
            "utilization_cv": row["utilization_cv"],
            "dead_experts": row["dead_experts"],
            "tiers": tiers,
        }
    return table


def sweep_markdown(table: dict[str, Any]) -> str:
    """sweep.md: each variant's paired differences per tier, against `default` and against its PARENT."""
    from ubsmoe.report.comparison import paired_cell

    groups = [("vs_default", "default (the paper's settings)", list(table))]
    for parent in dict.fromkeys(entry.get("parent") for entry in table.values() if entry.get("parent")):
        groups.append(("vs_parent", parent, [label for label, entry in table.items() if entry.get("parent") == parent]))
    sections = []
    for key, title, labels in groups:
        rows = {label: table[label]["tiers"] for label in labels if any(key in t for t in table[label]["tiers"])}
        if not rows:
            continue
        tiers = next(iter(rows.values()))
        header = ["variant", "seeds"]
        header += [f"K={t['top_k']} Δacc pts" for t in tiers] + [f"K={t['top_k']} ΔNLL/token" for t in tiers]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, entries in rows.items():
            cells = [paired_cell(t[key]["accuracy"], 100, 1, seeds=True) for t in entries]
            cells += [paired_cell(t[key]["answer_nll"], 1, 3, seeds=True) for t in entries]
            seeds = table[label]["seeds"]
            seeds = ", ".join(map(str, seeds)) if isinstance(seeds, list) else str(seeds)
            lines.append("| " + " | ".join([label, seeds, *cells]) + " |")
        sections.append(f"Each variant minus {title}, on the same dev examples and seeds:\n\n" + "\n".join(lines))
    note = (
        "Mean [95% bootstrap interval over seeds and examples] (each seed pair's own difference after it); * where the "
        "interval excludes zero; a lower answer NLL is better. Variants and their overrides: "
        "`benchmarks/pg_dmr_sweep.py`."
    )
    return "\n\n".join([*sections, note]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--only", default=None, help="comma-separated variants (default: all, in the table's order)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--preset", default="benchmark")
    parser.add_argument("--config", type=Path, default=None, help="a config file laid over the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override of the base config")
    parser.add_argument("--finished-only", action="store_true", help="run nothing: the table of finished runs")
    args = parser.parse_args(argv)

    from ubsmoe.compare import run_comparison, variant_config
    from ubsmoe.config import ConfigError, load_config

    try:
        labels = list(VARIANTS) if args.only is None else [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [label for label in labels if label not in VARIANTS]
        if unknown or not labels:
            raise ConfigError(f"--only: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(VARIANTS)}")
        if labels[0] != "default":
            labels = ["default", *[label for label in labels if label != "default"]]  # the reference comes first
        for label in list(labels):  # what each variant is measured against runs before it
            parent = PARENT.get(label)
            while parent is not None and parent not in labels:
                labels.insert(1, parent)
                parent = PARENT.get(parent)
        base = load_config(args.config, [*REFERENCE, *args.overrides], args.preset)
        for label in labels:  # every variant is a valid configuration before anything runs
            variant_config(base, label, base.seed, VARIANTS)
        comparison = run_comparison(
            base, labels, args.seeds, args.out, finished_only=args.finished_only, variants=VARIANTS
        )
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = {
        "benchmark": "UB-SMoE settings on the dev split (paired against 'default')",
        "base_config": comparison["base_config"],
        "missing": comparison["missing"],
        "variants": sweep_table(comparison, args.out),
    }
    (args.out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "sweep.md").write_text(sweep_markdown(result["variants"]), encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
