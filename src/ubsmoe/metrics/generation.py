"""The `generate` evaluation protocol (LLM-Adapters style): greedy generation, then the first option found.

Each prompt is encoded without special tokens (its last `max_prompt_tokens` tokens are kept), a
batch is left-padded, and a continuation is decoded greedily with the model's KV cache: a plain
forward loop (`model(input_ids, attention_mask, position_ids, cache, use_cache=True)`, see `kv_cache`),
not `model.generate`, so models whose MoE layers are custom blocks work unchanged. Positions come
from the attention mask, so left padding does not shift them. A row stops at the tokenizer's EOS or
after `max_new_tokens`. The generated tokens alone are decoded, and the prediction is the choice
whose text occurs first in them (`first_choice_match`), or, for examples in LLM-Adapters' instruction form,
the choice whose label (answer1, solution2, true ...) occurs first, which is that project's answer extraction;
a generation that names no choice is wrong and counted as unmatched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ubsmoe.data.multiple_choice import MultipleChoice
from ubsmoe.data.prompts import encode_text, left_pad, pad_token_id
from ubsmoe.metrics.evaluation import accuracy_summary
from ubsmoe.metrics.kv_cache import cache_keyword, forward_takes, returned_cache
from ubsmoe.moe.model import model_device


def _choice_regex(choices: Sequence[str]) -> re.Pattern[str] | None:
    """One alternation of the choices, longest first, each a named group `c<index>`; None when all are blank."""
    alternatives: list[tuple[int, int, str]] = []  # (-normalised length, index, pattern)
    seen: set[str] = set()
    for index, choice in enumerate(choices):
        words = choice.split()
        key = " ".join(words).lower()
        if not words or key in seen:  # blank choices never match; duplicates resolve to the first index
            continue
        seen.add(key)
        body = r"\s+".join(re.escape(word) for word in words)
        alternatives.append((-len(key), index, rf"(?P<c{index}>(?<!\w){body}(?!\w))"))
    if not alternatives:
        return None
    alternatives.sort()
    return re.compile("|".join(pattern for _, _, pattern in alternatives), re.IGNORECASE)


def first_choice_match(text: str, choices: Sequence[str]) -> int | None:
    """Index of the choice that occurs first in text (case-insensitive, whole words/phrases, whitespace-normalised).

    The longest choice wins at equal positions (so 'not plausible' beats 'plausible'); None when no
    choice occurs. A choice matches only where it is not glued to word characters on either side,
    so "no" does not match inside "not" or "know".
    """
    pattern = _choice_regex(choices)
    if pattern is None:
        return None
    match = pattern.search(text)
    if match is None or match.lastgroup is None:
        return None
    return int(match.lastgroup[1:])


@torch.no_grad()
def greedy_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    max_new_tokens: int,
    eos_id: int | None = None,
) -> list[list[int]]:
    """Greedy continuations (token ids, EOS excluded) of a batch of prompts, decoded with the KV cache.

    The prompts are left-padded with `pad_id` (attention mask 0 there); position ids are the
    cumulative sum of the mask minus one, so every row's first real token sits at position 0. A row
    stops after emitting `eos_id` (when not None) or `max_new_tokens` tokens.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot generate from an empty prompt")
    device = model_device(model)
    input_ids, attention_mask, position_ids = left_pad(prompts, pad_id, device)

    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    past = None
    cache_name = cache_keyword(model)
    # only the last position's logits are read: the prefill skips the LM head everywhere else
    last_only = {"logits_to_keep": 1} if forward_takes(model, "logits_to_keep") else {}
    for step in range(max_new_tokens):
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_name: past},
            **last_only,
        )
        past = returned_cache(output)
        next_tokens = output.logits[:, -1].argmax(dim=-1)
        for row, token in enumerate(next_tokens.tolist()):
            if done[row]:
                continue
            if eos_id is not None and token == eos_id:
                done[row] = True
            else:
                generated[row].append(token)
        if all(done) or step + 1 == max_new_tokens:
            break
        finished = torch.tensor(done, dtype=torch.bool, device=device)
        next_tokens = next_tokens.masked_fill(finished, pad_id)  # finished rows keep running; their tokens are ignored
        input_ids = next_tokens.unsqueeze(-1)
        position_ids = position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=-1)
    return generated


def generate_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_prompt_tokens: int = 384,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuation text of each prompt (generated tokens only, special tokens skipped), in input order."""
    if batch_size < 1 or max_prompt_tokens < 1:
        raise ValueError(f"batch_size and max_prompt_tokens must be positive, got {batch_size}, {max_prompt_tokens}")
    pad_id = pad_token_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_id = int(eos) if eos is not None else None
    encoded = [encode_text(tokenizer, prompt)[-max_prompt_tokens:] for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    texts: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            outputs = greedy_generate(model, [encoded[i] for i in batch], pad_id, max_new_tokens, eos_id)
            for i, ids in zip(batch, outputs, strict=True):
                texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
            if on_batch:
                on_batch(len(batch))
    finally:
        model.train(was_training)
    return texts


def generate_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[MultipleChoice],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_prompt_tokens: int = 384,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Accuracy of the `generate` protocol, with its 95% intervals (`accuracy_summary`).

    Returns {"protocol": "generate", "accuracy", "ci95", "wilson95", "n", "chance", "unmatched",
    "examples"}; `unmatched` is the share of generations that named no choice (counted as wrong),
    `chance` the mean of 1/len(choices), `examples` each generation with its parsed choice (None when
    it names none) and whether that is the answer.
    """
    texts = generate_continuations(
        model,
        tokenizer,
        [example.prompt for example in examples],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        on_batch=on_batch,
    )
    predictions = [
        first_choice_match(text, example.generation_targets) for text, example in zip(texts, examples, strict=True)
    ]
    n = len(examples)
    correct = [p == e.answer for p, e in zip(predictions, examples, strict=True)]
    unmatched = sum(p is None for p in predictions) / n if n else float("nan")
    return {
        "protocol": "generate",
        **accuracy_summary(correct, examples),
        "unmatched": unmatched,
        "examples": [
            {"prediction": p, "correct": c, "generation": text}
            for p, c, text in zip(predictions, correct, texts, strict=True)
        ],
    }
