"""Federated core: client update, server round logic, simulation, checkpoints (functions over plain payloads).

The in-process simulation and the Flower app call these same functions; the methods' own halves live
in `ubsmoe.methods`. Names are imported on first use, so importing one submodule (e.g. the payloads,
which every method needs) does not import the rest.
"""

from importlib import import_module

_WHERE = {
    "CheckpointError": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ClientSettings": "client",
    "client_update": "client",
    "round_lr": "client",
    "ClientUpdate": "payload",
    "GlobalState": "payload",
    "global_state_from_model": "payload",
    "load_global_state": "payload",
    "aggregate_round": "server",
    "sample_clients": "server",
    "validate_update": "server",
    "run_simulation": "simulation",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"ubsmoe.fl.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'ubsmoe.fl' has no attribute {name!r}")
