import json
import re
from pathlib import Path

import pytest

from ubsmoe.data.commonsense import (
    TASKS,
    CommonsenseDataError,
    infer_task,
    list_tasks,
    load_file,
    load_mix,
    load_task,
    parse_record,
    split_train_test,
)
from ubsmoe.data.multiple_choice import MultipleChoice

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "commonsense"
REAL_TASKS = ("boolq", "piqa", "social_i_qa", "ARC-Easy", "ARC-Challenge", "openbookqa")


def _shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real LLM-Adapters commonsense data not found at {SHARED} (only present in the project workspace)")
    return SHARED


def _piqa(answer="solution1"):
    record = {
        "instruction": "Please choose the correct solution to the question: How to open a jar?\n\n"
        "Solution1: Twist the lid.\n\nSolution2: Sing to it.\n\nAnswer format: solution1/solution2",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }
    return record


def _write(tmp_path, relative, text):
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("task", REAL_TASKS)
def test_real_test_sets_load(task):
    folder = _shared()
    examples = load_task(folder, task)
    assert examples and all(isinstance(e, MultipleChoice) and e.task == task for e in examples)
    assert all(e.prompt.endswith("\nAnswer:") for e in examples)
    assert len(examples) == list_tasks(folder)[task]["test"]
    # no trailer text, marker or carriage return leaks into an option or the question
    texts = [text for e in examples for text in (e.prompt, *e.choices)]
    assert not any("Answer format" in text or "\r" in text for text in texts)
    assert all(
        choice.strip() and not re.search(r"(?i)\b(answer|solution)\d+:", choice)
        for e in examples
        for choice in e.choices
    )


def test_real_folder_listing():
    sizes = list_tasks(_shared())
    assert set(REAL_TASKS) <= set(sizes)
    assert sizes["piqa"] == {"test": 1838}
    assert sizes["boolq"]["train"] > 0 and "train" not in sizes["social_i_qa"]


def test_fixture_tasks_and_mix():
    sizes = list_tasks(FIXTURES)
    assert sizes == {"hellaswag": {"test": 3}, "winogrande": {"train": 3, "test": 3}, "commonsense_15k": {"train": 8}}
    hellaswag = load_task(FIXTURES, "hellaswag")
    assert [len(e.choices) for e in hellaswag] == [4, 4, 4]
    assert [e.answer for e in hellaswag] == [0, 1, 2]
    assert hellaswag[1].choices[1] == "steadies the handlebars and pedals faster."
    winogrande = load_task(FIXTURES, "winogrande")
    # the real WinoGrande test file's layout: question, options and answer format on one line
    assert winogrande[0].choices == ("cup", "box") and [e.answer for e in winogrande] == [0, 1, 0]
    assert winogrande[1].choices == ("Anna", "Beth") and "Answer format" not in winogrande[1].prompt
    assert "_" in winogrande[0].prompt
    train = load_task(FIXTURES, "WinoGrande", split="train")  # .jsonl, names matched case-insensitively
    assert len(train) == 3 and train[0].answer == 1 and train[0].task == "winogrande"
    mix = load_mix(FIXTURES)
    assert [e.task for e in mix] == ["boolq", "piqa", "qa", "qa", "hellaswag", "winogrande", "boolq", "qa"]
    assert mix[0].choices == ("true", "false") and mix[6].answer == 1
    assert mix[7].choices[1] == "chlorophyll" and len(mix[7].choices) == 5
    assert mix[2].choices == ("oven", "refrigerator", "garden")  # CRLF line ends
    assert mix[6].prompt.endswith("fly to the moon?\nAnswer:")  # one line: the answer format is not in the prompt
    assert {e.task for e in load_mix(FIXTURES, infer=False)} == {"commonsense_15k"}


def test_infer_task_of_non_object():
    assert infer_task(["not", "a", "record"]) == "qa"


def test_missing_answer_names_file_record_and_expected(tmp_path):
    records = [_piqa(), _piqa("solution2"), {k: v for k, v in _piqa().items() if k != "answer"}]
    path = _write(tmp_path, "piqa/test.json", json.dumps(records))
    with pytest.raises(CommonsenseDataError) as error:
        load_file(path)
    assert (
        str(error.value) == "piqa/test.json, record 2: field 'answer' is missing (expected 'solution1' or 'solution2')"
    )


