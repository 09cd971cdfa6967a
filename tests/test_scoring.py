"""choice_logprobs (prompt run once, KV cache reused per choice) against a naive one-sequence-at-a-time reference."""

from __future__ import annotations

import inspect
import random

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from ubsmoe.metrics.scoring import choice_logprobs  # noqa: E402

PAD = 0


def _tiny_llama(vocab: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _tiny_olmoe() -> torch.nn.Module:
    from ubsmoe.models.native import adapt_moe_model, tiny_config
    from ubsmoe.moe import set_top_k

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("olmoe", initializer_range=0.2))
    adapt_moe_model(model)
    set_top_k(model, 1)
    return model.eval()


def _examples(seed: int, vocab: int, n: int = 12) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Prompts of 1..20 tokens, examples with 2, 3 or 5 choices of 1..6 tokens (pad id 0 avoided)."""
    rng = random.Random(seed)
    prompts, choices = [], []
    for index in range(n):
        length = 1 if index == 0 else 20 if index == 1 else rng.randint(1, 20)
        prompts.append([rng.randrange(1, vocab) for _ in range(length)])
        count = (2, 3, 5)[index % 3]
        choices.append([[rng.randrange(1, vocab) for _ in range(rng.randint(1, 6))] for _ in range(count)])
    return prompts, choices


@torch.no_grad()
def _naive(model, prompts, choices) -> list[list[float]]:
    """Each full sequence prompt + choice alone, unpadded: sum of log-softmax over the choice tokens."""
    scores = []
    for prompt, example in zip(prompts, choices, strict=True):
        row = []
        for ids in example:
            sequence = torch.tensor([prompt + ids])
            logprobs = F.log_softmax(model(input_ids=sequence).logits[0].float(), dim=-1)
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(ids) - 1)
            row.append(logprobs[positions, torch.tensor(ids)].sum().item())
        scores.append(row)
    return scores


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(r) for r in a] == [len(r) for r in b]
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.fixture(scope="module")
def llama():
    return _tiny_llama()


@pytest.fixture(scope="module")
def llama_data(llama):
    prompts, choices = _examples(1, 64)
    return prompts, choices, _naive(llama, prompts, choices)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_llama_matches_naive(llama, llama_data, batch_size):
    prompts, choices, reference = llama_data
    scores = choice_logprobs(llama, prompts, choices, PAD, batch_size=batch_size)
    assert all(isinstance(x, float) for row in scores for x in row)
    assert _max_diff(scores, reference) < 1e-4


def test_positions_and_masks_matter(llama, llama_data):
    """Sanity check that the test would catch mistakes: the scores depend on the prompt context."""
    prompts, choices, reference = llama_data
    shifted = choice_logprobs(llama, [p[1:] or p for p in prompts], choices, PAD)
    assert _max_diff(shifted, reference) > 1e-2


def test_olmoe_ubsmoe_top1_matches_naive():
    model = _tiny_olmoe()
    prompts, choices = _examples(2, model.config.vocab_size)
    reference = _naive(model, prompts, choices)
    for batch_size in (1, 16):
        scores = choice_logprobs(model, prompts, choices, PAD, batch_size=batch_size)
        assert _max_diff(scores, reference) < 1e-4


def test_one_forward_per_prompt_batch_and_choice_index(llama):
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 64) for _ in range(rng.randint(1, 20))] for _ in range(7)]
    # every choice has >= 2 tokens, so every choice index needs its own forward pass
    choices = [
        [[rng.randrange(1, 64) for _ in range(rng.randint(2, 6))] for _ in range(k)] for k in (2, 3, 5, 2, 3, 2, 2)
    ]
    calls = []
    handle = llama.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        scores = choice_logprobs(llama, prompts, choices, PAD, batch_size=4)
    finally:
        handle.remove()
    order = sorted(range(7), key=lambda i: len(prompts[i]))
    expected = sum(1 + max(len(choices[i]) for i in order[s : s + 4]) for s in range(0, 7, 4))
    assert len(calls) == expected
    assert _max_diff(scores, _naive(llama, prompts, choices)) < 1e-4


def test_single_token_choices_need_no_choice_pass(llama):
    calls = []
    handle = llama.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        scores = choice_logprobs(llama, [[5, 6, 7], [8]], [[[1], [2], [3]], [[4], [9]]], PAD)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert _max_diff(scores, _naive(llama, [[5, 6, 7], [8]], [[[1], [2], [3]], [[4], [9]]])) < 1e-4


def test_on_batch_counts_sum_to_pairs(llama, llama_data):
    prompts, choices, _ = llama_data
    counts: list[int] = []
    choice_logprobs(llama, prompts, choices, PAD, batch_size=5, on_batch=counts.append)
    assert len(counts) == 3  # 12 examples in batches of 5
    assert sum(counts) == sum(len(c) for c in choices)


def test_training_flag_restored(llama):
    llama.train()
    try:
        choice_logprobs(llama, [[1, 2]], [[[3], [4, 5]]], PAD)
        assert llama.training
    finally:
        llama.eval()
    choice_logprobs(llama, [[1, 2]], [[[3], [4, 5]]], PAD)
    assert not llama.training


def test_training_flag_restored_on_error(llama):
    llama.train()
    try:
        with pytest.raises((IndexError, RuntimeError)):
            choice_logprobs(llama, [[1, 2]], [[[3, 10_000]]], PAD)  # token id beyond the vocabulary
        assert llama.training
    finally:
        llama.eval()


def test_empty_prompt_raises(llama):
    with pytest.raises(ValueError, match="at least one token"):
        choice_logprobs(llama, [[1, 2], []], [[[3]], [[4]]], PAD)


def test_empty_choice_scores_zero_and_edge_cases(llama):
    prompts, choices = [[1, 2, 3], [4]], [[[], [5, 6]], [[], []]]
    scores = choice_logprobs(llama, prompts, choices, PAD)
    assert scores[0][0] == 0.0 and scores[1] == [0.0, 0.0]
    assert abs(scores[0][1] - _naive(llama, [[1, 2, 3]], [[[5, 6]]])[0][0]) < 1e-4
    assert choice_logprobs(llama, [], [], PAD) == []
    assert choice_logprobs(llama, [[1]], [[]], PAD) == [[]]
    with pytest.raises(ValueError):
        choice_logprobs(llama, [[1]], [], PAD)


def test_argmax_accuracy_matches_naive(llama):
    """A real-looking accuracy check: the predicted choice is the same for every example."""
    prompts, choices = _examples(4, 64, n=24)
    answers = [random.Random(i).randrange(len(c)) for i, c in enumerate(choices)]
    fast = choice_logprobs(llama, prompts, choices, PAD, batch_size=8)
    slow = _naive(llama, prompts, choices)

    def argmax(row: list[float]) -> int:
        return max(range(len(row)), key=row.__getitem__)

    assert [argmax(r) for r in fast] == [argmax(r) for r in slow]
    accuracy = sum(argmax(r) == a for r, a in zip(fast, answers, strict=True)) / len(answers)
    assert accuracy == sum(argmax(r) == a for r, a in zip(slow, answers, strict=True)) / len(answers)


def test_cache_passed_under_the_name_the_model_takes(llama, llama_data):
    """transformers 5.x renamed past_key_values to cache; the old name warns and is announced to go in 5.40."""
    import functools
    import warnings

    from ubsmoe.metrics.kv_cache import cache_keyword

    expected = "cache" if "cache" in inspect.signature(type(llama).forward).parameters else "past_key_values"
    assert cache_keyword(llama) == expected
    seen: list[set[str]] = []
    original = llama.forward

    @functools.wraps(original)
    def recording(*args, **kwargs):
        seen.append(set(kwargs))
        return original(*args, **kwargs)

    prompts, choices, reference = llama_data
    llama.forward = recording
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            scores = choice_logprobs(llama, prompts, choices, PAD, batch_size=4)
    finally:
        del llama.forward
    assert _max_diff(scores, reference) < 1e-4
    assert any(expected in names for names in seen)  # the choice passes ran on the prompt's cache
    other = {"cache", "past_key_values"} - {expected}
    assert not any(other & names for names in seen)
