"""benchmarks/tier_step.py: its pieces on a tiny MoEfied Llama and a tiny dense one, one repeat, and --help."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_moefication import tiny_llama  # noqa: E402

from ubsmoe.config import ExperimentConfig  # noqa: E402
from ubsmoe.models.moefication import MoEficationConfig, moefy  # noqa: E402
from ubsmoe.moe.model import moe_blocks  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "tier_step.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark(SCRIPT)


def encoded(rng: random.Random, n: int) -> list[dict[str, list[int]]]:
    """Examples as encode_for_training makes them: a prompt labelled -100, then the answer tokens."""
    out = []
    for _ in range(n):
        prompt = [rng.randrange(4, 128) for _ in range(rng.randint(6, 20))]
        answer = [rng.randrange(4, 128) for _ in range(rng.randint(1, 4))]
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def test_pieces_on_a_tiny_model(bench):
    config = ExperimentConfig()
    moe = moefy(
        tiny_llama(dtype=torch.float32),
        torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1)),
        MoEficationConfig(num_experts=4, calibration_tokens=256),
        config.ubsmoe_config(),
    )
    peft_model = bench.make_peft(tiny_llama(dtype=torch.float32), config)
    rng = random.Random(0)
    clients = [encoded(rng, 13), encoded(rng, 3)]  # client 1 holds no full batch of 4
    batches, owners = bench.pick_batches(clients, 4, 0, 0, 3)
    assert owners == [0, 0, 0] and all(len(b["input_ids"]) == 4 for b in batches)

    result = bench.measure(moe, peft_model, config, [1, 2, 4], batches, repeats=1, warmup=0, clients=owners)

    assert [t["k"] for t in result["tiers"]] == [1, 2, 4]
    k_max = result["tiers"][-1]
    assert k_max["time_ratio_to_k_max"] == 1.0 and k_max["flop_ratio_to_k_max"] == 1.0
    assert result["tiers"][0]["flop_ratio_to_k_max"] < 1.0
    for row in result["tiers"] + result["reference_rows"]:
        assert row["median_step_s"] > 0
    full = result["reference_rows"][0]
    assert full["name"] == "ubsmoe_k4_full_logits" and full["flop_ratio_to_k_max"] > 1.0
    assert all(len(steps) == 1 and len(steps[0]) == 3 for steps in result["per_step_s"].values())
    shapes = result["batches"]["total"]
    assert shapes["rows"] == 12 and 0 < shapes["labelled_tokens"] < shapes["tokens"] <= shapes["padded_tokens"]
    # at K = M the MoEfied model is the dense one and every LoRA B is zero: all first losses agree
    first = result["first_step_loss"]
    reference = first["peft_answer_only"][0]
    for name in ("ubsmoe_k4", "ubsmoe_k4_full_logits", "peft_full_logits"):
        assert first[name][0] == pytest.approx(reference, rel=1e-4)
    # runs' PG acts in update space; the paper's gradient space is timed beside it at the lowest and highest K,
    # from the same start (same first loss), and the blocks get their own config back
    gradient_rows = [row["name"] for row in result["reference_rows"] if row["name"].endswith("_pg_gradient")]
    assert config.pseudo_gradient.space == "update" and gradient_rows == [
        "ubsmoe_k1_pg_gradient",
        "ubsmoe_k4_pg_gradient",
    ]
    assert first["ubsmoe_k1_pg_gradient"][0] == pytest.approx(first["ubsmoe_k1"][0], rel=1e-6)
    assert {block.config.pg_space for block in moe_blocks(moe)} == {"update"}


def test_help():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--quick" in done.stdout
