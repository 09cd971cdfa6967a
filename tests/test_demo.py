import json

from typer.testing import CliRunner

from ubsmoe.cli import app
from ubsmoe.demo import DemoSettings, run_demo


def test_demo_runs_and_compute_falls_with_k(tmp_path):
    settings = DemoSettings(experts=16, native_top_k=4, hidden=32, intermediate=16, rounds=2, local_steps=2, batch=32)
    summary = run_demo(settings, tmp_path)
    assert summary["top_k_per_tier"] == [1, 2, 3, 4]
    ratios = [summary["flops_relative_to_full_k"][k] for k in summary["top_k_per_tier"]]
    assert ratios == sorted(ratios) and ratios[0] < 0.5 and ratios[-1] == 1.0
    for result in summary["methods"].values():
        assert len(result["rounds"]) == 2
        assert all(0 < loss < 2 for loss in result["rounds"][-1]["relative_test_loss"])
    assert summary["methods"]["smoe-naive"]["rounds"][-1]["phi_max"] == 0.0
    assert json.loads((tmp_path / "demo.json").read_text())["settings"]["rounds"] == 2
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_cli_rejects_bad_options_without_traceback():
    result = CliRunner().invoke(app, ["demo", "--rounds", "0"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
