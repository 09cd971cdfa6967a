"""Does a run lift each tier over the untrained model? Paired differences from a run's per-example records.

For every evaluation a run wrote after training (OUT/evaluations/round_NNNN.jsonl), per tier, the
difference to the evaluation before training (initial.jsonl) on the same examples: accuracy
(percentage points) and gold-answer NLL per token, each with its 95% paired bootstrap interval
(`ubsmoe.report.paired`). Issue 15's benchmark preset must be long enough that the K = 8 tier's
accuracy interval excludes zero; this is how a candidate setting is checked.

    python benchmarks/lift_over_untrained.py runs/default > lift.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ubsmoe.fl.tiers import EVALUATIONS_DIR
from ubsmoe.report.paired import paired_tier_differences, read_records


def lift(run: Path) -> dict[str, Any]:
    folder = run / EVALUATIONS_DIR
    initial = read_records(folder / "initial.jsonl")
    if initial is None:
        raise SystemExit(f"{folder / 'initial.jsonl'}: no evaluation before training (evaluation.initial=false?)")
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    tiers = summary["tiers"]
    evaluations = {}
    for path in sorted(folder.glob("round_*.jsonl")):
        differences = paired_tier_differences([initial], [read_records(path)], [t["tier"] for t in tiers])
        evaluations[path.stem] = [
            {
                "tier": d["tier"],
                "top_k": t["top_k"],
                "budget": t["budget"],
                **{k: d[k] for k in ("accuracy", "answer_nll")},
            }
            for d, t in zip(differences, tiers, strict=True)
        ]
    return {
        "run": str(run),
        "config": summary["config"],
        "examples_per_tier": sum(r["tier"] == tiers[0]["tier"] for r in initial),
        "total_s": summary["timing"]["total_s"],
        "after_minus_before": evaluations,
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/lift_over_untrained.py RUN_DIR")
    print(json.dumps(lift(Path(sys.argv[1])), indent=1))
