"""A Flower deployment on one machine: a SuperLink, one SuperNode per client, one run, then everything stopped.

    python -m ubsmoe.flower.deploy --config my.yaml --out runs/flower-local [--set key=value ...]
    python -m ubsmoe.flower.deploy --simulation --config my.yaml --out runs/flower-sim

With `--simulation` the SuperLink runs the federation itself in simulation mode (Ray, one virtual
SuperNode per client, tiers by partition-id) and step 4 is skipped; everything else is the same, so
this is also the `flwr run` route to a local simulation.

1. checks everything it can before starting anything, and stops with one message (exit code 2) when
   something is wrong: the config, every node's `--beta` (a number in (0, 1], one per client), the
   ports (in 1..65535, free on 127.0.0.1; a busy one is reported with the process holding it),
   `--min-replies` (at most the clients a round samples, as the ServerApp checks it too), the fault
   drill's options, the Flower tools, the app folder and the output folder;
2. writes a Flower config (`OUT/flwr-home/config.toml`, used through FLWR_HOME) with one SuperLink
   connection, `ubsmoe-local`, at 127.0.0.1:PORT, insecure (loopback only; with `--simulation`, also
   `options.num-supernodes` = the number of clients and one CPU per virtual client);
3. starts `flower-superlink --insecure [--simulation] --host 127.0.0.1 --port PORT
   --disable-runtime-dependency-installation` (Fleet, Control and Runtime APIs over HTTP on that one
   port in flwr 1.42; without the last flag the SuperLink `uv sync`s the app's dependencies into a new
   environment for every run, pulling an unpinned torch with CUDA);
4. starts one `flower-supernode --insecure --superlink 127.0.0.1:PORT --port PORT+1+i
   --node-config "client-id=i beta=B_i"` per client of the experiment, B_i its tier's budget (or
   `--beta` values, one per node), and waits until each has joined the SuperLink;
5. submits the app with `flwr run APP ubsmoe-local --stream --run-config ...` and waits for it;
6. stops every process it started, with their children (each runs in its own session and process
   group; the SuperLink's and the SuperNodes' `flower-superexec` and the ServerApp / ClientApp
   processes under them are found through /proc), also on an error, Ctrl-C (SIGINT), SIGTERM or
   SIGHUP (exit code 128 + the signal's number);
7. checks that the run was a full federation: OUT/run/summary.json exists, every client's node joined
   and no client went missing in a round (the fault drill's node excepted); otherwise it says which
   node and why, and exits with code 1 (the outputs stay).

Logs go to OUT/logs/, with `processes.json`: the id and process group of everything it started (to stop
them by hand with `kill -- -PGID` should the launcher itself be killed with SIGKILL). Fault drill (the
run carries on without the node, see docs/flower.md): `--kill-node I --kill-after-round R` kills
SuperNode I (SIGKILL, no goodbye to the SuperLink) as soon as the checkpoint of round R is on disk, so
it is gone for round R + 1; `--kill-node I --kill-after S` kills it S seconds after the run was
submitted instead. `--kill-superlink-after-round R` kills the SuperLink instead, once round R is
checkpointed: the run stops there, and `--resume` on the same `--out` starts a fresh SuperLink and
SuperNodes and continues the run from its newest checkpoint (the ServerApp's `resume` option; logs in
OUT/logs/resume-N/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ubsmoe.config import ConfigError, ExperimentConfig, load_config
from ubsmoe.fl.checkpoint import list_checkpoints
from ubsmoe.flower.processes import (
    DeploymentError,
    Interrupted,
    Processes,
    Signals,
    check_ports,
    flower_tool,
    wait_for_port,
)

__all__ = [
    "DeploymentError",
    "IncompleteRunError",
    "Interrupted",
    "main",
    "run_local_deployment",
    "run_problems",
]

CONNECTION = "ubsmoe-local"
NODE_JOINED = "SuperNode ID:"
"""What a flwr 1.42 SuperNode logs once the SuperLink has registered it."""


class IncompleteRunError(RuntimeError):
    """The run finished, but not as a full federation (a node refused, missing or dead); `problems` says which."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("the run finished, but not with every node: " + "; ".join(self.problems))


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


# ---- checks before and after ---------------------------------------------------------------------------


