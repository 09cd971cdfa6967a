"""The data of one federated experiment: per-task train/test splits, client partitions, encoded examples.

`federated_data(section, num_clients, tokenizer, eval_examples_per_task)` reads `config.data`:

- source `bigbench`: each task's examples (`from_bigbench`) split train/test by `split_train_test`
  (seed `data.seed`, `data.test_fraction`);
- source `commonsense`: LLM-Adapters task folders under `data.path`; a task's `train.json` is its
  training split where present, else its `test.json` is split like a BIG-bench task.

Training examples are capped per task by `data.max_train_examples_per_task` (a seeded sample, so a
cap keeps the task's label mix) and pooled; the pool is partitioned over the clients (IID, or
Dirichlet(alpha) over each example's task, or over its (task, answer index) pair with
`data.partition_label: task_answer`; seed `data.seed`), and each client's examples are
encoded for training (answer-only loss). Evaluation uses a seeded sample of at most
`eval_examples_per_task` test examples per task, the same for every round and tier, drawn from the
task's held-out examples (`eval_split` "all"), or from one of two disjoint, seeded halves of them
(`split_dev_test`): "dev" for choosing settings, "test" for the final tables only.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ubsmoe.data.bigbench import load_bigbench_task
from ubsmoe.data.commonsense import load_task, split_train_test, task_file
from ubsmoe.data.multiple_choice import MultipleChoice, from_bigbench
from ubsmoe.data.partition import example_labels, label_histograms, partition
from ubsmoe.data.prompts import encode_for_training

if TYPE_CHECKING:
    from ubsmoe.config import DataSection, ExperimentConfig
    from ubsmoe.models.loading import LoadedModel

__all__ = ["EVAL_SPLITS", "DataError", "FederatedData", "experiment_data", "federated_data", "split_dev_test"]


class DataError(ValueError):
    """The experiment's data cannot be assembled; the message names the task and what is wrong."""


@dataclass
class FederatedData:
    tasks: list[str]
    train: dict[str, list[MultipleChoice]]  # per task, after the cap
    test: dict[str, list[MultipleChoice]]  # per task, the evaluation sample
    client_examples: list[list[MultipleChoice]]
    client_encoded: list[list[dict[str, list[int]]]]
    label_histograms: list[dict[str, int]]  # partition label ("task" or "task/answer index") -> count, per client
    task_histograms: list[dict[str, int]]

    def describe(self) -> dict[str, Any]:
        """JSON-able description for summary.json (sizes and histograms, no example text)."""
        return {
            "tasks": self.tasks,
            "train_examples": {t: len(v) for t, v in self.train.items()},
            "eval_examples": {t: len(v) for t, v in self.test.items()},
            "client_sizes": [len(c) for c in self.client_examples],
        }


def _task_examples(
    section: DataSection, task: str, progress: Callable[[str], None] | None = None
) -> tuple[list[MultipleChoice], list[MultipleChoice]]:
    if section.source == "bigbench":
        examples = from_bigbench(load_bigbench_task(task, progress), task)
        if len(examples) < 2:
            raise DataError(
                f"data.tasks: BIG-bench task {task!r} has {len(examples)} multiple-choice example(s) "
                "(with target_scores); choose a multiple-choice task"
            )
        return split_train_test(examples, section.test_fraction, section.seed)
    folder = section.path
    if task_file(folder, task, "train") is not None:
        form = section.prompt_format
        return load_task(folder, task, "train", form), load_task(folder, task, "test", form)
    examples = load_task(folder, task, "test", section.prompt_format)
    if len(examples) < 2:  # one record cannot be both trained on and held out
        raise DataError(
            f"data.tasks: {task_file(folder, task, 'test')} holds {len(examples)} record and there is no "
            f"{task}/train.json, so it would be split into train and test parts; a task without a train file "
            "needs at least 2 records (add records, or a train.json beside it)"
        )
    return split_train_test(examples, section.test_fraction, section.seed)


EVAL_SPLITS = ("all", "dev", "test")


