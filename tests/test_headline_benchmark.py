"""benchmarks/headline.py: per tier, UB-SMoE against SMoE-naive and the best rank baseline, paired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "headline.py"


@pytest.fixture(scope="module")
def headline():
    return load_benchmark(SCRIPT)


def _run(folder: Path, correct: list[bool], nll: float, finished: bool = True) -> None:
    """One run of one tier (K = 2) on one task: its summary and last evaluation's records."""
    (folder / "evaluations").mkdir(parents=True)
    records = [
        {"tier": 0, "task": "t", "index": i, "correct": c, "gold_nll": nll, "gold_tokens": 1}
        for i, c in enumerate(correct)
    ]
    (folder / "evaluations" / "round_0003.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        accuracy = sum(correct) / len(correct)
        summary = {"tiers": [{"tier": 0, "top_k": 2, "accuracy": {"mean": accuracy}}]}
        (folder / "summary.json").write_text(json.dumps(summary))


def test_the_best_rank_baseline_is_picked_per_tier_and_paired(headline, tmp_path, capsys):
    _run(tmp_path / "ubsmoe" / "seed0", [True] * 8 + [False] * 2, nll=1.0)
    _run(tmp_path / "ubsmoe" / "seed1", [True] * 8 + [False] * 2, nll=1.0)
    _run(tmp_path / "smoe-naive" / "seed0", [True] * 5 + [False] * 5, nll=1.5)
    _run(tmp_path / "smoe-naive" / "seed1", [True] * 5 + [False] * 5, nll=1.5, finished=False)  # still running
    _run(tmp_path / "hetlora" / "seed0", [False] * 10, nll=3.0)
    _run(tmp_path / "flexlora" / "seed0", [True] * 6 + [False] * 4, nll=2.0)
    assert headline.main([str(tmp_path), "--markdown", str(tmp_path / "table.md")]) == 0
    result = json.loads(capsys.readouterr().out)
    (row,) = result["tiers"]
    assert row["top_k"] == 2 and row["ubsmoe"] == {"mean": 0.8, "std": 0.0, "seeds": 2}
    versus = row["ubsmoe - smoe-naive"]
    assert versus["seeds"] == 1  # only the seed both finished is paired
    assert versus["accuracy"]["mean"] == pytest.approx(0.3) and versus["answer_nll"]["mean"] == pytest.approx(-0.5)
    assert row["best_rank_baseline"]["method"] == "flexlora"
    assert row["ubsmoe - best rank baseline"]["accuracy"]["mean"] == pytest.approx(0.2)
    assert set(result["missing"]) == {"flora", "florist"}
    table = (tmp_path / "table.md").read_text()
    assert "| K=2 | 80.0 ± 0.0 | 50.0 ± 0.0 | +30.0 [" in table and "flexlora (60.0 ± 0.0)" in table


def test_a_folder_without_the_reference_says_so(headline, tmp_path, capsys):
    assert headline.main([str(tmp_path / "absent")]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no finished run of ubsmoe"):
        headline.main([str(tmp_path)])
