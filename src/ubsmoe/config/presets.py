"""Named presets: partial configurations laid over the defaults before a config file and `--set`.

`ubsmoe run --preset benchmark` (and `ubsmoe compare --preset benchmark`) start from the defaults,
apply the preset, then the `--config` file, then each `--set`; the run's config.yaml records the
result, so a preset is never needed to read or resume a run.

`benchmark` is the experiment the method comparison uses (docs/results.md): long enough that
fine-tuning lifts the K = 8 tier's accuracy beyond its paired interval over the untrained model, and
short enough that a three-seed comparison of every method fits the study's machine budget (about 11
minutes per run on 2 cores), evaluated on at least 400 examples per tier (409: the whole dev half).
`--set evaluation.initial=true` adds the evaluation before training that the lift is measured against. How its values
were chosen, with the measurements, is in docs/decisions.md ("The benchmark preset"). It evaluates
the `dev` half; the final tables use `--set evaluation.split=test`.
"""

from __future__ import annotations

import copy
from typing import Any

from ubsmoe.config.errors import ConfigError

__all__ = ["PRESETS", "preset_overrides"]

BENCHMARK_TASKS = ["movie_recommendation", "ruin_names", "date_understanding", "analogical_similarity"]
"""The default tasks whose options are texts that dense LoRA learns to rank (benchmarks/results/task_selection_cpu.json):
on the binary tasks (navigate, hyperbaton, winowhy) federated fine-tuning learned one constant answer instead
(benchmarks/results/lift_r8s15_6tasks_dev_cpu.json), and social_iqa did not move."""

PRESETS: dict[str, dict[str, Any]] = {
    "benchmark": {
        "data": {
            "tasks": BENCHMARK_TASKS,
            # half of each task held out, so its dev half alone has 409 examples per tier (all of them scored)
            "test_fraction": 0.5,
        },
        "federation": {"rounds": 6, "local_steps": 10},
        "evaluation": {
            "examples_per_task": None,
            "split": "dev",
            "initial": False,  # the untrained model is the same for every method and seed: score it once, not per run
            "every": 6,
            "heldout_tokens": 0,
        },
        "output": {"dir": "runs/benchmark"},
    },
}


def preset_overrides(name: str | None) -> dict[str, Any]:
    """The partial configuration of preset `name` (a fresh copy; {} for None); ConfigError for an unknown name."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
