"""Plain text for calibrating MoEfication and for held-out perplexity, from BIG-bench task files.

The two task sets are disjoint from each other and from the tasks used for fine-tuning and
evaluation (`ubsmoe.config.DEFAULT_TASKS`: social_iqa, winowhy, ...), so neither the router fit nor the perplexity
sees evaluation text. Each example becomes "input target" with its gold target.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ubsmoe.data.bigbench import load_bigbench_task

CALIBRATION_TASKS = (
    "abstract_narrative_understanding/4_distractors",
    "moral_permissibility",
    "presuppositions_as_nli",
    "fantasy_reasoning",
    "implicatures",
)
HELDOUT_TASKS = ("understanding_fables", "disambiguation_qa", "figure_of_speech_detection")


def _gold(example: dict[str, Any]) -> str:
    scores = example.get("target_scores")
    if isinstance(scores, dict) and scores:
        return str(max(scores, key=lambda k: float(scores[k])))
    target = example.get("target", "")
    return str(target[0] if isinstance(target, list) and target else target)


def task_texts(names: Iterable[str], progress: Callable[[str], None] | None = None) -> list[str]:
    """One text per example ("input gold-target") of each named BIG-bench task, in file order.

    `progress(text)` is told of a BIG-bench download or extraction (slow the first time on a machine).
    """
    texts = []
    for name in names:
        for example in load_bigbench_task(name, progress).get("examples", []):
            if isinstance(example, dict) and isinstance(example.get("input"), str):
                texts.append(f"{example['input'].strip()} {_gold(example).strip()}".strip())
    return texts


def token_blocks(
    tokenizer: Any, texts: Sequence[str], block_size: int, max_tokens: int, seed: int = 0
) -> list[list[int]]:
    """Shuffle the texts (seeded), join them with the EOS token and cut into full blocks, up to max_tokens."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for index in order:
        stream += tokenizer(texts[index], add_special_tokens=False)["input_ids"] + separator
        if len(stream) >= max_tokens:
            break
    usable = min(len(stream), max_tokens) // block_size * block_size
    return [stream[i : i + block_size] for i in range(0, usable, block_size)]
