"""A MoEfied model on disk (`save_moefied`, `load_moefied`) and the calibration cache (`moefy_cached`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ubsmoe.models.moefication.block import MoEfiedBlock, dense_layout, moefied_blocks
from ubsmoe.models.moefication.calibration import Batch, CalibrationData, calibration_batches, calibration_fingerprint
from ubsmoe.models.moefication.config import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    MoEficationConfig,
    Progress,
)
from ubsmoe.models.moefication.convert import moefy
from ubsmoe.models.native import ModelLoadError, require_transformers
from ubsmoe.moe import (
    SwiGLU,
    UBSMoEConfig,
    skip_padding,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


# ---- save / load -------------------------------------------------------------------------------
def _is_adapter_key(key: str, block_names: Sequence[str]) -> bool:
    """Trainable block state that the saved model does not carry: phi, expert LoRA, a method's extensions."""
    return any(
        key == f"{name}.phi" or key.startswith((f"{name}.lora.", f"{name}.extensions.", f"{name}.local_extensions."))
        for name in block_names
    )


def save_moefied(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write a MoEfied model: `model.safetensors` (every frozen weight, experts, shared groups and
    routers; not the expert LoRA or phi, which other code saves) and `moefication.json` (the base
    model's config, the MoEficationConfig, the UBSMoEConfig and each layer's neuron groups)."""
    from safetensors.torch import save_file

    blocks = moefied_blocks(model)
    config = getattr(model, "moefication_config", None)
    if not blocks or config is None:
        raise ModelLoadError("save_moefied needs a model returned by moefy or load_moefied")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in blocks]
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        if _is_adapter_key(key, names):
            continue
        identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if identity in seen and tensor.numel():
            aliases[key] = seen[identity]  # tied weights (e.g. lm_head = embed_tokens)
            continue
        seen[identity] = key
        tensors[key] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "producer": FORMAT_NAME})
    first = blocks[0][1]
    description = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "dtype": str(first.gate_up_proj.dtype).removeprefix("torch."),
        "base_config": model.config.to_dict(),
        "moefication": config.to_dict(),
        "ubsmoe": first.config.to_dict(),
        "calibration": getattr(model, "moefication_calibration", {}),
        "aliases": aliases,
        "layers": [
            {"module": name, "shared": block.shared_neurons, "groups": block.neuron_groups} for name, block in blocks
        ],
    }
    (directory / CONFIG_FILE).write_text(json.dumps(description, indent=1, default=str), encoding="utf-8")
    return directory


def load_moefied(
    directory: str | os.PathLike[str],
    ubsmoe_config: UBSMoEConfig | None = None,
    *,
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """Rebuild a model written by `save_moefied` (no calibration, no base checkpoint needed).

    `ubsmoe_config` replaces the saved block settings (LoRA rank, DMR, PG ...; `unit_gates` stays
    on); the frozen weights do not depend on it. Returns the model in eval mode, base frozen, with
    fresh adapters (LoRA-B zero, phi zero) and every block at K = M.
    """
    from safetensors.torch import load_file

    transformers = require_transformers()
    directory = Path(directory)
    description = _read_description(directory)
    try:
        base = dict(description["base_config"])
        model_type = base.pop("model_type")
        hf_config = transformers.CONFIG_MAPPING[model_type].from_dict({**base, "model_type": model_type})
        model_class = getattr(transformers, description["model_class"])
        dtype = getattr(torch, description["dtype"])
        moefication = MoEficationConfig.from_dict(description["moefication"])
        saved_layer_config = UBSMoEConfig.from_dict(description["ubsmoe"])
        layers = description["layers"]
        aliases = dict(description.get("aliases", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ModelLoadError(f"{directory / CONFIG_FILE} is not a valid MoEfied model description: {error}") from error
    layer_config = replace(ubsmoe_config or saved_layer_config, unit_gates=True)
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE), device=str(device or "cpu"))
    except Exception as error:
        raise ModelLoadError(f"cannot read {directory / WEIGHTS_FILE}: {error}") from error
    block_keys = list(tensors)

    with _no_init():
        model = model_class._from_config(hf_config, dtype=dtype)
    if device is not None:
        model.to(device)
    for parameter in model.parameters():  # the blocks built below bring their own trainable adapters
        parameter.requires_grad_(False)
    try:
        for layer in layers:
            name = layer["module"]
            old = model.get_submodule(name)
            shared = None
            if layer["shared"]:
                shared = SwiGLU(
                    tensors.pop(f"{name}.shared_expert.gate_weight"),
                    tensors.pop(f"{name}.shared_expert.up_weight"),
                    tensors.pop(f"{name}.shared_expert.down_weight"),
                    old.act_fn,
                )
            block = MoEfiedBlock(
                tensors.pop(f"{name}.gate_up_proj"),
                dense_layout(tensors.pop(f"{name}.down_proj")),
                tensors.pop(f"{name}.router_weight"),
                moefication.num_experts,
                layer_config,
                shared_expert=shared,
                activation=old.act_fn,
            )
            block.shared_neurons = list(layer["shared"])
            block.neuron_groups = [list(g) for g in layer["groups"]]
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, block)
    except (KeyError, AttributeError, ValueError) as error:
        raise ModelLoadError(f"{directory} does not match its description: {error}") from error
    consumed = set(block_keys) - set(tensors)  # the blocks' frozen tensors, built above from the file
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    names = [name for name, _ in moefied_blocks(model)]
    missing = [k for k in missing if k not in aliases and k not in consumed and not _is_adapter_key(k, names)]
    if missing or unexpected:
        raise ModelLoadError(
            f"{directory / WEIGHTS_FILE} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    state = model.state_dict()
    for key, source in aliases.items():  # tied weights the rebuilt model does not tie itself
        if key in state and source in state and state[key].data_ptr() != state[source].data_ptr():
            state[key].copy_(state[source])
    model.moefication_config = moefication
    model.moefication_calibration = description.get("calibration", {})
    return skip_padding(model).eval()


def _read_description(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(f"{directory} is not a saved MoEfied model: {CONFIG_FILE} is missing")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    if not isinstance(description, dict) or description.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{path} is not a {FORMAT_NAME} description")
    if description.get("version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path} has format version {description.get('version')!r}; this ubsmoe reads version {FORMAT_VERSION}. "
            "MoEfy the base model again."
        )
    return description


@contextlib.contextmanager
def _no_init() -> Any:
    """Skip random initialisation of a model whose weights are loaded right after (transformers' helper)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - other transformers versions
        yield
        return
    with no_init_weights():
        yield


# ---- calibration cache -------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """A hash of a model's config and every tensor of its state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def moefication_cache_key(base_identity: str, config: MoEficationConfig, batches: Sequence[Batch]) -> str:
    """Key of a cached MoEfied model: base model identity, format version, config and calibration tokens."""
    payload = json.dumps(
        {
            "base": base_identity,
            "format": [FORMAT_NAME, FORMAT_VERSION],
            "config": config.to_dict(),
            "calibration": calibration_fingerprint(batches),
        },
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def moefy_cached(
    cache_dir: str | os.PathLike[str],
    base: PreTrainedModel | Callable[[], PreTrainedModel],
    calibration: CalibrationData,
    config: MoEficationConfig | None = None,
    ubsmoe_config: UBSMoEConfig | None = None,
    *,
    base_identity: str | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> PreTrainedModel:
    """The MoEfied model from `cache_dir` if it was calibrated before, else `moefy` and cache it.

    Args:
        cache_dir: the cache root; each MoEfied model lives in `cache_dir/<key>`.
        base: the dense model, or a zero-argument function that loads it (called only on a miss).
        base_identity: a string identifying the base weights (e.g. a checkpoint hash); required when
            `base` is a function, else the model's weights are hashed (`model_fingerprint`).

    The key hashes the base identity, the config, the calibration tokens actually used and the
    format version. A miss writes into a temporary directory inside `cache_dir` and renames it into
    place, so a cache entry is either complete or absent (a concurrent writer's entry wins). The
    returned model has `moefication_cache = {"key", "path", "hit"}`.
    """
    config = config or MoEficationConfig()
    model = None
    if base_identity is None:
        if callable(base) and not isinstance(base, nn.Module):
            raise ValueError("moefy_cached needs base_identity when the base model is given as a loader function")
        base_identity = model_fingerprint(base)
    if isinstance(base, nn.Module):
        model = base
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    batches = calibration_batches(calibration, config.calibration_tokens, batch_size, vocab)
    key = moefication_cache_key(base_identity, config, batches)
    root = Path(cache_dir)
    path = root / key
    if (path / CONFIG_FILE).is_file():
        result = load_moefied(path, ubsmoe_config)
        result.moefication_cache = {"key": key, "path": str(path), "hit": True}
        return result
    if model is None:
        model = base()
    moefy(model, batches, config, ubsmoe_config, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        save_moefied(model, temporary)
        try:
            os.rename(temporary, path)
        except OSError:
            if not (path / CONFIG_FILE).is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    model.moefication_cache = {"key": key, "path": str(path), "hit": False}
    return model
