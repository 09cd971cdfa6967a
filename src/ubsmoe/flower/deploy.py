"""A Flower deployment on one machine: a SuperLink, one SuperNode per client, one run, then everything stopped.

    python -m ubsmoe.flower.deploy --config my.yaml --out runs/flower-local [--set key=value ...]
    python -m ubsmoe.flower.deploy --simulation --config my.yaml --out runs/flower-sim

With `--simulation` the SuperLink runs the federation itself in simulation mode (Ray, one virtual
SuperNode per client, tiers by partition-id) and step 3 is skipped; everything else is the same, so
this is also the `flwr run` route to a local simulation.

1. writes a Flower config (`OUT/flwr-home/config.toml`, used through FLWR_HOME) with one SuperLink
   connection, `ubsmoe-local`, at 127.0.0.1:PORT, insecure (loopback only; with `--simulation`, also
   `options.num-supernodes` = the number of clients and one CPU per virtual client);
2. starts `flower-superlink --insecure [--simulation] --host 127.0.0.1 --port PORT
   --disable-runtime-dependency-installation` (Fleet, Control and Runtime APIs over HTTP on that one
   port in flwr 1.41; without the last flag the SuperLink `uv sync`s the app's dependencies into a new
   environment for every run, pulling an unpinned torch with CUDA);
3. starts one `flower-supernode --insecure --superlink 127.0.0.1:PORT --port PORT+1+i
   --node-config "client-id=i beta=B_i"` per client of the experiment, B_i its tier's budget (or
   `--beta` values, one per node);
4. submits the app with `flwr run APP ubsmoe-local --stream --run-config ...` and waits for it;
5. stops every process it started (also on an error or Ctrl-C), and checks that OUT/summary.json exists.

Logs go to OUT/logs/. Fault drill (the run carries on without the node, see docs/flower.md):
`--kill-node I --kill-after-round R` kills SuperNode I (SIGKILL, no goodbye to the SuperLink) as soon
as the checkpoint of round R is on disk, so it is gone for round R + 1; `--kill-node I --kill-after S`
kills it S seconds after the run was submitted instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ubsmoe.config import ConfigError, load_config
from ubsmoe.fl.checkpoint import list_checkpoints

__all__ = ["DeploymentError", "main", "run_local_deployment"]

CONNECTION = "ubsmoe-local"


class DeploymentError(ValueError):
    """The deployment cannot start as asked (a missing Flower tool, busy ports, bad options); says why."""


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise DeploymentError(f"{name} not found; install the Flower extra: pip install -e '.[flower]'")
    return found


def _wait_for_port(port: int, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited early (code {process.returncode}); see its log")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the SuperLink did not open 127.0.0.1:{port} within {timeout:g} s")


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


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
    simulation: bool = False,
    timeout: float = 1800.0,
) -> int:
    """Run one experiment on a local SuperLink + SuperNodes; returns 0 when the run wrote its summary.

    `kill_node` (with `kill_after_round`, else `kill_after` seconds) is the fault drill of the module
    docstring.
    """
    config = load_config(config_path, overrides)
    nodes = config.num_clients
    budgets = betas if betas is not None else config.client_budgets()
    if len(budgets) != nodes:
        raise DeploymentError(f"{len(budgets)} budgets given for {nodes} clients")
    if kill_node is not None and not 0 <= kill_node < nodes:
        raise DeploymentError(f"--kill-node {kill_node}: the nodes are 0..{nodes - 1}")
    if simulation and (kill_node is not None or betas is not None):
        raise DeploymentError("--simulation runs virtual SuperNodes: --kill-node and --beta need a deployment")
    ports = [port] if simulation else [port, *range(port + 1, port + 1 + nodes)]
    busy = [p for p in ports if not _free(p)]
    if busy:
        raise DeploymentError(f"port(s) {busy} on 127.0.0.1 are in use; pick another --port")
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise DeploymentError(f"{out} is not empty; choose a new --out")
    logs, home = out / "logs", out / "flwr-home"
    logs.mkdir(parents=True)
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        + (f"options.num-supernodes = {nodes}\noptions.backend.client-resources.num-cpus = 1\n" if simulation else ""),
        encoding="utf-8",
    )
    env = {**os.environ, "FLWR_HOME": str(home)}
    started: list[subprocess.Popen] = []
    handles = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed at the end)
        handles.append(log)
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out, start_new_session=True
        )
        started.append(process)
        return process

    try:
        # --disable-runtime-dependency-installation: flwr 1.41's SuperLink otherwise `uv sync`s the app's
        # dependencies into a fresh environment per run (an unpinned torch: GBs of CUDA wheels)
        superlink = start(
            "superlink",
            [
                _tool("flower-superlink"),
                "--insecure",
                *(["--simulation"] if simulation else []),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
        )
        _wait_for_port(port, 60, superlink)
        supernodes = []
        for client, beta in enumerate([] if simulation else budgets):
            supernodes.append(
                start(
                    f"supernode-{client}",
                    [
                        _tool("flower-supernode"),
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
        run_config = " ".join(
            [
                f"config={_toml_string(str(Path(config_path).resolve()) if config_path else '')}",
                f"overrides={_toml_string(';'.join(overrides))}",
                f"out-dir={_toml_string(str(out / 'run'))}",
                f"round-timeout={float(round_timeout)}",
                f"min-replies={int(min_replies)}",
            ]
        )
        command = [_tool("flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", run_config]
        with open(logs / "flwr-run.log", "w", encoding="utf-8") as run_log:
            runner = subprocess.Popen(command, stdout=run_log, stderr=subprocess.STDOUT, env=env, cwd=out)
            submitted = time.monotonic()
            started.append(runner)
            if kill_node is not None:

                def due() -> bool:
                    if kill_after_round is None:
                        return time.monotonic() - submitted >= kill_after
                    done = [int(p.name.split("_")[1]) for p in list_checkpoints(out / "run" / "checkpoint")]
                    return bool(done) and max(done) >= kill_after_round

                def kill() -> None:
                    while runner.poll() is None and not due():
                        time.sleep(0.2)
                    if runner.poll() is None and supernodes[kill_node].poll() is None:
                        os.killpg(supernodes[kill_node].pid, signal.SIGKILL)
                        (logs / "killed.txt").write_text(f"supernode-{kill_node} at {time.time():.0f}\n")

                threading.Thread(target=kill, daemon=True).start()
            deadline = time.monotonic() + timeout
            while runner.poll() is None:
                if (out / "run" / "summary.json").is_file():
                    time.sleep(2)  # the ServerApp has written its last file; let the stream end
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the run did not finish within {timeout:g} s; see {logs}")
                time.sleep(1)
        return 0 if (out / "run" / "summary.json").is_file() else (runner.returncode or 1)
    finally:
        for process in reversed(started):  # only what this function started
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGTERM) if process is not started[-1] else process.terminate()
        for process in started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        for handle in handles:
            handle.close()


def _last_error(log: Path) -> str:
    """': <the ServerApp's last error line>' from the run's log, or '' when it has none."""
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
        errors = [line for line in lines if "Error:" in line or "Error(" in line]
        if errors:
            return f": {errors[-1]}"
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
    parser.add_argument("--min-replies", type=int, default=1)
    parser.add_argument("--kill-node", type=int, help="fault drill: kill this SuperNode ...")
    parser.add_argument("--kill-after", type=float, default=30.0, help="... this many seconds after submitting")
    parser.add_argument("--kill-after-round", type=int, help="... or once the checkpoint of this round is written")
    parser.add_argument("--simulation", action="store_true", help="a simulation SuperLink (Ray) instead of SuperNodes")
    parser.add_argument("--app", type=Path, default=Path(__file__).resolve().parents[3], help="the Flower app folder")
    args = parser.parse_args(argv)
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
            simulation=args.simulation,
        )
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    except (DeploymentError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = args.out.resolve() / "run" / "summary.json"
    if code == 0:
        print(f"done: {summary}")
    else:
        print(
            f"the run failed (code {code}){_last_error(args.out / 'logs' / 'flwr-run.log')}; logs in {args.out / 'logs'}"
        )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
