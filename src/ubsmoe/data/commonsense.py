"""LLM-Adapters commonsense data (the UB-SMoE paper's Commonsense-15K benchmark) from a local folder.

Layout accepted (the one of LLM-Adapters' `dataset/` folder)::

    <folder>/commonsense_15k.json      training mix (optional), also commonsense_170k.json
    <folder>/<task>/test.json          one of the eight tasks in `TASKS`
    <folder>/<task>/train.json         where the task has one

Every file is either a JSON array of records (`.json`) or one record per line (`.jsonl`). A record is
an object with `instruction` (the question, its options and "Answer format: ..."), `input` (empty),
`output` ("the correct answer is answerN") and `answer` (the label: answerN, solutionN, optionN,
endingN, true/false). Records become `MultipleChoice` examples through `from_llm_adapters`, whatever the
whitespace between the options and the answer format (blank lines, CRLF, or all on one line as in
WinoGrande's test file); a record whose options cannot be delimited, or whose answer is not one of
them, is refused with its location rather than scored with a wrong option text.

A malformed file or record raises `CommonsenseDataError` with one message naming the file, the
record (0-based index into a JSON array, as in `data[17]`) or line (1-based, for `.jsonl`), and
what was expected.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from ubsmoe.data.multiple_choice import MultipleChoice, from_llm_adapters, instruction_form

TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
MIXES = ("commonsense_15k", "commonsense_170k")
SPLITS = ("train", "test")
SUFFIXES = (".json", ".jsonl")
PROMPT_FORMATS = ("options", "instruction")
"""options: the question and each option's text scored (`from_llm_adapters`); instruction: LLM-Adapters'
own template and "the correct answer is answerN" targets (`instruction_form`)."""

T = TypeVar("T")


class CommonsenseDataError(ValueError):
    """A commonsense data folder, file or record that cannot be used."""


def _show(path: Path) -> str:
    """The file with its folder's name, e.g. `piqa/test.json`, for messages."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """The raw records of a `.json` (array) or `.jsonl` file, each with its location ("record 3", "line 4")."""
    path = Path(path)
    name = _show(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CommonsenseDataError(f"{name}: file not found ({path})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CommonsenseDataError(f"{name}: cannot be read as UTF-8 text ({error})") from None
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise CommonsenseDataError(
                    f"{name}, line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                    "expected one JSON object per line"
                ) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise CommonsenseDataError(
                f"{name}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                "expected a JSON array of records (use the .jsonl suffix for one record per line)"
            ) from None
        if not isinstance(data, list):
            raise CommonsenseDataError(f"{name}: expected a JSON array of records, got a JSON {type(data).__name__}")
        records = [(f"record {index}", record) for index, record in enumerate(data)]
    if not records:
        raise CommonsenseDataError(f"{name}: holds no records")
    return records


_FORMAT = re.compile(r"Answer format:\s*(\S+)", re.IGNORECASE)


def _expected_labels(instruction: Any) -> str:
    """The labels the instruction's "Answer format:" allows, as "'a', 'b' or 'c'", for messages."""
    match = _FORMAT.search(instruction) if isinstance(instruction, str) else None
    if match is None:
        return "a label such as 'answer1', 'solution1', 'option1', 'ending1' or 'true'/'false'"
    labels = [f"'{label}'" for label in match.group(1).split("/") if label]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]


def infer_task(record: Any) -> str:
    """The task family of a training-mix record, from its instruction (the mix records carry no task name).

    boolq, piqa, winogrande and hellaswag are recognised by their wording; ARC-Easy, ARC-Challenge,
    openbookqa and social_i_qa share one wording and give "qa".
    """
    instruction = record.get("instruction", "") if isinstance(record, dict) else ""
    answer_format = _FORMAT.search(instruction)
    labels = answer_format.group(1).lower() if answer_format else ""
    if labels.startswith("true"):
        return "boolq"
    if labels.startswith("solution"):
        return "piqa"
    if labels.startswith("option"):
        return "winogrande"
    if labels.startswith("ending"):
        return "hellaswag"
    return "qa"


def parse_record(record: Any, task: str, where: str, prompt_format: str = "options") -> MultipleChoice:
    """One record as a `MultipleChoice` in `prompt_format` (`PROMPT_FORMATS`); `where` ("piqa/test.json,
    record 17") prefixes any error."""
    if not isinstance(record, dict):
        raise CommonsenseDataError(
            f"{where}: expected a JSON object with 'instruction' and 'answer', got a JSON {type(record).__name__}"
        )
    instruction = record.get("instruction")
    if "instruction" not in record:
        raise CommonsenseDataError(f"{where}: field 'instruction' is missing (expected the question with its options)")
    if not isinstance(instruction, str) or not instruction.strip():
        raise CommonsenseDataError(f"{where}: field 'instruction' must be a non-empty string, got {instruction!r}")
    if "answer" not in record:
        raise CommonsenseDataError(f"{where}: field 'answer' is missing (expected {_expected_labels(instruction)})")
    answer = record["answer"]
    if not isinstance(answer, str) or not answer.strip():
        raise CommonsenseDataError(
            f"{where}: field 'answer' must be a non-empty string, got {answer!r} (expected {_expected_labels(instruction)})"
        )
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; expected one of {PROMPT_FORMATS}")
    try:
        return (instruction_form if prompt_format == "instruction" else from_llm_adapters)(record, task)
    except ValueError as error:
        raise CommonsenseDataError(f"{where}: {error}") from None


def load_file(
    path: str | Path, task: str | None = None, infer: bool = False, prompt_format: str = "options"
) -> list[MultipleChoice]:
    """All records of one file as examples (in `prompt_format`).

    `task` names them (default: the file's folder name for `<task>/<split>.json`, else its stem);
    `infer=True` names each by `infer_task` instead (for the training mixes).
    """
    path = Path(path)
    name = task or (path.parent.name if path.stem in SPLITS else path.stem)
    shown = _show(path)
    return [
        parse_record(record, infer_task(record) if infer else name, f"{shown}, {where}", prompt_format)
        for where, record in read_records(path)
    ]


def _folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CommonsenseDataError(
            f"commonsense data folder {folder} does not exist (expected LLM-Adapters' dataset folder holding "
            f"<task>/test.json for tasks among {', '.join(TASKS)}, and/or {MIXES[0]}.json)"
        )
    return folder


def _find(folder: Path, stem: str) -> Path | None:
    """`<folder>/<stem>.json` or `.jsonl`; case-insensitive on the names (arc-easy/ARC-Easy)."""
    if not folder.is_dir():
        return None
    wanted = {stem.lower() + suffix: suffix for suffix in SUFFIXES}
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower() in wanted)
    return found[0] if found else None


