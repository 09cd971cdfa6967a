"""Paired comparisons of two methods on the same examples (`ubsmoe.report.paired`)."""

from __future__ import annotations

import pytest

from ubsmoe.report.comparison import comparison_markdown
from ubsmoe.report.paired import paired_bootstrap, paired_tier_differences


def test_a_constant_difference_has_that_interval_and_noise_straddles_zero():
    assert paired_bootstrap([0.5] * 40) == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 40}
    noise = paired_bootstrap([1.0, -1.0] * 50)
    assert noise["mean"] == 0 and noise["low"] < 0 < noise["high"]
    assert paired_bootstrap([1.0, -1.0] * 50) == noise  # seeded
    assert paired_bootstrap([])["mean"] is None


def _records(tier_correct, nll):
    return [
        {"tier": tier, "task": "t", "index": i, "correct": c, "gold_nll": nll * 2, "gold_tokens": 2}
        for tier, correct in tier_correct.items()
        for i, c in enumerate(correct)
    ]


def test_pairs_are_the_same_example_of_the_same_seed():
    # seed 0: the other method gets tier 0 right everywhere the reference got it wrong; tier 1 equal
    reference = [_records({0: [False] * 10, 1: [True] * 10}, nll=1.0)] * 2
    other = [_records({0: [True] * 10, 1: [True] * 10}, nll=0.75)] * 2
    tiers = paired_tier_differences(reference, other, [0, 1])
    assert tiers[0]["accuracy"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 10, "per_seed": [1.0, 1.0]}
    assert tiers[1]["accuracy"]["mean"] == 0.0 and tiers[1]["accuracy"]["n"] == 10  # n counts examples
    assert tiers[0]["answer_nll"]["mean"] == pytest.approx(-0.25)  # per token: 0.75 - 1.0
    shifted = [[{**r, "index": r["index"] + 5} for r in run] for run in other]  # only 5 examples in common
    assert paired_tier_differences(reference, shifted, [0])[0]["accuracy"]["n"] == 5


def test_the_seeds_are_resampled_too_so_disagreeing_seeds_widen_the_interval():
    # two seeds that disagree on every example (+1 and -1): an example-only bootstrap of the per-example
    # means would give exactly [0, 0]; drawing the seeds as well gives the interval [-1, +1]
    opposite = [_records({0: [True] * 10}, nll=1.0), _records({0: [False] * 10}, nll=1.0)]
    flipped = [_records({0: [False] * 10}, nll=1.0), _records({0: [True] * 10}, nll=1.0)]
    (tier,) = paired_tier_differences(opposite, flipped, [0])
    assert tier["accuracy"]["per_seed"] == [-1.0, 1.0] and tier["accuracy"]["mean"] == 0.0
    assert (tier["accuracy"]["low"], tier["accuracy"]["high"]) == (-1.0, 1.0)
    # seeds that agree leave only the examples' sampling
    agreeing = paired_bootstrap([[1.0, -1.0] * 25, [1.0, -1.0] * 25])
    assert agreeing["n"] == 50 and -0.4 < agreeing["low"] < 0 < agreeing["high"] < 0.4


def test_the_table_marks_intervals_that_exclude_zero():
    entry = {"mean": 0.1, "low": 0.05, "high": 0.15, "n": 10}
    flat = {"mean": 0.0, "low": -0.1, "high": 0.1, "n": 10}
    comparison = {
        "budgets": [0.5],
        "methods": [],
        "paired": {"reference": "ubsmoe", "methods": {"smoe-naive": [{"accuracy": entry, "answer_nll": flat}]}},
    }
    table = comparison_markdown(comparison)
    assert "Paired differences to ubsmoe" in table
    assert "| smoe-naive | +10.0 [+5.0, +15.0] * | +0.000 [-0.100, +0.100] |" in table
    assert "Paired" not in comparison_markdown({**comparison, "paired": None})


def test_the_lift_script_reads_a_run_folder(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "lift_over_untrained.py"
    spec = importlib.util.spec_from_file_location("lift_over_untrained", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "evaluations").mkdir()
    before = _records({0: [False, False, True, True]}, nll=2.0)
    after = _records({0: [True, True, True, True]}, nll=1.0)
    for name, records in (("initial", before), ("round_0001", after)):
        lines = "".join(json.dumps(r) + "\n" for r in records)
        (tmp_path / "evaluations" / f"{name}.jsonl").write_text(lines)
    summary = {"config": {}, "timing": {"total_s": 1.0}, "tiers": [{"tier": 0, "top_k": 2, "budget": 0.25}]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    result = module.lift(tmp_path)
    (row,) = result["after_minus_before"]["round_0001"]
    assert result["examples_per_tier"] == 4 and row["top_k"] == 2
    assert row["accuracy"]["mean"] == 0.5 and row["answer_nll"]["mean"] == pytest.approx(-1.0)
