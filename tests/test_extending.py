"""A method defined outside the package (examples/fedprox.py, the walk-through of docs/extending.md) runs
through `ubsmoe run` and through the Flower simulation, by its import path and by a registered name.

FedProx adds (mu / 2) ||w - w_start||^2 to the client's loss, so every client line after training has
`train_loss` above `train_lm_loss` (the loss without the method's term) when mu > 0, and equal to it at mu = 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from test_run import QUICK, write_experiment  # noqa: E402

from ubsmoe.config import ConfigError, load_config  # noqa: E402
from ubsmoe.fl.experiment import run_experiment  # noqa: E402
from ubsmoe.methods import method_class, register_method  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FEDPROX = "fedprox:FedProx"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_experiment(tmp_path_factory.mktemp("extending"))


@pytest.fixture
def examples_on_path(monkeypatch):
    """examples/ importable here and in every process started from here (Flower's Ray workers, `ubsmoe run`)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")])))


def _proximal_terms(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["train_loss"] - line["train_lm_loss"] for line in lines if line["accepted"]]


def test_ubsmoe_run_takes_a_method_by_its_import_path(setup, examples_on_path):
    out = setup["root"] / "cli-fedprox"
    sets = [*QUICK, f"method={FEDPROX}", "method_options.mu=10.0"]
    command = [sys.executable, "-m", "ubsmoe.cli", "run", "--config", str(setup["config"]), "--out", str(out)]
    result = subprocess.run(
        [*command, *[arg for s in sets for arg in ("--set", s)]], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == FEDPROX and summary["config"]["method_options"] == {"mu": 10.0}
    terms = _proximal_terms(out)
    assert len(terms) == 8 and all(t > 0 for t in terms)


def test_a_registered_method_runs_in_process(setup, examples_on_path):
    from fedprox import FedProx

    register_method("fedprox-example", FedProx)
    assert method_class("fedprox-example") is FedProx
    out = setup["root"] / "registered"
    run_experiment(load_config(setup["config"], [*QUICK, "method=fedprox-example", "method_options.mu=0"]), out)
    assert all(abs(t) < 1e-12 for t in _proximal_terms(out))  # mu = 0: FedProx is UB-SMoE


def test_a_method_from_outside_runs_under_flower_as_in_process(setup, examples_on_path):
    from test_flower import _assert_same_run, _flower, _reference

    extra = [f"method={FEDPROX}", "method_options.mu=10.0"]
    flower = _flower(setup, "flower-fedprox", extra)
    reference = _reference(setup, "reference-fedprox", extra)
    _assert_same_run(flower, reference)
    assert all(t > 0 for t in _proximal_terms(flower))


def test_bad_methods_and_options_are_one_clear_line(setup, examples_on_path, tmp_path):
    def problem(*sets: str) -> str:
        with pytest.raises(ConfigError) as info:
            run_experiment(load_config(setup["config"], [*QUICK, *sets]), tmp_path / "never")
        return str(info.value)

    assert problem(f"method={FEDPROX}", "method_options.nu=1") == (
        'method_options = {"nu": 1}: method fedprox:FedProx does not take nu (it takes mu)'
    )
    assert problem(f"method={FEDPROX}", "method_options.mu=high") == (
        'method_options = {"mu": "high"}: method fedprox:FedProx: option mu = \'high\' must be float'
    )
    assert "must be float" in problem(f"method={FEDPROX}", "method_options.mu=true")
    assert "cannot import nowhere.fedprox" in problem("method=nowhere.fedprox:FedProx")
    assert "not a subclass of ubsmoe.methods.Method" in problem("method=json:JSONDecoder")
    assert not (tmp_path / "never").exists()
