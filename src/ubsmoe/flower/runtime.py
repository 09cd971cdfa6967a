"""What the ServerApp and the ClientApp both load: the experiment's model and data, and a client's tier.

Both sides load the model and the federated data exactly as `ubsmoe run` does (`load_experiment_model`,
`federated_data`), so a client's examples, the initial adapters and the frozen base are the same
everywhere. The experiment config travels from the ServerApp to the clients inside every message
(`CONFIG_KEY`, JSON of `ExperimentConfig.to_dict()`), so a SuperNode needs no copy of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ubsmoe.config import ExperimentConfig, Tier
from ubsmoe.data.federated import FederatedData, experiment_data
from ubsmoe.data.prompts import pad_token_id
from ubsmoe.fl.client import ClientSettings
from ubsmoe.methods import Method
from ubsmoe.models.loading import LoadedModel, load_experiment_model

__all__ = [
    "CONFIG_KEY",
    "Runtime",
    "budget_settings",
    "check_budget",
    "config_from_json",
    "config_to_json",
    "load_runtime",
    "make_runtime",
    "node_identity",
]

CONFIG_KEY = "experiment"
"""ConfigRecord key of the experiment config (JSON text) in every message the ServerApp sends."""


def config_to_json(config: ExperimentConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def config_from_json(text: str) -> ExperimentConfig:
    return ExperimentConfig.from_dict(json.loads(text), source="the ServerApp's message")


@dataclass
class Runtime:
    """A loaded experiment: the model (a work buffer), its data and the settings derived from the config."""

    config: ExperimentConfig
    loaded: LoadedModel
    data: FederatedData
    pad_id: int
    method: Method
    settings: ClientSettings
    merger: Any | None
    """`Method.base_merger` (FLoRA/FLoRIST): merges the server's accumulated factors into this model's frozen base."""
    key: str = ""


def load_runtime(config: ExperimentConfig) -> Runtime:
    """The model and the data of `config`, as `ubsmoe.fl.experiment.run_experiment` loads them."""
    loaded = load_experiment_model(config)
    return make_runtime(config, loaded, experiment_data(config, loaded))


def make_runtime(config: ExperimentConfig, loaded: LoadedModel, data: FederatedData) -> Runtime:
    """A `Runtime` around a model and data already loaded (the ServerApp's, by the experiment set-up)."""
    method = config.method_instance()
    return Runtime(
        config=config,
        loaded=loaded,
        data=data,
        pad_id=pad_token_id(loaded.tokenizer),
        method=method,
        settings=ClientSettings.from_config(config),
        merger=method.base_merger(loaded.model),
        key=hashlib.sha256(config_to_json(config).encode("utf-8")).hexdigest(),
    )


def check_budget(budget: Any, name: str = "budget (beta)") -> float:
    """`budget` as a float when it is a valid compute budget, a number in (0, 1]; else ValueError naming `name`.

    The one rule for a node's beta: the launcher checks its `--beta` values with it before starting
    anything, and the ClientApp and the Strategy check a node's declared beta with it at run time.
    """
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
        raise ValueError(f"{name} = {budget!r}: must be a number in (0, 1] (the share of K_max the node can afford)")
    return float(budget)


def budget_settings(config: ExperimentConfig, budget: float, k_max: int) -> tuple[int, int]:
    """(K_c, configured LoRA rank r_c) of a client with compute budget `budget`, by the config's own rules."""
    budget = check_budget(budget)
    single = config.model_copy(
        update={"moe": config.moe.model_copy(update={"tiers": [Tier(budget=budget, clients=1)]})}
    )
    return single.client_top_ks(k_max)[0], single.client_ranks()[0]


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"node-config {name} = {value!r}: must be a number") from None


def node_identity(node_config: dict[str, Any], config: ExperimentConfig) -> tuple[int, float]:
    """(client id, budget beta) of a SuperNode.

    The client id is node-config `client-id` (deployment) or `partition-id` (simulation); the budget is
    node-config `beta` when set (deployment: each device declares what it can afford), else the budget
    of that client's tier in the experiment config (simulation).
    """
    for name in ("client-id", "partition-id"):
        if name in node_config:
            value = node_config[name]
            try:
                client = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"node-config {name} = {value!r}: must be an integer") from None
            break
    else:
        raise ValueError("the SuperNode's node-config has neither client-id nor partition-id")
    if not 0 <= client < config.num_clients:
        raise ValueError(f"client id {client} is outside the experiment's clients 0..{config.num_clients - 1}")
    budget = _number(node_config["beta"], "beta") if "beta" in node_config else config.client_budgets()[client]
    return client, check_budget(budget, "node-config beta")
