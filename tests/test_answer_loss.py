"""The answer-only loss (LM head at the labelled positions only) equals transformers' full causal-LM loss."""

from __future__ import annotations

import pytest
import torch

from ubsmoe.models.answer_loss import answer_loss, split_causal_lm
from ubsmoe.moe import UBSMoEConfig, set_top_k

transformers = pytest.importorskip("transformers")

from ubsmoe.models import adapt_moe_model, tiny_config  # noqa: E402


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows whose labels cover only an answer span (and not the padding), as collate makes them."""
    ids = torch.randint(3, 100, (3, 12), generator=torch.Generator().manual_seed(3))
    labels = torch.full_like(ids, -100)
    labels[0, 7:10] = ids[0, 7:10]
    labels[1, 9:] = ids[1, 9:]
    labels[2, 5:8] = ids[2, 5:8]
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return ids, labels, mask


def full_and_answer_only(model: torch.nn.Module):
    ids, labels, mask = batch()
    parameters = [p for p in model.parameters() if p.requires_grad]
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    full_grads = torch.autograd.grad(full, parameters)
    result = answer_loss(model, ids, labels, mask)
    grads = torch.autograd.grad(result.loss, parameters)
    return full, full_grads, result, grads


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_equals_the_full_loss_and_its_gradients(model_type):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type))
    model = adapt_moe_model(model, UBSMoEConfig(lora_rank=4))
    with torch.no_grad():  # B starts at zero; give every adapter a gradient path that matters
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    set_top_k(model, 1)
    model.train()
    assert split_causal_lm(model) is not None
    full, full_grads, result, grads = full_and_answer_only(model)
    assert result.tokens == 9  # three labelled tokens per row
    torch.testing.assert_close(result.loss, full, rtol=0, atol=1e-6)
    assert len(grads) > 0
    for got, want in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_head_with_extras_takes_the_models_own_loss():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    model = transformers.LlamaForCausalLM(config)
    assert split_causal_lm(model) is not None
    model.config.final_logit_softcapping = 30.0  # a model whose logits are more than lm_head(hidden)
    assert split_causal_lm(model) is None
    model.config.final_logit_softcapping = None
    model.config.output_router_logits = True  # its loss would add a router auxiliary term
    assert split_causal_lm(model) is None
    model.config.output_router_logits = False
    model.model.norm.weight.requires_grad_(True)
    ids, labels, mask = batch()
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(answer_loss(model, ids, labels, mask).loss, full, rtol=0, atol=1e-6)
