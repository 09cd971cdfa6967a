"""Payloads of the federated core <-> Flower records, exact in both directions.

A `GlobalState` travels as one `ArrayRecord` (keys `adapters.<module path>`, `phi`, `method.<name>`,
the same names as a checkpoint's `state.safetensors`) plus a `ConfigRecord` (the round and the key
order). A `ClientUpdate` travels as an `ArrayRecord` (`delta.<key>`, `phi`, `counts`, `tokens`,
`local.<key>`), a `ConfigRecord` (client id, num_examples, top_k, rank, key order) and a
`MetricRecord` (the client's training metrics, unchanged).

Tensors whose dtype numpy can hold travel as Flower's standard numpy arrays; others (bfloat16) as
their raw bytes with the torch dtype's name (stype `ubsmoe.torch-raw`). Either way the decoded tensor
equals the encoded one bit for bit, with the same dtype and shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from ubsmoe.fl.payload import ClientUpdate, GlobalState

__all__ = [
    "RAW_STYPE",
    "array_to_tensor",
    "records_to_state",
    "records_to_update",
    "state_to_records",
    "tensor_to_array",
    "update_to_records",
]

RAW_STYPE = "ubsmoe.torch-raw"
_NUMPY_DTYPES = {
    torch.float64,
    torch.float32,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
}


def tensor_to_array(tensor: torch.Tensor) -> Array:
    """A Flower `Array` holding `tensor` exactly (a CPU copy)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype in _NUMPY_DTYPES:
        return Array.from_numpy_ndarray(tensor.numpy())
    raw = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return Array(dtype=str(tensor.dtype).removeprefix("torch."), shape=tuple(tensor.shape), stype=RAW_STYPE, data=raw)


def array_to_tensor(array: Array) -> torch.Tensor:
    """The tensor an `Array` of `tensor_to_array` holds (a fresh, writable CPU tensor)."""
    if array.stype == RAW_STYPE:
        dtype = getattr(torch, array.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown torch dtype {array.dtype!r} in a {RAW_STYPE} array")
        if not array.data:
            return torch.empty(tuple(array.shape), dtype=dtype)
        return torch.frombuffer(bytearray(array.data), dtype=dtype).reshape(tuple(array.shape)).clone()
    return torch.from_numpy(array.numpy().copy())


def _put(record: ArrayRecord, prefix: str, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    for key, value in tensors.items():
        record[f"{prefix}{key}"] = tensor_to_array(value)
    return list(tensors)


def _take(record: ArrayRecord, prefix: str, keys: list[str]) -> dict[str, torch.Tensor]:
    missing = [k for k in keys if f"{prefix}{k}" not in record]
    if missing:
        raise ValueError(f"the record lacks {len(missing)} tensor(s), first {prefix}{missing[0]!r}")
    return {k: array_to_tensor(record[f"{prefix}{k}"]) for k in keys}


def state_to_records(state: GlobalState) -> tuple[ArrayRecord, ConfigRecord]:
    """(arrays, config) of a `GlobalState`; `records_to_state` inverts it exactly."""
    arrays = ArrayRecord()
    adapter_keys = _put(arrays, "adapters.", state.adapters)
    method_keys = _put(arrays, "method.", state.method_state)
    arrays["phi"] = tensor_to_array(state.phi)
    config = ConfigRecord(
        {"round": int(state.round), "adapter-keys": adapter_keys or [""], "method-keys": method_keys or [""]}
    )
    return arrays, config


def _keys(config: ConfigRecord, name: str) -> list[str]:
    value = config.get(name, [])
    if not isinstance(value, list):
        raise ValueError(f"{name!r} must be a list of keys, got {type(value).__name__}")
    return [str(k) for k in value if k != ""]  # [""] stands for an empty list (a ConfigRecord list must not be empty)


def records_to_state(arrays: ArrayRecord, config: ConfigRecord) -> GlobalState:
    """The `GlobalState` of `state_to_records` (keys in their original order)."""
    if "phi" not in arrays:
        raise ValueError("the state record has no 'phi' tensor")
    return GlobalState(
        adapters=_take(arrays, "adapters.", _keys(config, "adapter-keys")),
        phi=array_to_tensor(arrays["phi"]),
        round=int(config["round"]),
        method_state=_take(arrays, "method.", _keys(config, "method-keys")),
    )


def update_to_records(update: ClientUpdate) -> tuple[ArrayRecord, ConfigRecord, MetricRecord]:
    """(arrays, config, metrics) of a `ClientUpdate`; `records_to_update` inverts it exactly."""
    arrays = ArrayRecord()
    delta_keys = _put(arrays, "delta.", update.adapter_deltas)
    local_keys = _put(arrays, "local.", update.local_state)
    for name in ("phi", "counts", "tokens"):
        arrays[name] = tensor_to_array(getattr(update, name))
    config: dict = {
        "client-id": str(update.client_id),
        "client-id-is-int": isinstance(update.client_id, int) and not isinstance(update.client_id, bool),
        "num-examples": int(update.num_examples),
        "top-k": int(update.top_k),
        "delta-keys": delta_keys or [""],
        "local-keys": local_keys or [""],
    }
    if update.rank is not None:
        config["rank"] = int(update.rank)
    metrics = MetricRecord()
    for key, value in update.metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"metric {key!r} = {value!r}: a MetricRecord holds numbers only")
        metrics[key] = value
    return arrays, ConfigRecord(config), metrics


def records_to_update(arrays: ArrayRecord, config: ConfigRecord, metrics: MetricRecord) -> ClientUpdate:
    """The `ClientUpdate` of `update_to_records`."""
    client_id: str | int = str(config["client-id"])
    if config.get("client-id-is-int"):
        client_id = int(client_id)
    for name in ("phi", "counts", "tokens"):
        if name not in arrays:
            raise ValueError(f"the update record has no {name!r} tensor")
    rank = config.get("rank")
    return ClientUpdate(
        client_id=client_id,
        adapter_deltas=_take(arrays, "delta.", _keys(config, "delta-keys")),
        phi=array_to_tensor(arrays["phi"]),
        counts=array_to_tensor(arrays["counts"]),
        tokens=array_to_tensor(arrays["tokens"]),
        num_examples=int(config["num-examples"]),
        top_k=int(config["top-k"]),
        metrics=dict(metrics.items()),
        rank=None if rank is None else int(rank),
        local_state=_take(arrays, "local.", _keys(config, "local-keys")),
    )
