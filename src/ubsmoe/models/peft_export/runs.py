"""peft adapters from a UB-SMoE model in memory and from a finished run's folder (`ubsmoe export`, the end of a run)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import nn

from ubsmoe.models.peft_export.layout import (
    EXPORT_FORMATS,
    PEFT_FOLDER,
    NeuronGroups,
    PeftAdapter,
    PeftExportError,
    moefied_peft_adapter,
    native_peft_adapter,
)
from ubsmoe.models.peft_export.writing import _check_target, _staging, write_peft_adapter


def export_refusal(method: str | None) -> str | None:
    """Why a run of `method` has no peft export (`Method.peft_export_refusal`), or None when it has one.

    A method that cannot be found (e.g. a folder written by a method since removed) is not refused here:
    the export then reads the adapters as they are."""
    if not method:
        return None
    from ubsmoe.methods import UnknownMethodError, method_class

    try:
        return method_class(method).peft_export_refusal
    except UnknownMethodError:
        return None


# ---- from an in-memory UB-SMoE model -----------------------------------------------------------------
def model_peft_adapter(model: nn.Module, base_model: str | None = None) -> PeftAdapter:
    """The peft adapter of a UB-SMoE model (native or MoEfied) from its current trainable state."""
    from ubsmoe.models.moefication import MoEfiedBlock
    from ubsmoe.models.native import UnsupportedModelError, family_spec
    from ubsmoe.models.state import trainable_state
    from ubsmoe.moe import UBSMoEBlock

    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, UBSMoEBlock)]
    if not blocks:
        raise PeftExportError("the model has no UB-SMoE blocks: adapt or MoEfy it first")
    first = blocks[0][1]
    rank, alpha = first.config.lora_rank, first.config.lora_alpha
    hf_config = getattr(model, "config", None)
    if base_model is None:
        base_model = getattr(hf_config, "name_or_path", None) or None
    adapters = trainable_state(model)
    if isinstance(first, MoEfiedBlock):
        moefication = getattr(model, "moefication_config", None)
        if moefication is not None and moefication.recovery:
            raise PeftExportError(_RECOVERY_REFUSAL)
        intermediate = getattr(hf_config, "intermediate_size", None)
        if not isinstance(intermediate, int):
            raise PeftExportError("the MoEfied model's config has no intermediate_size (the dense FFN's width)")
        layers = []
        for name, block in blocks:
            if not block.neuron_groups:
                raise PeftExportError(f"the MoEfied block {name!r} does not record its neuron groups")
            layers.append(NeuronGroups(name, [list(g) for g in block.neuron_groups], intermediate))
        return moefied_peft_adapter(adapters, layers, rank=rank, alpha=alpha, base_model=base_model)
    try:
        spec = family_spec(model)
    except UnsupportedModelError as error:
        raise PeftExportError(str(error)) from None
    _check_native_routing(spec, hf_config, first.config.normalize_gates, first.config.unit_gates)
    return native_peft_adapter(
        adapters,
        rank=rank,
        alpha=alpha,
        experts_attr=spec.experts_attr,
        router_attr=spec.router_attr,
        base_model=base_model,
    )


_RECOVERY_REFUSAL = (
    "the model was MoEfied with the recovery stage (model.moefication.recovery), which trains the experts away "
    "from the dense FFN: at K = M it is no longer the original model, so no LoRA of the original model reproduces "
    "it. MoEfy without recovery to export for peft"
)


def _check_native_routing(spec: Any, hf_config: Any, normalize: bool, unit_gates: bool) -> None:
    """The peft model routes as the base config says: refuse blocks that route otherwise."""
    if unit_gates:
        raise PeftExportError(f"the blocks use unit (straight-through) gates, which {spec.name}'s router does not")
    if hf_config is not None and normalize != spec.normalize_gates(hf_config):
        raise PeftExportError(
            f"the blocks {'' if normalize else 'do not '}renormalise the top-k gates (moe.normalize_gates), the base "
            f"{spec.name} config does {'not ' if normalize else ''}: peft on the original model would route "
            "differently. Use `ubsmoe export --format merged`, which writes the setting into the model's config"
        )


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    replace: bool = False,
) -> Path:
    """Write a UB-SMoE model's adapters as a peft adapter of the original model (see the module docstring).

    `base_model` is recorded as `base_model_name_or_path` (default: the model config's `name_or_path`).
    What the export leaves out (non-zero phi of a native model, A3SMoE output scales) is warned about.
    """
    adapter = model_peft_adapter(model, base_model)
    for note in adapter.notes:
        warnings.warn(note, stacklevel=2)
    return write_peft_adapter(adapter, directory, replace=replace)


# ---- from a finished run -----------------------------------------------------------------------------
def base_model_path(name: str) -> str:
    """Where the base model of `model.name` lives: the embedded default's converted checkpoint, or the folder."""
    from ubsmoe.config import EMBEDDED_MODEL

    if name == EMBEDDED_MODEL:
        from ubsmoe.models.embedded import CACHE_NAME
        from ubsmoe.paths import cache_dir

        return str(cache_dir() / "models" / CACHE_NAME)
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def base_model_of_run(name: str, model_info: Mapping[str, Any] | None = None) -> tuple[str, str | None]:
    """(`base_model_name_or_path`, `revision`) of a run's base model, from summary.json's `model` entry.

    A hub id with the commit it resolved to (so peft loads the very weights the run used), else the
    folder the run read, else `base_model_path(name)`.
    """
    info = model_info or {}
    if info.get("hub_id"):
        return str(info["hub_id"]), info.get("commit") or info.get("revision")
    if info.get("path"):
        return str(info["path"]), None
    return base_model_path(name), None


def export_run_adapters(
    model: nn.Module,
    adapters_dir: str | os.PathLike[str],
    config: Any,
    model_info: Mapping[str, Any] | None = None,
) -> tuple[Path | None, list[str]]:
    """At the end of a run: `adapters_dir/peft/`, or None; and the lines to log (notes, or why not).

    `model_info`: summary.json's `model` entry (where the base model was read). Never raises for what it
    cannot export (a run's end must not fail on it): the reason is returned.
    """
    directory = Path(adapters_dir) / PEFT_FOLDER
    reason = export_refusal(config.method)
    if reason is None:
        try:
            base_model, revision = base_model_of_run(config.model.name, model_info)
            adapter = model_peft_adapter(model, base_model)
            if revision:
                adapter.config["revision"] = revision
            write_peft_adapter(adapter, directory, replace=True, source=f"a ubsmoe run, method {config.method}")
        except Exception as error:  # an optional extra: the run's own outputs must still be written
            reason = str(error) if isinstance(error, PeftExportError | OSError) else f"{type(error).__name__}: {error}"
        else:
            return directory, [f"peft adapter: {note}" for note in adapter.notes]
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(directory)  # a resumed run must not leave an earlier export that no longer matches
    return None, [f"no peft adapter in {directory}: {reason}"]


def _resolve_run(path: Path) -> tuple[Path, Path | None]:
    """(the adapters folder, the run folder or None) of RUN_DIR or of an adapters folder."""
    from ubsmoe.models.state import ADAPTER_CONFIG

    if not path.exists():
        raise PeftExportError(f"{path}: no such folder")
    if not path.is_dir():
        raise PeftExportError(f"{path} is a file; pass the folder of a finished `ubsmoe run`")
    if (path / "adapters" / ADAPTER_CONFIG).is_file():
        return path / "adapters", path
    if (path / ADAPTER_CONFIG).is_file():
        return path, path.parent if (path.parent / "config.yaml").is_file() else None
    if (path / "config.yaml").is_file():
        raise PeftExportError(
            f"{path} holds a run without final adapters (adapters/{ADAPTER_CONFIG}): it has not finished; finish it "
            f"with `ubsmoe run --resume {path}`"
        )
    raise PeftExportError(f"{path} is not the folder of a finished `ubsmoe run` (no adapters/{ADAPTER_CONFIG})")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PeftExportError(f"cannot read {path}: {error}") from None


def _saved_neuron_groups(run: Path | None) -> tuple[list[NeuronGroups], bool] | None:
    """The MoEfied blocks' neuron groups (and whether recovery ran) from the run's cached MoEfied model."""
    from ubsmoe.models.moefication import CONFIG_FILE

    if run is None or not (run / "summary.json").is_file():
        return None
    summary = _read_json(run / "summary.json")
    cache = ((summary.get("model") if isinstance(summary, dict) else None) or {}).get("moefication_cache") or {}
    description_file = Path(cache.get("path") or "") / CONFIG_FILE
    if not cache.get("path") or not description_file.is_file():
        return None
    description = _read_json(description_file)
    try:
        intermediate = int(description["base_config"]["intermediate_size"])
        layers = [NeuronGroups(layer["module"], layer["groups"], intermediate) for layer in description["layers"]]
        recovery = bool(description["moefication"].get("recovery", False))
    except (KeyError, TypeError, ValueError) as error:
        raise PeftExportError(f"{description_file} is not a MoEfied model description ({error})") from None
    return layers, recovery


def _run_config(run: Path | None, what: str) -> Any:
    from ubsmoe.config import ConfigError, load_config

    if run is None:
        raise PeftExportError(f"{what} needs the run's config.yaml: pass the run folder, not its adapters folder")
    try:
        return load_config(run / "config.yaml")
    except ConfigError as error:
        raise PeftExportError(f"{run / 'config.yaml'}: {error}") from None


def _loaded_model(run: Path | None, adapters_dir: Path, what: str, progress: Callable[[str], None] | None) -> Any:
    """The run's UB-SMoE model (loaded, or MoEfied from its cache) with its final adapters."""
    from ubsmoe.models.loading import load_experiment_model
    from ubsmoe.models.state import load_trainable_state

    config = _run_config(run, what)
    if progress:
        progress(f"loading the run's model ({config.model.name})")
    loaded = load_experiment_model(config, progress=progress)
    loaded.model.to("cpu")
    load_trainable_state(loaded.model, adapters_dir)
    return loaded.model, config


def export_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    format: str = "peft",
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, list[str]]:
    """Export a finished run's final adapters to `out_dir` (a new or empty folder); returns it and notes.

    `run_dir`: the run's folder (or its `adapters/` folder). `format`: "peft" (a peft LoRA adapter of the
    original model, see the module docstring) or "merged" (native MoE models: the LoRA folded into a
    plain transformers checkpoint, `ubsmoe.models.state.export_merged`). Errors are `PeftExportError`s,
    `ubsmoe.models.state.AdapterStateError` / `ExportError` and `ubsmoe.models.native.ModelLoadError`
    (all ValueErrors), each one line.
    """
    from safetensors.torch import load_file

    from ubsmoe.models.moefication import DENSE_FAMILIES
    from ubsmoe.models.native import NATIVE_FAMILIES
    from ubsmoe.models.state import ADAPTER_WEIGHTS, export_merged, read_adapter_config

    if format not in EXPORT_FORMATS:
        raise PeftExportError(f"--format {format}: use one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out_dir)
    _check_target(out, replace=False)
    adapters_dir, run = _resolve_run(Path(run_dir))
    saved = read_adapter_config(adapters_dir)
    model_type = saved.get("model_type")
    native = model_type in NATIVE_FAMILIES
    if not native and model_type not in DENSE_FAMILIES:
        raise PeftExportError(f"{adapters_dir}: adapters of an unknown model type {model_type!r}")
    method = (saved.get("metadata") or {}).get("method")
    refusal = export_refusal(method)
    if refusal is not None:
        raise PeftExportError(f"{adapters_dir}: {refusal}; nothing to export")
    summary = _read_json(run / "summary.json") if run is not None and (run / "summary.json").is_file() else {}
    model_info = summary.get("model") if isinstance(summary, dict) else None
    base_model, revision = base_model_of_run(str(saved.get("base_model") or ""), model_info)
    source = f"ubsmoe run {run if run is not None else adapters_dir}"

    if format == "merged":
        if not native:
            raise PeftExportError(
                "--format merged writes native MoE checkpoints; a MoEfied model's adapters are exported with "
                "--format peft (load them with peft and call merge_and_unload() for a merged dense model)"
            )
        model, _ = _loaded_model(run, adapters_dir, "--format merged", progress)
        with _staging(out, replace=False) as staging, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_merged(model, staging)
        return out, [str(w.message) for w in caught]

    rank, alpha = saved.get("lora_rank"), saved.get("lora_alpha")
    if not isinstance(rank, int) or not isinstance(alpha, int | float):
        raise PeftExportError(f"{adapters_dir / 'adapter_config.json'} has no valid lora_rank / lora_alpha")
    try:
        tensors = load_file(str(adapters_dir / ADAPTER_WEIGHTS))
    except Exception as error:  # safetensors raises its own error types for missing or corrupt files
        raise PeftExportError(f"cannot read {adapters_dir / ADAPTER_WEIGHTS}: {error}") from None
    block_config = saved.get("ubsmoe_config") or {}
    if native:
        spec = NATIVE_FAMILIES[model_type]
        base_config = Path(base_model) / "config.json"
        hf_config = SimpleNamespace(**_read_json(base_config)) if base_config.is_file() else None
        _check_native_routing(
            spec, hf_config, bool(block_config.get("normalize_gates")), bool(block_config.get("unit_gates"))
        )
        adapter = native_peft_adapter(
            tensors,
            rank=rank,
            alpha=alpha,
            experts_attr=spec.experts_attr,
            router_attr=spec.router_attr,
            base_model=base_model,
        )
    else:
        groups = _saved_neuron_groups(run)
        if groups is None:
            model, _ = _loaded_model(run, adapters_dir, "a MoEfied model's export", progress)
            adapter = model_peft_adapter(model, base_model)
        else:
            layers, recovery = groups
            if recovery:
                raise PeftExportError(_RECOVERY_REFUSAL)
            adapter = moefied_peft_adapter(tensors, layers, rank=rank, alpha=alpha, base_model=base_model)
    if revision:
        adapter.config["revision"] = revision
    write_peft_adapter(adapter, out, source=source)
    return out, list(adapter.notes)
