"""The experiment configuration: one typed, validated schema for the CLI, the simulation and Flower.

An `ExperimentConfig` is read from a YAML (`.yaml`/`.yml`) or TOML (`.toml`) file, or built from the
defaults alone (the embedded default experiment: SmolLM2-135M MoEfied into M = 8 experts, four budget
tiers 0.25 / 0.5 / 0.75 / 1.0 with two clients each, eight BIG-bench tasks), and changed with
`--set a.b=c` overrides whose values follow YAML's scalar rules (`federation.rounds=5`,
`lora.targets=[gate,down]`, `moe.tiers=[{budget: 0.5, clients: 3}]`, `moe.num_candidates=null`).

Every section forbids unknown keys, so a typo is an error; a key given twice in one YAML/JSON mapping is an
error too (naming the key and its lines), every float must be finite (`.inf`/`.nan` are refused), and
`true`/`false` are refused where a number is expected. Invalid values raise `ConfigError`, whose
message has one line per problem naming the dotted field, the offending value and what is allowed:

    federation.fraction = 1.5: must be in (0, 1]
    federation.roundz = 5: unknown key; did you mean 'rounds'? Valid keys of federation: ...

Checks that need the loaded model (K_max of a native MoE, its expert count, the number of training
examples) run later through `ExperimentConfig.check_against_model`, which raises the same kind of error.

`method` names a method of `ubsmoe.methods` (a built-in name, a registered one, or a
`package.module:Class` path; `method_options` holds an external method's hyper-parameters). How it
relates to the switches: the `dmr.enabled` / `pseudo_gradient.enabled` flags and `dmr.range_lambda`
are the UB-SMoE settings; a method whose class does not use a mechanism (`Method.uses_dmr`, ...)
switches it off, whatever the flag says (`ubsmoe-no-dmr` -> DMR off, `ubsmoe-no-reg` -> range_lambda
0, `smoe-naive` -> DMR and PG off ...). `ExperimentConfig.ubsmoe_config()` applies this.

This package imports neither torch nor transformers; the builders of the layer configs and the
method's semantics (`method_class`, the method modules import torch) import them lazily.

A preset (`ubsmoe.config.presets`, e.g. `benchmark`, the comparison's experiment) is a partial
configuration laid over the defaults before the file and the overrides: `load_config(path, overrides, preset)`.

The package: `schema` (the sections and `ExperimentConfig`), `errors` (`ConfigError` and the rendering
of pydantic's errors), `files` (files, overrides, `load_config`, `save_config`), `presets`.
"""

from ubsmoe.config.errors import ConfigError
from ubsmoe.config.files import load_config, parse_override, save_config
from ubsmoe.config.presets import PRESETS
from ubsmoe.config.schema import DEFAULT_TASKS, EMBEDDED_MODEL, DataSection, ExperimentConfig, Tier

__all__ = [
    "DEFAULT_TASKS",
    "EMBEDDED_MODEL",
    "PRESETS",
    "ConfigError",
    "DataSection",
    "ExperimentConfig",
    "Tier",
    "load_config",
    "parse_override",
    "save_config",
]
