"""Copy a comparison's finished runs into a folder fit to commit: what a table is rebuilt from, nothing more.

    python benchmarks/collect_runs.py runs/sweep benchmarks/results/sweep_dev

For `SRC` (an `ubsmoe compare` or `benchmarks/pg_dmr_sweep.py` folder) it copies `base_config.yaml`,
`comparison.json`/`.md` and `sweep.json` where present, and for every finished run (`<label>/seed<k>/`
with a summary.json) its `config.yaml`, `summary.json` and the per-example records of its first and
last evaluation (`evaluations/initial.jsonl`, `round_NNNN.jsonl`: indices, predictions and NLLs, no
example text). Checkpoints, adapters, plots and logs stay behind. Unfinished runs are skipped, so it can
run while the comparison goes on; running `ubsmoe compare ... --out DST --finished-only` (or the sweep
with `--finished-only`) on the copy rebuilds the tables, paired differences included. Prints what it
copied as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

TOP_FILES = ("base_config.yaml", "comparison.json", "comparison.md", "sweep.json")
RUN_FILES = ("config.yaml", "summary.json")


def collect(source: Path, target: Path) -> dict[str, list[str]]:
    """Copy the finished runs of `source` into `target` (see the module docstring); returns what was copied."""
    if not (source / "base_config.yaml").is_file():
        raise ValueError(f"{source} is not a comparison folder (no base_config.yaml)")
    copied: dict[str, list[str]] = {"files": [], "runs": []}
    target.mkdir(parents=True, exist_ok=True)
    for name in TOP_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied["files"].append(name)
    for summary in sorted(source.glob("*/seed*/summary.json")):
        run = summary.parent
        destination = target / run.relative_to(source)
        (destination / "evaluations").mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            shutil.copy2(run / name, destination / name)
        records = sorted((run / "evaluations").glob("round_*.jsonl"))
        for path in [run / "evaluations" / "initial.jsonl", *records[-1:]]:
            if path.is_file():
                shutil.copy2(path, destination / "evaluations" / path.name)
        copied["runs"].append(str(run.relative_to(source)))
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    try:
        copied = collect(args.source, args.target)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(copied, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