def test_answer_not_among_options(tmp_path):
    _write(tmp_path, "piqa/test.json", json.dumps([_piqa(), _piqa("solution3")]))
    with pytest.raises(CommonsenseDataError, match=r"^piqa/test\.json, record 1: answer 'solution3' is not one of"):
        load_task(tmp_path, "piqa")


def test_not_json(tmp_path):
    path = _write(tmp_path, "piqa/test.json", '[{"instruction": "x",\n "answer": }]')
    with pytest.raises(CommonsenseDataError, match=r"^piqa/test\.json: not valid JSON .*line 2.*expected a JSON array"):
        load_file(path)


def test_not_an_array(tmp_path):
    path = _write(tmp_path, "piqa/test.json", json.dumps(_piqa()))
    with pytest.raises(
        CommonsenseDataError, match=r"piqa/test\.json: expected a JSON array of records, got a JSON dict"
    ):
        load_file(path)


def test_non_object_record(tmp_path):
    path = _write(tmp_path, "piqa/test.json", json.dumps([_piqa(), "solution1"]))
    with pytest.raises(
        CommonsenseDataError, match=r"^piqa/test\.json, record 1: expected a JSON object .* got a JSON str"
    ):
        load_file(path)


def test_jsonl_reports_line_numbers(tmp_path):
    lines = [json.dumps(_piqa()), "", json.dumps(_piqa("solution3"))]
    path = _write(tmp_path, "piqa/train.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(CommonsenseDataError, match=r"^piqa/train\.jsonl, line 3: answer 'solution3'"):
        load_file(path)
    _write(tmp_path, "piqa/train.jsonl", json.dumps(_piqa()) + "\n{oops\n")
    with pytest.raises(CommonsenseDataError, match=r"^piqa/train\.jsonl, line 2: not valid JSON"):
        load_file(path)
    _write(tmp_path, "piqa/train.jsonl", json.dumps(_piqa()) + "\n" + json.dumps([1]) + "\n")
    with pytest.raises(CommonsenseDataError, match=r"^piqa/train\.jsonl, line 2: expected a JSON object"):
        load_file(path)


def test_missing_instruction_and_empty_file(tmp_path):
    path = _write(tmp_path, "boolq/test.json", json.dumps([{"answer": "true"}]))
    with pytest.raises(CommonsenseDataError, match=r"record 0: field 'instruction' is missing"):
        load_file(path)
    _write(tmp_path, "boolq/test.json", "[]")
    with pytest.raises(CommonsenseDataError, match=r"boolq/test\.json: holds no records"):
        load_file(path)


def test_folder_errors(tmp_path):
    with pytest.raises(CommonsenseDataError, match="does not exist"):
        list_tasks(tmp_path / "nowhere")
    (tmp_path / "unrelated").mkdir()
    with pytest.raises(CommonsenseDataError, match="holds none of the known commonsense tasks"):
        list_tasks(tmp_path)
    assert list_tasks(tmp_path, missing_ok=True) == {}
    with pytest.raises(CommonsenseDataError, match=r"piqa/test\.json \(or \.jsonl\) not found"):
        load_task(tmp_path, "piqa")
    with pytest.raises(CommonsenseDataError, match="unknown commonsense task"):
        load_task(tmp_path, "squad")
    with pytest.raises(CommonsenseDataError, match="commonsense_15k.json not found"):
        load_mix(tmp_path)
    assert len(TASKS) == 8


def test_split_train_test_disjoint_and_seeded():
    items = list(range(100))
    train, test = split_train_test(items, 0.2, seed=3)
    assert len(test) == 20 and len(train) == 80
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(items)
    assert train == sorted(train) and test == sorted(test)  # input order kept
    assert split_train_test(items, 0.2, seed=3) == (train, test)
    assert split_train_test(items, 0.2, seed=4)[1] != test
    assert split_train_test([1, 2], 0.01, seed=0)[1] and split_train_test([1, 2], 0.99, seed=0)[0]
    with pytest.raises(ValueError):
        split_train_test(items, 1.0, seed=0)
    with pytest.raises(ValueError):
        split_train_test([1], 0.5, seed=0)


def test_split_real_piqa_examples():
    examples = load_task(_shared(), "piqa")
    train, test = split_train_test(examples, 0.1, seed=0)
    assert len(test) == round(len(examples) * 0.1)
    assert not {id(e) for e in train} & {id(e) for e in test}


# ---- option parsing: the eight tasks' formats in every whitespace layout (issue 16) -----------------
# (task, instruction head, marker word, options, answer label): the wording of LLM-Adapters' files
FORMATS = {
    "boolq": ("Please answer the following question with true or false, question: is ice cold?", None, None, "false"),
    "piqa": (
        "Please choose the correct solution to the question: How to open a jar?",
        "Solution",
        ["Twist the lid.", "Sing to it."],
        "solution1",
    ),
    "social_i_qa": (
        "Please choose the correct answer to the question: Kai lent Sam a pen. What will Sam want to do next?",
        "Answer",
        ["write a note", "sell the pen", "go to sleep"],
        "answer1",
    ),
    "hellaswag": (
        "Please choose the correct ending to complete the given sentence: Baking: A baker kneads dough. she",
        "Ending",
        ["folds it over.", "throws it away.", "paints it blue.", "reads to it."],
        "ending1",
    ),
    "winogrande": (
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "Option",
        ["Sarah", "Maria"],
        "option2",
    ),
    "ARC-Easy": (
        "Please choose the correct answer to the question: Which is a metal?",
        "Answer",
        ["wood", "iron", "glass", "paper"],
        "answer2",
    ),
    "ARC-Challenge": (
        "Please choose the correct answer to the question: What makes day and night?",
        "Answer",
        ["Earth's rotation", "the Moon", "clouds", "tides", "seasons"],
        "answer1",
    ),
    "openbookqa": (
        "Please choose the correct answer to the question: A magnet attracts",
        "Answer",
        ["nails", "water", "sand", "rubber"],
        "answer1",
    ),
}
LAYOUTS = {  # (before the options, between options, before "Answer format:")
    "lf": ("\n\n", "\n", "\n\n"),
    "lf-blank-lines": ("\n\n", "\n\n", " \n\n"),  # PIQA's real layout, with its stray space
    "crlf": ("\r\n\r\n", "\r\n", "\r\n\r\n"),
    "one-line": (" ", " ", " "),  # WinoGrande's real layout
    "tabs-and-cr": ("\r\r", "\t", "\r"),
}


def _render(task: str, layout: str) -> dict:
    head, word, options, answer = FORMATS[task]
    before, between, trailer = LAYOUTS[layout]
    if word is None:
        instruction, labels = head, ["true", "false"]
    else:
        labels = [f"{word.lower()}{i}" for i in range(1, len(options) + 1)]
        marked = between.join(f"{word}{i}: {text}" for i, text in enumerate(options, start=1))
        instruction = head + before + marked
    instruction += f"{trailer}Answer format: {'/'.join(labels)}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("task", TASKS)
def test_every_task_format_in_every_layout(tmp_path, task, layout):
    head, word, options, answer = FORMATS[task]
    path = _write(tmp_path, f"{task}/test.json", json.dumps([_render(task, layout)] * 2))
    example = load_task(tmp_path, task)[0]
    expected = ("true", "false") if word is None else tuple(options)
    assert example.choices == expected
    assert example.choices[example.answer] == (answer if word is None else options[int(answer[-1]) - 1])
    assert example.prompt == head + "\nAnswer:"
    assert load_file(path)[1] == example


def test_a_carriage_return_stays_out_of_the_last_option():
    record = {
        "instruction": "Please choose the correct answer to the question: 5 + 7 = ?\r\n\r\nAnswer1: 11 Answer2: 12"
        "\r\n\r\nAnswer format: answer1/answer2",
        "answer": "answer2",
    }
    example = parse_record(record, "ARC-Easy", "ARC-Easy/test.json, record 0")
    assert example.choices == ("11", "12") and example.answer == 1


def test_one_line_options_end_at_the_answer_format():
    record = _render("winogrande", "one-line")
    assert "Option1: Sarah Option2: Maria Answer format: option1/option2" in record["instruction"]
    example = parse_record(record, "winogrande", "winogrande/test.json, record 0")
    assert example.choices == ("Sarah", "Maria") and example.answer == 1


@pytest.mark.parametrize(
    ("instruction", "message"),
    [
        # the answer format lists three options, the instruction marks two
        ("Q? Answer1: a Answer2: b Answer format: answer1/answer2/answer3", "cannot delimit the options"),
        ("Q? Answer1: a Answer1: b Answer format: answer1/answer2", "found Answer1:, Answer1:"),  # repeated
        ("Q? Answer2: a Answer1: b Answer format: answer1/answer2", "once each and in order"),  # out of order
        ("Q? Answer1: a Solution2: b Answer format: answer1/answer2", "found Answer1:, Solution2:"),  # mixed kinds
        ("Q? Option1: a Option2: Answer format: option1/option2", "option2 is empty"),
        ("Q? Option1: a Option2: b Option3: c Answer format: option1/option2", "expected the markers Option1: ..."),
        ("Q? no markers at all\n\nAnswer format: solution1/solution2", "found none"),
        ("Q? A) x B) y\n\nAnswer format: a/b", "unknown answer format 'a/b'"),
        ("Q? Answer1: x Answer2: y\n\nAnswer format:", "'Answer format:' lists no labels"),
    ],
)
def test_options_that_cannot_be_delimited_are_refused_naming_the_record(tmp_path, instruction, message):
    good = _render("ARC-Easy", "lf")
    label = re.search(r"format: (\w+)", instruction)
    bad = {"instruction": instruction, "input": "", "output": "", "answer": label.group(1) if label else "answer1"}
    path = _write(tmp_path, "ARC-Easy/test.json", json.dumps([good, good, bad]))
    with pytest.raises(CommonsenseDataError) as error:
        load_file(path)
    text = str(error.value)
    assert text.startswith("ARC-Easy/test.json, record 2: ") and message in text, text
    assert len(text.splitlines()) == 1


def test_a_boolq_answer_that_is_not_true_or_false(tmp_path):
    maybe = {**_render("boolq", "lf"), "answer": "maybe"}
    _write(tmp_path, "boolq/test.json", json.dumps([_render("boolq", "lf"), maybe]))
    with pytest.raises(CommonsenseDataError) as error:
        load_task(tmp_path, "boolq")
    assert str(error.value) == "boolq/test.json, record 1: answer 'maybe' is not one of the options 'true' or 'false'"
    with pytest.raises(CommonsenseDataError, match="record 0: answer 'answer1' is not one of the options 'option1'"):
        load_file(
            _write(tmp_path, "winogrande/test.json", json.dumps([{**_render("winogrande", "lf"), "answer": "answer1"}]))
        )


def _data_section(folder, task):
    from ubsmoe.config import load_config

    overrides = [
        "data.source=commonsense",
        f"data.path={folder}",
        f"data.tasks=[{task}]",
        "moe.tiers=[{budget: 1, clients: 1}]",
    ]
    return load_config(None, overrides).data


def test_a_task_file_with_one_record(tmp_path):
    from ubsmoe.data.federated import DataError, federated_data

    # no train.json: the one record would have to be both trained on and held out
    _write(tmp_path, "piqa/test.json", json.dumps([_piqa()]))
    with pytest.raises(DataError) as error:
        federated_data(_data_section(tmp_path, "piqa"), 1, None, None)
    text = str(error.value)
    assert "piqa/test.json holds 1 record" in text and "needs at least 2 records" in text, text
    # with a train.json, one record on either side is usable
    _write(tmp_path, "piqa/train.json", json.dumps([_piqa("solution2")]))

    class Characters:  # encode_for_training needs only __call__ / eos
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 97 + 1 for c in text]}

    data = federated_data(_data_section(tmp_path, "piqa"), 1, Characters(), None)
    assert len(data.train["piqa"]) == len(data.test["piqa"]) == 1


