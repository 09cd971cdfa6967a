"""Quality measures of a causal LM: log-likelihood multiple-choice accuracy and perplexity.

The `loglik` protocol scores each choice by the summed log-probability of its tokens after the
prompt, and picks the highest. Prompt and choice are tokenized separately and concatenated, so the
scored tokens are exactly the choice's, whatever the tokenizer does at the boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ubsmoe.data.multiple_choice import MultipleChoice
from ubsmoe.data.prompts import choice_text, collate, encode_text, pad_token_id


@torch.no_grad()
def sequence_logprobs(model: Any, sequences: Sequence[list[int]], pad_id: int) -> list[torch.Tensor]:
    """Per-token log-probabilities of tokens 1..n-1 of each sequence under the model (right-padded batch)."""
    batch = collate([{"input_ids": seq, "labels": seq} for seq in sequences], pad_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logprobs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return [logprobs[row, : len(seq) - 1] for row, seq in enumerate(sequences)]


def loglik_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[MultipleChoice],
    batch_size: int = 16,
    max_prompt_tokens: int = 384,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Accuracy of the `loglik` protocol, with a 95% normal-approximation interval."""
    pad_id = pad_token_id(tokenizer)
    rows: list[tuple[int, int, list[int]]] = []  # (example, choice, ids) with the choice length below
    lengths: list[int] = []
    for e_index, example in enumerate(examples):
        prompt = encode_text(tokenizer, example.prompt)[-max_prompt_tokens:]
        for c_index, choice in enumerate(example.choices):
            choice_ids = encode_text(tokenizer, choice_text(choice))
            rows.append((e_index, c_index, prompt + choice_ids))
            lengths.append(len(choice_ids))
    scores = [[-math.inf] * len(e.choices) for e in examples]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][2]))  # similar lengths share a batch
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        logprobs = sequence_logprobs(model, [rows[i][2] for i in batch], pad_id)
        for i, lp in zip(batch, logprobs, strict=True):
            e_index, c_index, _ = rows[i]
            scores[e_index][c_index] = lp[-lengths[i] :].sum().item()
        if on_batch:
            on_batch(len(batch))
    model.train(was_training)
    correct = [max(range(len(s)), key=s.__getitem__) == e.answer for s, e in zip(scores, examples, strict=True)]
    n = len(correct)
    accuracy = sum(correct) / n if n else float("nan")
    half_width = 1.96 * math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")
    chance = sum(1 / len(e.choices) for e in examples) / n if n else float("nan")
    return {"protocol": "loglik", "accuracy": accuracy, "ci95": half_width, "n": n, "chance": chance}


@torch.no_grad()
def perplexity(model: Any, token_blocks: Sequence[list[int]], batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over fixed blocks of token ids."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(token_blocks), batch_size):
        for lp in sequence_logprobs(model, token_blocks[start : start + batch_size], 0):
            total -= lp.sum().item()
            count += lp.numel()
    model.train(was_training)
    return math.exp(total / max(count, 1))