def _task_dir(folder: Path, task: str) -> Path | None:
    matches = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.lower() == task.lower())
    return matches[0] if matches else None


def _canonical(task: str) -> str:
    for known in TASKS:
        if known.lower() == task.lower():
            return known
    raise CommonsenseDataError(f"unknown commonsense task {task!r}; known tasks: {', '.join(TASKS)}")


def task_file(folder: str | Path, task: str, split: str = "test") -> Path | None:
    """The file of a task's split (`<folder>/<task>/<split>.json` or `.jsonl`), or None when absent."""
    if split not in SPLITS:
        raise CommonsenseDataError(f"unknown split {split!r}; expected one of {SPLITS}")
    folder = _folder(folder)
    directory = _task_dir(folder, _canonical(task))
    return _find(directory, split) if directory else None


def load_task(
    folder: str | Path, task: str, split: str = "test", prompt_format: str = "options"
) -> list[MultipleChoice]:
    """A task's split as examples named by the task (e.g. `load_task(folder, "piqa")`), in `prompt_format`."""
    task = _canonical(task)
    path = task_file(folder, task, split)
    if path is None:
        raise CommonsenseDataError(f"{task}/{split}.json (or .jsonl) not found in {folder}")
    return load_file(path, task, prompt_format=prompt_format)


def load_mix(folder: str | Path, name: str = "commonsense_15k", infer: bool = True) -> list[MultipleChoice]:
    """A training mix (`commonsense_15k.json` / `commonsense_170k.json`); examples named by `infer_task`."""
    stem = name.removesuffix(".jsonl").removesuffix(".json")
    path = _find(_folder(folder), stem)
    if path is None:
        raise CommonsenseDataError(f"{stem}.json not found in {folder}")
    return load_file(path, stem, infer=infer)


def _count(path: Path) -> int:
    return len(read_records(path))


def list_tasks(folder: str | Path, missing_ok: bool = False) -> dict[str, dict[str, int]]:
    """The known tasks and training mixes in a folder with their split sizes.

    E.g. `{"piqa": {"test": 1838}, "boolq": {"train": 9427, "test": 3270}, "commonsense_15k": {"train": 15000}}`:
    tasks in `TASKS` order, then mixes. Raises when the folder holds none of them (unless `missing_ok`).
    Sizes come from reading each file, so a malformed file raises here too.
    """
    folder = _folder(folder)
    found: dict[str, dict[str, int]] = {}
    for task in TASKS:
        directory = _task_dir(folder, task)
        if directory is None:
            continue
        sizes = {split: _count(path) for split in SPLITS if (path := _find(directory, split)) is not None}
        if sizes:
            found[task] = sizes
    for mix in MIXES:
        path = _find(folder, mix)
        if path is not None:
            found[mix] = {"train": _count(path)}
    if not found and not missing_ok:
        raise CommonsenseDataError(
            f"{folder} holds none of the known commonsense tasks (expected <task>/test.json or <task>/train.json "
            f"for tasks among {', '.join(TASKS)}, or {MIXES[0]}.json / {MIXES[1]}.json)"
        )
    return found


def split_train_test(examples: Sequence[T], test_fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """A seeded random split for tasks without a train split: (train, test), disjoint, each in input order.

    The test part has round(n * test_fraction) items, at least one and leaving at least one to train.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    n = len(examples)
    if n < 2:
        raise ValueError(f"cannot split {n} example(s) into non-empty train and test parts")
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test_indices = set(order[:n_test])
    train = [e for i, e in enumerate(examples) if i not in test_indices]
    test = [e for i, e in enumerate(examples) if i in test_indices]
    return train, test
