"""Quality measures of a causal LM: log-likelihood multiple-choice accuracy and perplexity.

The `loglik` protocol scores each choice by the summed log-probability of its tokens after the
prompt, and picks the highest; `generate` (in `ubsmoe.metrics.generation`) generates greedily and
takes the first choice found in the text. `evaluate_tasks` runs either over several tasks. Prompt and choice are tokenized separately and concatenated, so the
scored tokens are exactly the choice's, whatever the tokenizer does at the boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ubsmoe.data.multiple_choice import MultipleChoice
from ubsmoe.data.prompts import choice_text, collate, encode_text, pad_token_id
from ubsmoe.metrics.scoring import choice_logprobs
from ubsmoe.moe.model import model_device

PROTOCOLS = ("loglik", "generate")
Z95 = 1.959964  # two-sided 95% quantile of the standard normal


@torch.no_grad()
def sequence_logprobs(model: Any, sequences: Sequence[list[int]], pad_id: int) -> list[torch.Tensor]:
    """Per-token log-probabilities of tokens 1..n-1 of each sequence under the model (right-padded batch)."""
    batch = collate([{"input_ids": seq, "labels": seq} for seq in sequences], pad_id)
    device = model_device(model)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logprobs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return [logprobs[row, : len(seq) - 1].cpu() for row, seq in enumerate(sequences)]


def _score_rows(
    model: Any,
    tokenizer: Any,
    examples: Sequence[MultipleChoice],
    batch_size: int,
    max_prompt_tokens: int,
    on_batch: Callable[[int], None] | None,
    gold_only: bool = False,
) -> tuple[list[list[float]], list[list[int]]]:
    """Summed log-probability and token count of each choice of each example (-inf / 0 where not scored).

    Each prompt runs once and its KV cache serves all of its choices (`ubsmoe.metrics.scoring`).
    """
    prompts = [encode_text(tokenizer, example.prompt)[-max_prompt_tokens:] for example in examples]
    choice_ids = [[encode_text(tokenizer, choice_text(choice)) for choice in example.choices] for example in examples]
    wanted = [[ids[e.answer]] for ids, e in zip(choice_ids, examples, strict=True)] if gold_only else choice_ids
    logprobs = choice_logprobs(model, prompts, wanted, pad_token_id(tokenizer), batch_size, on_batch)
    scores = [[-math.inf] * len(e.choices) for e in examples]
    counts = [[0] * len(e.choices) for e in examples]
    for e_index, example in enumerate(examples):
        indices = [example.answer] if gold_only else range(len(example.choices))
        for position, c_index in enumerate(indices):
            scores[e_index][c_index] = logprobs[e_index][position]
            counts[e_index][c_index] = len(choice_ids[e_index][c_index])
    return scores, counts


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (NaNs for n = 0).

    Unlike the normal approximation p +- z sqrt(p (1 - p) / n), it is not zero-width at 0% or 100%
    and stays inside [0, 1].
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def accuracy_summary(correct: Sequence[bool], examples: Sequence[MultipleChoice]) -> dict[str, Any]:
    """Accuracy, its 95% normal-approximation half-width `ci95`, its Wilson interval `wilson95` [low,
    high], n and the chance level (the mean of 1 / number of choices)."""
    n = len(correct)
    accuracy = sum(correct) / n if n else float("nan")
    half_width = Z95 * math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")
    chance = sum(1 / len(e.choices) for e in examples) / n if n else float("nan")
    return {
        "accuracy": accuracy,
        "ci95": half_width,
        "wilson95": list(wilson_interval(sum(correct), n)),
        "n": n,
        "chance": chance,
    }


def loglik_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[MultipleChoice],
    batch_size: int = 16,
    max_prompt_tokens: int = 384,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Accuracy of the `loglik` protocol, with a 95% normal-approximation interval.

    Also returns the gold answers' summed negative log-likelihood and token count (`answer_nll`,
    `answer_tokens`), from the same forward passes: exp(answer_nll / answer_tokens) is the
    perplexity of the correct answers, a more sensitive quality measure than accuracy.
    """
    scores, counts = _score_rows(model, tokenizer, examples, batch_size, max_prompt_tokens, on_batch)
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = [p == e.answer for p, e in zip(predictions, examples, strict=True)]
    gold = [(-s[e.answer], c[e.answer]) for s, c, e in zip(scores, counts, examples, strict=True)]
    return {
        "protocol": "loglik",
        **accuracy_summary(correct, examples),
        "answer_nll": sum(nll for nll, _ in gold),
        "answer_tokens": sum(tokens for _, tokens in gold),
        "examples": [
            {"prediction": p, "correct": c, "gold_nll": nll, "gold_tokens": tokens}
            for p, c, (nll, tokens) in zip(predictions, correct, gold, strict=True)
        ],
    }