def test_the_dev_and_test_halves_are_disjoint_seeded_and_cover_the_held_out_examples():
    from ubsmoe.data.federated import split_dev_test
    from ubsmoe.data.multiple_choice import MultipleChoice

    examples = [MultipleChoice(f"q{i}", ("a", "b"), i % 2) for i in range(21)]
    dev, test = split_dev_test(examples, 0.5, seed=3, task="boolq")
    assert len(dev) == 10 and len(test) == 11  # round(10.5) = 10 (banker's rounding)
    assert {e.prompt for e in dev}.isdisjoint(e.prompt for e in test)
    assert sorted(e.prompt for e in dev + test) == sorted(e.prompt for e in examples)
    assert split_dev_test(examples, 0.5, seed=3, task="boolq") == (dev, test)  # seeded
    assert split_dev_test(examples, 0.5, seed=4, task="boolq")[0] != dev
    assert [len(part) for part in split_dev_test(examples[:2], 0.9, seed=0, task="t")] == [1, 1]


def test_the_evaluation_split_picks_disjoint_examples_from_the_held_out_ones(tmp_path):
    from ubsmoe.data.federated import federated_data

    class Characters:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 97 + 1 for c in text]}

    records = [_piqa("solution1" if i % 2 else "solution2") for i in range(12)]
    for i, record in enumerate(records):
        record["instruction"] = record["instruction"].replace("a jar", f"jar number {i}")
    _write(tmp_path, "piqa/test.json", json.dumps(records[:8]))
    _write(tmp_path, "piqa/train.json", json.dumps(records[8:]))
    section = _data_section(tmp_path, "piqa")
    every = federated_data(section, 1, Characters(), None).test["piqa"]
    dev = federated_data(section, 1, Characters(), None, eval_split="dev").test["piqa"]
    test = federated_data(section, 1, Characters(), None, eval_split="test").test["piqa"]
    assert len(dev) == len(test) == 4 and {e.prompt for e in dev}.isdisjoint(e.prompt for e in test)
    assert sorted(e.prompt for e in dev + test) == sorted(e.prompt for e in every)


