"""Which BIG-bench tasks does the embedded default model learn? Dense before/after LoRA fine-tuning per task.

For each candidate multiple-choice task: a seeded train/test split (`ubsmoe.data.split_train_test`),
`loglik` accuracy of the default model (MoEfied SmolLM2 at K = M, which is exactly the dense model)
on the test examples, then `--steps` steps of the project's own local training (`client_update`:
expert LoRA, AdamW, constant LR) on that task's training examples alone, then accuracy again. A
task qualifies for the default mix when its fine-tuned accuracy clears both chance and the
majority-answer baseline by more than the 95% interval. One JSON document goes to stdout:

    python benchmarks/task_selection.py > benchmarks/results/task_selection_cpu.json
"""

import argparse
import collections
import dataclasses
import json
import platform
import sys
import time

import torch

from ubsmoe.config import ExperimentConfig
from ubsmoe.data import from_bigbench, load_bigbench_task, split_train_test
from ubsmoe.data.prompts import collate, encode_for_training, pad_token_id
from ubsmoe.fl.client import ClientSettings, client_update
from ubsmoe.fl.payload import global_state_from_model, load_global_state
from ubsmoe.metrics.evaluation import loglik_accuracy
from ubsmoe.models.loading import load_experiment_model
from ubsmoe.moe import set_top_k

CANDIDATES = (
    "social_iqa",
    "strategyqa",
    "winowhy",
    "sports_understanding",
    "epistemic_reasoning",
    "navigate",
    "hyperbaton",
    "logical_fallacy_detection",
    "date_understanding",
    "ruin_names",
    "movie_recommendation",
    "analogical_similarity",
    "logical_deduction/three_objects",
    "tracking_shuffled_objects/three_objects",
    "vitaminc_fact_verification",
    "timedial",
)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--tasks", default=",".join(CANDIDATES))
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--lr", type=float, default=3e-4)
parser.add_argument("--train-examples", type=int, default=800)
parser.add_argument("--test-examples", type=int, default=150)
parser.add_argument("--max-length", type=int, default=256)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.set_num_threads(args.threads)
t_start = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - t_start:7.1f}s]", *a, file=sys.stderr, flush=True)


config = ExperimentConfig()
loaded = load_experiment_model(config, progress=log)
model, tokenizer = loaded.model, loaded.tokenizer
set_top_k(model, loaded.k_max)
initial = global_state_from_model(model)
pad = pad_token_id(tokenizer)
settings = ClientSettings(lr=args.lr, min_lr=args.lr, local_steps=args.steps, total_rounds=1, schedule="constant")


def majority(train, test):
    """Accuracy of always answering the most frequent training answer text (where it is among the choices)."""
    top = collections.Counter(e.choices[e.answer] for e in train).most_common(1)[0][0]
    return sum(e.choices[e.answer] == top for e in test) / len(test)


rows = []
for name in args.tasks.split(","):
    train, test = split_train_test(from_bigbench(load_bigbench_task(name), name), 0.2, args.seed)
    train, test = train[: args.train_examples], test[: args.test_examples]
    load_global_state(model, initial)
    before = loglik_accuracy(model, tokenizer, test)
    encoded = [encode_for_training(tokenizer, e, args.max_length) for e in train]
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(encoded), generator=generator).tolist()
    batches = [
        collate([encoded[i] for i in order[s : s + args.batch_size]], pad)
        for s in range(0, len(order), args.batch_size)
    ]
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    update = client_update(model, initial, batches, loaded.k_max, settings, name)
    train_s = time.perf_counter() - start
    trained = {k: initial.adapters[k] + d for k, d in update.adapter_deltas.items()}
    load_global_state(model, dataclasses.replace(initial, adapters=trained))
    after = loglik_accuracy(model, tokenizer, test)
    base = majority(train, test)
    margin = after["accuracy"] - max(after["chance"], base)
    row = {
        "task": name,
        "train_examples": len(train),
        "test_examples": len(test),
        "choices_mean": sum(len(e.choices) for e in test) / len(test),
        "chance": after["chance"],
        "majority_baseline": base,
        "before": before["accuracy"],
        "after": after["accuracy"],
        "ci95": after["ci95"],
        "lift": after["accuracy"] - before["accuracy"],
        "margin_over_baselines": margin,
        "qualifies": margin > after["ci95"],
        "first_loss": update.metrics["first_loss"],
        "last_loss": update.metrics["last_loss"],
        "train_s": train_s,
    }
    rows.append(row)
    log(json.dumps(row))

result = {
    "benchmark": "dense fine-tuning lift per BIG-bench task (embedded default at K = M)",
    "protocol": "loglik (option texts)",
    "training": {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": "adamw",
        "lora": config.lora.model_dump(),
        "max_length": args.max_length,
    },
    "split": {"test_fraction": 0.2, "seed": args.seed},
    "tasks": rows,
    "qualifying": [r["task"] for r in rows if r["qualifies"]],
    "environment": {"torch": torch.__version__, "threads": args.threads, "platform": platform.platform()},
    "wall_time_s": time.perf_counter() - t_start,
}
print(json.dumps(result, indent=2))
