"""Multiple-choice examples from BIG-bench task files and LLM-Adapters commonsense records.

Both become `MultipleChoice(prompt, choices, answer)`: the option *texts* are scored where they are
known (more signal for a small model than the labels "answer1".."answer5"). `instruction_form` keeps
an LLM-Adapters record as that project trains and tests it instead: its instruction (question, options
and "Answer format: ...") in the instruction template, the target "the correct answer is answerN", and
the labels a generation names (LLM-Adapters' answer extraction).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MultipleChoice:
    prompt: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    task: str = ""
    labels: tuple[str, ...] | None = None
    """What a generation names to choose each option (e.g. answer1..answerN); None: the option texts."""

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"a multiple-choice example needs at least two choices, got {list(self.choices)}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index {self.answer} is outside the {len(self.choices)} choices")
        if self.labels is not None and len(self.labels) != len(self.choices):
            raise ValueError(f"{len(self.labels)} labels for {len(self.choices)} choices")

    @property
    def generation_targets(self) -> tuple[str, ...]:
        """The strings the `generate` protocol looks for in a generation, one per choice."""
        return self.labels if self.labels is not None else self.choices


def from_bigbench(task: Mapping[str, Any], name: str = "") -> list[MultipleChoice]:
    """Examples of a BIG-bench task.json that have `target_scores` (the best-scored choice is the answer)."""
    prefix = task.get("example_input_prefix", "\nQ: ") if isinstance(task, Mapping) else ""
    suffix = task.get("example_output_prefix", "\nA: ") if isinstance(task, Mapping) else ""
    examples = []
    for index, example in enumerate(task.get("examples", [])):
        scores = example.get("target_scores") if isinstance(example, Mapping) else None
        if not isinstance(scores, Mapping) or len(scores) < 2 or not isinstance(example.get("input"), str):
            continue
        choices = tuple(str(c) for c in scores)
        values = [float(v) for v in scores.values()]
        best = max(range(len(values)), key=values.__getitem__)
        if values.count(values[best]) > 1:
            continue  # ambiguous gold
        prompt = (prefix + example["input"]).strip() + suffix.rstrip(" ")
        examples.append(MultipleChoice(prompt, choices, best, name or f"example {index}"))
    return examples


_MARK = re.compile(r"\b(Answer|Solution|Option|Ending)[ \t]*(\d+)[ \t]*:", re.IGNORECASE)
_TRAILER = re.compile(r"\bAnswer[ \t]*format[ \t]*:", re.IGNORECASE)
_LABELS = re.compile(r"\s*([A-Za-z]+\d*(?:[ \t]*/[ \t]*[A-Za-z]+\d*)*)")
_LABEL = re.compile(r"(answer|solution|option|ending)(\d+)")
_BOOLEAN = ("true", "false")


def _quoted(labels: list[str]) -> str:
    shown = [f"'{label}'" for label in labels]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def _answer_format(instruction: str) -> tuple[str, list[str] | None]:
    """(the instruction without its trailing "Answer format: a/b/c", the labels it lists or None when absent).

    Whatever whitespace precedes the trailer (a blank line, a CRLF pair, one space on a one-line layout).
    """
    trailers = list(_TRAILER.finditer(instruction))
    if not trailers:
        return instruction, None
    last = trailers[-1]
    labels = _LABELS.match(instruction, last.end())
    if labels is None:
        raise ValueError(f"'Answer format:' lists no labels (expected e.g. 'answer1/answer2'): {instruction[-80:]!r}")
    return instruction[: last.start()], [label.strip().lower() for label in labels.group(1).split("/")]


def from_llm_adapters(record: Mapping[str, Any], task: str = "") -> MultipleChoice:
    """An LLM-Adapters commonsense record (instruction, answer): option texts parsed from the instruction.

    Handles "Answer1: ... Answer2: ..." (ARC, OpenBookQA, Social IQa), "Solution1/2" (PIQA),
    "Option1/2" (WinoGrande), "Ending1..4" (HellaSwag) and true/false (BoolQ), each with the trailing
    "Answer format: ..." and in any whitespace layout: options on their own lines (LF or CRLF) or all
    on one line ("... Option1: Sarah Option2: Maria Answer format: option1/option2").

    Raises ValueError when the options cannot be delimited (markers missing, repeated, out of order,
    an empty option, markers that disagree with the answer format) or the answer is not one of them:
    a record is refused rather than scored with a wrong option text.
    """
    return _parse_llm_adapters(record, task)[0]


INSTRUCTION_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
"""LLM-Adapters' prompt (the Alpaca template without input), which its commonsense training and evaluation use."""