# ---- LLM-Adapters' instruction form (the paper's generate protocol) -----------------------------------
def test_the_instruction_form_keeps_the_record_as_llm_adapters_trains_it():
    from ubsmoe.data.multiple_choice import INSTRUCTION_TEMPLATE
    from ubsmoe.metrics.generation import first_choice_match

    record = _piqa("solution2")
    example = parse_record(record, "piqa", "piqa/test.json, record 0", "instruction")
    assert example.prompt == INSTRUCTION_TEMPLATE.format(instruction=record["instruction"])
    assert "Solution1: Twist the lid." in example.prompt and "Answer format: solution1/solution2" in example.prompt
    assert example.choices == ("the correct answer is solution1", "the correct answer is solution2")
    assert example.choices[example.answer] == record["output"] and example.labels == ("solution1", "solution2")
    # a generation is read by its label, as LLM-Adapters extracts answers; one naming none is unmatched
    assert first_choice_match(" the correct answer is solution2.", example.generation_targets) == 1
    assert first_choice_match("Twist the lid.", example.generation_targets) is None
    plain = parse_record(record, "piqa", "piqa/test.json, record 0")
    assert plain.labels is None and plain.generation_targets == plain.choices == ("Twist the lid.", "Sing to it.")
    boolq = parse_record(
        {"instruction": "Is water wet?\n\nAnswer format: true/false", "answer": "false"}, "boolq", "b", "instruction"
    )
    assert boolq.labels == ("true", "false") and boolq.answer == 1
    with pytest.raises(CommonsenseDataError, match="record 3: answer 'solution3' is not one of the options"):
        parse_record(_piqa("solution3"), "piqa", "piqa/test.json, record 3", "instruction")


def test_real_test_sets_load_in_instruction_form():
    folder = _shared()
    for task in REAL_TASKS:
        examples = load_task(folder, task, "test", "instruction")
        assert len(examples) == list_tasks(folder)[task]["test"]
        assert all(e.prompt.endswith("### Response:\n") and "Answer format:" in e.prompt for e in examples)
        records = json.loads((folder / task / "test.json").read_text())
        assert [e.choices[e.answer] for e in examples] == [r["output"].strip() for r in records]
