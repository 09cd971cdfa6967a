"""Training sequences from multiple-choice examples, with an answer-only loss mask, and their collation.

Template (the same the `loglik` evaluation scores, so training and evaluation agree)::

    prompt  = example.prompt                      # already ends with "\\nAnswer:" (or "A:")
    answer  = " " + example.choices[example.answer].strip()  + EOS

Prompt and answer are tokenized separately (`tokenizer(text, add_special_tokens=False)`) and
concatenated, so the supervised tokens are exactly the answer's whatever the tokenizer does at the
boundary. `labels` copy `input_ids` on the answer tokens (EOS included) and are -100 elsewhere. A
sequence longer than `max_length` loses prompt tokens from the left; the answer is never cut.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ubsmoe.data.multiple_choice import MultipleChoice

IGNORE_INDEX = -100


def prompt_text(example: MultipleChoice) -> str:
    """The prompt the model sees: the example's own prompt text."""
    return example.prompt


def choice_text(choice: str) -> str:
    """How a choice follows the prompt, in training and in `loglik` scoring alike: a space, then the text."""
    return " " + choice.strip()


def answer_text(example: MultipleChoice) -> str:
    """The target text (without EOS): the correct choice."""
    return choice_text(example.choices[example.answer])


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens (prompt and answer are encoded separately)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_for_training(
    tokenizer: Any, example: MultipleChoice, max_length: int, add_eos: bool = True
) -> dict[str, list[int]]:
    """`{"input_ids", "labels"}` of one example; labels are -100 except on the answer tokens (and EOS).

    `tokenizer` is called as `tokenizer(text, add_special_tokens=False)["input_ids"]` (a Hugging Face
    tokenizer or anything alike); EOS is `tokenizer.eos_token_id`, appended when `add_eos` and not None.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    answer = encode_text(tokenizer, answer_text(example))
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None:
        answer.append(int(eos))
    if not answer:
        raise ValueError(f"the answer of an example of task {example.task!r} encodes to no tokens")
    if len(answer) > max_length:
        raise ValueError(
            f"the answer alone is {len(answer)} tokens, longer than max_length={max_length} "
            f"(task {example.task!r}); raise max_length"
        )
    prompt = encode_text(tokenizer, prompt_text(example))
    room = max_length - len(answer)
    prompt = prompt[len(prompt) - room :] if len(prompt) > room else prompt
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padded positions are masked out anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def collate(features: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of `encode_for_training` outputs: input_ids (pad_id), attention_mask (0), labels (-100).

    Use with a DataLoader as `functools.partial(collate, pad_id=pad_token_id(tokenizer))`.
    """
    if not features:
        raise ValueError("cannot collate an empty batch")
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        ids, target = feature["input_ids"], feature["labels"]
        if len(ids) != len(target):
            raise ValueError(f"batch item {row}: {len(ids)} input_ids but {len(target)} labels")
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.as_tensor(target, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of prompts left-padded to a common width, on `device`.

    For decoding on a KV cache: every row ends at the last column, and the position ids (the mask's
    cumulative sum minus one) put each row's first real token at position 0 whatever its padding.
    """
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return input_ids, attention_mask, (attention_mask.cumsum(-1) - 1).clamp(min=0)