def _check_options(
    config: ExperimentConfig,
    *,
    port: int,
    betas: list[float] | None,
    round_timeout: float,
    min_replies: int,
    kill_node: int | None,
    kill_after: float,
    kill_after_round: int | None,
    kill_superlink_after_round: int | None = None,
    simulation: bool,
    timeout: float,
) -> list[float]:
    """Every node's budget when the options can work for `config`; else DeploymentError listing what is wrong."""
    from ubsmoe.flower.runtime import check_budget
    from ubsmoe.flower.server_app import ServerOptions, check_options

    nodes = config.num_clients
    problems = []
    budgets = list(betas) if betas is not None else config.client_budgets()
    if simulation and (kill_node is not None or betas is not None):
        problems.append("--simulation runs virtual SuperNodes: --kill-node and --beta need a deployment")
    if len(budgets) != nodes:
        problems.append(f"{len(budgets)} --beta value(s) given for the experiment's {nodes} clients (one per node)")
    for node, beta in enumerate(budgets):
        try:
            check_budget(beta, f"--beta of node {node}")
        except ValueError as error:
            problems.append(str(error))
    last = port + (0 if simulation else nodes)
    if not (port >= 1 and last <= 65535):
        problems.append(
            f"--port {port}: must be in 1..{65535 - (0 if simulation else nodes)}"
            + ("" if simulation else f" (the {nodes} SuperNodes take the ports after it, up to 65535)")
        )
    try:
        check_options(ServerOptions(min_replies=min_replies, round_timeout=round_timeout), config)
    except ValueError as error:
        problems.append(f"--{error}")
    if kill_node is not None and not 0 <= kill_node < nodes:
        problems.append(f"--kill-node {kill_node}: the nodes are 0..{nodes - 1}")
    if kill_node is not None and kill_after_round is not None:
        rounds = config.federation.rounds
        if not 0 <= kill_after_round < rounds - 1:
            problems.append(
                f"--kill-after-round {kill_after_round}: must be in 0..{rounds - 2} for a node to miss a round "
                f"of the run's {rounds}"
            )
    rounds = config.federation.rounds
    if kill_superlink_after_round is not None and not 0 <= kill_superlink_after_round < rounds - 1:
        problems.append(
            f"--kill-superlink-after-round {kill_superlink_after_round}: must be in 0..{rounds - 2}, a round "
            f"before the last of the run's {rounds}"
        )
    if not (math.isfinite(kill_after) and kill_after >= 0):
        problems.append(f"--kill-after {kill_after:g}: must be a number of seconds >= 0")
    if not timeout > 0:
        problems.append(f"timeout {timeout:g}: must be positive")
    if problems:
        raise DeploymentError("; ".join(problems))
    return [float(b) for b in budgets]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REFUSAL = re.compile(r"node \S+ (could not say who it is|not served)")


def run_problems(
    run_dir: Path, clients: int, *, killed: int | None = None, server_log: Path | None = None
) -> list[str]:
    """What kept a finished run from being a full federation, one line per client ([] when nothing did).

    Every client should have a node that joined (the summary's `runtime.nodes`) and no client may be
    recorded missing in a round; `killed` (the fault drill's node) is expected to go missing. With
    problems, the refusals in `server_log` (the ServerApp's output) are added as they were logged.
    """
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    joined = {int(client) for client in (summary.get("runtime") or {}).get("nodes", {})}
    missing: dict[int, list[tuple[Any, str]]] = {}
    for record in summary.get("rounds") or []:
        for entry in record.get("missing") or []:
            client = entry.get("client_id")
            if client != killed:
                missing.setdefault(client, []).append((record.get("round"), str(entry.get("reason", ""))))
    problems = []
    for client in sorted({c for c in range(clients) if c not in joined and c != killed} | set(missing)):
        parts = []
        if client not in joined:
            parts.append("its SuperNode never joined the federation (refused by the ServerApp, or not connected)")
        if client in missing:
            rounds = ", ".join(str(r) for r, _ in missing[client])
            reasons = "; ".join(dict.fromkeys(reason for _, reason in missing[client]))
            parts.append(f"missing in round(s) {rounds} ({reasons})")
        problems.append(f"client {client}: " + ", ".join(parts))
    if problems and server_log is not None:
        with contextlib.suppress(OSError):
            text = _ANSI.sub("", server_log.read_text(encoding="utf-8", errors="replace"))
            said = [line.split(":", 1)[-1].strip() for line in text.splitlines() if _REFUSAL.search(line)]
            problems += [f"the ServerApp logged: {line}" for line in dict.fromkeys(said)]
    return problems


