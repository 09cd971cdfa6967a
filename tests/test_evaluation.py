"""Multiple-choice parsing and the loglik / perplexity measures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ubsmoe.data.multiple_choice import MultipleChoice, from_bigbench, from_llm_adapters
from ubsmoe.metrics.evaluation import loglik_accuracy, perplexity, sequence_logprobs, wilson_interval

COMMONSENSE = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"


class CharTokenizer:
    """One token per character (ids 3..), enough to test scoring without a real tokenizer."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 60) for c in text]}


@pytest.fixture(scope="module")
def tiny_lm():
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
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_llm_adapters_records_of_every_label_format():
    arc = {
        "instruction": "Please choose the correct answer to the question: Q?\n\nAnswer1: red Answer2: blue "
        "Answer3: green\n\nAnswer format: answer1/answer2/answer3",
        "answer": "answer2",
    }
    piqa = {
        "instruction": "Please choose the correct solution to the question: open a jar\n\nSolution1: twist it"
        "\n\nSolution2: eat it\n\nAnswer format: solution1/solution2",
        "answer": "solution1",
    }
    wino = {
        "instruction": "Please choose the correct answer to fill in the blank: The cup is _.\n\nOption1: full "
        "Option2: empty\n\nAnswer format: option1/option2",
        "answer": "option2",
    }
    hella = {
        "instruction": "Please choose the correct ending: A man\n\nEnding1: a Ending2: b Ending3: c Ending4: d"
        "\n\nAnswer format: ending1/ending2/ending3/ending4",
        "answer": "ending4",
    }
    boolq = {
        "instruction": "Please answer the following question with true or false, question: is it?\n\n"
        "Answer format: true/false",
        "answer": "false",
    }
    parsed = [from_llm_adapters(r) for r in (arc, piqa, wino, hella, boolq)]
    assert parsed[0].choices == ("red", "blue", "green") and parsed[0].answer == 1
    assert parsed[1].choices == ("twist it", "eat it") and parsed[1].answer == 0
    assert parsed[2].answer == 1 and parsed[3].answer == 3 and parsed[3].choices[3] == "d"
    assert parsed[4].choices == ("true", "false") and parsed[4].answer == 1
    with pytest.raises(ValueError, match="no options"):
        from_llm_adapters({"instruction": "What?", "answer": "answer1"})
    with pytest.raises(ValueError, match="not one of the options"):
        from_llm_adapters({**arc, "answer": "answer9"})


def test_real_commonsense_files_parse():
    if not COMMONSENSE.is_dir():
        pytest.skip(f"{COMMONSENSE} is absent (shared data is only on the project's machines)")
    for task in ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa", "piqa", "social_i_qa"):
        records = json.loads((COMMONSENSE / task / "test.json").read_text())[:200]
        parsed = [from_llm_adapters(r, task) for r in records]
        assert all(len(p.choices) >= 2 for p in parsed)


def test_bigbench_examples():
    task = {
        "examples": [
            {"input": "Is the sky blue?", "target_scores": {"yes": 1, "no": 0}},
            {"input": "tie", "target_scores": {"a": 1, "b": 1}},  # ambiguous gold: skipped
            {"input": "free text", "target": "x"},  # not multiple choice: skipped
        ]
    }
    examples = from_bigbench(task, "toy")
    assert examples == [MultipleChoice("Q: Is the sky blue?\nA:", ("yes", "no"), 0, "toy")]


def test_loglik_scores_are_the_choice_token_logprobs(tiny_lm):
    tokenizer = CharTokenizer()
    example = MultipleChoice("ab", ("cd", "e"), 0)
    prompt = tokenizer("ab")["input_ids"]
    manual = []
    for choice in example.choices:
        ids = prompt + tokenizer(" " + choice)["input_ids"]
        logprobs = torch.log_softmax(tiny_lm(torch.tensor([ids])).logits[0, :-1].float(), -1)
        targets = torch.tensor(ids[1:])
        per_token = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        manual.append(per_token[-(len(ids) - len(prompt)) :].sum().item())
    best = max(range(2), key=manual.__getitem__)
    for answer, expected in ((best, 1.0), (1 - best, 0.0)):
        result = loglik_accuracy(tiny_lm, tokenizer, [MultipleChoice("ab", ("cd", "e"), answer)], batch_size=1)
        assert result["accuracy"] == expected and result["protocol"] == "loglik" and result["chance"] == 0.5


def test_batched_scoring_matches_one_by_one(tiny_lm):
    tokenizer = CharTokenizer()
    examples = [MultipleChoice("q" * n, ("x" * n, "yy", "z"), n % 3) for n in range(1, 7)]
    one = loglik_accuracy(tiny_lm, tokenizer, examples, batch_size=1)
    seven = loglik_accuracy(tiny_lm, tokenizer, examples, batch_size=7)
    assert one.pop("answer_nll") == pytest.approx(seven.pop("answer_nll"), rel=1e-5)
    records_one, records_seven = one.pop("examples"), seven.pop("examples")
    assert [r["gold_nll"] for r in records_one] == pytest.approx([r["gold_nll"] for r in records_seven], rel=1e-5)
    assert [(r["prediction"], r["correct"], r["gold_tokens"]) for r in records_one] == [
        (r["prediction"], r["correct"], r["gold_tokens"]) for r in records_seven
    ]
    assert one == seven


def test_the_wilson_interval_is_not_zero_width_at_zero_or_one():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((1 - high, 1.0))
    low, high = wilson_interval(50, 100)  # symmetric, slightly narrower than the normal one
    assert (low + high) / 2 == pytest.approx(0.5) and high - 0.5 == pytest.approx(0.0962, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_perplexity_is_exp_mean_nll(tiny_lm):
    blocks = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    logprobs = sequence_logprobs(tiny_lm, blocks, 0)
    expected = math.exp(-torch.cat(logprobs).mean().item())
    assert perplexity(tiny_lm, blocks, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert 1.0 < expected < 1000.0
