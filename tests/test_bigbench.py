"""BIG-bench task files from the bigbench 1.0.0 sdist, extracted into the user cache.

The sdist (358 MB) is downloaded once per test session into a temporary directory, or into
$UBSMOE_TEST_BIGBENCH_CACHE when set (so that CI downloads it once), or taken from
$UBSMOE_BIGBENCH_SDIST when that names a downloaded copy. The tests that need it skip cleanly when
PyPI is unreachable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ubsmoe.data import bigbench
from ubsmoe.data.bigbench import (
    SDIST_ENV,
    BigBenchArchiveError,
    BigBenchDownloadError,
    UnknownBigBenchTaskError,
    available_tasks,
    bigbench_task_path,
    bigbench_task_paths,
    load_bigbench_task,
)

REPOSITORY = Path(__file__).resolve().parents[1]
CANDIDATES = [
    "social_iqa",
    "strategyqa",
    "winowhy",
    "timedial",
    "sports_understanding",
    "epistemic_reasoning",
    "causal_judgment",
    "logical_fallacy_detection",
    "navigate",
    "hyperbaton",
    "snarks",
    "date_understanding",
    "physical_intuition",
    "anachronisms",
]


@pytest.fixture(scope="session")
def sdist(tmp_path_factory) -> Path:
    """A verified bigbench-1.0.0.tar.gz, downloaded at most once per session."""
    persistent = os.environ.get("UBSMOE_TEST_BIGBENCH_CACHE", "").strip()
    root = Path(persistent) if persistent else tmp_path_factory.mktemp("bigbench-download")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UBSMOE_CACHE", str(root))
        try:
            return bigbench.bigbench_sdist()
        except BigBenchDownloadError as error:
            pytest.skip(f"the bigbench sdist could not be downloaded (PyPI unreachable?): {error}")


@pytest.fixture(scope="module")
def extracted(sdist, tmp_path_factory):
    """A fresh cache in which social_iqa was extracted (this also writes the task index)."""
    root = tmp_path_factory.mktemp("ubsmoe-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UBSMOE_CACHE", str(root))
        patch.setenv(SDIST_ENV, str(sdist))
        path = bigbench_task_path("social_iqa")
        yield root, path


@pytest.fixture
def cache(extracted, monkeypatch):
    root, _ = extracted
    monkeypatch.setenv("UBSMOE_CACHE", str(root))
    monkeypatch.setenv(SDIST_ENV, str(root / "no-such-sdist.tar.gz"))  # the archive must not be needed
    return root


def test_social_iqa_parses_with_target_scores(cache):
    task = load_bigbench_task("social_iqa")
    examples = task["examples"]
    assert len(examples) == 1954
    for example in examples:
        scores = example["target_scores"]
        assert isinstance(example["input"], str) and example["input"]
        assert len(scores) in (2, 3)
        assert sorted(scores.values())[-1] == 1 and sum(scores.values()) == 1
    assert "canary" in task  # the reason these files stay in the user cache


def test_extraction_writes_only_the_requested_task(extracted):
    root, path = extracted
    assert path == root / "bigbench" / "1.0.0" / "social_iqa" / "task.json"
    assert sorted(p.name for p in (root / "bigbench" / "1.0.0").iterdir()) == ["index.json", "social_iqa"]
    assert [p.name for p in (root / "bigbench").iterdir()] == ["1.0.0"]  # the sdist lives elsewhere here
    assert not path.resolve().is_relative_to(REPOSITORY)


def test_unknown_task_names_close_matches_without_reading_the_archive(cache):
    with pytest.raises(UnknownBigBenchTaskError, match=r"'social_iqaa' \(did you mean social_iqa\?\)") as caught:
        load_bigbench_task("social_iqaa")
    assert "available_tasks()" in str(caught.value)
    with pytest.raises(UnknownBigBenchTaskError, match="not a BIG-bench task name"):
        bigbench_task_path("../social_iqa")
    with pytest.raises(UnknownBigBenchTaskError, match="not a BIG-bench task name"):
        bigbench_task_paths(["social_iqa", "a b"])


def test_available_tasks_from_the_index(cache):
    tasks = available_tasks()
    assert len(tasks) == 320
    assert set(CANDIDATES) <= set(tasks)
    assert "arithmetic/1_digit_addition" in tasks  # subtasks as task/subtask
    assert "arithmetic" not in tasks  # a parent task.json without examples
    assert len(available_tasks(multiple_choice_only=False)) == 1041


def test_several_tasks_in_one_pass_and_damaged_copies_are_extracted_again(cache, sdist, monkeypatch):
    monkeypatch.setenv(SDIST_ENV, str(sdist))
    scans = []
    real_scan = bigbench._scan
    monkeypatch.setattr(bigbench, "_scan", lambda *args: scans.append(args[1]) or real_scan(*args))
    paths = bigbench_task_paths(["anachronisms", "social_iqa", "causal_judgment"])  # both early in the archive
    assert scans == [{"anachronisms", "causal_judgment"}]
    assert len(load_bigbench_task("causal_judgment")["examples"]) == 190
    paths["anachronisms"].write_text('{"truncated": ')
    assert len(load_bigbench_task("anachronisms")["examples"]) == 230
    assert scans == [{"anachronisms", "causal_judgment"}, {"anachronisms"}]
    shutil.rmtree(paths["anachronisms"].parent)
    shutil.rmtree(paths["causal_judgment"].parent)


def test_damaged_archive_message(tmp_path, monkeypatch):
    garbage = tmp_path / "bigbench-1.0.0.tar.gz"
    garbage.write_bytes(b"\x1f\x8b this is not really a gzip stream")
    monkeypatch.setenv("UBSMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(SDIST_ENV, str(garbage))
    with pytest.raises(BigBenchArchiveError, match="is not bigbench 1.0.0's sdist"):
        load_bigbench_task("social_iqa")
    monkeypatch.setattr(bigbench, "bigbench_sdist", lambda progress=None: garbage)  # skip the hash check
    with pytest.raises(BigBenchArchiveError, match="is damaged"):
        load_bigbench_task("social_iqa")


def test_download_failure_message(tmp_path, monkeypatch):
    monkeypatch.setenv("UBSMOE_CACHE", str(tmp_path))
    monkeypatch.delenv(SDIST_ENV, raising=False)

    commands = []

    def failing_pip(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies bigbench\n")

    monkeypatch.setattr(bigbench.subprocess, "run", failing_pip)
    with pytest.raises(BigBenchDownloadError) as caught:
        load_bigbench_task("social_iqa")
    message = str(caught.value)
    assert "PyPI must be reachable" in message
    assert "pip download --no-deps --no-binary :all: bigbench==1.0.0 failed: ERROR: Could not find" in message
    assert SDIST_ENV in message and "\n" not in message
    assert commands and commands[0][1:4] == ["-m", "pip", "download"]
    assert not list((tmp_path / "bigbench").iterdir())  # no partial files left


def test_no_canary_file_in_the_repository():
    if shutil.which("git") is None or not (REPOSITORY / ".git").exists():
        pytest.skip("not a git checkout")
    marker = "canary" + " GUID"  # spelled in two parts so that this file does not match itself
    result = subprocess.run(
        ["git", "grep", "-l", "-I", "--untracked", marker],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    assert result.stdout.strip() == "", f"files carrying the BIG-bench canary are in the repository: {result.stdout}"


def test_the_default_tasks_are_multiple_choice_and_disjoint_from_calibration_text(cache, sdist, monkeypatch):
    from ubsmoe.config import DEFAULT_TASKS
    from ubsmoe.data.calibration import CALIBRATION_TASKS, HELDOUT_TASKS
    from ubsmoe.data.multiple_choice import from_bigbench

    monkeypatch.setenv(SDIST_ENV, str(sdist))
    assert "social_iqa" in DEFAULT_TASKS and len(DEFAULT_TASKS) == 8
    assert not set(DEFAULT_TASKS) & (set(CALIBRATION_TASKS) | set(HELDOUT_TASKS))
    for name in DEFAULT_TASKS:
        assert len(from_bigbench(load_bigbench_task(name), name)) >= 300, name