# ---- the deployment ------------------------------------------------------------------------------------


def run_local_deployment(
    config_path: str | None,
    out: Path,
    overrides: list[str],
    *,
    app_dir: Path,
    port: int = 39200,
    betas: list[float] | None = None,
    round_timeout: float = 600.0,
    min_replies: int = 1,
    kill_node: int | None = None,
    kill_after: float = 0.0,
    kill_after_round: int | None = None,
    kill_superlink_after_round: int | None = None,
    resume: bool = False,
    simulation: bool = False,
    timeout: float = 1800.0,
    join_timeout: float = 180.0,
) -> int:
    """Run one experiment on a local SuperLink + SuperNodes; returns 0 when it ran as a full federation.

    Raises DeploymentError (nothing was started) when the options cannot work, `IncompleteRunError`
    when the run finished without some node (refused, missing in a round, dead), `Interrupted` on
    SIGTERM / SIGINT / SIGHUP (in the main thread), after stopping everything it started. Returns the
    failed run's code when there is no summary. `kill_node` (with `kill_after_round`, else `kill_after`
    seconds) is the fault drill of the module docstring, `kill_superlink_after_round` the SuperLink's
    (the run then stops at that round's checkpoint, and the call returns the failed run's code);
    `resume`: continue the run in `out` from its newest checkpoint; `join_timeout`: seconds to wait for
    the SuperNodes to join before submitting anyway (a node that never joins is then reported).
    """
    config = load_config(config_path, overrides)
    nodes = config.num_clients
    budgets = _check_options(
        config,
        port=port,
        betas=betas,
        round_timeout=round_timeout,
        min_replies=min_replies,
        kill_node=kill_node,
        kill_after=kill_after,
        kill_after_round=kill_after_round,
        kill_superlink_after_round=kill_superlink_after_round,
        simulation=simulation,
        timeout=timeout,
    )
    tools = {name: flower_tool(name) for name in ("flower-superlink", "flower-superexec", "flwr")}
    if not simulation:
        tools["flower-supernode"] = flower_tool("flower-supernode")
    app_dir = Path(app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise DeploymentError(f"--app {app_dir}: not a Flower app folder (no pyproject.toml)")
    check_ports([port] if simulation else list(range(port, port + 1 + nodes)))
    out = out.resolve()
    if resume:
        if not list_checkpoints(out / "run" / "checkpoint"):
            raise DeploymentError(f"--resume: {out / 'run'} holds no checkpoint of a run to continue")
        earlier = list((out / "logs").glob("resume-*")) if (out / "logs").is_dir() else []
        logs, home = out / "logs" / f"resume-{len(earlier) + 1}", out / "flwr-home"
        logs.mkdir(parents=True)
        home.mkdir(exist_ok=True)
    else:
        if out.exists() and any(out.iterdir()):
            raise DeploymentError(f"{out} is not empty; choose a new --out (or --resume to continue its run)")
        logs, home = out / "logs", out / "flwr-home"
        logs.mkdir(parents=True)
        home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        + (f"options.num-supernodes = {nodes}\noptions.backend.client-resources.num-cpus = 1\n" if simulation else ""),
        encoding="utf-8",
    )
    # the SuperLink and the SuperNodes start `flower-superexec` by name: the tools' folder goes first on PATH
    path = os.pathsep.join([str(Path(tools["flower-superexec"]).parent), os.environ.get("PATH", "")])
    processes = Processes(logs, {**os.environ, "FLWR_HOME": str(home), "PATH": path}, out)
    with Signals() as signals:
        try:
            code, exited, killed = _run(
                processes,
                signals,
                tools,
                config_path,
                out,
                overrides,
                budgets,
                app_dir=app_dir,
                port=port,
                round_timeout=round_timeout,
                min_replies=min_replies,
                kill_node=kill_node,
                kill_after=kill_after,
                kill_after_round=kill_after_round,
                kill_superlink_after_round=kill_superlink_after_round,
                resume=resume,
                simulation=simulation,
                timeout=timeout,
                join_timeout=join_timeout,
            )
        except BaseException:
            signals.holding += 1  # a second Ctrl-C does not cut the clean-up short
            processes.stop()
            raise
        signals.holding += 1
        processes.stop()
        if signals.pending is not None:
            raise Interrupted(signals.pending)
    if code != 0:
        return code
    problems = [
        f"supernode-{node} exited with code {rc} during the run (see logs/supernode-{node}.log)"
        for node, rc in sorted(exited.items())
    ]
    problems += run_problems(out / "run", nodes, killed=killed, server_log=logs / "flwr-run.log")
    if problems:
        raise IncompleteRunError(problems)
    return 0


