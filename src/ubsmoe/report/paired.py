"""Paired comparisons of two methods on the same evaluation examples (issue 15's "evaluation that resolves").

Two runs of one comparison evaluate every tier on the same examples (the data split is seeded by
`data.seed`, which `ubsmoe compare` keeps), and each run writes one record per (tier, task, example)
(`OUT/evaluations/round_NNNN.jsonl`). A method's difference to a reference method is then measured
example by example: for each tier, the pairs are (the same seed of both methods, the same example);
the accuracy difference is the mean of `correct_B - correct_A` over the pairs and the answer-NLL
difference the mean of the per-token gold-answer NLL differences. Their 95% interval is a two-level
percentile bootstrap, seeded (the same records give the same interval): each resample draws the seed
pairs with replacement, then the examples with replacement, and averages the drawn seeds' differences
on the drawn examples. Drawing the examples once for all seeds keeps each example's seeds together
(they are not independent draws); drawing the seeds lets the training's own randomness widen the
interval, which an example-only bootstrap of a several-seed comparison would leave out. With one seed
it is the plain paired bootstrap over the examples. `per_seed` (each seed pair's mean difference) is
reported beside it. A difference is claimed only when the interval excludes zero.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["finished_records", "paired_bootstrap", "paired_runs", "paired_tier_differences", "read_records"]


def paired_bootstrap(
    differences: Sequence[float] | Sequence[Sequence[float]], resamples: int = 4000, seed: int = 0
) -> dict[str, Any]:
    """{mean, low, high, n}: the mean paired difference and its 95% percentile-bootstrap interval.

    `differences` is one difference per example, or a seeds x examples table of them (every seed on the
    same examples), which is resampled on both levels (module docstring); `n` counts the examples.
    """
    table = np.asarray(differences, dtype=np.float64)
    if table.ndim == 1:
        table = table[None, :]
    seeds, n = table.shape
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    seed_weights = np.stack([np.bincount(draw, minlength=seeds) for draw in rng.integers(0, seeds, (resamples, seeds))])
    per_example = seed_weights @ table / seeds  # resamples x examples: the drawn seeds' mean difference
    draws = rng.integers(0, n, (resamples, n))
    means = np.sort(np.take_along_axis(per_example, draws, axis=1).mean(axis=1))
    low, high = means[int(0.025 * (resamples - 1))], means[int(round(0.975 * (resamples - 1)))]
    return {"mean": float(table.mean()), "low": float(low), "high": float(high), "n": n}


def read_records(path: Path) -> list[dict[str, Any]] | None:
    """The per-example records of one evaluation file, or None when the run wrote none (older runs)."""
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def finished_records(method_folder: Path) -> dict[str, list[dict[str, Any]]]:
    """seed folder name -> the per-example records of its last evaluation, for every finished run
    (`summary.json` written) of one method in a `ubsmoe compare` folder (`OUT/<method>/seed<k>/`)."""
    found = {}
    for run in sorted(method_folder.glob("seed*"), key=lambda p: (len(p.name), p.name)):
        evaluations = sorted((run / "evaluations").glob("round_*.jsonl"))
        if evaluations and (run / "summary.json").is_file():
            found[run.name] = read_records(evaluations[-1])
    return found


def paired_runs(
    reference: Mapping[str, Sequence[Mapping[str, Any]]],
    other: Mapping[str, Sequence[Mapping[str, Any]]],
    tiers: Sequence[int],
) -> list[dict[str, Any]]:
    """`paired_tier_differences` of `other - reference` on the seeds both have ({seed name: records})."""
    seeds = [name for name in reference if name in other]
    return paired_tier_differences([reference[s] for s in seeds], [other[s] for s in seeds], tiers)


def _by_example(records: Sequence[Mapping[str, Any]], tier: int) -> dict[tuple[str, int], Mapping[str, Any]]:
    return {(r["task"], int(r["index"])): r for r in records if r["tier"] == tier}


def _nll_per_token(record: Mapping[str, Any]) -> float:
    return record["gold_nll"] / max(record["gold_tokens"], 1)


def paired_tier_differences(
    reference: Sequence[Sequence[Mapping[str, Any]]],
    other: Sequence[Sequence[Mapping[str, Any]]],
    tiers: Sequence[int],
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per tier, `other - reference`: {tier, accuracy, answer_nll}, each a `paired_bootstrap` over the
    examples plus `per_seed` (the mean difference of each seed pair).

    `reference[i]` and `other[i]` are the records of the i-th seed of each method (the same seeds in
    the same order); examples present in only one of a pair are left out.
    """
    out = []
    pairs = list(zip(reference, other, strict=False))
    for tier in tiers:
        by_seed = [(_by_example(a, tier), _by_example(b, tier)) for a, b in pairs]
        common = sorted(set.intersection(*(a.keys() & b.keys() for a, b in by_seed))) if by_seed else []
        correct = [[float(b[key]["correct"]) - float(a[key]["correct"]) for key in common] for a, b in by_seed]
        nll = [[_nll_per_token(b[key]) - _nll_per_token(a[key]) for key in common] for a, b in by_seed]
        out.append(
            {
                "tier": tier,
                "accuracy": {**paired_bootstrap(correct, seed=seed), "per_seed": [_mean(row) for row in correct]},
                "answer_nll": {**paired_bootstrap(nll, seed=seed + 1), "per_seed": [_mean(row) for row in nll]},
            }
        )
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
