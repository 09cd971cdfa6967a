"""Real Flower processes on 127.0.0.1 (`ubsmoe.flower.deploy`): a SuperLink with four SuperNodes, a
simulation SuperLink reached with `flwr run`, a SuperNode killed in the middle of a run, and the
launcher stopped with SIGTERM.

Each run test runs the tiny experiment of `test_run` through `flwr run` and compares it with the
in-process `run_experiment` of the same config and seed, with the tolerance of `test_flower` (1e-6; see
there). Everything the tests start is stopped by the deployment script, also when a test fails. The
checks of the launcher's options start no process at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("transformers")

from test_flower import _assert_same_run, _close, _lines  # noqa: E402
from test_run import QUICK, write_experiment  # noqa: E402

from ubsmoe.config import ConfigError, load_config  # noqa: E402
from ubsmoe.fl.experiment import run_experiment  # noqa: E402
from ubsmoe.flower import deploy  # noqa: E402
from ubsmoe.flower.deploy import DeploymentError, IncompleteRunError, main, run_local_deployment, run_problems  # noqa: E402
from ubsmoe.flower.server_app import ServerOptions, run_server  # noqa: E402

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
def experiment(tmp_path_factory):
    return write_experiment(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def setup(experiment):
    experiment["reference"] = experiment["root"] / "reference"
    run_experiment(load_config(experiment["config"], QUICK), experiment["reference"])
    return experiment


def _deploy(setup, name: str, **options) -> tuple[int, Path]:
    out = setup["root"] / name
    code = run_local_deployment(
        str(setup["config"]), out, list(QUICK), app_dir=APP_DIR, port=_free_ports(5), timeout=900, **options
    )
    return code, out


def test_a_superlink_killed_after_a_round_resumes_to_the_in_process_run(setup):
    # four SuperNodes; the SuperLink is killed (SIGKILL) once round 0 is checkpointed, and the run stops
    # there; --resume starts a new SuperLink and SuperNodes and the run ends as the uninterrupted one
    code, out = _deploy(setup, "deployed", kill_superlink_after_round=0)
    assert code != 0 and (out / "logs" / "killed.txt").read_text().startswith("superlink")
    assert not (out / "run" / "summary.json").exists()
    assert [p.name for p in sorted((out / "run" / "checkpoint").glob("round_*"))] == ["round_0001"]
    code = run_local_deployment(
        str(setup["config"]), out, list(QUICK), app_dir=APP_DIR, port=_free_ports(5), timeout=900, resume=True
    )
    assert code == 0, (out / "logs" / "resume-1" / "flwr-run.log").read_text()[-3000:]
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
    # heartbeats (60 s in flwr 1.42) and answers its message with an error, well inside the round timeout,
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


def test_bad_deployment_options_give_one_message(experiment, capsys):
    with pytest.raises(DeploymentError, match="nodes are 0..3"):
        _deploy(experiment, "bad-node", kill_node=7)
    with pytest.raises(DeploymentError, match="need a deployment"):
        _deploy(experiment, "bad-sim", simulation=True, betas=[1.0] * 4)
    code = main(["--config", str(experiment["root"] / "missing.yaml"), "--out", str(experiment["root"] / "bad-config")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err


@pytest.fixture
def no_process(monkeypatch):
    """Fails a test as soon as the launcher starts a process."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the launcher started a process: {args[0] if args else kwargs}")

    monkeypatch.setattr(deploy.subprocess, "Popen", refuse)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--beta", "1.5", "--beta", "1", "--beta", "1", "--beta", "1"],
            "--beta of node 0 = 1.5: must be a number in (0, 1]",
        ),
        (["--beta", "0.5", "--beta", "nan", "--beta", "1", "--beta", "1"], "--beta of node 1 = nan"),
        (["--beta", "0.5", "--beta", "1"], "2 --beta value(s) given for the experiment's 4 clients"),
        (["--port", "-1"], "--port -1: must be in 1..65531"),
        (["--port", "70000"], "--port 70000: must be in 1..65531"),
        (["--min-replies", "5"], "--min-replies = 5: must be in 1..4, the clients a round samples"),
        (["--set", "federation.fraction=0.5", "--min-replies", "3"], "--min-replies = 3: must be in 1..2"),
    ],
    ids=[
        "beta-above-1",
        "beta-nan",
        "beta-count",
        "port-negative",
        "port-too-high",
        "min-replies",
        "min-replies-fraction",
    ],
)
def test_bad_options_stop_the_launcher_before_it_starts_anything(experiment, no_process, capsys, options, message):
    out = experiment["root"] / "never-started"
    code = main(["--config", str(experiment["config"]), "--out", str(out), *options])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err
    assert "Traceback" not in captured.err and "done" not in captured.out
    assert not out.exists()


def test_a_busy_port_is_named_with_the_process_holding_it(experiment, no_process, capsys):
    port = _free_ports(5)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port + 2))  # the second SuperNode's port
        holder.listen()
        code = main(
            ["--config", str(experiment["config"]), "--out", str(experiment["root"] / "busy"), "--port", str(port)]
        )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert f"port {port + 2} on 127.0.0.1 is in use by pid {os.getpid()} " in err
    assert not (experiment["root"] / "busy").exists()


