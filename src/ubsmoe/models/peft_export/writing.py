"""Writing a peft adapter folder atomically: the tensors, adapter_config.json and a README, published by rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ubsmoe.models.peft_export.layout import PEFT_CONFIG, PEFT_WEIGHTS, README, PeftAdapter, PeftExportError


# ---- writing -----------------------------------------------------------------------------------------
def _readme(adapter: PeftAdapter, source: str | None) -> str:
    base = adapter.config.get("base_model_name_or_path") or "BASE_MODEL"
    lines = ["# peft LoRA adapter exported by ubsmoe", ""]
    if source:
        lines += [f"From {source}.", ""]
    lines += [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
        "```",
        "",
    ]
    if adapter.config.get("target_parameters"):
        lines.append(
            "The expert LoRA of every MoE layer on the fused expert weights (`target_parameters`): the UB-SMoE "
            "model at the native top-k with phi = 0, routed by the base router."
        )
        if adapter.config.get("rank_pattern"):
            lines.append("")
            lines.append(
                "peft may warn that the rank_pattern / alpha_pattern key `gate_up_proj` 'did not match any targeted "
                "module and was ignored': its check looks at target_modules only; the pattern is applied to the "
                "targeted parameter (otherwise the weights would not load)."
            )
    else:
        lines.append(
            "The MoEfied model's per-expert LoRA as one dense LoRA of rank M x r on the original FFN: exactly the "
            "UB-SMoE model at K = M (every expert runs). Budget tiers with K < M need the UB-SMoE model."
        )
    for note in adapter.notes:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _fsync_files(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _check_target(directory: Path, replace: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise PeftExportError(f"{directory} is a file; pass a new or empty folder")
    if not replace and directory.is_dir() and any(directory.iterdir()):
        raise PeftExportError(f"{directory} is not empty; pass a new or empty folder")


def _publish(staging: Path, directory: Path, replace: bool) -> None:
    """Move the finished `staging` folder to `directory` (an empty one is replaced; a full one only with `replace`)."""
    _check_target(directory, replace)
    retired = None
    if directory.is_dir():
        if any(directory.iterdir()):
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, retired / "old")
        else:
            directory.rmdir()
    os.rename(staging, directory)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def _staging(directory: Path, replace: bool):
    """A temporary folder next to `directory`, published there on success and removed on failure."""
    _check_target(directory, replace)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield staging
        _publish(staging, directory, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_peft_adapter(
    adapter: PeftAdapter, directory: str | os.PathLike[str], *, replace: bool = False, source: str | None = None
) -> Path:
    """Write `adapter_model.safetensors`, `adapter_config.json` (as peft's `save_pretrained`) and README.md.

    The files are written to a temporary folder next to `directory`, which is then renamed into place:
    a reader sees the whole adapter or none. A non-empty `directory` is refused unless `replace`.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    config = adapter.config_dict()
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in adapter.state_dict.items()}
    with _staging(directory, replace) as staging:
        save_file(tensors, str(staging / PEFT_WEIGHTS), metadata={"format": "pt"})
        (staging / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        (staging / README).write_text(_readme(adapter, source), encoding="utf-8")
        _fsync_files(staging)
    return directory
