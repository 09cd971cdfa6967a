"""Federated core: client update, aggregation rules, server round logic (functions over plain payloads).

The in-process simulation and the Flower app call these same functions.
"""

from ubsmoe.fl.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from ubsmoe.fl.client import ClientSettings, client_update, round_lr
from ubsmoe.fl.payload import ClientUpdate, GlobalState, global_state_from_model, load_global_state
from ubsmoe.fl.server import aggregate_round, sample_clients, validate_update
from ubsmoe.fl.simulation import run_simulation

__all__ = [
    "CheckpointError",
    "ClientSettings",
    "ClientUpdate",
    "GlobalState",
    "aggregate_round",
    "client_update",
    "global_state_from_model",
    "latest_checkpoint",
    "load_checkpoint",
    "load_global_state",
    "round_lr",
    "run_simulation",
    "sample_clients",
    "save_checkpoint",
    "validate_update",
]
