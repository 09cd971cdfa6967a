"""The language-model loss over the answer tokens only: the LM head runs where a label is.

Training examples label only their answer tokens (`ubsmoe.data.prompts`: the prompt is -100), yet a
transformers causal LM called with `labels` applies its LM head (H -> vocabulary, 49,152 columns for
SmolLM2) at every position and then throws most of those logits away. `answer_loss` runs the
backbone, keeps the positions whose shifted label is not -100, and applies the head and the
cross-entropy there only. The loss (mean over the labelled tokens, logits in float32) and every
gradient are those of the full computation; only the discarded logits are no longer computed.

Models whose head does more than a linear map (logit soft-capping or scaling) or whose loss adds a
router auxiliary term take the plain full forward instead, so the result is always the model's own
loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AnswerLoss", "answer_loss", "split_causal_lm"]

IGNORE_INDEX = -100
# config attributes that make a head more than `lm_head(hidden)` (Gemma, Cohere, Granite, ...)
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass(frozen=True)
class AnswerLoss:
    """The mean cross-entropy over the labelled tokens and how many tokens it averages over."""

    loss: torch.Tensor
    tokens: int


def split_causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, head) of a transformers causal LM whose logits are exactly `head(backbone(...)[0])`, else None."""
    config = getattr(model, "config", None)
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if config is None or get_decoder is None or get_head is None:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_EXTRAS):
        return None
    if getattr(config, "output_router_logits", False):
        return None  # the model's loss would add its router auxiliary loss
    backbone, head = get_decoder(), get_head()
    if backbone is None or backbone is model or not isinstance(head, nn.Linear):
        return None
    return backbone, head


def answer_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> AnswerLoss:
    """Mean next-token cross-entropy over the positions whose shifted label is not -100.

    Equal to `model(input_ids, attention_mask=..., labels=labels).loss` (transformers' causal-LM
    loss: labels shifted left by one, -100 ignored, float32 logits, mean), computing the LM head only
    at the labelled positions.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    parts = split_causal_lm(model)
    if parts is None:
        mask = {} if attention_mask is None else {"attention_mask": attention_mask}
        output = model(input_ids=input_ids, labels=labels, **mask)
        return AnswerLoss(output.loss, count)
    backbone, head = parts
    hidden = _last_hidden_state(backbone(input_ids=input_ids, attention_mask=attention_mask))
    rows = hidden[:, :-1][keep]  # (labelled tokens, H); the last position predicts nothing
    logits = head(rows).float()
    return AnswerLoss(F.cross_entropy(logits, targets[keep], ignore_index=IGNORE_INDEX), count)


def _last_hidden_state(output: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]
