"""Tiny models on disk, with a character-level tokenizer: for tests, examples and quick trials of the pipeline.

`save_tiny_model(directory, "olmoe")` writes a randomly initialised native MoE (`tiny_config`, with
room for 512 positions) and a tokenizer that maps every printable ASCII character to one token, in
the layout `from_pretrained` reads; `model.name: <directory>` in a config then runs the whole
federated pipeline in seconds. Nothing is downloaded.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

import torch

from ubsmoe.models.native import require_transformers, tiny_config

__all__ = ["char_tokenizer", "save_tiny_model"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3: pad, bos, eos as in tiny_config


def char_tokenizer() -> Any:
    """A transformers fast tokenizer with one token per printable ASCII character (100 + 4 special ids)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    transformers = require_transformers()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_model(
    directory: str | os.PathLike[str], model_type: str = "olmoe", seed: int = 0, **overrides: Any
) -> Path:
    """Write a tiny random `model_type` model and the character tokenizer to `directory`; returns it."""
    transformers = require_transformers()
    tokenizer = char_tokenizer()
    values = {"max_position_embeddings": 512, **overrides}
    config = tiny_config(model_type, **values)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
