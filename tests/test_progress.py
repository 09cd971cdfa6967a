"""Plain progress lines (runs without a terminal, OUT/run.log) and stage times, on a fake clock: no model."""

from __future__ import annotations

import io
import re
import time

import pytest

from ubsmoe.report.progress import PlainReporter, ReporterGroup, StageTimer, format_duration

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+\d+:\d\d:\d\d (.*)$")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _messages(stream: io.StringIO) -> list[str]:
    lines = stream.getvalue().splitlines()
    assert all(LINE.match(line) for line in lines), lines
    return [LINE.match(line).group(1) for line in lines]


@pytest.fixture
def plain():
    clock, stream = Clock(), io.StringIO()
    return PlainReporter(stream, interval=30, clock=clock, heartbeat=False), clock, stream


def test_durations_read_at_a_glance():
    assert [format_duration(s) for s in (0, 42.4, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]


def test_stage_changes_print_at_once_and_steps_at_most_every_interval(plain):
    reporter, clock, stream = plain
    reporter.stage("loading the model")
    reporter.round_started(0, 3, [0, 1], local_steps=4)
    clock.now += 10
    reporter.step(0, 0, 1)  # 10 s since the last line: nothing
    assert _messages(stream) == ["loading the model", "round 1/3: 2 clients x 4 local steps"]
    clock.now += 20
    reporter.step(0, 0, 2)  # 30 s: the state line, with an estimate from the 2 of 8 steps done
    assert _messages(stream)[-1] == (
        "round 1/3 training · client 0 (1/2) · step 2/4 · 30s into the round, about 1m30s left"
    )
    clock.now += 30
    reporter.step(0, 1, 1)  # the second client's first step: 5 of 8 done in 60 s
    assert _messages(stream)[-1] == (
        "round 1/3 training · client 1 (2/2) · step 1/4 · 1m00s into the round, about 36s left"
    )
    clock.now += 5
    reporter.step(0, 1, 2)
    assert len(_messages(stream)) == 4  # 5 s since the last line


def test_a_finished_round_prints_its_numbers_and_the_time_left(plain):
    reporter, clock, stream = plain
    reporter.round_started(0, 3, [0, 1], local_steps=4)
    reporter.evaluation_started("evaluating 2 tiers after round 1", 100)
    clock.now += 40
    reporter.evaluation_advanced(25)  # 40 s since the last line
    assert _messages(stream)[-1] == "evaluating 2 tiers after round 1: 25/100 · 40s, about 2m00s left"
    reporter.evaluation_advanced(75)
    reporter.evaluation_finished()
    assert _messages(stream)[-1] == "evaluating 2 tiers after round 1: done (100/100) in 40s"
    clock.now += 31
    assert reporter.tick()  # the heartbeat: the round is past its evaluation
    assert _messages(stream)[-1] == "round 1/3: saving the checkpoint · 1m11s into the round"
    record = {
        "round": 0,
        "round_time_s": 75.0,
        "train": {"train_lm_loss": 2.3456},
        "mean_utilization_cv": 0.25,
        "eval": {"mean_accuracy": 0.4, "tiers": [{"budget": 0.5, "accuracy": 0.3}, {"budget": 1.0, "accuracy": 0.5}]},
        "dropped": [{"client_id": 1, "reason": "update not finite"}],
    }
    reporter.round_finished(record)
    assert _messages(stream)[-2:] == [
        "round 1: dropped client 1: update not finite",
        "round 1/3 finished in 1m15s: train loss 2.346, utilization CV 0.250, mean accuracy 40.0% "
        "(beta 0.5: 30.0%, beta 1: 50.0%); about 2m30s for the 2 rounds left",
    ]


def test_the_heartbeat_says_what_a_silent_stage_does(plain):
    reporter, clock, stream = plain
    reporter.stage("loading the data")
    clock.now += 29
    assert not reporter.tick()
    clock.now += 1
    assert reporter.tick()
    assert _messages(stream)[-1] == "loading the data · 30s"
    assert not reporter.tick()  # the heartbeat line counts as a line
    reporter.steps("MoEfication (clustering)", 0, 10)  # a new bar is a stage change
    clock.now += 30
    reporter.steps("MoEfication (clustering)", 4, 10)
    assert _messages(stream)[-2:] == [
        "MoEfication (clustering): 0/10",
        "MoEfication (clustering): 4/10 · 30s, about 45s left",
    ]


def test_the_heartbeat_thread_writes_during_silence_and_stops_on_close():
    stream = io.StringIO()
    with PlainReporter(stream, interval=0.05, label="ubsmoe seed0") as reporter:
        reporter.stage("loading the model")
        time.sleep(0.4)
    lines = _messages(stream)
    assert lines[0] == "[ubsmoe seed0] loading the model"
    beats = [line for line in lines[1:] if line.startswith("[ubsmoe seed0] loading the model · ")]
    assert len(beats) >= 2 and len(beats) == len(lines) - 1
    count = len(lines)
    time.sleep(0.15)
    assert len(_messages(stream)) == count  # no line after close


def test_a_broken_stream_does_not_stop_the_run():
    stream = io.StringIO()
    stream.close()
    PlainReporter(stream, heartbeat=False).stage("still running")


def test_a_group_passes_every_event_on():
    a, b = io.StringIO(), io.StringIO()
    group = ReporterGroup(PlainReporter(a, heartbeat=False), None, PlainReporter(b, heartbeat=False))
    group.stage("loading the model")
    group.round_started(1, 2, [0], 1)
    assert _messages(a) == _messages(b) == ["loading the model", "round 2/2: 1 clients x 1 local steps"]
    with pytest.raises(AttributeError):
        group.not_an_event  # noqa: B018


def test_stages_last_until_the_next_begins_and_notes_are_their_parts():
    clock = Clock()
    timer = StageTimer("prepare", start=clock.now - 2, clock=clock)
    clock.now += 1
    timer.begin("model")
    timer.note("converting")
    clock.now += 5
    timer.note("loading")
    clock.now += 1
    timer.begin("moefication")
    clock.now += 3
    timer.begin("training", round=1)
    clock.now += 4
    timer.annotate("moefication", cache="hit")
    assert timer.stages()[-1] == {"stage": "training", "round": 1, "seconds": 4}  # the open stage, up to now
    timer.finish()
    clock.now += 100
    assert timer.stages() == [
        {"stage": "prepare", "seconds": 3},
        {
            "stage": "model",
            "seconds": 6,
            "parts": [{"text": "converting", "seconds": 5}, {"text": "loading", "seconds": 1}],
        },
        {"stage": "moefication", "cache": "hit", "seconds": 3},
        {"stage": "training", "round": 1, "seconds": 4},
    ]


def test_model_loading_times_calibration_and_moefication_apart(monkeypatch):
    """`load_experiment_model`'s MoEfication path opens the `calibration` and `moefication` stages (no model)."""
    pytest.importorskip("torch")
    from ubsmoe.config import load_config
    from ubsmoe.models import loading, moefication

    events = []
    monkeypatch.setattr(loading, "_calibration", lambda *args: events.append("read calibration") or [])
    monkeypatch.setattr(moefication, "moefy_cached", lambda *args, **kwargs: events.append("moefy") or "model")
    model = loading._moefy(
        None, None, load_config(None), "base", None, progress=lambda text: events.append("text"), begin=events.append
    )
    assert model == "model"
    assert events == ["calibration", "text", "read calibration", "moefication", "text", "moefy"]


def test_the_terminal_reporter_draws_steps_after_a_round_started():
    """`_RichReporter.steps` is the event, not a bar id (it was shadowed, so MoEfication drew no bar)."""
    from rich.progress import Progress

    from ubsmoe.cli import _RichReporter

    with Progress(disable=True) as progress:
        reporter = _RichReporter(progress)
        reporter.round_started(0, 1, [0], 2)
        reporter.step(0, 0, 1)
        reporter.steps("MoEfication (clustering)", 2, 3)
    bar = next(task for task in progress.tasks if task.description == "MoEfication (clustering)")
    assert (bar.completed, bar.total) == (2, 3)
