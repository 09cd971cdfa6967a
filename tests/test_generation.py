"""The `generate` protocol: choice matching, the KV-cached greedy loop, and generate_accuracy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ubsmoe.data.multiple_choice import MultipleChoice
from ubsmoe.metrics.generation import (
    first_choice_match,
    generate_accuracy,
    generate_continuations,
    greedy_generate,
)

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 \n:?.,()'-"  # ids 3.. ; 0 pad, 1 eos, 2 bos


class CharTokenizer:
    """One token per character (ids 3..); decodes back to the characters, dropping 0/1/2."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.token(c) for c in text.lower()]}

    @staticmethod
    def token(char: str) -> int:
        return 3 + ALPHABET.index(char if char in ALPHABET else "?")

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i > 2]
        return "".join(ALPHABET[i - 3] if 3 <= i < 3 + len(ALPHABET) else "?" for i in ids)


# ---- first_choice_match ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "choices", "expected"),
    [
        ("I think the answer is false, not true", ("true", "false"), 1),  # earliest occurrence wins
        ("true. Actually false", ("false", "true"), 1),
        ("It is not plausible.", ("plausible", "not plausible"), 1),  # longest at the same position
        ("It is plausible.", ("plausible", "not plausible"), 0),
        ("The ANSWER is Yes", ("no", "yes"), 1),  # case-insensitive
        ("I do not know", ("no", "maybe"), None),  # 'no' is not matched inside 'not' / 'know'
        ("no way", ("yes", "no"), 1),
        ("it is\n  NOT\tplausible", ("plausible", "not plausible"), 1),  # whitespace normalised
        ("the  red   ball", ("red ball", "blue ball"), 0),
        ("answer: (B) then (A)", ("(A)", "(B)"), 1),  # punctuation is escaped
        ("about 3x5 or 3.5", ("3.5", "35"), 0),  # '.' is literal, not any character
        ("35 apples", ("3.5", "35"), 1),
        ("nothing relevant here", ("alpha", "beta"), None),
        ("", ("a", "b"), None),
        ("solution2 is better", ("solution1", "solution2"), 1),
        ("option 10", ("option 1", "option 10"), 1),  # 'option 1' must not match the start of 'option 10'
    ],
)
def test_first_choice_match(text, choices, expected):
    assert first_choice_match(text, choices) == expected


def test_first_choice_match_blank_and_duplicate_choices():
    assert first_choice_match("anything", ("", "  ")) is None
    assert first_choice_match("yes", ("yes", "YES")) == 0  # duplicates resolve to the first index


# ---- models ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # sharper attention than the default 0.02, so positions and masks visibly matter
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_ubsmoe():
    transformers = pytest.importorskip("transformers")
    from ubsmoe.models.native import adapt_moe_model, tiny_config

    torch.manual_seed(0)
    config = tiny_config("olmoe", initializer_range=0.2)
    assert config.vocab_size >= 3 + len(ALPHABET)
    model = transformers.AutoModelForCausalLM.from_config(config)
    adapt_moe_model(model)
    return model.eval()


@torch.no_grad()
def naive_greedy(model, prompt, max_new_tokens, eos_id=None):
    """Reference: one unpadded sequence, re-run in full without cache for every new token."""
    ids, generated = list(prompt), []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
        token = int(logits[0, -1].argmax())
        if eos_id is not None and token == eos_id:
            break
        generated.append(token)
        ids.append(token)
    return generated


PROMPTS = [
    "q: is the sky blue?\nanswer:",
    "hi\na:",
    "q: which is larger, 3 or 5? options: (a) 3 (b) 5\nanswer:",
    "x\nanswer:",
    "a longer question about things and stuff\na:",
]


def encoded_prompts():
    tokenizer = CharTokenizer()
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.mark.parametrize("eos_id", [None, 1])
def test_cached_greedy_matches_naive_reference(tiny_llama, eos_id):
    prompts = encoded_prompts()
    assert len({len(p) for p in prompts}) > 1  # different lengths: left padding and position ids matter
    cached = greedy_generate(tiny_llama, prompts, pad_id=0, max_new_tokens=10, eos_id=eos_id)
    expected = [naive_greedy(tiny_llama, p, 10, eos_id) for p in prompts]
    assert cached == expected
    if eos_id is None:
        assert all(len(ids) == 10 for ids in cached)


def test_cached_greedy_matches_naive_reference_ubsmoe(tiny_ubsmoe):
    from ubsmoe.moe import moe_blocks

    assert moe_blocks(tiny_ubsmoe)  # the custom blocks are in place
    prompts = encoded_prompts()[:3]
    cached = greedy_generate(tiny_ubsmoe, prompts, pad_id=0, max_new_tokens=6)
    expected = [naive_greedy(tiny_ubsmoe, p, 6) for p in prompts]
    assert cached == expected


def test_generate_accuracy_on_ubsmoe_model(tiny_ubsmoe):
    examples = [MultipleChoice(p, ("yes", "no"), i % 2) for i, p in enumerate(PROMPTS)]
    result = generate_accuracy(tiny_ubsmoe, CharTokenizer(), examples, batch_size=3, max_new_tokens=4)
    assert result["n"] == len(examples)
    assert 0.0 <= result["accuracy"] <= 1.0
    assert 0.0 <= result["unmatched"] <= 1.0


