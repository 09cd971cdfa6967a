"""benchmarks/gpu_check.py on a CPU: the correctness check and a timing pass with small dimensions, in float32 and
bfloat16 (the device placement and bf16 paths the GPU run takes), a fault it must catch, and the no-CUDA skip."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import ubsmoe.moe.experts as experts_module  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
SMALL = {"hidden": 64, "intermediate": 32, "experts": 8, "top_k": 4, "rank": 8, "alpha": 16.0}


@pytest.fixture(autouse=True)
def one_thread():
    """Small kernels: on a busy 2-core machine two threads mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def check():
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("gpu_check_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path[:] = saved  # the script puts benchmarks/ on the path to import moe_contenders beside it
    yield module
    sys.modules.pop("moe_contenders", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fast_path_matches_the_eager_reference(check, dtype):
    result = check.check_correctness("cpu", dtype, **SMALL, tokens=48)
    assert result["passed"], json.dumps(result, indent=1)
    cases = result["cases"]
    assert {(c["lora_projection"], c["k"]) for c in cases} == {(p, k) for p in ("rows", "tokens") for k in (1, 2, 4)}
    assert all(c["fast_path"] == "grouped_mm" for c in cases)  # the fast path really ran, not eager vs eager
    names = set(cases[0]["relative_errors"])
    assert {"output", "input_grad", "grad.phi", "grad.lora.lora_A.gate", "grad.lora.lora_B.down"} <= names


def test_a_wrong_fast_path_fails_the_check(check, monkeypatch):
    original = experts_module.make_grouped_linear

    def off_by_a_little(counts, implementation):
        linear = original(counts, implementation)
        return (lambda rows, weight: linear(rows, weight) * 1.001) if implementation == "grouped_mm" else linear

    monkeypatch.setattr(experts_module, "make_grouped_linear", off_by_a_little)
    result = check.check_correctness("cpu", torch.float32, **SMALL, tokens=48, ks=[2], projections=["rows"])
    assert not result["passed"]
    assert 5e-4 < result["cases"][0]["max_relative_error"] < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_timing_pass(check, dtype):
    result = check.time_steps("cpu", dtype, **SMALL, ks=[1, 2], tokens=64, repeats=1, warmup=0)
    assert [row["k"] for row in result["per_k"]] == [1, 2, 4]  # K_max is always timed
    assert result["dtype"] == str(dtype).removeprefix("torch.") and result["repeats"] == 1
    for row in result["per_k"]:
        assert all(t > 0 for t in row["time_s"].values()) and row["speedup_vs_hf_peft"] > 0
    assert result["per_k"][-1]["time_ratio_to_k_max"]["ubsmoe"] == 1.0
    assert result["per_k"][0]["flop_ratio_to_k_max"] < result["per_k"][1]["flop_ratio_to_k_max"] < 1.0


def test_main_on_the_cpu_prints_one_json(check, capsys):
    args = ["--device", "cpu", "--hidden", "64", "--intermediate", "32", "--experts", "8", "--top-k", "4"]
    args += ["--ks", "1,2", "--rank", "8", "--tokens", "32", "--check-tokens", "16", "--repeats", "1", "--warmup", "0"]
    assert check.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] and not result["skipped"]
    assert [c["dtype"] for c in result["correctness"]] == ["float32", "bfloat16"]
    assert result["timing"]["dtype"] == "bfloat16"
    assert set(result["summary"]["speedup_vs_hf_peft"]) == {"1", "2", "4"}
    assert {"torch", "transformers", "peft", "cpu"} <= set(result["environment"])


def test_without_cuda_it_skips_with_a_reason(check, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check.main([]) == 0  # --device cuda is the default
    result = json.loads(capsys.readouterr().out)
    assert result["skipped"] is True and "CUDA is not available" in result["reason"]
    assert result["environment"]["torch"] == torch.__version__
