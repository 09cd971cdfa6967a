"""Paired comparisons of two methods on the same evaluation examples (issue 15's "evaluation that resolves").

Two runs of one comparison evaluate every tier on the same examples (the data split is seeded by
`data.seed`, which `ubsmoe compare` keeps), and each run writes one record per (tier, task, example)
(`OUT/evaluations/round_NNNN.jsonl`). A method's difference to a reference method is then measured
example by example: for each tier, the pairs are (the same seed of both methods, the same example);
the accuracy difference is the mean of `correct_B - correct_A` over the pairs and the answer-NLL
difference the mean of the per-token gold-answer NLL differences. Their 95% interval is a percentile
bootstrap over the pairs (resampled together, so the pairing is kept), seeded: the same records give
the same interval. A difference is claimed only when its interval excludes zero.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["paired_bootstrap", "paired_tier_differences", "read_records"]


def paired_bootstrap(differences: Sequence[float], resamples: int = 4000, seed: int = 0) -> dict[str, Any]:
    """{mean, low, high, n}: the mean paired difference and its 95% percentile-bootstrap interval."""
    n = len(differences)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = sum(differences) / n
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(differences, k=n)) / n for _ in range(resamples))
    low, high = means[int(0.025 * (resamples - 1))], means[int(round(0.975 * (resamples - 1)))]
    return {"mean": mean, "low": low, "high": high, "n": n}


def read_records(path: Path) -> list[dict[str, Any]] | None:
    """The per-example records of one evaluation file, or None when the run wrote none (older runs)."""
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _by_example(records: Sequence[Mapping[str, Any]], tier: int) -> dict[tuple[str, int], Mapping[str, Any]]:
    return {(r["task"], int(r["index"])): r for r in records if r["tier"] == tier}


def _nll_per_token(record: Mapping[str, Any]) -> float | None:
    tokens = record.get("gold_tokens")
    return record["gold_nll"] / tokens if tokens else None


def paired_tier_differences(
    reference: Sequence[Sequence[Mapping[str, Any]]],
    other: Sequence[Sequence[Mapping[str, Any]]],
    tiers: Sequence[int],
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per tier, `other - reference`: {tier, accuracy: paired_bootstrap, answer_nll: paired_bootstrap}.

    `reference[i]` and `other[i]` are the records of the i-th seed of each method (the same seeds in
    the same order); examples present in only one of a pair are left out.
    """
    out = []
    for tier in tiers:
        correct, nll = [], []
        for records_a, records_b in zip(reference, other, strict=False):
            a, b = _by_example(records_a, tier), _by_example(records_b, tier)
            for key in sorted(a.keys() & b.keys()):
                correct.append(float(b[key]["correct"]) - float(a[key]["correct"]))
                nll_a, nll_b = _nll_per_token(a[key]), _nll_per_token(b[key])
                if nll_a is not None and nll_b is not None:
                    nll.append(nll_b - nll_a)
        out.append(
            {
                "tier": tier,
                "accuracy": paired_bootstrap(correct, seed=seed),
                "answer_nll": paired_bootstrap(nll, seed=seed + 1),
            }
        )
    return out
