"""The output folder of a run: one run at a time, never mixed into files the run did not write (DESIGN 6).

- `output_folder(path, create=True)`: the folder, created when asked, or an `OutputFolderError` (a
  `ConfigError`: one clear message, no traceback in the CLI) when it is a file, lies under a file,
  or cannot be created or written.
- `lock_output(path)`: holds `DIR/.ubsmoe.lock` locked (`fcntl.flock`, exclusive, non-blocking) for
  the duration of a `with` block. The kernel drops the lock when the process ends, however it ends
  (a crash or `kill -9` included), so a stale lock never blocks the next run. A second run on the
  same folder fails at once, naming the folder and the pid of the run that holds it (written into
  the lock file). The file itself stays (removing it could let two runs lock two different files).
- `new_run_clashes(path)`: what a new run would overwrite there: every name a run writes
  (`RUN_OUTPUTS`: config.yaml, metrics.jsonl, summary.json, run.log, adapters/, checkpoint/, ...) that exists.
  A new run starts only in a folder where this is empty (absent, empty, or holding only other files).
- `write_run_marker(path, config)`: `DIR/.ubsmoe-run.json`, written by a new run before anything
  else: the configuration the run started with. `--resume` compares `DIR/config.yaml` with it
  (`resume_config_changes`): only `federation.rounds` may change (to extend a run); every other
  difference is named. Folders of runs from before the marker fall back to `summary.json`'s config.
- `rebuild_metrics(path, records, rounds)`: on resume, `metrics.jsonl` is rewritten from the newest
  checkpoint's records (every round's lines are kept there), so a deleted or damaged file gets its
  earlier rounds back.
- `load_resume_checkpoint(directory)`: the newest checkpoint, loaded and verified; a corrupt one
  names the newest intact older checkpoint and says how to continue from it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked there
    fcntl = None

from ubsmoe.config import ConfigError

__all__ = [
    "LOCK_FILE",
    "RUN_LOG",
    "RUN_MARKER",
    "RUN_OUTPUTS",
    "OutputFolderError",
    "load_resume_checkpoint",
    "lock_output",
    "new_run_clashes",
    "output_folder",
    "read_run_marker",
    "rebuild_metrics",
    "resume_config_changes",
    "write_run_marker",
]

LOCK_FILE = ".ubsmoe.lock"
RUN_MARKER = ".ubsmoe-run.json"
RUN_LOG = "run.log"
"""Plain progress lines of the run (appended to by a resumed run)."""
MARKER_FORMAT = "ubsmoe-run-v1"
RUN_OUTPUTS = (
    "config.yaml",
    "initial_eval.json",
    "metrics.jsonl",
    "summary.json",
    RUN_LOG,
    "checkpoint",
    "evaluations",
    "adapters",
    "plots",
    "tensorboard",
    RUN_MARKER,
)
"""Everything a run writes into its folder (besides the lock file)."""
RESUMABLE_FIELDS = frozenset({"federation.rounds"})
"""Configuration fields `--resume` accepts a change of (the run is extended)."""


class OutputFolderError(ConfigError):
    """The output folder cannot be used: not a folder, not writable, in use by another run, or not ours."""


def _first_file_above(path: Path) -> Path | None:
    for parent in path.parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def output_folder(path: str | os.PathLike[str], create: bool = True) -> Path:
    """`path` as a usable, writable folder (created when `create`), or an `OutputFolderError`."""
    folder = Path(path)
    where = f"cannot use {str(folder)!r} as the output folder"
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{where}: it is a file, not a folder; choose a folder with --out")
    blocker = _first_file_above(folder)
    if blocker is not None:
        raise OutputFolderError(f"{where}: {str(blocker)!r} is a file, not a folder; choose a folder with --out")
    if not folder.exists():
        if not create:
            raise OutputFolderError(f"{where}: it does not exist")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputFolderError(f"{where}: cannot create it ({error.strerror or error})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{where}: it is not writable")
    return folder


@contextlib.contextmanager
def lock_output(path: str | os.PathLike[str], create: bool = True) -> Iterator[Path]:
    """Hold the folder's lock for the `with` block (see the module docstring); yields the folder."""
    folder = output_folder(path, create=create)
    if fcntl is None:
        yield folder
        return
    lock_path = folder / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise OutputFolderError(
            f"cannot use {str(folder)!r} as the output folder: cannot open its lock file {LOCK_FILE} "
            f"({error.strerror or error})"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputFolderError(
                    f"cannot lock the output folder {str(folder)!r} ({error.strerror or error})"
                ) from None
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise OutputFolderError(
                f"the output folder {str(folder)!r} is in use by another ubsmoe run (pid {holder}); wait for "
                "it to finish, or choose another folder with --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        try:
            yield folder
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # still locked: nobody reads a stale pid
    finally:
        os.close(fd)  # releases the lock


def new_run_clashes(path: str | os.PathLike[str]) -> list[str]:
    """The names a new run would write that already exist in `path` (folders end with '/')."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    return [name + ("/" if (folder / name).is_dir() else "") for name in RUN_OUTPUTS if (folder / name).exists()]


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value))


def write_run_marker(path: str | os.PathLike[str], config: Mapping[str, Any]) -> Path:
    """`DIR/.ubsmoe-run.json`: the marker of a run of ubsmoe, with the configuration it started with."""
    from ubsmoe import __version__
    from ubsmoe.paths import write_text_atomic

    marker = Path(path) / RUN_MARKER
    data = {
        "format": MARKER_FORMAT,
        "ubsmoe": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pid": os.getpid(),
        "config": _normalised(dict(config)),
    }
    write_text_atomic(marker, json.dumps(data, indent=1) + "\n")
    return marker


def read_run_marker(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run marker of `path` (None when absent or unreadable)."""
    try:
        data = json.loads((Path(path) / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def _original_config(folder: Path) -> tuple[dict[str, Any], str] | None:
    """The configuration the run in `folder` started with, and where it was read from."""
    marker = read_run_marker(folder)
    if marker is not None and isinstance(marker.get("config"), dict):
        return marker["config"], RUN_MARKER
    with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        if isinstance(summary, dict) and isinstance(summary.get("config"), dict):
            return summary["config"], "summary.json"
    return None


def _differences(before: Any, after: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in [*before, *(k for k in after if k not in before)]:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in before or key not in after:
                found.append((name, before.get(key, "(absent)"), after.get(key, "(absent)")))
            else:
                found.extend(_differences(before[key], after[key], name))
        return found
    return [] if before == after else [(prefix, before, after)]


def resume_config_changes(path: str | os.PathLike[str], config: Mapping[str, Any]) -> list[str]:
    """The fields of `config` (read from `DIR/config.yaml`) that differ from the run's original
    configuration and may not change on resume, as 'field: old -> new' lines (empty when none, or when
    the original is unknown)."""
    original = _original_config(Path(path))
    if original is None:
        return []
    differences = _differences(_normalised(original[0]), _normalised(dict(config)))
    return [
        f"{name}: {json.dumps(old)} -> {json.dumps(new)}"
        for name, old, new in differences
        if name not in RESUMABLE_FIELDS
    ]


def load_resume_checkpoint(directory: str | os.PathLike[str]):
    """(path, GlobalState, meta) of the newest checkpoint in `directory`, or None when there is none.

    A bad newest checkpoint raises a `CheckpointError` that names the newest older one that loads and
    says how to continue from it.
    """
    from ubsmoe.fl.checkpoint import CheckpointError, list_checkpoints, load_checkpoint

    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return None
    newest = checkpoints[-1]
    try:
        state, meta = load_checkpoint(newest)
    except CheckpointError as error:
        for older in reversed(checkpoints[:-1]):
            try:
                load_checkpoint(older)
            except CheckpointError:
                continue
            raise CheckpointError(
                f"{error}. The previous checkpoint {str(older)!r} is intact: to continue from it, move the "
                f"corrupt one aside (mv {newest} {newest}.corrupt) and run --resume again"
            ) from None
        hint = "; no older checkpoint is intact" if len(checkpoints) > 1 else "; it is the only checkpoint"
        raise CheckpointError(f"{error}{hint}") from None
    return newest, state, meta


def rebuild_metrics(path: str | os.PathLike[str], records: Sequence[Any], rounds: int) -> bool:
    """Rewrite `DIR/metrics.jsonl` from checkpoint records (their `client_metrics`), for rounds < `rounds`.

    Returns False (and leaves the file alone) when the records do not hold every round's lines.
    """
    from ubsmoe.fl.simulation import METRICS_FILE
    from ubsmoe.paths import write_text_atomic

    lines = []
    covered = set()
    for record in records:
        if not (isinstance(record, Mapping) and isinstance(record.get("client_metrics"), list)):
            return False
        if not (isinstance(record.get("round"), int) and record["round"] < rounds):
            continue
        covered.add(record["round"])
        lines.extend(json.dumps(line, sort_keys=True) + "\n" for line in record["client_metrics"])
    if covered != set(range(rounds)):
        return False
    write_text_atomic(Path(path) / METRICS_FILE, "".join(lines))
    return True
