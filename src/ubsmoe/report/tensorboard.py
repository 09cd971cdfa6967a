"""TensorBoard scalars of a run, when the `tensorboard` package is installed (`pip install tensorboard`).

The step of every scalar is the number of rounds completed (0 = before training), as in the plots:
per tier accuracy/<tier>, answer_perplexity/<tier>; accuracy/mean; train/lm_loss; balance/mean_cv and
balance/dead_experts. Written once at the end of a run from its summary (a resumed run rewrites them).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["tensorboard_available", "write_scalars"]


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def _tier_name(entry: Mapping[str, Any]) -> str:
    return f"tier{entry.get('tier')}_K{entry.get('top_k')}"


def _eval_scalars(evaluation: Mapping[str, Any] | None) -> dict[str, float]:
    if not evaluation:
        return {}
    scalars = {"accuracy/mean": evaluation.get("mean_accuracy")}
    for entry in evaluation.get("tiers", []):
        scalars[f"accuracy/{_tier_name(entry)}"] = entry.get("accuracy")
        scalars[f"answer_perplexity/{_tier_name(entry)}"] = entry.get("answer_perplexity")
    return scalars


def run_scalars(summary: Mapping[str, Any]) -> dict[int, dict[str, float]]:
    """{step: {tag: value}} with step = rounds completed; non-numeric values are left out."""
    steps: dict[int, dict[str, Any]] = {0: _eval_scalars(summary.get("initial"))}
    for record in summary.get("rounds", []):
        step = int(record["round"]) + 1
        scalars = _eval_scalars(record.get("eval"))
        scalars["train/lm_loss"] = (record.get("train") or {}).get("train_lm_loss")
        scalars["balance/mean_cv"] = record.get("mean_utilization_cv")
        scalars["balance/dead_experts"] = sum(record.get("dead_experts") or [])
        steps[step] = scalars
    return {
        step: {tag: float(v) for tag, v in scalars.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for step, scalars in steps.items()
    }


def write_scalars(summary: Mapping[str, Any], directory: str | Path) -> str | None:
    """Write the run's scalars to `directory` (replacing earlier ones); None when tensorboard is not installed."""
    if not tensorboard_available():
        return None
    from torch.utils.tensorboard import SummaryWriter

    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(directory))
    try:
        for step, scalars in sorted(run_scalars(summary).items()):
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    return str(directory)
