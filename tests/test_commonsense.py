import json
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
    assert winogrande[0].choices == ("cup", "box") and [e.answer for e in winogrande] == [0, 1, 0]
    assert "_" in winogrande[0].prompt
    train = load_task(FIXTURES, "WinoGrande", split="train")  # .jsonl, names matched case-insensitively
    assert len(train) == 3 and train[0].answer == 1 and train[0].task == "winogrande"
    mix = load_mix(FIXTURES)
    assert [e.task for e in mix] == ["boolq", "piqa", "qa", "qa", "hellaswag", "winogrande", "boolq", "qa"]
    assert mix[0].choices == ("true", "false") and mix[6].answer == 1
    assert mix[7].choices[1] == "chlorophyll" and len(mix[7].choices) == 5
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
