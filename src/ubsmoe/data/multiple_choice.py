"""Multiple-choice examples from BIG-bench task files and LLM-Adapters commonsense records.

Both become `MultipleChoice(prompt, choices, answer)`: the option *texts* are scored where they are
known (more signal for a small model than the labels "answer1".."answer5").
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

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"a multiple-choice example needs at least two choices, got {list(self.choices)}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index {self.answer} is outside the {len(self.choices)} choices")


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


_OPTION = re.compile(r"(Answer|Solution|Option|Ending)\s*(\d+)\s*:\s*", re.IGNORECASE)


def from_llm_adapters(record: Mapping[str, Any], task: str = "") -> MultipleChoice:
    """An LLM-Adapters commonsense record (instruction, answer): option texts parsed from the instruction.

    Handles "Answer1: ... Answer2: ..." (ARC, OpenBookQA, Social IQa), "Solution1/2" (PIQA),
    "Option1/2" (WinoGrande), "Ending1..4" (HellaSwag) and true/false (BoolQ).
    """
    instruction, answer = record.get("instruction"), record.get("answer")
    if not isinstance(instruction, str) or not isinstance(answer, str):
        raise ValueError("expected string fields 'instruction' and 'answer'")
    answer = answer.strip().lower()
    body = instruction.split("\n\nAnswer format:")[0]
    if answer in ("true", "false"):
        question = body.strip()
        return MultipleChoice(question + "\nAnswer:", ("true", "false"), 0 if answer == "true" else 1, task)
    marks = list(_OPTION.finditer(body))
    if len(marks) < 2:
        raise ValueError(f"no options (Answer1:, Solution1:, ...) found in instruction {instruction[:80]!r}")
    question = body[: marks[0].start()].strip()
    texts = [
        body[m.end() : (marks[i + 1].start() if i + 1 < len(marks) else len(body))].strip() for i, m in enumerate(marks)
    ]
    labels = [f"{m.group(1).lower()}{m.group(2)}" for m in marks]
    if answer not in labels:
        raise ValueError(f"answer {answer!r} is not one of the options {labels}")
    return MultipleChoice(question + "\nAnswer:", tuple(texts), labels.index(answer), task)


def parse_all(records: Iterable[Mapping[str, Any]], task: str) -> list[MultipleChoice]:
    return [from_llm_adapters(r, task) for r in records]
