"""The K = 8 (or any K) local step of this tree against the same step at an earlier commit, on the same batches.

Issue 12 asked for the K = 8 step to be at least 1.3x faster than before its changes. Speed-ups measured within one
process (tier_step.py's full-logits row) cover only the loss; this script times the whole step of two versions of
the package: it checks the old commit out into a temporary git worktree, saves `--batches` default-data batches
made by this tree (tier_step.py's `pick_batches`), then alternates worker processes, old and new, each loading the
embedded default through its own code and timing `client_update` at K over the saved batches (one warm-up round, then
`--rounds` rounds of len(batches) + 1 steps; a round's figure is its mean step time without the first step). The old
commit's MoEfication cache is built the first time (a few minutes). One JSON document to stdout, progress to stderr:

    python benchmarks/step_against_commit.py e0e5d28 > k8_vs_e0e5d28.json      # about 4 minutes on 2 cores, more the first time

The commit must have `client_update(model, state, batches, top_k, settings, client_id, on_step=, method=)`,
`initial_global_state`, `ClientSettings.from_config` and `load_experiment_model` (true from the engine onwards).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def worker(batches_path: str, top_k: int, rounds: int) -> None:
    """Runs under the version on PYTHONPATH: prints one JSON line of per-round mean step times."""
    import torch
    import transformers

    from ubsmoe.config import ExperimentConfig
    from ubsmoe.fl.client import ClientSettings, client_update
    from ubsmoe.fl.experiment import initial_global_state
    from ubsmoe.models.loading import load_experiment_model

    transformers.logging.set_verbosity_error()
    config = ExperimentConfig()
    torch.manual_seed(config.seed)
    loaded = load_experiment_model(config)
    batches = torch.load(batches_path)
    state = initial_global_state(loaded.model, config)
    settings = ClientSettings.from_config(config, round=0)
    settings = dataclasses.replace(settings, local_steps=len(batches) + 1)
    try:  # the method as the tree under test builds it (ubsmoe.methods since issue 13)
        method = config.method_instance()
    except AttributeError:  # an older commit: its MethodSettings
        from ubsmoe.fl.methods import MethodSettings

        method = MethodSettings.from_config(config)
    means = []
    for r in range(rounds + 1):  # round 0 warms up
        stamps: list[float] = []
        client_update(
            loaded.model, state, list(batches), top_k, settings, "bench",
            on_step=lambda _n, s=stamps: s.append(time.perf_counter()), method=method,
        )  # fmt: skip
        if r:
            means.append(statistics.fmean(b - a for a, b in zip(stamps, stamps[1:], strict=False)))
    print(json.dumps({"round_means_s": means}))


def save_batches(path: Path, count: int) -> list[list[int]]:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from tier_step import pick_batches

    from ubsmoe.config import ExperimentConfig
    from ubsmoe.data.federated import federated_data
    from ubsmoe.data.prompts import pad_token_id
    from ubsmoe.models.loading import load_experiment_model

    config = ExperimentConfig()
    loaded = load_experiment_model(config)
    data = federated_data(config.data, config.num_clients, loaded.tokenizer, config.evaluation.examples_per_task)
    pad = pad_token_id(loaded.tokenizer)
    batches, _ = pick_batches(data.client_encoded, config.federation.batch_size, config.seed, pad, count)
    torch.save(batches, path)
    return [list(b["input_ids"].shape) for b in batches]


def run_worker(src: Path, batches: Path, top_k: int, rounds: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, __file__, "--worker", str(batches), "--k", str(top_k), "--rounds", str(rounds)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"worker for {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["round_means_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", nargs="?", help="the earlier commit to compare against")
    parser.add_argument("--k", type=int, default=8, help="the tier's K (default 8)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per worker process")
    parser.add_argument("--alternations", type=int, default=3, help="old/new worker pairs")
    parser.add_argument("--worker", metavar="BATCHES", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.k, args.rounds)
        return
    if not args.commit:
        parser.error("give the earlier commit to compare against")
    started = time.perf_counter()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory(prefix="ubsmoe-step-") as tmp:
        tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.commit],
                       check=True, capture_output=True)  # fmt: skip
        try:
            old = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
            batches = Path(tmp) / "batches.pt"
            shapes = save_batches(batches, args.batches)
            log(f"batches {shapes}; warming the old commit's caches")
            run_worker(tree / "src", batches, args.k, 0)
            times: dict[str, list[float]] = {"old": [], "new": []}
            for i in range(args.alternations):
                for label, src in (("old", tree / "src"), ("new", REPO / "src")):
                    times[label] += run_worker(src, batches, args.k, args.rounds)
                    log(f"alternation {i + 1}/{args.alternations} {label}: {times[label][-args.rounds :]}")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    median = {label: statistics.median(values) for label, values in times.items()}
    print(json.dumps({
        "benchmark": f"client_update step at K = {args.k}: this tree against an earlier commit, same batches",
        "old_commit": old.stdout.strip(), "new_commit": head.stdout.strip(), "batch_shapes": shapes,
        "median_step_s": median, "speedup_new_over_old": median["old"] / median["new"], "round_means_s": times,
        "torch_threads": __import__("torch").get_num_threads(), "wall_time_s": time.perf_counter() - started,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
