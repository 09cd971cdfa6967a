"""`ubsmoe compare`: the same experiment for several methods and seeds, then one comparison.

Every (method, seed) runs `run_experiment` with the base configuration, changing only `method` and
`seed` (seed i is base seed + i; FLOPs are counted on the first seed only, since they do not depend
on it; `data.seed`, hence the split and the partition, stays the same, so
the seeds measure the training's randomness on one federation). Runs land in
`OUT/<method>/seed<k>/`; running the command again reuses finished runs, resumes interrupted ones
from their checkpoints and starts the rest, so a long comparison survives interruptions.
`OUT/base_config.yaml` records the base configuration: a folder that holds a comparison of another
configuration is refused. A run folder that holds a `config.yaml` but no checkpoint (stopped before
its first round) is resumed too (it restarts with its saved configuration). `OUT` is locked while the
command runs (`ubsmoe.fl.outdir.lock_output`; a second `ubsmoe compare` on it fails at once), and
every run locks its own folder.

Method labels are the config's method names plus the N_p ablation of UB-SMoE: `ubsmoe-np1x`,
`ubsmoe-np2x`, `ubsmoe-np4x` run `ubsmoe` with moe.num_candidates = 1, 2, 4 x K_max, clipped to the
M experts (where K_max = M, as in MoEfied models, the three coincide; the comparison says so).

Settings variants (the Python API's `variants`, used by benchmarks/pg_dmr_sweep.py): a label that maps to a
list of `a.b=c` overrides runs the base configuration with those overrides (and the base's method unless
they set one), so a sweep over a method's settings shares the reuse, resume, locking and paired tables.

Outputs: `OUT/comparison.json` (`ubsmoe.report.comparison.build_comparison`, plus the command, the
base configuration and the N_p actually used), `OUT/comparison.md` and `OUT/plots/`.

`finished_only=True` (`ubsmoe compare --finished-only`) runs nothing: it builds the comparison from the
runs that have a summary.json, lists the others under `missing`, and leaves out a method with none,
so a long comparison can be read while it runs (and the table says how many seeds each row has); it
takes no lock.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ubsmoe.config import ConfigError, ExperimentConfig, load_config, save_config
from ubsmoe.config.files import apply_override
from ubsmoe.methods.registry import is_method_name, method_names

__all__ = ["NP_VARIANTS", "method_labels", "run_comparison", "variant_config"]

NP_VARIANTS = {"ubsmoe-np1x": 1, "ubsmoe-np2x": 2, "ubsmoe-np4x": 4}
BASE_CONFIG = "base_config.yaml"


def method_labels(text: str) -> list[str]:
    """The comma-separated labels of `--methods`, checked (ConfigError names the unknown ones)."""
    labels = [part.strip() for part in text.split(",") if part.strip()]
    if not labels:
        raise ConfigError("--methods is empty; give e.g. --methods ubsmoe,smoe-naive")
    unknown = [label for label in labels if label not in NP_VARIANTS and not is_method_name(label)]
    if unknown:
        known = (*method_names(), *NP_VARIANTS)
        raise ConfigError(
            f"--methods: unknown {', '.join(unknown)}; known: {', '.join(known)} (or a 'package.module:Class' path)"
        )
    if len(set(labels)) != len(labels):
        raise ConfigError("--methods names a method twice")
    return labels


def _k_max_and_experts(config: ExperimentConfig) -> tuple[int, int]:
    if config.model.is_moefied:
        experts = config.model.moefication.num_experts
        return experts, experts
    from ubsmoe.models.loading import resolve_model_directory
    from ubsmoe.models.native import ModelLoadError

    try:  # a local folder, or a hub id's config in the Hugging Face cache (fetched when missing)
        directory = resolve_model_directory(config.model.name, config.model.revision, weights=False).directory
    except ModelLoadError as error:
        raise ConfigError(f"the N_p ablation needs K_max and M of the model: {error}") from None
    path = directory / "config.json"
    try:
        native = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"the N_p ablation needs K_max and M of the model: cannot read {path}") from None
    experts = native.get("num_experts") or native.get("num_local_experts")
    k_max = native.get("num_experts_per_tok")
    if not isinstance(experts, int) or not isinstance(k_max, int):
        raise ConfigError(f"{path} names no num_experts_per_tok and num_experts / num_local_experts")
    return k_max, experts


def variant_config(
    base: ExperimentConfig, label: str, seed: int, variants: Mapping[str, Sequence[str]] | None = None
) -> ExperimentConfig:
    """The configuration of one (label, seed) run (`variants`: labels that stand for `a.b=c` overrides)."""
    data = base.to_dict()
    if seed != base.seed:  # FLOPs do not depend on the seed: count them on the first seed only
        data["evaluation"]["measure_flops"] = False
    data["seed"] = seed
    if variants is not None and label in variants:
        for text in variants[label]:
            apply_override(data, text)
    elif label in NP_VARIANTS:
        k_max, experts = _k_max_and_experts(base)
        data["method"] = "ubsmoe"
        data["moe"]["num_candidates"] = min(NP_VARIANTS[label] * k_max, experts)
    else:
        data["method"] = label
    return ExperimentConfig.from_dict(data)


def _paired(
    summaries: dict[str, list[dict[str, Any]]], folders: dict[str, list[Path]], rounds: int
) -> dict[str, Any] | None:
    """Every method against the first, example by example on the last evaluation (`ubsmoe.report.paired`);
    None when a run wrote no per-example records (runs from before they were written)."""
    from ubsmoe.fl.tiers import EVALUATIONS_DIR, evaluation_file
    from ubsmoe.report.paired import paired_tier_differences, read_records

    records = {
        label: [read_records(evaluation_file(folder / EVALUATIONS_DIR, rounds - 1)) for folder in runs]
        for label, runs in folders.items()
        if label in summaries
    }
    if len(records) < 2 or any(r is None for runs in records.values() for r in runs):
        return None
    reference, *others = records
    tiers = [tier["tier"] for tier in summaries[reference][0]["tiers"]]
    return {
        "reference": reference,
        "methods": {label: paired_tier_differences(records[reference], records[label], tiers) for label in others},
    }


def _check_folder(base: ExperimentConfig, out: Path) -> None:
    saved = out / BASE_CONFIG
    if saved.is_file():
        if load_config(saved).to_dict() != base.to_dict():
            raise ConfigError(
                f"{out} holds a comparison of another configuration ({saved}); use another --out, or the same "
                "--config/--set to continue it"
            )
        return
    from ubsmoe.fl.outdir import output_folder

    output_folder(out)
    save_config(base, saved)


def run_comparison(
    base: ExperimentConfig,
    labels: Sequence[str],
    seeds: int,
    out: str | Path,
    run: Callable[[ExperimentConfig | None, Path, bool], dict[str, Any]] | None = None,
    on_run: Callable[[str, int, str], None] | None = None,
    finished_only: bool = False,
    variants: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every (label, seed), then write and return the comparison; see the module docstring.

    `run(config, folder, resume)` runs one experiment (default: `run_experiment` without progress);
    `on_run(label, seed, status)` is told 'reused', 'resumed' or 'started' before each run.
    """
    from ubsmoe.fl.outdir import lock_output

    if not (isinstance(seeds, int) and seeds >= 1):
        raise ConfigError(f"--seeds {seeds}: must be an integer >= 1")
    out = Path(out)
    if finished_only:  # reads while another `ubsmoe compare` may hold the folder
        return _compare(base, labels, seeds, out, run, on_run, finished_only, variants)
    with lock_output(out):
        return _compare(base, labels, seeds, out, run, on_run, finished_only, variants)


