"""The paper's generate protocol, read from a comparison's per-example records: accuracy and unparsable share per tier.

    ubsmoe compare --methods ubsmoe,hetlora,flexlora -c benchmarks/configs/generate_protocol.yaml \
        --out runs/generate_protocol
    python benchmarks/generate_protocol_report.py runs/generate_protocol

For every method, seed and tier of `OUT/<method>/seed<k>/evaluations/<last round>.jsonl`: the accuracy over
all examples with its Wilson 95% interval, the share of generations that name no option label
(`unmatched`, counted wrong: what lets a multiple-choice score fall below chance), and how those
generations look (empty, or the answer sentence with a label outside the options, or other text), with
a few of them verbatim. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_SENTENCE = re.compile(r"the correct answer is\s*(\S*)", re.IGNORECASE)


def unmatched_kind(generation: str) -> str:
    """How a generation that named no option looks: empty, the answer sentence with another label, or other text."""
    if not generation.strip():
        return "empty"
    if _SENTENCE.search(generation):
        return "answer sentence, label outside the options"
    return "other text"


def tier_report(records: list[dict[str, Any]], tier: int, samples: int = 3) -> dict[str, Any]:
    """Accuracy (Wilson 95%), unmatched share and the kinds of unmatched generations of one tier's records."""
    from ubsmoe.metrics.evaluation import wilson_interval

    mine = [r for r in records if r["tier"] == tier]
    n = len(mine)
    correct = sum(bool(r["correct"]) for r in mine)
    unmatched = [r for r in mine if r["prediction"] is None]
    return {
        "tier": tier,
        "budget": mine[0]["budget"],
        "top_k": mine[0]["top_k"],
        "rank": mine[0].get("rank"),
        # the rank the tier's clients held when evaluated (HetLoRA prunes it); None in records that predate it
        "evaluated_rank": mine[0].get("evaluated_rank"),
        "n": n,
        "accuracy": correct / n,
        "wilson95": list(wilson_interval(correct, n)),
        "unmatched": len(unmatched) / n,
        "unmatched_kinds": dict(Counter(unmatched_kind(r.get("generation") or "") for r in unmatched)),
        "unmatched_samples": [r.get("generation") for r in unmatched[:samples]],
    }


def report(folder: Path) -> dict[str, Any]:
    """Per method and seed, every tier's `tier_report` from the last evaluation of each finished run."""
    from ubsmoe.report.paired import read_records

    methods: dict[str, Any] = {}
    for summary in sorted(folder.glob("*/seed*/summary.json")):
        run = summary.parent
        files = sorted((run / "evaluations").glob("round_*.jsonl"))
        records = read_records(files[-1]) if files else None
        if not records:
            continue
        if "generation" not in records[0]:
            raise ValueError(f"{files[-1]} holds no generations: the run used the loglik protocol")
        tiers = sorted({r["tier"] for r in records})
        methods.setdefault(run.parent.name, {})[run.name] = [tier_report(records, t) for t in tiers]
    if not methods:
        raise ValueError(f"{folder} holds no finished run with per-example records")
    return {"benchmark": "generate protocol (LLM-Adapters label extraction) per tier", "methods": methods}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an `ubsmoe compare` output folder of generate-protocol runs")
    args = parser.parse_args(argv)
    try:
        result = report(args.folder)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
