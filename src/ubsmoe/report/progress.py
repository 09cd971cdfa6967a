"""Plain progress lines (no terminal needed), the run's log file, and the wall time of each stage.

- `PlainReporter(stream, ...)`: a progress reporter (the `Reporter` events of `ubsmoe.fl.experiment`)
  that writes plain, timestamped lines: one at each stage change, when a round starts and when it
  finishes (with its key numbers), when an evaluation starts and ends; between those, a state line
  (stage, round, client, local step, elapsed, and an estimate of what is left of the round or stage
  from the steps done so far) on the next event once `interval` seconds (30) have passed since the
  last line. A small daemon thread writes the same state line when nothing was written for
  `interval` seconds, so long silent phases (loading, a slow evaluation batch) still show they are
  alive. `ubsmoe run` and `ubsmoe compare` use it for stdout when stdout is not a terminal (nohup,
  a batch scheduler, CI), and every run writes the same lines to `OUT/run.log`.
- `ReporterGroup(*reporters)`: one reporter that passes every event on to several.
- `StageTimer`: the wall time of each stage of a run, for summary.json's `timing.stages`: a stage
  lasts until the next one begins; messages within a stage (`note`) are timed as its `parts`.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

__all__ = ["HEARTBEAT_S", "PlainReporter", "ReporterGroup", "StageTimer", "format_duration"]

HEARTBEAT_S = 30.0
"""Longest silence of a `PlainReporter` (seconds)."""

_EVENTS = (
    "stage",
    "steps",
    "round_started",
    "step",
    "round_finished",
    "evaluation_started",
    "evaluation_advanced",
    "evaluation_finished",
)


def format_duration(seconds: float) -> str:
    """'42s', '3m05s', '1h02m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _left(elapsed: float, done: int, total: int) -> str:
    """', about 2m10s left' at the pace so far; '' before the first unit or after the last."""
    if done <= 0 or total <= done:
        return ""
    return f", about {format_duration(elapsed / done * (total - done))} left"


