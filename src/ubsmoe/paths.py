"""Where ubsmoe keeps files it derives or downloads (converted models, BIG-bench task files), and atomic writes.

`cache_dir()` is, in order of precedence: `$UBSMOE_CACHE`, `$XDG_CACHE_HOME/ubsmoe`, `~/.cache/ubsmoe`.
It is created on demand. Nothing under it is ever part of the repository; deleting it is always safe
(its contents are rebuilt when next needed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "UBSMOE_CACHE"


def cache_dir() -> Path:
    """The user cache directory of ubsmoe, created if missing.

    Raises OSError with the path in the message when it cannot be created (e.g. a read-only home:
    set UBSMOE_CACHE to a writable directory).
    """
    override = os.environ.get(CACHE_ENV, "").strip()
    if override:
        path = Path(override).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        # the XDG spec says relative values are invalid and must be ignored
        base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
        path = base / "ubsmoe"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(
            f"cannot create the ubsmoe cache directory {path} ({error.strerror or error}); "
            f"set {CACHE_ENV} to a writable directory"
        ) from error
    return path


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file next to `path`, flush it to disk, then rename it over `path`.

    A reader sees the old file or the new one, never a partial one, whatever interrupts the write.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