def test_batch_size_does_not_change_results(tiny_llama):
    tokenizer = CharTokenizer()
    one = generate_continuations(tiny_llama, tokenizer, PROMPTS, batch_size=1, max_new_tokens=6)
    four = generate_continuations(tiny_llama, tokenizer, PROMPTS, batch_size=4, max_new_tokens=6)
    assert one == four
    assert all(len(text) > 0 for text in one)
    examples = [MultipleChoice(p, ("a", "e", "q"), i % 3) for i, p in enumerate(PROMPTS)]
    single = generate_accuracy(tiny_llama, tokenizer, examples, batch_size=1, max_new_tokens=6)
    assert single == generate_accuracy(tiny_llama, tokenizer, examples, batch_size=4, max_new_tokens=6)


def test_prompt_truncation_keeps_the_last_tokens(tiny_llama):
    tokenizer = CharTokenizer()
    long_prompt = "ignored prefix " * 5 + "kept\na:"
    short_prompt = "kept\na:"
    truncated = generate_continuations(
        tiny_llama, tokenizer, [long_prompt], max_new_tokens=6, max_prompt_tokens=len(short_prompt)
    )
    assert truncated == generate_continuations(tiny_llama, tokenizer, [short_prompt], max_new_tokens=6)


# ---- a model with a forced output ---------------------------------------------------------------
class ForcedModel(nn.Module):
    """Emits the tokens of `text`, then EOS, then junk, whatever the input; `past_key_values` counts the steps."""

    def __init__(self, text: str, vocab: int = 64):
        super().__init__()
        tokenizer = CharTokenizer()
        self.script = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] + [tokenizer.token("z")] * 50
        self.vocab = vocab
        self.calls = 0
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device and a training flag to restore

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        assert use_cache
        step = 0 if past_key_values is None else past_key_values
        assert input_ids.shape[1] == 1 or step == 0  # after the prompt only the new token is fed
        self.calls += 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        logits[:, -1, self.script[step]] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=step + 1)


def test_forced_generation_is_scored():
    examples = [
        MultipleChoice("q: is it?\nanswer:", ("no", "yes"), 1),
        MultipleChoice("is it really so?\na:", ("yes", "no", "maybe"), 0),
    ]
    model = ForcedModel(" yes")
    model.train()
    batches = []
    result = generate_accuracy(model, CharTokenizer(), examples, batch_size=1, on_batch=batches.append)
    assert result["accuracy"] == 1.0 and result["unmatched"] == 0.0 and result["ci95"] == 0.0
    assert batches == [1, 1]
    assert model.training  # the training flag is restored
    assert model.calls == 2 * 5  # four characters plus EOS per example: the loop stops when all rows are done

    wrong = generate_accuracy(ForcedModel(" yes"), CharTokenizer(), [MultipleChoice("p\na:", ("yes", "no"), 1)])
    assert wrong["accuracy"] == 0.0 and wrong["unmatched"] == 0.0

    unmatched = generate_accuracy(ForcedModel(" yes"), CharTokenizer(), [MultipleChoice("p\na:", ("no", "maybe"), 0)])
    assert unmatched["accuracy"] == 0.0 and unmatched["unmatched"] == 1.0


def test_generation_stops_at_eos_and_max_new_tokens():
    tokenizer = CharTokenizer()
    assert generate_continuations(ForcedModel(" yes"), tokenizer, ["p\na:"], max_new_tokens=32) == [" yes"]
    assert generate_continuations(ForcedModel(" yes"), tokenizer, ["p\na:"], max_new_tokens=2) == [" y"]


def test_result_keys_and_chance():
    examples = [
        MultipleChoice("a\nanswer:", ("yes", "no"), 0),
        MultipleChoice("b\nanswer:", ("a", "b", "c", "d"), 1),
        MultipleChoice("c\nanswer:", ("x", "yes"), 1),
        MultipleChoice("d\nanswer:", ("yes", "y", "n", "m"), 0),
    ]
    result = generate_accuracy(ForcedModel(" yes"), CharTokenizer(), examples, batch_size=3)
    assert set(result) == {"protocol", "accuracy", "ci95", "wilson95", "n", "chance", "unmatched", "examples"}
    assert [r["prediction"] for r in result["examples"]] == [0, None, 1, 0]  # b's generation names no choice
    assert [r["correct"] for r in result["examples"]] == [True, False, True, True]
    assert all(r["generation"] == " yes" for r in result["examples"])
    assert result["protocol"] == "generate"
    assert result["n"] == 4
    assert result["chance"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 2 + 1 / 4) / 4)
    assert result["accuracy"] == pytest.approx(3 / 4)  # example b names no choice
    assert result["unmatched"] == pytest.approx(1 / 4)
    assert result["ci95"] == pytest.approx(1.959964 * math.sqrt(0.75 * 0.25 / 4))  # as the loglik protocol


def test_empty_examples():
    result = generate_accuracy(ForcedModel(" yes"), CharTokenizer(), [])
    assert result["n"] == 0 and math.isnan(result["accuracy"]) and math.isnan(result["unmatched"])