class PlainReporter:
    """Progress events as plain lines on `stream` (see the module docstring); use it as a context manager.

    Args:
        stream: where the lines go (flushed after each line; a failing write is ignored, never the run's end).
        interval: the longest silence in seconds (events, then the heartbeat thread); default `HEARTBEAT_S`.
            0 writes the state line on every event, with no heartbeat thread.
        label: put in front of every message (e.g. `ubsmoe-no-dmr seed0` inside `ubsmoe compare`).
        clock: monotonic seconds (a fake one in tests).
        heartbeat: start the heartbeat thread on `__enter__` (tests drive `tick()` themselves).
    """

    def __init__(
        self,
        stream: TextIO,
        interval: float | None = None,
        label: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: bool = True,
    ):
        self.stream, self.label, self.clock = stream, label, clock
        self.interval = HEARTBEAT_S if interval is None else interval
        self._heartbeat = heartbeat
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = self._last = clock()
        self._stage, self._stage_start = "starting", self.started
        self._counter: list[Any] | None = None  # [label, done, total, start] of an evaluation or a steps() bar
        self._round: dict[str, Any] | None = None
        self._round_times: list[float] = []

    # ---- lines ---------------------------------------------------------------------------------------
    def line(self, message: str) -> None:
        """Write one line now: wall-clock time, time since the reporter started, the message."""
        with self._lock:
            now = self.clock()
            self._last = now
            stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            elapsed = int(now - self.started)
            prefix = f"[{self.label}] " if self.label else ""
            text = f"{stamp} +{elapsed // 3600}:{elapsed % 3600 // 60:02d}:{elapsed % 60:02d} {prefix}{message}"
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # a closed or broken stream must not stop the run
                pass

    def status(self) -> str:
        """What the run is doing now: stage, round, client, step, elapsed, estimate."""
        with self._lock:
            now = self.clock()
            if self._counter is not None:
                label, done, total, start = self._counter
                return f"{label}: {done}/{total} · {format_duration(now - start)}{_left(now - start, done, total)}"
            if self._round is not None:
                r = self._round
                text = f"round {r['round'] + 1}/{r['total']}"
                if r["phase"] != "training":
                    return f"{text}: {r['phase']} · {format_duration(now - r['start'])} into the round"
                text += " training"
                if r["client"] is not None:
                    text += f" · client {r['client']} ({r['index']}/{r['clients']}) · step {r['step']}/{r['steps']}"
                done = max(0, r["index"] - 1) * r["steps"] + r["step"]
                elapsed = now - r["start"]
                return f"{text} · {format_duration(elapsed)} into the round{_left(elapsed, done, r['clients'] * r['steps'])}"
            return f"{self._stage} · {format_duration(now - self._stage_start)}"

    def tick(self) -> bool:
        """Write the state line when `interval` seconds have passed since the last line; whether it wrote."""
        with self._lock:
            if self.clock() - self._last < self.interval:
                return False
            self.line(self.status())
            return True

    # ---- the heartbeat thread ----------------------------------------------------------------------
    def __enter__(self) -> PlainReporter:
        if self._heartbeat and self.interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="ubsmoe-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the heartbeat thread (no line is written after this returns)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _beat(self) -> None:
        while True:
            with self._lock:
                wait = self.interval - (self.clock() - self._last)
            if self._stop.wait(max(wait, min(self.interval, 1.0) / 10)):
                return
            self.tick()

    # ---- the Reporter events -----------------------------------------------------------------------
    def stage(self, text: str) -> None:
        with self._lock:
            self._stage, self._stage_start, self._counter = text, self.clock(), None
            self.line(text)

    def steps(self, what: str, done: int, total: int) -> None:
        with self._lock:
            if self._counter is None or self._counter[0] != what:
                self._counter = [what, done, total, self.clock()]
                self.line(f"{what}: {done}/{total}")
                return
            self._counter[1:3] = [done, total]
            self.tick()

    def round_started(self, round: int, total_rounds: int, participants: list[int], local_steps: int) -> None:
        with self._lock:
            self._counter = None
            self._round = {
                "round": round,
                "total": total_rounds,
                "clients": len(participants),
                "steps": local_steps,
                "start": self.clock(),
                "phase": "training",
                "client": None,
                "index": 0,
                "step": 0,
            }
            self.line(f"round {round + 1}/{total_rounds}: {len(participants)} clients x {local_steps} local steps")

    def step(self, round: int, client: int, step: int) -> None:
        with self._lock:
            r = self._round
            if r is None:
                return
            if client != r["client"]:
                r["client"], r["index"] = client, r["index"] + 1
            r["step"] = step
            self.tick()

    def round_finished(self, record: Mapping[str, Any]) -> None:
        with self._lock:
            r, self._round, self._counter = self._round, None, None
            number = record["round"] + 1
            for item in record.get("dropped") or []:
                self.line(f"round {number}: dropped client {item['client_id']}: {item['reason']}")
            took = record.get("round_time_s")
            if took is None and r is not None:
                took = self.clock() - r["start"]
            total = r["total"] if r is not None else None
            text = f"round {number}{f'/{total}' if total else ''} finished"
            if took is not None:
                self._round_times.append(took)
                text += f" in {format_duration(took)}"
            train = record.get("train") or {}
            if train.get("train_lm_loss") is not None:
                text += f": train loss {train['train_lm_loss']:.3f}"
            if record.get("mean_utilization_cv") is not None:
                text += f", utilization CV {record['mean_utilization_cv']:.3f}"
            evaluation = record.get("eval") or {}
            if evaluation.get("mean_accuracy") is not None:
                text += f", mean accuracy {100 * evaluation['mean_accuracy']:.1f}%"
                tiers = [t for t in evaluation.get("tiers") or [] if t.get("accuracy") is not None]
                if tiers:
                    text += " (" + ", ".join(f"beta {t['budget']:g}: {100 * t['accuracy']:.1f}%" for t in tiers) + ")"
            left = (total - number) if total else 0
            if left > 0 and self._round_times:
                each = sum(self._round_times) / len(self._round_times)
                text += f"; about {format_duration(each * left)} for the {left} round{'s' if left > 1 else ''} left"
            self.line(text)

    def evaluation_started(self, label: str, total: int) -> None:
        with self._lock:
            if self._round is not None:
                self._round["phase"] = "evaluation"
            self._counter = [label, 0, total, self.clock()]
            self.line(f"{label}: 0/{total}")

    def evaluation_advanced(self, amount: int) -> None:
        with self._lock:
            if self._counter is not None:
                self._counter[1] += amount
            self.tick()

    def evaluation_finished(self) -> None:
        with self._lock:
            if self._counter is not None:
                label, done, total, start = self._counter
                self.line(f"{label}: done ({done}/{total}) in {format_duration(self.clock() - start)}")
                self._stage = f"{label}: done"
            self._counter = None
            if self._round is not None:
                self._round["phase"] = "saving the checkpoint"
            else:
                self._stage_start = self.clock()


