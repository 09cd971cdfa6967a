"""Named presets: partial configurations laid over the defaults before a config file and `--set`.

`ubsmoe run --preset benchmark` (and `ubsmoe compare --preset benchmark`) start from the defaults,
apply the preset, then the `--config` file, then each `--set`; the run's config.yaml records the
result, so a preset is never needed to read or resume a run.

`benchmark` is the experiment the method comparison uses (docs/results.md): long enough that
fine-tuning lifts the K = 8 tier's accuracy beyond its paired interval over the untrained model, each
run at most about 25 minutes on 2 cores, evaluated on at least 400 examples per tier. How its values
were chosen, with the measurements, is in docs/decisions.md ("The benchmark preset"). It evaluates
the `dev` half; the final tables use `--set evaluation.split=test`.
"""

from __future__ import annotations

import copy
from typing import Any

from ubsmoe.config.errors import ConfigError

__all__ = ["PRESETS", "preset_overrides"]

BENCHMARK_TASKS = ["hyperbaton", "navigate", "winowhy", "movie_recommendation", "ruin_names", "date_understanding"]
"""The default tasks that dense LoRA lifts most (benchmarks/results/task_selection_cpu.json), without the two
that no tier learned in six rounds (social_iqa, analogical_similarity: benchmarks/results/lift_r6s10_dev_cpu.json)."""

PRESETS: dict[str, dict[str, Any]] = {
    "benchmark": {
        "data": {"tasks": BENCHMARK_TASKS},
        "federation": {"rounds": 8, "local_steps": 15},
        "evaluation": {
            "examples_per_task": 100,
            "split": "dev",
            "every": 8,
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
