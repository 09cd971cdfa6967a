"""UB-SMoE blocks skip padding: real tokens' outputs and gradients unchanged, padding uncounted."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_moefication import moefied, randomize_lora, tiny_llama  # noqa: E402
from test_native_models import build  # noqa: E402

from ubsmoe.metrics.kv_cache import cache_keyword, returned_cache  # noqa: E402
from ubsmoe.models import adapt_moe_model  # noqa: E402
from ubsmoe.models.answer_loss import answer_loss  # noqa: E402
from ubsmoe.moe import UBSMoEConfig, collect_utilization, moe_blocks, reset_utilization, set_top_k  # noqa: E402


def lengths_batch(lengths, width, seed=3, left=False):
    """Random ids (B, width) with the given real lengths; padding (id 0, mask 0) on the right or left."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        span = slice(width - length, width) if left else slice(0, length)
        mask[row, span] = 1
    return ids.masked_fill(mask == 0, 0), mask


def models():
    native = adapt_moe_model(build("olmoe"), UBSMoEConfig(lora_rank=4, lora_alpha=8.0, dmr=True))
    dense = moefied(tiny_llama(torch.float32))
    for model in (native, dense):
        randomize_lora(model)
    return {"olmoe": native, "moefied": dense}


@pytest.mark.parametrize("family", ["olmoe", "moefied"])
@pytest.mark.parametrize("top_k", [1, "max"])
def test_padded_batch_equals_each_sequence_alone_and_counts_only_real_tokens(family, top_k):
    model = models()[family].float()
    blocks = moe_blocks(model)
    set_top_k(model, blocks[0].num_experts if top_k == "max" else top_k)
    lengths = [9, 4, 12]
    ids, mask = lengths_batch(lengths, 12)
    reset_utilization(model)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
    utilization = collect_utilization(model)
    assert utilization["tokens"].tolist() == [sum(lengths)] * len(blocks)
    assert all(block.real_tokens is None for block in blocks)  # cleared after the forward
    for row, length in enumerate(lengths):
        with torch.no_grad():
            alone = model(input_ids=ids[row : row + 1, :length]).logits[0]
        torch.testing.assert_close(padded[row, :length], alone, atol=1e-5, rtol=1e-5)


def test_left_padding_and_kv_cache_steps_use_the_mask_tail():
    model = models()["moefied"].float()
    set_top_k(model, 2)
    ids, mask = lengths_batch([5, 8], 8, left=True)
    step_ids = torch.tensor([[7], [9]])
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        prefill = model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True
        )
        step = model(
            input_ids=step_ids,
            attention_mask=step_mask,
            position_ids=step_mask.sum(1, keepdim=True) - 1,
            **{cache_keyword(model): returned_cache(prefill)},
        ).logits
    for row, length in enumerate([5, 8]):
        with torch.no_grad():
            alone = model(input_ids=torch.cat([ids[row, 8 - length :], step_ids[row]])[None]).logits
        torch.testing.assert_close(step[row, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["olmoe", "moefied"])
def test_answer_loss_gradients_unchanged_by_padding(family):
    model = models()[family].float().train()
    set_top_k(model, 2)
    ids, mask = lengths_batch([10, 6], 10)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    parameters = [p for p in model.parameters() if p.requires_grad]

    def gradients(input_ids, attention_mask, target):
        model.zero_grad()
        answer_loss(model, input_ids, attention_mask=attention_mask, labels=target).loss.backward()
        return [p.grad.clone() for p in parameters]

    padded = gradients(ids, mask, labels)
    reference = [torch.zeros_like(g) for g in padded]
    # the batch's mean loss over labelled tokens, rebuilt from each row alone (weighted by its labels)
    total = int((labels[:, 1:] != -100).sum())
    for row, length in enumerate([10, 6]):
        count = int((labels[row, 1:length] != -100).sum())
        grads = gradients(ids[row : row + 1, :length], None, labels[row : row + 1, :length])
        for ref, grad in zip(reference, grads, strict=True):
            ref += grad * count / total
    for got, want in zip(padded, reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