def answer_nlls(
    model: Any, tokenizer: Any, examples: Sequence[MultipleChoice], batch_size: int = 16, max_prompt_tokens: int = 384
) -> list[tuple[float, int]]:
    """(negative log-likelihood, token count) of each example's gold answer."""
    scores, counts = _score_rows(model, tokenizer, examples, batch_size, max_prompt_tokens, None, gold_only=True)
    return [(-s[e.answer], c[e.answer]) for s, c, e in zip(scores, counts, examples, strict=True)]


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Mapping[str, Sequence[MultipleChoice]],
    protocol: str = "loglik",
    batch_size: int = 16,
    max_new_tokens: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Accuracy per task and their mean (each task weighs the same), with 95% intervals, and the answer perplexity.

    The interval of the mean combines the tasks' binomial variances: 1.96 * sqrt(sum_t p_t (1 - p_t) / n_t) / T.
    `answer_perplexity` is exp(mean NLL per gold-answer token) over all tasks' examples (under
    `generate` it costs one extra scoring pass of the gold answers). `examples` holds one record per
    example (task, index, prediction or None, correct, gold_nll, gold_tokens; under `generate` also the
    generated text), in task order: what paired comparisons and audits need. Under `generate`, `unmatched`
    is the share of all generations that named no option (counted wrong; also per task).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; expected one of {PROTOCOLS}")
    per_task: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    nll, tokens = 0.0, 0
    for task, examples in tasks.items():
        if protocol == "loglik":
            result = loglik_accuracy(model, tokenizer, examples, batch_size, on_batch=on_batch)
            task_nll, task_tokens = result.pop("answer_nll"), result.pop("answer_tokens")
        else:
            from ubsmoe.metrics.generation import generate_accuracy

            result = generate_accuracy(model, tokenizer, examples, batch_size, max_new_tokens, on_batch=on_batch)
            gold = answer_nlls(model, tokenizer, examples, batch_size)
            for record, (example_nll, example_tokens) in zip(result["examples"], gold, strict=True):
                record.update(gold_nll=example_nll, gold_tokens=example_tokens)
            task_nll, task_tokens = sum(n for n, _ in gold), sum(t for _, t in gold)
        result.pop("protocol", None)
        records += [{"task": task, "index": i, **r} for i, r in enumerate(result.pop("examples"))]
        per_task[task] = result
        nll, tokens = nll + task_nll, tokens + task_tokens
    accuracies = [r["accuracy"] for r in per_task.values()]
    count = len(accuracies)
    variance = sum(r["accuracy"] * (1 - r["accuracy"]) / r["n"] for r in per_task.values() if r["n"])
    unmatched = {}
    if protocol == "generate" and records:  # the share of all generations that named no option
        unmatched = {"unmatched": sum(r["prediction"] is None for r in records) / len(records)}
    return {
        "protocol": protocol,
        "accuracy": sum(accuracies) / count if count else float("nan"),
        "ci95": Z95 * math.sqrt(variance) / count if count else float("nan"),
        "chance": sum(r["chance"] for r in per_task.values()) / count if count else float("nan"),
        "answer_perplexity": math.exp(nll / tokens) if tokens else float("nan"),
        "per_task": per_task,
        **unmatched,
        "examples": records,
    }


@torch.no_grad()
def perplexity(model: Any, token_blocks: Sequence[list[int]], batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over fixed blocks of token ids."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(token_blocks), batch_size):
            for lp in sequence_logprobs(model, token_blocks[start : start + batch_size], 0):
                total -= lp.sum().item()
                count += lp.numel()
    finally:
        model.train(was_training)
    return math.exp(total / max(count, 1))