def test_the_server_app_checks_min_replies_before_the_first_round(experiment, tmp_path):
    # grid None: the check must come before the output folder, the model and the first round
    for extra, min_replies, allowed in (([], 5, "1..4"), (["federation.fraction=0.5"], 3, "1..2")):
        options = ServerOptions(
            config=str(experiment["config"]),
            overrides=(*QUICK, *extra),
            out_dir=str(tmp_path / "run"),
            min_replies=min_replies,
        )
        with pytest.raises(ValueError, match=rf"min-replies = {min_replies}: must be in {allowed}"):
            run_server(None, options)
        assert not (tmp_path / "run").exists()


def test_the_server_app_locks_its_output_folder(experiment, tmp_path, monkeypatch):
    """A ServerApp run refuses a folder another run holds (and a folder with a run in it), before any model load."""
    from ubsmoe.fl.outdir import OutputFolderError, lock_output
    from ubsmoe.flower import server_app

    monkeypatch.setattr(server_app, "set_up_experiment", lambda *args: pytest.fail("loaded the model"))
    options = ServerOptions(config=str(experiment["config"]), overrides=QUICK, out_dir=str(tmp_path / "run"))
    with lock_output(tmp_path / "run"), pytest.raises(OutputFolderError, match="in use by another ubsmoe run"):
        run_server(None, options)
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run"):
        run_server(None, options)


def test_a_run_without_every_node_is_reported_not_done(tmp_path, monkeypatch, capsys):
    # what a run with node 0 refused (beta 1.5) and node 3 killed by the drill leaves behind
    run = tmp_path / "run"
    run.mkdir()
    absent = "no connected SuperNode has this client id"
    summary = {
        "runtime": {"kind": "flower", "nodes": {"1": 0.5, "2": 1.0}},
        "rounds": [
            {"round": 0, "missing": [{"client_id": 0, "reason": absent}]},
            {
                "round": 1,
                "missing": [{"client_id": 0, "reason": absent}, {"client_id": 3, "reason": "Node Unavailable"}],
            },
        ],
    }
    (run / "summary.json").write_text(json.dumps(summary))
    log = tmp_path / "flwr-run.log"
    log.write_text(
        "\x1b[93mWARNING \x1b[0m:   node 81 could not say who it is: ValueError: node-config beta = 1.5: must be ...\n"
    )
    problems = run_problems(run, 4, killed=3, server_log=log)
    assert len(problems) == 2
    assert problems[0].startswith("client 0: its SuperNode never joined the federation")
    assert f"missing in round(s) 0, 1 ({absent})" in problems[0]
    assert (
        problems[1]
        == "the ServerApp logged: node 81 could not say who it is: ValueError: node-config beta = 1.5: must be ..."
    )
    unplanned = run_problems(run, 4, server_log=log)  # node 3 was not the drill's: it counts too
    assert [p.split(":")[0] for p in unplanned[:2]] == ["client 0", "client 3"]

    def finished_without_node_0(*args, **kwargs):
        raise IncompleteRunError(problems)

    monkeypatch.setattr(deploy, "run_local_deployment", finished_without_node_0)
    code = main(["--out", str(tmp_path / "deployed")])
    captured = capsys.readouterr()
    assert code == 1 and "done" not in captured.out
    assert captured.err.startswith("error: the run finished, but not with every node: client 0: ")


def _process_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (parent pid, session id, start time, command line) of every live process (zombies left out)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] not in ("Z", "X"):
                table[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]), command)
    return table


def _family(table, root: int, sessions: set[int]) -> dict[tuple[int, int], str]:
    """(pid, start time) -> command line of `root`'s descendants and of every process in `sessions`."""
    members = {pid for pid, (_, sid, _, _) in table.items() if sid in sessions}
    grown = {root}
    while grown:
        grown = {pid for pid, (ppid, _, _, _) in table.items() if ppid in grown | members} - members
        members |= grown
    return {(pid, table[pid][2]): table[pid][3] for pid in members}


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process tree from /proc")
def test_sigterm_stops_every_process_the_launcher_started(experiment, tmp_path):
    port = _free_ports(5)
    sets = [arg for override in QUICK for arg in ("--set", override)]
    command = [sys.executable, "-m", "ubsmoe.flower.deploy", "--config", str(experiment["config"]), *sets]
    launcher = subprocess.Popen(
        [*command, "--out", str(tmp_path / "out"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    family: dict[tuple[int, int], str] = {}
    sessions: set[int] = set()
    try:
        # up: every SuperNode joined (the launcher submitted the run after that), their SuperExecs and the
        # SuperLink's, and the ServerApp's process under the latter (in a session of its own)
        deadline = time.monotonic() + 240
        while not (
            sum("flower-superexec" in c for c in family.values()) == 5
            and any("flwr-serverapp" in c for c in family.values())
        ):
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, sorted(family.values())
            time.sleep(0.5)
            table = _process_table()
            family = _family(table, launcher.pid, sessions)
            sessions |= {table[pid][1] for pid, _ in family if pid in table} - {os.getsid(0)}
        launcher.send_signal(signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=90)
        assert launcher.returncode == 128 + signal.SIGTERM, stderr
        assert "SIGTERM: stopped every process it started" in stderr and "done" not in stdout
        table = _process_table()
        left = {name: c for name, c in family.items() if table.get(name[0], (0, 0, -1))[2] == name[1]}
        left.update(_family(table, launcher.pid, sessions))  # also what started in their sessions since
        assert not left
        for p in range(port, port + 5):
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(("127.0.0.1", p))  # free again: the next deployment can use it
    finally:  # whatever the outcome, nothing of this test stays
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
        table = _process_table()
        for pid, start in {**family, **_family(table, launcher.pid, sessions)}:
            if table.get(pid, (0, 0, -1))[2] == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
