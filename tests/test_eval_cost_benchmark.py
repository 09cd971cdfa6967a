"""benchmarks/eval_cost.py: its timing loop on a tiny model, and --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_benchmark

pytest.importorskip("transformers")

from test_generation import CharTokenizer  # noqa: E402

from ubsmoe.data.multiple_choice import MultipleChoice  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "eval_cost.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark(SCRIPT)


def test_each_k_gets_a_median_per_example_time(bench):
    import transformers

    from ubsmoe.models.native import adapt_moe_model, tiny_config

    model = transformers.AutoModelForCausalLM.from_config(tiny_config("olmoe"))
    adapt_moe_model(model)
    tasks = {"t": [MultipleChoice(f"question {i}", ("yes", "no", "maybe"), i % 3) for i in range(5)]}
    for protocol in ("loglik", "generate"):
        rows = bench.measure(model.eval(), CharTokenizer(), tasks, [1, 2], protocol, repeats=2, max_new_tokens=3)
        assert [r["k"] for r in rows] == [1, 2]
        for row in rows:
            assert row["examples"] == 5 and row["choices"] == 15 and len(row["repeats"]) == 2
            assert row["seconds_per_example"] == pytest.approx(row["seconds"] / 5)
            assert row["seconds"] == pytest.approx(
                sorted(row["repeats"])[0] + (sorted(row["repeats"])[1] - sorted(row["repeats"])[0]) / 2
            )


def test_help_runs_without_loading_a_model():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--quick" in result.stdout
