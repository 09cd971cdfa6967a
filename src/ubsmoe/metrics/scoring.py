"""Multiple-choice log-likelihood scoring that runs each prompt once and reuses its KV cache for every choice.

`choice_logprobs(model, prompts, choices, pad_id)` gives, for every example i and choice j, the summed
log-probability log p(choices[i][j] | prompts[i]) of the choice's tokens after the prompt: the same
numbers as scoring each full sequence prompt + choice on its own, at a fraction of the cost when
prompts are long and there are several choices.

Examples are sorted by prompt length so that similar lengths share a batch. A batch's prompts are
left-padded to a common width P (attention mask 0 on pads, position ids the cumulative sum of the
mask minus one) and run once with `use_cache=True`; the last position's distribution scores every
choice's first token. Then, for each choice index j, the j-th choices of the batch are right-padded
into one block and run on top of the prompt cache (positions continue from each prompt's own length),
which is cropped back to P afterwards. Only a choice's tokens 0..n-2 need to be fed (their logits
score tokens 1..n-1), so a choice index whose choices all have at most one token costs no forward
pass. Rows without a j-th choice (or with an empty one) run masked dummy tokens and are ignored.

This is a plain forward loop (no `model.generate`), so models whose MoE layers are custom per-token
blocks work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ubsmoe.data.prompts import left_pad
from ubsmoe.metrics.kv_cache import cache_keyword, forward_takes, returned_cache
from ubsmoe.moe.model import model_device


def _crop_cache(cache: Any, length: int) -> None:
    """Drop every cached position after the first `length`, in place."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        # A negative argument means "remove this many tokens" both in transformers 5.x (where a positive one is
        # rejected) and in 4.x (where a positive one is the length to keep).
        cache.crop(-extra)


@torch.no_grad()
def _score_batch(
    model: Any,
    prompts: Sequence[list[int]],
    choices: Sequence[Sequence[list[int]]],
    pad_id: int,
    device: torch.device,
    logits_to_keep: bool,
    cache_name: str,
) -> list[list[float]]:
    """Summed log-probabilities of every choice of one batch of examples (prompts non-empty)."""
    rows = len(prompts)
    input_ids, prompt_mask, position_ids = left_pad(prompts, pad_id, device)
    width = input_ids.shape[1]
    extra = {"logits_to_keep": 1} if logits_to_keep else {}
    output = model(
        input_ids=input_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids,
        use_cache=True,
        **extra,
    )
    first = F.log_softmax(output.logits[:, -1].float(), dim=-1)  # predicts each choice's first token
    cache = returned_cache(output)
    prompt_lengths = prompt_mask.sum(-1, keepdim=True)  # (rows, 1): the first choice token's position

    scores = [[0.0] * len(example) for example in choices]
    for j in range(max(len(example) for example in choices)):
        tokens = [example[j] if j < len(example) else [] for example in choices]
        firsts = [(row, ids[0]) for row, ids in enumerate(tokens) if ids]
        if not firsts:
            continue
        index_rows = torch.tensor([row for row, _ in firsts], device=device)
        index_tokens = torch.tensor([token for _, token in firsts], device=device)
        totals = first[index_rows, index_tokens].double().cpu()
        block = max(len(ids) for ids in tokens) - 1  # feed tokens 0..n-2; their logits score tokens 1..n-1
        if block > 0:
            choice_ids = torch.full((rows, block), pad_id, dtype=torch.long)
            choice_mask = torch.zeros((rows, block), dtype=torch.long)
            targets = torch.zeros((rows, block), dtype=torch.long)
            target_mask = torch.zeros((rows, block), dtype=torch.bool)
            for row, ids in enumerate(tokens):
                fed = len(ids) - 1
                if fed > 0:
                    choice_ids[row, :fed] = torch.as_tensor(ids[:-1], dtype=torch.long)
                    choice_mask[row, :fed] = 1
                    targets[row, :fed] = torch.as_tensor(ids[1:], dtype=torch.long)
                    target_mask[row, :fed] = True
            choice_ids, choice_mask = choice_ids.to(device), choice_mask.to(device)
            targets, target_mask = targets.to(device), target_mask.to(device)
            output = model(
                input_ids=choice_ids,
                attention_mask=torch.cat([prompt_mask, choice_mask], dim=-1),
                position_ids=prompt_lengths + torch.arange(block, device=device),
                use_cache=True,
                **{cache_name: cache},
            )
            cache = returned_cache(output)
            _crop_cache(cache, width)
            logprobs = F.log_softmax(output.logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            rest = (logprobs * target_mask).sum(-1).double().cpu()
            totals = totals + rest[index_rows.cpu()]
        for (row, _), total in zip(firsts, totals.tolist(), strict=True):
            scores[row][j] = float(total)
    return scores


@torch.no_grad()
def choice_logprobs(
    model: Any,
    prompts: Sequence[list[int]],
    choices: Sequence[Sequence[list[int]]],
    pad_id: int,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Summed log-probability of each choice's tokens after its prompt: result[i][j] = log p(choices[i][j] | prompts[i]).

    Each prompt is run once; its KV cache is then reused for every choice of that example. An
    empty choice scores 0.0; an empty prompt raises ValueError (the first choice token needs a
    context). `on_batch` receives the number of (example, choice) pairs of each batch, once per
    batch. The model is put in eval mode and its training flag restored afterwards.
    """
    if len(prompts) != len(choices):
        raise ValueError(f"got {len(prompts)} prompts but {len(choices)} lists of choices")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty: a prompt must have at least one token to score choices after")
    device = model_device(model)
    logits_to_keep = forward_takes(model, "logits_to_keep")
    cache_name = cache_keyword(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: list[list[float]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            batch_choices = [[list(ids) for ids in choices[i]] for i in batch]
            if any(batch_choices):
                batch_prompts = [list(prompts[i]) for i in batch]
                scores = _score_batch(model, batch_prompts, batch_choices, pad_id, device, logits_to_keep, cache_name)
            else:
                scores = [[] for _ in batch]
            for i, row_scores in zip(batch, scores, strict=True):
                results[i] = row_scores
            if on_batch:
                on_batch(sum(len(example) for example in batch_choices))
    finally:
        model.train(was_training)
    return results