def split_dev_test(
    examples: Sequence[MultipleChoice], dev_fraction: float, seed: int, task: str
) -> tuple[list[MultipleChoice], list[MultipleChoice]]:
    """(dev, test): a seeded split of a task's held-out examples, round(n * dev_fraction) of them dev (at
    least one in each part when n >= 2), both in their original order; the same for every run with this
    `data.seed`, whatever the method, so settings chosen on dev never see a test example."""
    order = list(range(len(examples)))
    random.Random(f"ubsmoe-dev-test:{seed}:{task}").shuffle(order)
    count = round(len(examples) * dev_fraction)
    if len(examples) >= 2:
        count = min(max(count, 1), len(examples) - 1)
    dev, test = sorted(order[:count]), sorted(order[count:])
    return [examples[i] for i in dev], [examples[i] for i in test]


def _sample(items: Sequence[Any], count: int | None, seed: str) -> list[Any]:
    if count is None or count >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), count))
    return [items[i] for i in chosen]


def federated_data(
    section: DataSection,
    num_clients: int,
    tokenizer: Any,
    eval_examples_per_task: int | None,
    progress: Callable[[str], None] | None = None,
    eval_split: str = "all",
    dev_fraction: float = 0.5,
) -> FederatedData:
    """Load, split, cap, partition and encode the experiment's data (see the module docstring)."""
    if eval_split not in EVAL_SPLITS:
        raise DataError(f"evaluation.split = {eval_split!r}: must be one of {', '.join(EVAL_SPLITS)}")
    train: dict[str, list[MultipleChoice]] = {}
    test: dict[str, list[MultipleChoice]] = {}
    for task in section.tasks:
        if progress:
            progress(f"data: {task}")
        task_train, task_test = _task_examples(section, task, progress)
        train[task] = _sample(task_train, section.max_train_examples_per_task, f"ubsmoe-train:{section.seed}:{task}")
        if eval_split != "all":
            dev, held_out = split_dev_test(task_test, dev_fraction, section.seed, task)
            if not dev or not held_out:
                raise DataError(
                    f"evaluation.split = {eval_split!r}: task {task!r} has {len(task_test)} held-out example(s), too "
                    "few to split into dev and test halves; use evaluation.split=all or a task with more examples"
                )
            task_test = dev if eval_split == "dev" else held_out
        test[task] = _sample(task_test, eval_examples_per_task, f"ubsmoe-eval:{section.seed}:{task}")
        if not train[task] or not test[task]:
            raise DataError(f"data.tasks: task {task!r} has no training or no test examples after the split")
    pool = [example for task in section.tasks for example in train[task]]
    if section.partition_label == "task":
        labels = example_labels(pool, key=lambda example: (example.task, None))
    else:
        labels = example_labels(pool)
    if len(pool) < num_clients:
        raise DataError(
            f"moe.tiers: {num_clients} clients but only {len(pool)} training examples; use fewer clients or more data"
        )
    parts = partition(labels, num_clients, section.partition, section.dirichlet_alpha, section.seed)
    client_examples = [[pool[i] for i in part] for part in parts]
    client_encoded = [[encode_for_training(tokenizer, e, section.max_length) for e in part] for part in client_examples]
    histograms = [
        {task if answer is None else f"{task}/{answer}": n for (task, answer), n in h.items()}
        for h in label_histograms(labels, parts)
    ]
    task_histograms = [dict(Counter(e.task for e in part)) for part in client_examples]
    return FederatedData(
        tasks=list(section.tasks),
        train=train,
        test=test,
        client_examples=client_examples,
        client_encoded=client_encoded,
        label_histograms=histograms,
        task_histograms=task_histograms,
    )


def experiment_data(
    config: ExperimentConfig, loaded: LoadedModel, progress: Callable[[str], None] | None = None
) -> FederatedData:
    """The data of an experiment for its loaded model (`federated_data` with the config's data and
    evaluation settings), checked against the model (`ExperimentConfig.check_against_model`): what
    `ubsmoe run`, the Flower ServerApp and every ClientApp load."""
    evaluation = config.evaluation
    data = federated_data(
        config.data,
        config.num_clients,
        loaded.tokenizer,
        evaluation.examples_per_task,
        progress=progress,
        eval_split=evaluation.split,
        dev_fraction=evaluation.dev_fraction,
    )
    config.check_against_model(loaded.k_max, loaded.num_experts, sum(len(c) for c in data.client_encoded))
    return data
