"""What one evaluation costs on the embedded default: seconds per example at every tier's K, per protocol.

Issue 15 asks for at least 400 evaluation examples per tier and an evaluation that stays affordable; this
measures the price. The model is the embedded default (SmolLM2-135M-Instruct MoEfied into 8 experts, the
default `ExperimentConfig()`), the examples the default BIG-bench tasks' held-out ones
(`--examples-per-task` each), evaluated exactly as a run evaluates a tier (`evaluate_tasks`, the KV-cached
loglik scoring: one prompt pass, then each choice against its cache) at K = 2 / 4 / 6 / 8, and the
`generate` protocol (greedy, `--max-new-tokens`, plus the gold-answer scoring pass) on the first
`--generate-examples` examples of each task. The ranks of the K rows are interleaved over `--repeats`
repeats (the first is a warm-up) and the median is reported.

One JSON document goes to stdout, progress to stderr:

    python benchmarks/eval_cost.py > eval_cost.json         # 50 examples per task (400), 3 repeats
    python benchmarks/eval_cost.py --quick > quick.json     # 10 per task, 2 repeats: about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ubsmoe.data.multiple_choice import MultipleChoice
from ubsmoe.metrics.evaluation import evaluate_tasks
from ubsmoe.moe import set_top_k

FULL = {"examples_per_task": 50, "generate_examples": 4, "repeats": 3, "max_new_tokens": 32}
QUICK = {"examples_per_task": 10, "generate_examples": 2, "repeats": 2, "max_new_tokens": 16}


def time_evaluation(
    model: Any,
    tokenizer: Any,
    tasks: Mapping[str, Sequence[MultipleChoice]],
    k: int,
    protocol: str,
    batch_size: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """One evaluation of `tasks` at K = `k`: its wall time, the examples and choices it scored, per example."""
    set_top_k(model, k)
    examples = sum(len(v) for v in tasks.values())
    choices = sum(len(e.choices) for v in tasks.values() for e in v)
    started = time.perf_counter()
    result = evaluate_tasks(model, tokenizer, tasks, protocol, batch_size, max_new_tokens)
    seconds = time.perf_counter() - started
    return {
        "k": k,
        "protocol": protocol,
        "seconds": seconds,
        "examples": examples,
        "choices": choices,
        "seconds_per_example": seconds / examples,
        "accuracy": result["accuracy"],
    }


def measure(
    model: Any,
    tokenizer: Any,
    tasks: Mapping[str, Sequence[MultipleChoice]],
    ks: Sequence[int],
    protocol: str,
    repeats: int,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    log: Callable[[str], None] = lambda text: None,
) -> list[dict[str, Any]]:
    """Per K, the median over repeats (after one warm-up) of `time_evaluation`, the K order rotating."""
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in ks}
    for repeat in range(repeats + 1):
        order = list(ks[repeat % len(ks) :]) + list(ks[: repeat % len(ks)])
        for k in order:
            row = time_evaluation(model, tokenizer, tasks, k, protocol, batch_size, max_new_tokens)
            log(f"{protocol} K={k} repeat {repeat}: {row['seconds']:.1f} s")
            if repeat:  # repeat 0 warms up
                runs[k].append(row)
    rows = []
    for k in ks:
        times = [r["seconds"] for r in runs[k]]
        first = (
            runs[k][0] if runs[k] else time_evaluation(model, tokenizer, tasks, k, protocol, batch_size, max_new_tokens)
        )
        median = statistics.median(times) if times else first["seconds"]
        rows.append({**first, "seconds": median, "seconds_per_example": median / first["examples"], "repeats": times})
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Defaults: " + json.dumps(FULL))
    parser.add_argument("--quick", action="store_true", help="fewer examples and repeats: " + json.dumps(QUICK))
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    args = parser.parse_args(argv)
    chosen = QUICK if args.quick else FULL
    for key, value in chosen.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from tier_step import environment  # the machine and versions, as the step benchmark records them

    from ubsmoe.config import ExperimentConfig
    from ubsmoe.data.federated import federated_data
    from ubsmoe.models.loading import load_experiment_model

    args = parse_args(argv)
    load_start = os.getloadavg()

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    config = ExperimentConfig()
    loaded = load_experiment_model(config)
    data = federated_data(config.data, config.num_clients, loaded.tokenizer, args.examples_per_task)
    ks = sorted(set(config.client_top_ks(loaded.k_max)))
    model = loaded.model.eval()
    with torch.no_grad():
        loglik = measure(model, loaded.tokenizer, data.test, ks, "loglik", args.repeats, log=log)
        few = {task: examples[: args.generate_examples] for task, examples in data.test.items()}
        generate = measure(
            model, loaded.tokenizer, few, ks, "generate", args.repeats, max_new_tokens=args.max_new_tokens, log=log
        )
    report = {
        "benchmark": "eval_cost: seconds per evaluation example at every tier's K on the embedded default",
        "settings": {k: getattr(args, k) for k in FULL} | {"batch_size": config.evaluation.batch_size},
        "tasks": {task: len(examples) for task, examples in data.test.items()},
        "loglik": loglik,
        "generate": generate,
        "environment": environment(load_start),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
