"""`ubsmoe compare` on the tiny OLMoE: two methods, one round, two seeds; reuse on a second call; bad input."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from test_run import QUICK, write_experiment  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ubsmoe.cli import app  # noqa: E402
from ubsmoe.report.comparison import build_comparison, comparison_markdown  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_experiment(tmp_path_factory.mktemp("compare"))


def _compare(setup, methods, out, *extra, flags=()):
    sets = [x for item in [*QUICK, "federation.rounds=1", *extra] for x in ("--set", item)]
    args = ["compare", "--methods", methods, "--seeds", "2", "-c", str(setup["config"]), "--out", str(out), *sets]
    args += list(flags)
    return CliRunner().invoke(app, args)


def test_a_short_comparison_writes_its_table_and_plots(setup):
    out = setup["root"] / "cmp"
    result = _compare(setup, "ubsmoe,smoe-naive", out)
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert [row["label"] for row in comparison["methods"]] == ["ubsmoe", "smoe-naive"]
    for row in comparison["methods"]:
        assert row["seeds"] == [0, 1]
        assert [t["top_k"] for t in row["tiers"]] == [1, 2]
        assert all(t["accuracy"]["n"] == 2 and t["accuracy"]["std"] >= 0 for t in row["tiers"])
        assert row["communication_per_round"]["upload_bytes"] > 0
    assert (out / "ubsmoe" / "seed1" / "summary.json").is_file()
    table = (out / "comparison.md").read_text()
    assert "| ubsmoe | 2 |" in table and "| smoe-naive | 2 |" in table
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "accuracy_by_tier.png",
        "accuracy_vs_flops.png",
        "utilization_cv.png",
    ]
    # smoe-naive against ubsmoe, example by example on the same seeds (the runs' evaluations/ records)
    paired = comparison["paired"]
    assert paired["reference"] == "ubsmoe" and list(paired["methods"]) == ["smoe-naive"]
    for tier in paired["methods"]["smoe-naive"]:
        accuracy = tier["accuracy"]
        assert accuracy["n"] > 0 and accuracy["low"] <= accuracy["mean"] <= accuracy["high"]
    assert "Paired differences to ubsmoe" in table
    again = _compare(setup, "ubsmoe,smoe-naive", out)  # every run is reused
    assert again.exit_code == 0 and again.output.count("reused") == 4
    assert json.loads((out / "comparison.json").read_text())["methods"] == comparison["methods"]


def test_finished_only_tables_the_finished_runs_and_runs_nothing(setup):
    out = setup["root"] / "cmp"  # ubsmoe and smoe-naive finished there by the test above
    result = _compare(setup, "ubsmoe,fedit,smoe-naive", out, flags=["--finished-only"])
    assert result.exit_code == 0, result.output
    assert "started" not in result.output and not (out / "fedit").exists()
    comparison = json.loads((out / "comparison.json").read_text())
    assert [row["label"] for row in comparison["methods"]] == ["ubsmoe", "smoe-naive"]
    assert comparison["missing"] == [{"method": "fedit", "seed": s, "status": "absent"} for s in (0, 1)]
    assert "fedit seed 0 (absent)" in " ".join(result.output.split())
    empty = _compare(setup, "fedit", setup["root"] / "nothing-yet", flags=["--finished-only"])
    assert empty.exit_code == 2 and "no finished run" in " ".join(empty.output.split())


def test_bad_input_gives_one_message(setup):
    result = _compare(setup, "ubsmoe,fedavg", setup["root"] / "bad")
    assert result.exit_code == 2 and "unknown fedavg" in result.output and "Traceback" not in result.output
    other = _compare(setup, "ubsmoe", setup["root"] / "cmp", "federation.local_steps=3")
    assert other.exit_code == 2 and "another configuration" in " ".join(other.output.split())


def test_np_variants_resolve_against_the_model(setup):
    from ubsmoe.compare import variant_config
    from ubsmoe.config import load_config

    base = load_config(setup["config"])
    resolved = [variant_config(base, label, 0).moe.num_candidates for label in ("ubsmoe-np1x", "ubsmoe-np4x")]
    assert resolved[0] < resolved[1] or resolved[0] == resolved[1] == 4  # clipped to M


def test_the_table_reads_seed_spread():
    tier = {"tier": 0, "budget": 1.0, "top_k": 2, "rank": None, "flops_per_sample": {"analytic": 2e9}}
    runs = [
        {"method": "x", "seed": s, "tiers": [{**tier, "accuracy": {"mean": a}}], "mean_over_tiers": {"accuracy": a}}
        for s, a in ((0, 0.4), (1, 0.6))
    ]
    comparison = build_comparison({"x": runs})
    assert comparison["methods"][0]["tiers"][0]["accuracy"]["mean"] == pytest.approx(0.5)
    assert "50.0 ± 14.1" in comparison_markdown(comparison)
    assert "answer ppl" not in comparison_markdown(comparison)  # no run recorded it: no empty table
    for run, ppl in zip(runs, (3.0, 5.0), strict=True):
        run["tiers"][0]["answer_perplexity"] = ppl
    assert "| x | 4.00 ± 1.41 |" in comparison_markdown(build_comparison({"x": runs}))
