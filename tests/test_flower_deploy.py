"""Real Flower processes on 127.0.0.1 (`ubsmoe.flower.deploy`): a SuperLink with four SuperNodes, a
simulation SuperLink reached with `flwr run`, and a SuperNode killed in the middle of a run.

Each test runs the tiny experiment of `test_run` through `flwr run` and compares it with the in-process
`run_experiment` of the same config and seed, with the tolerance of `test_flower` (1e-6; see there).
Everything the tests start is stopped by the deployment script, also when a test fails.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("transformers")

from test_flower import _assert_same_run, _close, _lines  # noqa: E402
from test_run import QUICK, write_experiment  # noqa: E402

from ubsmoe.config import load_config  # noqa: E402
from ubsmoe.fl.experiment import run_experiment  # noqa: E402
from ubsmoe.flower.deploy import DeploymentError, main, run_local_deployment  # noqa: E402

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: this repository (pyproject.toml)


def _free_ports(count: int) -> int:
    """A base port with `count` consecutive free ports on 127.0.0.1 (the SuperLink's and each SuperNode's)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(40000, 60000)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free ports on 127.0.0.1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    setup = write_experiment(tmp_path_factory.mktemp("deploy"))
    setup["reference"] = setup["root"] / "reference"
    run_experiment(load_config(setup["config"], QUICK), setup["reference"])
    return setup


def _deploy(setup, name: str, **options) -> tuple[int, Path]:
    out = setup["root"] / name
    code = run_local_deployment(
        str(setup["config"]), out, list(QUICK), app_dir=APP_DIR, port=_free_ports(5), timeout=900, **options
    )
    return code, out


def test_a_superlink_with_four_supernodes_matches_the_in_process_run(setup):
    code, out = _deploy(setup, "deployed")
    assert code == 0, (out / "logs" / "flwr-run.log").read_text()[-3000:]
    _assert_same_run(out / "run", setup["reference"])
    runtime = json.loads((out / "run" / "summary.json").read_text())["runtime"]
    assert runtime["nodes"] == {"0": 0.5, "1": 0.5, "2": 1.0, "3": 1.0}  # each SuperNode's declared beta


def test_flwr_run_on_a_simulation_superlink_matches_the_in_process_run(setup):
    code, out = _deploy(setup, "simulated", simulation=True)
    assert code == 0, (out / "logs" / "flwr-run.log").read_text()[-3000:]
    _assert_same_run(out / "run", setup["reference"])
    assert not list((out / "logs").glob("supernode-*.log"))  # Ray's virtual nodes, no SuperNode processes


def test_a_supernode_killed_mid_run_does_not_stop_it(setup):
    # node 3 dies (SIGKILL) once round 0 is checkpointed; the SuperLink marks it offline after two missed
    # heartbeats (60 s in flwr 1.41) and answers its message with an error, well inside the round timeout,
    # and round 1 goes on with the other three
    code, out = _deploy(setup, "fault", kill_node=3, kill_after_round=0, round_timeout=300, min_replies=3)
    assert code == 0, (out / "logs" / "flwr-run.log").read_text()[-3000:]
    assert (out / "logs" / "killed.txt").is_file()
    lines, reference = _lines(out / "run"), _lines(setup["reference"])
    assert _close([l for l in lines if l["round"] == 0], [l for l in reference if l["round"] == 0])
    late = {line["client_id"]: line for line in lines if line["round"] == 1}
    assert [c for c, line in sorted(late.items()) if line["accepted"]] == [0, 1, 2]
    # told by the SuperLink (node offline) or by the discovery, not by waiting out the 300 s
    assert late[3]["accepted"] is False and "missing" in late[3]["drop_reason"]
    assert "Node Unavailable" in late[3]["drop_reason"] or "no connected SuperNode" in late[3]["drop_reason"]
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert [m["client_id"] for m in summary["rounds"][1]["missing"]] == [3]
    assert len(summary["rounds"][1]["accepted"]) == 3


def test_bad_deployment_options_give_one_message(setup, capsys):
    with pytest.raises(DeploymentError, match="nodes are 0..3"):
        _deploy(setup, "bad-node", kill_node=7)
    with pytest.raises(DeploymentError, match="need a deployment"):
        _deploy(setup, "bad-sim", simulation=True, betas=[1.0] * 4)
    code = main(["--config", str(setup["root"] / "missing.yaml"), "--out", str(setup["root"] / "bad-config")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
