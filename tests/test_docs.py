"""The documentation names every configuration key."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from ubsmoe.config import ExperimentConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


def config_keys(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += config_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_config_key_is_documented():
    text = (DOCS / "running.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z0-9_]+(?:\.[a-z0-9_]+)*)`", text))
    wildcard = {key[:-2] for key in re.findall(r"`([a-z_]+\.\*)`", text)}
    missing = [key for key in config_keys() if key not in documented and key.split(".")[0] not in wildcard]
    assert not missing, f"keys missing from docs/running.md: {missing}"
    assert "federation.rounds" in config_keys() and "moe.tiers" in config_keys()


def test_every_file_a_run_writes_is_in_the_outputs_table():
    from ubsmoe.fl.outdir import RUN_OUTPUTS

    text = (DOCS / "running.md").read_text(encoding="utf-8")
    outputs = text[text.index("## Outputs") : text.index("### Output folders and resume")]
    missing = [name for name in RUN_OUTPUTS if f"`{name}" not in outputs]
    assert not missing, f"files a run writes missing from the outputs table of docs/running.md: {missing}"
