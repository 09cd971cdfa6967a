"""benchmarks/generate_protocol_report.py on hand-made per-example records of a comparison folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "generate_protocol_report.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark(SCRIPT)


def _record(tier, index, prediction, correct, generation):
    where = {"tier": tier, "budget": 0.25 * (tier + 1), "top_k": 8, "rank": 2 * (tier + 1), "task": "piqa"}
    return {**where, "index": index, "prediction": prediction, "correct": correct, "generation": generation}


def test_tiers_report_accuracy_with_wilson_and_the_unmatched_generations(bench, tmp_path, capsys):
    records = [
        _record(0, 0, None, False, ""),
        _record(0, 1, None, False, " the correct answer is answer7"),
        _record(0, 2, None, False, " Twist it."),
        _record(0, 3, 1, True, " the correct answer is solution2"),
        *[_record(1, i, 0, i % 2 == 0, " the correct answer is solution1") for i in range(4)],
    ]
    run = tmp_path / "cmp" / "hetlora" / "seed0"
    (run / "evaluations").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    (run / "evaluations" / "round_0001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench.main([str(tmp_path / "cmp")]) == 0
    low, high = json.loads(capsys.readouterr().out)["methods"]["hetlora"]["seed0"]
    assert (low["accuracy"], low["unmatched"], low["rank"]) == (0.25, 0.75, 2)
    assert low["wilson95"][0] > 0.0 and low["wilson95"][1] < 1.0
    assert low["unmatched_kinds"] == {"empty": 1, "answer sentence, label outside the options": 1, "other text": 1}
    assert (high["accuracy"], high["unmatched"], high["unmatched_kinds"]) == (0.5, 0.0, {})
    assert bench.main([str(tmp_path / "empty")]) == 2
    assert "no finished run" in capsys.readouterr().err
