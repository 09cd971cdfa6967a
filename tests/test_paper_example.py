"""examples/paper_olmoe_commonsense.yaml, the paper's experiment as a file, run end to end so that it cannot rot.

The run goes through `ubsmoe run` with the file itself and only the overrides a CPU test needs: a tiny random
OLMoE on disk (64 -> 16 experts, native top-8 kept, so the tiers' K are the paper's 2 / 4 / 6 / 8), the CPU in
float32, one round of one local step, one evaluation example per task and a fixture with all eight commonsense
tasks in LLM-Adapters' format (tests/fixtures/commonsense_paper; invented records, not the real data).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from ubsmoe.cli import app  # noqa: E402
from ubsmoe.config import load_config  # noqa: E402
from ubsmoe.data.commonsense import TASKS  # noqa: E402
from ubsmoe.models.tiny import save_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "paper_olmoe_commonsense.yaml"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "commonsense_paper"


@pytest.fixture
def one_thread():
    """A tiny model's kernels are too small to share out: on a busy 2-core machine two threads wait on each other
    (measured: the run takes 4 s with one thread, 50 s with two while other processes load the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_file_holds_the_papers_setup():
    config = load_config(EXAMPLE)
    assert config.method == "ubsmoe"
    assert config.model.name == "allenai/OLMoE-1B-7B-0924" and config.model.kind == "native"
    assert (config.device, config.model.dtype) == ("cuda", "bfloat16")
    assert [t.budget for t in config.moe.tiers] == [0.25, 0.5, 0.75, 1.0]
    assert sorted(set(config.client_top_ks(8))) == [2, 4, 6, 8]  # OLMoE's native top-8
    assert config.data.source == "commonsense" and config.data.tasks == list(TASKS)
    assert config.evaluation.protocol == "generate"
    assert config.dmr_active and config.pseudo_gradient_active


def test_the_file_runs_end_to_end_on_a_tiny_olmoe(tmp_path, one_thread):
    model = save_tiny_model(
        tmp_path / "model", "olmoe", num_experts=16, num_experts_per_tok=8, max_position_embeddings=1024
    )
    overrides = [
        f"model.name={model}",
        "device=cpu",
        "model.dtype=float32",
        f"data.path={FIXTURE}",
        "federation.rounds=1",
        "federation.local_steps=1",
        "federation.batch_size=1",
        "evaluation.examples_per_task=1",
        "evaluation.max_new_tokens=4",
        "evaluation.every=1",
        "output.plots=false",
        "output.tensorboard=false",
    ]
    out = tmp_path / "out"
    sets = [part for item in overrides for part in ("--set", item)]
    result = CliRunner().invoke(app, ["run", "--config", str(EXAMPLE), *sets, "--out", str(out)])
    assert result.exit_code == 0, result.output

    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"]["protocol"] == "generate"
    assert [tier["top_k"] for tier in summary["tiers"]] == [2, 4, 6, 8]
    assert [len(tier["clients"]) for tier in summary["tiers"]] == [5, 5, 5, 5]
    for tier in summary["tiers"]:
        assert set(tier["accuracy"]["per_task"]) == set(TASKS)
        assert 0.0 <= tier["accuracy"]["mean"] <= 1.0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 20  # every client trained in the round
    # everything but the overrides reached the run as the file says
    expected = load_config(EXAMPLE, overrides).to_dict()
    assert summary["config"] == expected
    file_only = load_config(EXAMPLE).to_dict()
    for section in ("moe", "dmr", "pseudo_gradient", "lora"):
        assert summary["config"][section] == file_only[section]
