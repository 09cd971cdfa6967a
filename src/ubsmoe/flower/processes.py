"""The processes a local Flower deployment starts: finding the Flower tools, checking and waiting for ports,
starting each process in its own session, following its family through /proc, and stopping all of it
(also on SIGTERM / SIGINT / SIGHUP). `ubsmoe.flower.deploy` decides what to start and when.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class DeploymentError(ValueError):
    """The deployment cannot start as asked (a missing Flower tool, busy ports, bad options); says why."""


class Interrupted(BaseException):  # noqa: N818 (like KeyboardInterrupt, not an error of the run)
    """The launcher got SIGTERM, SIGINT or SIGHUP; raised after everything it started was stopped."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def flower_tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise DeploymentError(f"{name} not found; install the Flower extra: pip install -e '.[flower]'")
    return found


# ---- ports ---------------------------------------------------------------------------------------------


def _port_error(port: int) -> OSError | None:
    """Why a server could not listen on 127.0.0.1:`port` now (None: it could). SO_REUSEADDR, as the
    SuperLink and the SuperNodes set it: a closed connection in TIME_WAIT does not count, a listener does."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            return error
    return None


def _port_owner(port: int) -> str | None:
    """'pid N (command line)' of the process listening on `port` (Linux, what this user can see), else None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text(encoding="ascii").splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        command = command.strip()
                        return f"pid {proc.name} ({command[:100]}{'...' if len(command) > 100 else ''})"
    return None


def check_ports(ports: list[int]) -> None:
    problems = []
    for port in ports:
        error = _port_error(port)
        if error is None:
            continue
        if error.errno in (errno.EACCES, errno.EPERM):
            problems.append(f"port {port} needs root (ports below 1024 are privileged); pick --port 1024 or above")
        else:
            owner = _port_owner(port)
            problems.append(f"port {port} on 127.0.0.1 is in use" + (f" by {owner}" if owner else ""))
    if problems:
        raise DeploymentError(
            "; ".join(problems) + f" (the deployment needs ports {ports[0]}..{ports[-1]}); stop what holds them "
            "(a deployment left running: kill -- -PGID, see its logs/processes.json) or pick another --port"
        )


def wait_for_port(port: int, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited early (code {process.returncode}); see its log")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the SuperLink did not open 127.0.0.1:{port} within {timeout:g} s")


# ---- processes -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    sid: int
    start: int  # clock ticks after boot: (pid, start) names a process even once its pid is reused
    zombie: bool


def _process_table() -> dict[int, _Proc]:
    """Every process this user can see in /proc (empty where there is no /proc)."""
    table = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(entry.path, "stat").read_text(encoding="ascii", errors="replace")
                fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
                pid = int(entry.name)
                table[pid] = _Proc(pid, int(fields[1]), int(fields[3]), int(fields[19]), fields[0] in "ZX")
    return table


def _alive(name: tuple[int, int], table: dict[int, _Proc]) -> bool:
    proc = table.get(name[0])
    return proc is not None and proc.start == name[1] and not proc.zombie


class Processes:
    """What the launcher starts, each in its own session (so its process group), with every descendant.

    A started process can start others outside its group (flwr 1.42's SuperLink starts
    `flower-superexec` in a new session, which starts the ServerApp), so the family is also followed
    through /proc: the sessions of the started processes and every descendant of a member, recorded
    while they run (`refresh`), so one orphaned by the death of its parent is still found.
    """

    def __init__(self, logs: Path, env: dict[str, str], cwd: Path):
        self.logs, self.env, self.cwd = logs, env, cwd
        self.started: list[tuple[str, subprocess.Popen]] = []
        self.handles: list[Any] = []
        self.seen: set[tuple[int, int]] = set()  # (pid, start time) of every family member met

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed in stop)
        self.handles.append(log)
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True
        )
        self.started.append((name, process))
        listing = [{"name": n, "pid": p.pid, "pgid": p.pid, "command": p.args} for n, p in self.started]
        (self.logs / "processes.json").write_text(json.dumps(listing, indent=1) + "\n", encoding="utf-8")
        return process

    def family(self, table: dict[int, _Proc]) -> set[tuple[int, int]]:
        roots = {p.pid for _, p in self.started}
        members = {pid for pid, proc in table.items() if pid in roots or proc.sid in roots}
        members |= {pid for pid, start in self.seen if pid in table and table[pid].start == start}
        grown = True
        while grown:
            children = {pid for pid, proc in table.items() if proc.ppid in members} - members
            members |= children
            grown = bool(children)
        return {(pid, table[pid].start) for pid in members}

    def refresh(self) -> None:
        self.seen |= self.family(_process_table())

    def _signal(self, signum: int, table: dict[int, _Proc]) -> None:
        for _, process in reversed(self.started):
            if process.poll() is None:  # not reaped: its pid is still its process group's id
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signum)
        for name in self.seen:
            if _alive(name, table):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(name[0], signum)

    def _wait(self, timeout: float) -> bool:
        """Whether the whole family is gone within `timeout` seconds (newcomers get SIGTERM too)."""
        deadline = time.monotonic() + timeout
        while True:
            for _, process in self.started:
                process.poll()  # reaps the direct children
            table = _process_table()
            new = self.family(table) - self.seen
            if new:
                self.seen |= new
                self._signal(signal.SIGTERM, table)
            running = any(process.returncode is None for _, process in self.started)
            if not running and not any(_alive(name, table) for name in self.seen):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to every started process group and family member; SIGKILL to what is left after `grace` s."""
        try:
            self.refresh()
            self._signal(signal.SIGTERM, _process_table())
            if not self._wait(grace):
                self._signal(signal.SIGKILL, _process_table())
                self._wait(5.0)
        finally:
            for handle in self.handles:
                handle.close()


class Signals:
    """SIGTERM, SIGINT and SIGHUP raise `Interrupted` in the main thread, except inside `hold()`, where
    they wait until the block is done (so a process is never started without being recorded)."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.holding = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.pending is None:
            self.pending = signum
        if not self.holding:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
        if self.pending is not None and not self.holding:
            raise Interrupted(self.pending)
