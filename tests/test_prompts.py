import pytest
import torch

from ubsmoe.data.multiple_choice import MultipleChoice
from ubsmoe.data.prompts import IGNORE_INDEX, answer_text, collate, encode_for_training, pad_token_id


class CharTokenizer:
    """One token per character (ids 10..), EOS 2, pad 0: enough to check masks without a real tokenizer."""

    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 + ord(c) % 100 for c in text]}


EXAMPLE = MultipleChoice("Is ice cold?\nAnswer:", ("yes", "no"), 0, "toy")


def test_labels_mask_everything_but_the_answer():
    tokenizer = CharTokenizer()
    encoded = encode_for_training(tokenizer, EXAMPLE, max_length=64)
    prompt = tokenizer(EXAMPLE.prompt)["input_ids"]
    answer = tokenizer(" yes")["input_ids"] + [2]
    assert answer_text(EXAMPLE) == " yes"
    assert encoded["input_ids"] == prompt + answer
    assert encoded["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    without_eos = encode_for_training(tokenizer, EXAMPLE, max_length=64, add_eos=False)
    assert without_eos["labels"][-4:] == tokenizer(" yes")["input_ids"]


def test_truncation_cuts_the_prompt_from_the_left_only():
    tokenizer = CharTokenizer()
    encoded = encode_for_training(tokenizer, EXAMPLE, max_length=10)
    answer = tokenizer(" yes")["input_ids"] + [2]
    assert len(encoded["input_ids"]) == 10
    assert encoded["input_ids"] == tokenizer(EXAMPLE.prompt)["input_ids"][-5:] + answer
    assert encoded["labels"][-5:] == answer and encoded["labels"][:5] == [IGNORE_INDEX] * 5
    assert encode_for_training(tokenizer, EXAMPLE, max_length=5)["input_ids"] == answer  # no prompt left
    with pytest.raises(ValueError, match="answer alone is 5 tokens"):
        encode_for_training(tokenizer, EXAMPLE, max_length=4)


def test_collate_right_pads():
    tokenizer = CharTokenizer()
    long = MultipleChoice("A longer question here?\nAnswer:", ("x", "maybe"), 1, "toy")
    features = [encode_for_training(tokenizer, e, 64) for e in (EXAMPLE, long)]
    batch = collate(features, pad_id=pad_token_id(tokenizer))
    widths = [len(f["input_ids"]) for f in features]
    assert batch["input_ids"].shape == (2, max(widths)) and batch["input_ids"].dtype == torch.long
    short = widths[0]
    assert batch["input_ids"][0, :short].tolist() == features[0]["input_ids"]
    assert (batch["input_ids"][0, short:] == 0).all()
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (max(widths) - short)
    assert batch["attention_mask"][1].all()
    assert batch["labels"][0, short:].eq(IGNORE_INDEX).all()
    assert batch["labels"][1].tolist() == features[1]["labels"]
    with pytest.raises(ValueError):
        collate([], pad_id=0)


def test_pad_token_id_fallbacks():
    class NoPad:
        pad_token_id = None
        eos_token_id = 7

    assert pad_token_id(CharTokenizer()) == 0
    assert pad_token_id(NoPad()) == 7
    assert pad_token_id(object()) == 0