ANSWER_SENTENCE = "the correct answer is {label}"
"""LLM-Adapters' target for every commonsense record (its `output` field)."""


def instruction_form(record: Mapping[str, Any], task: str = "") -> MultipleChoice:
    """An LLM-Adapters record as that project uses it: the whole instruction (question, options, answer
    format) in `INSTRUCTION_TEMPLATE`, one choice "the correct answer is <label>" per label, and the labels
    as what a generation names (`MultipleChoice.labels`). Validated like `from_llm_adapters` (same errors)."""
    example, labels = _parse_llm_adapters(record, task)
    instruction = str(record["instruction"]).replace("\r\n", "\n").replace("\r", "\n").strip()
    choices = tuple(ANSWER_SENTENCE.format(label=label) for label in labels)
    return MultipleChoice(INSTRUCTION_TEMPLATE.format(instruction=instruction), choices, example.answer, task, labels)


def _parse_llm_adapters(record: Mapping[str, Any], task: str) -> tuple[MultipleChoice, tuple[str, ...]]:
    """`from_llm_adapters`'s example and the record's labels (answer1.., solution1.., true/false) in order."""
    instruction, answer = record.get("instruction"), record.get("answer")
    if not isinstance(instruction, str) or not isinstance(answer, str):
        raise ValueError("expected string fields 'instruction' and 'answer'")
    answer = answer.strip().lower()
    text = instruction.replace("\r\n", "\n").replace("\r", "\n")
    body, labels = _answer_format(text)
    marks = list(_MARK.finditer(body))
    if (labels is not None and sorted(labels) == sorted(_BOOLEAN)) or (labels is None and not marks):
        if answer not in _BOOLEAN and labels is None:
            raise ValueError(
                f"no options (Answer1:, Solution1:, ...) and no 'Answer format:' found in the instruction, and "
                f"answer {answer!r} is not 'true' or 'false'"
            )
        if answer not in _BOOLEAN:
            raise ValueError(f"answer {answer!r} is not one of the options 'true' or 'false'")
        return MultipleChoice(body.strip() + "\nAnswer:", _BOOLEAN, _BOOLEAN.index(answer), task), _BOOLEAN
    if labels is not None:
        parsed = [_LABEL.fullmatch(label) for label in labels]
        expected = [f"{parsed[0].group(1)}{i}" for i in range(1, len(labels) + 1)] if parsed[0] else []
        if labels != expected or len(labels) < 2:
            raise ValueError(
                f"unknown answer format {'/'.join(labels)!r}; expected true/false or numbered labels of one kind "
                "from 1, e.g. answer1/answer2/answer3, solution1/solution2, option1/option2, ending1/.../ending4"
            )
        if answer not in labels:
            raise ValueError(f"answer {answer!r} is not one of the options {_quoted(labels)}")
        kind = parsed[0].group(1)
    else:
        kind = marks[0].group(1).lower()
    count = len(labels) if labels is not None else len(marks)
    wanted = [f"{kind}{i}" for i in range(1, count + 1)]
    found = [f"{m.group(1).lower()}{m.group(2)}" for m in marks]
    if found != wanted or count < 2:
        name = kind.capitalize()
        got = ", ".join(f"{m.group(1).capitalize()}{m.group(2)}:" for m in marks) or "none"
        raise ValueError(
            f"cannot delimit the options: expected the markers {name}1: ... {name}{max(count, 2)}: "
            f"once each and in order, found {got}"
        )
    ends = [m.start() for m in marks[1:]] + [len(body)]
    texts = [body[m.end() : end].strip() for m, end in zip(marks, ends, strict=True)]
    empty = [f"{kind}{i}" for i, option in enumerate(texts, start=1) if not option]
    if empty:
        raise ValueError(f"cannot delimit the options: {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty")
    if answer not in wanted:
        raise ValueError(f"answer {answer!r} is not one of the options {_quoted(wanted)}")
    question = body[: marks[0].start()].strip()
    return MultipleChoice(question + "\nAnswer:", tuple(texts), wanted.index(answer), task), tuple(wanted)


def parse_all(records: Iterable[Mapping[str, Any]], task: str) -> list[MultipleChoice]:
    return [from_llm_adapters(r, task) for r in records]