class ReporterGroup:
    """One reporter that passes every event on to each of `reporters`, in order."""

    def __init__(self, *reporters: Any):
        self.reporters = [r for r in reporters if r is not None]

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name not in _EVENTS:
            raise AttributeError(name)

        def forward(*args: Any, **kwargs: Any) -> None:
            for reporter in self.reporters:
                getattr(reporter, name)(*args, **kwargs)

        return forward


class StageTimer:
    """Wall time of each stage of a run (see the module docstring).

    `begin(name, **detail)` ends the open stage and opens `name` (the detail, e.g. `round=2`, is kept
    in its entry); `note(text)` opens a part of the open stage (parts end at the next note or the
    stage's end); `annotate(name, **detail)` adds detail to the last stage called `name`; `stages()`
    lists them, the open one timed up to now: `{"stage", "seconds", **detail, "parts": [{"text", "seconds"}]}`.
    """

    def __init__(
        self, first: str | None = None, start: float | None = None, clock: Callable[[], float] = time.perf_counter
    ):
        """`first`: a stage open from `start` (a `clock()` reading; default now)."""
        self.clock = clock
        self._entries: list[dict[str, Any]] = []
        if first is not None:
            self.begin(first, _at=start)

    def begin(self, name: str, _at: float | None = None, **detail: Any) -> None:
        now = self.clock() if _at is None else _at
        self._close(now)
        self._entries.append({"stage": name, **detail, "_start": now, "_end": None, "parts": []})

    def note(self, text: str) -> None:
        if not self._entries or self._entries[-1]["_end"] is not None:
            self.begin("run")
        now = self.clock()
        parts = self._entries[-1]["parts"]
        if parts and parts[-1]["_end"] is None:
            parts[-1]["_end"] = now
        parts.append({"text": text, "_start": now, "_end": None})

    def annotate(self, name: str, **detail: Any) -> None:
        for entry in reversed(self._entries):
            if entry["stage"] == name:
                entry.update(detail)
                return

    def finish(self) -> None:
        """End the open stage (a later `begin` opens another)."""
        self._close(self.clock())

    def stages(self) -> list[dict[str, Any]]:
        now = self.clock()
        rows = []
        for entry in self._entries:
            end = entry["_end"] if entry["_end"] is not None else now
            row = {k: v for k, v in entry.items() if not k.startswith("_") and k != "parts"}
            row["seconds"] = end - entry["_start"]
            if entry["parts"]:
                row["parts"] = [
                    {"text": p["text"], "seconds": (p["_end"] if p["_end"] is not None else end) - p["_start"]}
                    for p in entry["parts"]
                ]
            rows.append(row)
        return rows

    def _close(self, now: float) -> None:
        if self._entries and self._entries[-1]["_end"] is None:
            entry = self._entries[-1]
            entry["_end"] = now
            if entry["parts"] and entry["parts"][-1]["_end"] is None:
                entry["parts"][-1]["_end"] = now