def _compare(
    base: ExperimentConfig,
    labels: Sequence[str],
    seeds: int,
    out: Path,
    run: Callable[[ExperimentConfig | None, Path, bool], dict[str, Any]] | None,
    on_run: Callable[[str, int, str], None] | None,
    finished_only: bool,
    variants: Mapping[str, Sequence[str]] | None,
) -> dict[str, Any]:
    from ubsmoe.fl.checkpoint import latest_checkpoint
    from ubsmoe.fl.experiment import run_experiment
    from ubsmoe.report.comparison import build_comparison, comparison_markdown, write_comparison_plots

    _check_folder(base, out)
    run = run or (lambda config, folder, resume: run_experiment(config, folder, resume=resume))
    started = time.perf_counter()
    summaries: dict[str, list[dict[str, Any]]] = {}
    folders: dict[str, list[Path]] = {}  # the run folder of each summary, in the same order
    candidates: dict[str, int | None] = {}
    missing: list[dict[str, Any]] = []
    for label in labels:
        summaries[label], folders[label] = [], []
        for index in range(seeds):
            seed = base.seed + index
            config = variant_config(base, label, seed, variants)
            candidates[label] = config.moe.num_candidates
            folder = out / label / f"seed{seed}"
            summary_path = folder / "summary.json"
            if summary_path.is_file():
                status = "reused"
                summary = json.loads(summary_path.read_text(encoding="utf-8"))
            elif latest_checkpoint(folder / "checkpoint") is not None or (folder / "config.yaml").is_file():
                status = "resumed"  # with no checkpoint yet (stopped before its first round) it restarts
            else:
                status = "started"
            if finished_only and status != "reused":
                missing.append(
                    {"method": label, "seed": seed, "status": "unfinished" if status == "resumed" else "absent"}
                )
                continue
            if on_run is not None:
                on_run(label, seed, status)
            if status == "resumed":
                summary = run(None, folder, True)
            elif status == "started":
                summary = run(config, folder, False)
            summaries[label].append(summary)
            folders[label].append(folder)

    summaries = {label: runs for label, runs in summaries.items() if runs}
    if not summaries:
        raise ConfigError(f"{out} holds no finished run of {', '.join(labels)} yet")
    comparison = build_comparison(summaries)
    comparison["paired"] = _paired(summaries, folders, base.federation.rounds)
    comparison["missing"] = missing
    comparison["command"] = " ".join(sys.argv)
    comparison["seeds"] = seeds
    comparison["num_candidates"] = candidates
    if variants is not None:
        comparison["variants"] = {label: list(variants[label]) for label in labels if label in variants}
    comparison["base_config"] = base.to_dict()
    comparison["wall_clock_s"] = time.perf_counter() - started
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    (out / "comparison.md").write_text(comparison_markdown(comparison), encoding="utf-8")
    if base.output.plots:
        write_comparison_plots(comparison, out / "plots")
    return comparison
