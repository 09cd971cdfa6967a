"""benchmarks/pg_dmr_sweep.py: settings variants through `run_comparison`, paired against the defaults."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import load_benchmark

pytest.importorskip("transformers")

from test_run import QUICK, write_experiment  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "pg_dmr_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    return load_benchmark(SCRIPT)


def test_every_variant_is_a_valid_change_of_the_benchmark(sweep):
    from ubsmoe.compare import variant_config
    from ubsmoe.config import load_config

    base = load_config(None, sweep.REFERENCE, "benchmark")  # as main() builds it: the paper's settings pinned
    configs = {label: variant_config(base, label, 0, sweep.VARIANTS) for label in sweep.VARIANTS}
    assert configs["default"].evaluation.initial and not base.evaluation.initial
    assert configs["default"].model_copy(update={"evaluation": base.evaluation}) == base  # only the extra scoring
    assert configs["pg-off"].ubsmoe_config().pseudo_gradient is False
    assert configs["pg-update"].ubsmoe_config().pg_space == "update"
    assert configs["k4-dmr-range-0.5"].ubsmoe_config().phi_max == 0.5
    assert configs["k4-dmr-range-0.5"].ubsmoe_config().pg_kappa == 4.0
    assert all(configs[label].ubsmoe_config().pg_space == "update" for label in sweep.PARENT)
    assert all(c.method == "ubsmoe" and c.evaluation.split == "dev" for c in configs.values())
    assert len({json.dumps(c.to_dict(), sort_keys=True) for c in configs.values()}) == len(configs)


def test_a_two_variant_sweep_runs_resumes_and_pairs(sweep, tmp_path, capsys):
    setup = write_experiment(tmp_path / "setup")
    sets = [x for item in [*QUICK, "federation.rounds=1"] for x in ("--set", item)]
    only = ["--only", "update-dmr-off"]
    args = ["--out", str(tmp_path / "sweep"), *only, "--config", str(setup["config"]), *sets]
    assert sweep.main(args) == 0
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    # the reference is always run first, and what an update-* variant changes one thing of comes with it
    assert list(result["variants"]) == ["default", "pg-update", "update-dmr-off"]
    update = result["variants"]["pg-update"]
    assert update["overrides"] == ["pseudo_gradient.space=update"]
    for tier in update["tiers"]:
        difference = tier["vs_default"]["accuracy"]
        assert difference["n"] > 0 and difference["low"] <= difference["mean"] <= difference["high"]
        assert "vs_parent" not in tier
    for tier in result["variants"]["update-dmr-off"]["tiers"]:
        assert tier["vs_parent"]["accuracy"]["n"] > 0 and tier["vs_parent"]["accuracy"]["per_seed"]
    tables = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "Each variant minus default" in tables and "Each variant minus pg-update" in tables
    assert "| update-dmr-off | 0 | " in tables  # the seeds it ran
    saved = json.loads((tmp_path / "sweep" / "pg-update" / "seed0" / "summary.json").read_text())
    assert saved["config"]["pseudo_gradient"]["space"] == "update"
    capsys.readouterr()
    assert sweep.main([*args, "--finished-only"]) == 0  # reads the finished runs, runs nothing
    assert json.loads(capsys.readouterr().out)["variants"].keys() == result["variants"].keys()
    # the committable copy (summaries and records only) rebuilds the same table, paired differences included
    spec = importlib.util.spec_from_file_location("collect_runs", SCRIPT.parent / "collect_runs.py")
    collect_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect_runs)
    assert collect_runs.main([str(tmp_path / "sweep"), str(tmp_path / "copy")]) == 0
    assert not list((tmp_path / "copy").rglob("checkpoint")) and not list((tmp_path / "copy").rglob("adapters"))
    capsys.readouterr()
    assert sweep.main([*args[:1], str(tmp_path / "copy"), *args[2:], "--finished-only"]) == 0
    rebuilt = json.loads(capsys.readouterr().out)["variants"]
    assert rebuilt["pg-update"]["tiers"] == update["tiers"]
    assert rebuilt["update-dmr-off"]["tiers"] == result["variants"]["update-dmr-off"]["tiers"]
    assert collect_runs.main([str(tmp_path / "nothing"), str(tmp_path / "copy2")]) == 2
    assert sweep.main(["--out", str(tmp_path / "bad"), "--only", "pg-offf"]) == 2
    assert "unknown pg-offf" in capsys.readouterr().err and not (tmp_path / "bad").exists()
