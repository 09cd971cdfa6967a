"""Round checkpoints of a federated run, written atomically (DESIGN 5, 6: `--resume`).

Layout: `<directory>/round_XXXX/` holds the global state after XXXX completed rounds (so its
`GlobalState.round` is XXXX, the 0-based index of the next round):

- `state.safetensors`: the adapters (keys `adapters.<module path>`), phi (key `phi`) and a baseline's
  method state (keys `method.<name>`, see `ubsmoe.methods`);
- `meta.json`: format, round, the SHA-256 and size of `state.safetensors`, the RNG states of torch,
  Python `random` and numpy (JSON data; `restore_rng_states` puts them back) and the caller's `extra`.

Atomicity: a checkpoint is written into a hidden temporary folder next to its final place, every
file is fsynced, meta.json last, then the folder is renamed into place and the parent fsynced. A
crash leaves either the previous checkpoints untouched plus a hidden `.tmp-*` folder (ignored, and
removed by the next save) or the complete new checkpoint. Older checkpoints are removed only after
the new one is in place, and only when `keep` asks for it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ubsmoe.fl.payload import GlobalState

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "capture_rng_states",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_states",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "ubsmoe-checkpoint-v1"
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
_ADAPTER_PREFIX = "adapters."
_METHOD_PREFIX = "method."
_PHI_KEY = "phi"
_NAME = re.compile(r"^round_(\d{4,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupt (the message says which file and why)."""


# ---- RNG states as JSON data ---------------------------------------------------------------------
def capture_rng_states() -> dict[str, Any]:
    """The current torch (CPU, and CUDA when present), Python `random` and numpy global RNG states, as JSON data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "kind": kind,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        states["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back the RNG states of `capture_rng_states` (missing entries are left alone)."""
    if "torch" in states:
        raw = base64.b64decode(states["torch"])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    if "python" in states:
        py = states["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "numpy" in states:
        npy = states["numpy"]
        keys = np.asarray(npy["keys"], dtype=np.uint32)
        np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in states["cuda"]]
        )


# ---- writing -------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/file system lets a folder be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_name(round: int) -> str:
    return f"round_{round:04d}"


def save_checkpoint(
    directory: str | os.PathLike[str],
    global_state: GlobalState,
    round: int | None = None,
    extra: dict[str, Any] | None = None,
    *,
    keep: int | None = None,
) -> Path:
    """Write `global_state` (after `round` completed rounds; default `global_state.round`) atomically.

    `extra` must be JSON-serialisable; it is stored under `meta["extra"]`. `keep`: how many of the
    newest checkpoints to keep (None = all). Returns the checkpoint's folder.
    """
    from safetensors.torch import save_file

    round = global_state.round if round is None else int(round)
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(round)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = {
            f"{_ADAPTER_PREFIX}{k}": v.detach().cpu().contiguous().clone() for k, v in global_state.adapters.items()
        }
        tensors.update(
            {
                f"{_METHOD_PREFIX}{k}": v.detach().cpu().contiguous().clone()
                for k, v in global_state.method_state.items()
            }
        )
        tensors[_PHI_KEY] = global_state.phi.detach().cpu().contiguous().clone()
        save_file(tensors, str(tmp / STATE_FILE), metadata={"format": CHECKPOINT_FORMAT, "round": str(round)})
        _fsync_file(tmp / STATE_FILE)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "round": round,
            "state_sha256": _sha256(tmp / STATE_FILE),
            "state_bytes": (tmp / STATE_FILE).stat().st_size,
            "rng": capture_rng_states(),
            "extra": extra or {},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
        _fsync_file(tmp / META_FILE)
        _fsync_dir(tmp)
        if final.exists():  # the same round written again (e.g. a fresh run over an old folder)
            trash = root / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---- reading -------------------------------------------------------------------------------------
def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The `round_XXXX` folders of `directory` that have a meta.json (complete-looking), oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint folder in `directory` (see `list_checkpoints`), or None."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[GlobalState, dict[str, Any]]:
    """(GlobalState, meta) of a checkpoint folder; a `CheckpointError` says what is wrong with a bad one."""
    from safetensors.torch import load_file

    folder = Path(path)
    where = f"checkpoint {str(folder)!r}"
    if not folder.is_dir():
        raise CheckpointError(f"{where} does not exist or is not a folder")
    meta_path, state_path = folder / META_FILE, folder / STATE_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{where} is incomplete: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{where} is corrupt: {META_FILE} is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where} is corrupt: {META_FILE} is not a {CHECKPOINT_FORMAT} file")
    for key, kind in (("round", int), ("state_sha256", str), ("state_bytes", int), ("rng", dict), ("extra", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{where} is corrupt: {META_FILE} lacks a valid {key!r}")
    if not state_path.is_file():
        raise CheckpointError(f"{where} is incomplete: {STATE_FILE} is missing")
    size = state_path.stat().st_size
    if size != meta["state_bytes"]:
        raise CheckpointError(f"{where} is corrupt: {STATE_FILE} has {size} bytes, expected {meta['state_bytes']}")
    if _sha256(state_path) != meta["state_sha256"]:
        raise CheckpointError(f"{where} is corrupt: {STATE_FILE} does not match its checksum in {META_FILE}")
    try:
        tensors = load_file(str(state_path))
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{where} is corrupt: cannot read {STATE_FILE} ({error})") from None
    if _PHI_KEY not in tensors:
        raise CheckpointError(f"{where} is corrupt: {STATE_FILE} has no {_PHI_KEY!r} tensor")
    unknown = [k for k in tensors if k != _PHI_KEY and not k.startswith((_ADAPTER_PREFIX, _METHOD_PREFIX))]
    if unknown:
        raise CheckpointError(f"{where} is corrupt: {STATE_FILE} has an unexpected tensor {unknown[0]!r}")
    adapters = {k[len(_ADAPTER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_ADAPTER_PREFIX)}
    method_state = {k[len(_METHOD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_METHOD_PREFIX)}
    return GlobalState(adapters=adapters, phi=tensors[_PHI_KEY], round=meta["round"], method_state=method_state), meta