def _run(
    processes: Processes,
    signals: Signals,
    tools: dict[str, str],
    config_path: str | None,
    out: Path,
    overrides: list[str],
    budgets: list[float],
    *,
    app_dir: Path,
    port: int,
    round_timeout: float,
    min_replies: int,
    kill_node: int | None,
    kill_after: float,
    kill_after_round: int | None,
    kill_superlink_after_round: int | None,
    resume: bool,
    simulation: bool,
    timeout: float,
    join_timeout: float,
) -> tuple[int, dict[int, int], int | None]:
    """Starts the processes and waits for the run: (its code, {node: exit code} of SuperNodes that died
    during the run, the node the drill killed or None)."""
    logs = processes.logs

    def start(name: str, command: list[str]) -> subprocess.Popen:
        with signals.hold():
            return processes.start(name, command)

    # --disable-runtime-dependency-installation: flwr 1.42's SuperLink otherwise `uv sync`s the app's
    # dependencies into a fresh environment per run (an unpinned torch: GBs of CUDA wheels)
    superlink = start(
        "superlink",
        [
            tools["flower-superlink"],
            "--insecure",
            *(["--simulation"] if simulation else []),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
    )
    wait_for_port(port, 60, superlink)
    supernodes = []
    for client, beta in enumerate([] if simulation else budgets):
        supernodes.append(
            start(
                f"supernode-{client}",
                [
                    tools["flower-supernode"],
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(port + 1 + client),
                    "--node-config",
                    f"client-id={client} beta={beta}",
                ],
            )
        )
    _wait_for_nodes(processes, superlink, supernodes, join_timeout)
    run_config = " ".join(
        [
            f"config={_toml_string(str(Path(config_path).resolve()) if config_path else '')}",
            f"overrides={_toml_string(';'.join(overrides))}",
            f"out-dir={_toml_string(str(out / 'run'))}",
            f"round-timeout={float(round_timeout)}",
            f"min-replies={int(min_replies)}",
            *(["resume=true"] if resume else []),
        ]
    )
    runner = start("flwr-run", [tools["flwr"], "run", str(app_dir), CONNECTION, "--stream", "--run-config", run_config])
    submitted = time.monotonic()
    killed: list[int] = []

    def checkpointed(round: int) -> bool:
        done = [int(p.name.split("_")[1]) for p in list_checkpoints(out / "run" / "checkpoint")]
        return bool(done) and max(done) >= round

    superlink_killed = threading.Event()
    if kill_superlink_after_round is not None:

        def kill_superlink() -> None:
            while runner.poll() is None and not checkpointed(kill_superlink_after_round):
                time.sleep(0.2)
            if runner.poll() is None and superlink.poll() is None:
                os.killpg(superlink.pid, signal.SIGKILL)
                superlink_killed.set()
                (logs / "killed.txt").write_text(f"superlink at {time.time():.0f}\n")

        threading.Thread(target=kill_superlink, daemon=True).start()
    if kill_node is not None:

        def due() -> bool:
            if kill_after_round is None:
                return time.monotonic() - submitted >= kill_after
            return checkpointed(kill_after_round)

        def kill() -> None:
            while runner.poll() is None and not due():
                time.sleep(0.2)
            if runner.poll() is None and supernodes[kill_node].poll() is None:
                killed.append(kill_node)  # first: the main thread must not count it as a node that died
                os.killpg(supernodes[kill_node].pid, signal.SIGKILL)
                (logs / "killed.txt").write_text(f"supernode-{kill_node} at {time.time():.0f}\n")

        threading.Thread(target=kill, daemon=True).start()
    deadline = time.monotonic() + timeout
    while runner.poll() is None:
        if superlink_killed.is_set():
            break  # the drill: the run cannot go on without its SuperLink
        if (out / "run" / "summary.json").is_file():
            time.sleep(2)  # the ServerApp has written its last file; let the stream end
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the run did not finish within {timeout:g} s; see {logs}")
        processes.refresh()
        time.sleep(1)
    exited = {
        node: process.returncode
        for node, process in enumerate(supernodes)
        if process.poll() is not None and node not in killed
    }
    code = 0 if (out / "run" / "summary.json").is_file() else (runner.returncode or 1)
    return code, exited, (killed[0] if killed else None)


def _wait_for_nodes(
    processes: Processes, superlink: subprocess.Popen, supernodes: list[subprocess.Popen], timeout: float
) -> None:
    """Until every SuperNode has joined the SuperLink (its log says so) or `timeout` s have passed (the run
    is then submitted anyway, and a node that never joins is reported after it); RuntimeError when the
    SuperLink or a SuperNode exits first."""
    pending = set(range(len(supernodes)))
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        if superlink.poll() is not None:
            raise RuntimeError(
                f"the SuperLink exited (code {superlink.returncode}); see {processes.logs / 'superlink.log'}"
            )
        for node in sorted(pending):
            log = processes.logs / f"supernode-{node}.log"
            text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
            if NODE_JOINED in text:
                pending.discard(node)
            elif supernodes[node].poll() is not None:
                last = [line for line in _ANSI.sub("", text).splitlines() if line.strip()][-1:]
                raise RuntimeError(
                    f"supernode-{node} exited (code {supernodes[node].returncode}) before joining the SuperLink"
                    + (f": {last[0].strip()}" if last else "")
                    + f"; see {log}"
                )
        processes.refresh()
        if pending:
            time.sleep(0.5)


def _last_error(log: Path) -> str:
    """': <the ServerApp's last error line>' from the run's log, or '' when it has none."""
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
        errors = [line for line in lines if "Error:" in line or "Error(" in line]
        if errors:
            return f": {_ANSI.sub('', errors[-1])}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ubsmoe.flower.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="experiment YAML/TOML (default: the embedded default experiment)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", required=True, type=Path, help="a new folder: logs, Flower config and run outputs")
    parser.add_argument("--port", type=int, default=39200, help="SuperLink port; SuperNodes use the next ones")
    parser.add_argument("--beta", type=float, action="append", help="budget of node i (repeat once per node)")
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=600.0,
        help="seconds a round waits for replies (a fresh ClientApp "
        "process loads the model for every message, minutes on a busy CPU)",
    )
    parser.add_argument("--min-replies", type=int, default=1, help="fewest updates a round may be aggregated from")
    parser.add_argument("--kill-node", type=int, help="fault drill: kill this SuperNode ...")
    parser.add_argument("--kill-after", type=float, default=30.0, help="... this many seconds after submitting")
    parser.add_argument("--kill-after-round", type=int, help="... or once the checkpoint of this round is written")
    parser.add_argument(
        "--kill-superlink-after-round", type=int, help="fault drill: kill the SuperLink once this round is checkpointed"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--simulation", action="store_true", help="a simulation SuperLink (Ray) instead of SuperNodes")
    parser.add_argument("--app", type=Path, default=Path(__file__).resolve().parents[3], help="the Flower app folder")
    args = parser.parse_args(argv)
    logs = args.out / "logs"
    try:
        code = run_local_deployment(
            args.config,
            args.out,
            args.set,
            app_dir=args.app,
            port=args.port,
            betas=args.beta,
            round_timeout=args.round_timeout,
            min_replies=args.min_replies,
            kill_node=args.kill_node,
            kill_after=args.kill_after,
            kill_after_round=args.kill_after_round,
            kill_superlink_after_round=args.kill_superlink_after_round,
            resume=args.resume,
            simulation=args.simulation,
        )
    except (Interrupted, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        print(f"{signal.Signals(signum).name}: stopped every process it started; logs in {logs}", file=sys.stderr)
        return 128 + int(signum)
    except (DeploymentError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except IncompleteRunError as error:
        print(f"error: {error}; outputs in {args.out / 'run'}, logs in {logs}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = args.out.resolve() / "run" / "summary.json"
    if code == 0:
        print(f"done: {summary}")
    elif args.kill_superlink_after_round is not None and (logs / "killed.txt").is_file():
        print(
            f"the drill killed the SuperLink after round {args.kill_superlink_after_round}; continue the run with "
            f"the same options and --resume (without the drill); logs in {logs}",
            file=sys.stderr,
        )
    else:
        print(f"the run failed (code {code}){_last_error(logs / 'flwr-run.log')}; logs in {logs}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
