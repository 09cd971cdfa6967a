"""`ubsmoe run` end to end on a tiny native MoE and small synthetic LLM-Adapters-format data.

Covers: the outputs of the DESIGN 6 contract, determinism, resume after an interruption, a NaN update
dropped while the run carries on, a malformed data line and an invalid config each giving one clear
message (exit code 2, no traceback), and DMR lowering the utilization CV against a run without it.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from ubsmoe.cli import app  # noqa: E402
from ubsmoe.config import load_config  # noqa: E402
from ubsmoe.fl import (
    rounds,  # noqa: E402
)
from ubsmoe.fl.experiment import Reporter, run_experiment  # noqa: E402
from ubsmoe.fl.simulation import TIMING_KEYS  # noqa: E402
from ubsmoe.models.tiny import save_tiny_model  # noqa: E402
from ubsmoe.report import progress  # noqa: E402

QUICK = [
    "federation.rounds=2",
    "federation.local_steps=2",
    "federation.batch_size=4",
    "evaluation.examples_per_task=6",
    "evaluation.heldout_tokens=0",
    "output.tensorboard=false",
]


def _arc(a: int, b: int, rng: random.Random) -> dict:
    options = [str(a + b), str(a + b + 1), str(a + b + 2)]
    rng.shuffle(options)
    answer = options.index(str(a + b)) + 1
    return {
        "instruction": f"Please choose the correct answer to the question: {a}+{b}=?\n\nAnswer1: {options[0]} "
        f"Answer2: {options[1]} Answer3: {options[2]}\n\nAnswer format: answer1/answer2/answer3",
        "input": "",
        "output": f"the correct answer is answer{answer}",
        "answer": f"answer{answer}",
    }


def _boolq(a: int, b: int) -> dict:
    truth = str(a > b).lower()
    return {
        "instruction": f"Please answer the following question with true or false, question: is {a} > {b}?"
        "\n\nAnswer format: true/false",
        "input": "",
        "output": f"the correct answer is {truth}",
        "answer": truth,
    }


def write_data(folder: Path, examples: int = 60) -> Path:
    rng = random.Random(0)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(examples)]
    for task, records in (
        ("ARC-Easy", [_arc(a, b, rng) for a, b in pairs]),
        ("boolq", [_boolq(a, b) for a, b in pairs]),
    ):
        (folder / task).mkdir(parents=True, exist_ok=True)
        (folder / task / "test.json").write_text(json.dumps(records), encoding="utf-8")
    return folder


def write_experiment(root: Path) -> dict:
    """A tiny OLMoE on disk, synthetic data and a config with two tiers of two clients (shared by other tests)."""
    model = save_tiny_model(root / "model", "olmoe")
    data = write_data(root / "data")
    config = root / "config.yaml"
    config.write_text(
        f"model: {{name: {model}}}\n"
        "moe:\n  tiers: [{budget: 0.5, clients: 2}, {budget: 1.0, clients: 2}]\n"
        f"data: {{source: commonsense, path: {data}, tasks: [ARC-Easy, boolq], max_length: 128}}\n",
        encoding="utf-8",
    )
    return {"root": root, "config": config, "model": model, "data": data}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_experiment(tmp_path_factory.mktemp("run"))


def _config(setup, *extra: str):
    return load_config(setup["config"], [*QUICK, *extra])


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _lines(out: Path) -> list[dict]:
    return [_without_timing(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(setup):
    out = setup["root"] / "reference"
    summary = run_experiment(_config(setup, "output.tensorboard=true"), out)
    return out, summary


def test_outputs_follow_the_contract(reference):
    out, summary = reference
    saved = json.loads((out / "summary.json").read_text())
    for key in ("config", "seed", "versions", "method", "tiers", "balance", "evaluation"):
        assert key in saved
    assert saved["evaluation"]["protocol"] == "loglik"
    assert saved["versions"]["torch"] == torch.__version__.split("+")[0] or saved["versions"]["torch"]
    assert [t["top_k"] for t in saved["tiers"]] == [1, 2]
    for tier in saved["tiers"]:
        assert set(tier["accuracy"]["per_task"]) == {"ARC-Easy", "boolq"}
        assert 0.0 <= tier["accuracy"]["mean"] <= 1.0 and tier["accuracy"]["ci95"] > 0
        flops = tier["flops_per_sample"]
        assert flops["analytic"] > 0 and flops["measured"] == pytest.approx(flops["analytic_same_samples"])
        assert tier["step_time_s"] > 0
        assert tier["upload_bytes_per_client_round"] > 0 and tier["download_bytes_per_client_round"] > 0
    k1, k2 = saved["tiers"]
    assert k1["flops_per_sample"]["analytic"] < k2["flops_per_sample"]["analytic"]
    assert len(saved["balance"]["per_layer"]) == 2
    assert {"cv", "dead_experts"} <= set(saved["balance"]["per_layer"][0])
    clients = saved["data"]["clients"]
    assert [c["top_k"] for c in clients] == [1, 1, 2, 2]
    assert all(sum(c["label_histogram"].values()) == c["num_examples"] for c in clients)
    lines = _lines(out)
    assert len(lines) == 2 * 4  # rounds x clients
    assert {"round", "client_id", "top_k", "upload_bytes", "download_bytes", "train_lm_loss"} <= set(lines[0])
    names = sorted(p.name for p in (out / "plots").iterdir())
    assert names == sorted(
        [
            "accuracy_by_round.png",
            "balance_by_round.png",
            "compute_vs_accuracy.png",
            "train_loss_by_round.png",
            "utilization_heatmap.png",
        ]
    )
    assert (out / "adapters" / "adapter.safetensors").is_file()
    assert (out / "checkpoint").is_dir() and (out / "config.yaml").is_file()
    # each evaluation's per-example records: the same examples for every tier, adding up to its accuracies
    assert sorted(p.name for p in (out / "evaluations").iterdir()) == [
        "initial.jsonl",
        "round_0001.jsonl",
        "round_0002.jsonl",
    ]
    records = [json.loads(line) for line in (out / "evaluations" / "round_0002.jsonl").read_text().splitlines()]
    per_tier = {t: [(r["task"], r["index"]) for r in records if r["tier"] == t] for t in (0, 1)}
    assert per_tier[0] == per_tier[1] and len(per_tier[0]) == sum(
        result["n"] for result in saved["tiers"][0]["accuracy"]["per_task"].values()
    )
    # a record names its tier as summary.json does: a K tier has no LoRA rank of its own
    assert {(r["top_k"], r["rank"]) for r in records} == {(t["top_k"], t["rank"]) for t in saved["tiers"]}
    assert all(t["rank"] is None for t in saved["tiers"])
    for tier in saved["tiers"]:
        for task, result in tier["accuracy"]["per_task"].items():
            mine = [r for r in records if r["tier"] == tier["tier"] and r["task"] == task]
            assert sum(r["correct"] for r in mine) == round(result["accuracy"] * result["n"])
            assert result["wilson95"][0] <= result["accuracy"] <= result["wilson95"][1]
    if saved["tensorboard"] is not None:
        assert any(Path(saved["tensorboard"]).iterdir())
    # every stage's wall time (a stage lasts until the next begins), adding up to the whole run
    stages = saved["timing"]["stages"]
    per_round = [(s["stage"], s.get("round")) for s in stages if "round" in s]
    assert [s["stage"] for s in stages if "round" not in s] == [
        "prepare",
        "model",
        "data",
        "flops",
        "evaluation_setup",
        "initial_evaluation",
        "outputs",
    ]  # a native MoE: no calibration or moefication stage
    assert per_round == [(name, r) for r in (1, 2) for name in ("training", "evaluation", "checkpoint")]
    assert all(s["seconds"] >= 0 for s in stages) and stages[-1]["stage"] == "outputs"
    assert sum(s["seconds"] for s in stages) == pytest.approx(saved["timing"]["total_s"], abs=0.05)
    assert any(p["text"] == "data: boolq" for s in stages if s["stage"] == "data" for p in s["parts"])
    log = (out / "run.log").read_text().splitlines()
    assert "starting the run in" in log[0] and "finished in" in log[-1]
    assert any("round 2/2 finished in" in line and "mean accuracy" in line for line in log)


def test_the_final_adapters_load_in_peft(setup, reference):
    """OUT/adapters/peft/ loads onto the original model with peft alone and is the run's model at K_max, phi = 0."""
    peft = pytest.importorskip("peft")
    import transformers

    from ubsmoe.models.loading import load_experiment_model
    from ubsmoe.models.state import load_trainable_state
    from ubsmoe.moe import moe_blocks

    out, summary = reference
    folder = out / "adapters" / "peft"
    assert summary["peft_adapters"] == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    base = transformers.AutoModelForCausalLM.from_pretrained(setup["model"])
    peft_model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    model = load_experiment_model(_config(setup)).model
    load_trainable_state(model, out / "adapters")
    phi = [block.phi.detach().clone() for block in moe_blocks(model)]
    assert any(p.abs().sum() > 0 for p in phi)  # DMR moved phi: the export drops it, and the log says so
    assert any("peft adapter: phi is non-zero" in line for line in (out / "run.log").read_text().splitlines())
    with torch.no_grad():
        for block in moe_blocks(model):
            block.phi.zero_()
        ids = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        difference = (peft_model(ids).logits - model(ids).logits).abs().max().item()
    assert difference < 1e-5


def test_same_seed_gives_the_same_metrics(setup, reference):
    out, summary = reference
    again = run_experiment(_config(setup, "output.tensorboard=true"), setup["root"] / "again")
    assert _lines(setup["root"] / "again") == _lines(out)
    assert _without_timing(again["tiers"]) == _without_timing(summary["tiers"])


class _Interrupt(Reporter):
    def round_finished(self, record):
        raise KeyboardInterrupt


def test_resume_after_an_interruption_ends_like_an_uninterrupted_run(setup, reference):
    out = setup["root"] / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_config(setup, "output.tensorboard=true"), out, reporter=_Interrupt())
    assert not (out / "summary.json").exists()
    resumed = run_experiment(None, out, resume=True)
    assert resumed["resumed_from"] == 1
    assert _lines(out) == _lines(reference[0])
    assert _without_timing(resumed["tiers"]) == _without_timing(reference[1]["tiers"])


def test_a_nan_update_is_dropped_and_the_run_carries_on(setup, monkeypatch):
    original = rounds.client_update

    def poisoned(model, state, batches, top_k, settings, client, **kwargs):
        update = original(model, state, batches, top_k, settings, client, **kwargs)
        if client == 1 and state.round == 0:
            key = next(iter(update.adapter_deltas))
            update.adapter_deltas[key][0].fill_(float("nan"))
        return update

    monkeypatch.setattr(rounds, "client_update", poisoned)
    out = setup["root"] / "nan"
    summary = run_experiment(_config(setup), out)
    first = summary["rounds"][0]
    assert [d["client_id"] for d in first["dropped"]] == [1]
    assert "finite" in first["dropped"][0]["reason"]
    line = next(x for x in _lines(out) if x["round"] == 0 and x["client_id"] == 1)
    assert line["accepted"] is False and line["drop_reason"]
    assert len(summary["rounds"]) == 2 and summary["rounds"][1]["dropped"] == []


def _cli(*args: str):
    return CliRunner().invoke(app, ["run", *args])


def test_without_a_terminal_the_run_prints_plain_progress_lines(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0)  # the state line on every event, not every 30 s
    quick = ["federation.rounds=1", "evaluation.initial=false", "evaluation.measure_flops=false", "output.plots=false"]
    sets = [x for item in [*QUICK, *quick] for x in ("--set", item)]
    result = _cli("--config", str(setup["config"]), *sets, "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+\d", line)]
    text = "\n".join(lines)
    for expected in (
        r"\+0:00:\d\d loading the model$",
        r" loading the data$",
        r" round 1/1: 4 clients x 2 local steps$",
        r" round 1/1 training · client 0 \(1/4\) · step 1/2 · \d+s into the round, about \d+s left$",
        r" round 1/1 training · client 3 \(4/4\) · step 2/2 · \d+s into the round$",
        r" evaluating 2 tiers after round 1: \d+/\d+ · \d+s",
        r" round 1/1 finished in \d+s: train loss \d\.\d{3}, utilization CV .*, mean accuracy .*%",
    ):
        assert re.search(expected, text, re.MULTILINE), f"{expected!r} not in:\n{text}"
    assert ": local steps" not in result.output and "\r" not in result.output  # no progress bars
    assert "starting the run in" in (tmp_path / "out" / "run.log").read_text()


def test_a_malformed_data_line_gives_one_clear_message(setup, tmp_path):
    data = write_data(tmp_path / "data", examples=12)
    records = json.loads((data / "boolq" / "test.json").read_text())
    records[5] = {"instruction": "is 3 > 2?\n\nAnswer format: true/false"}  # no answer
    (data / "boolq" / "test.json").write_text(json.dumps(records))
    result = _cli("--config", str(setup["config"]), "--set", f"data.path={data}", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    expected = "error: boolq/test.json, record 5: field 'answer' is missing (expected 'true' or 'false')"
    assert expected in " ".join(result.output.split())
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("moe.tiers=[{budget: 1.5, clients: 2}]", "moe.tiers[0].budget = 1.5: must be in (0, 1]"),
        ("moe.num_candidates=1", "moe.num_candidates = 1: must be in [K_max, M] = [2, 8] (the model)"),
        ("federation.roundz=3", "federation.roundz = 3: unknown key; did you mean 'rounds'?"),
        ("data.max_train_examples_per_task=1", "fewer than the 4 clients of moe.tiers"),
    ],
)
def test_an_invalid_config_gives_one_clear_message(setup, tmp_path, override, message):
    result = _cli("--config", str(setup["config"]), "--set", override, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_an_existing_run_is_not_overwritten(setup, reference):
    result = _cli("--config", str(setup["config"]), "--out", str(reference[0]))
    assert result.exit_code == 2 and "--resume" in result.output


def test_dmr_lowers_the_utilization_cv(setup):
    # PG off in both runs, so DMR is the one difference: a large kappa moves every expert's LoRA, which on
    # this tiny model shifts the routing too (the benchmark's CV with DMR stays lower at kappa 16: decisions.md)
    quick = ["federation.rounds=4", "evaluation.every=4", "evaluation.initial=false", "output.plots=false"]
    quick += ["pseudo_gradient.enabled=false"]
    cvs = {}
    for method in ("ubsmoe", "ubsmoe-no-dmr"):
        summary = run_experiment(_config(setup, f"method={method}", *quick), setup["root"] / f"dmr-{method}")
        cvs[method] = [r["mean_utilization_cv"] for r in summary["rounds"]]
    assert cvs["ubsmoe"][0] == pytest.approx(cvs["ubsmoe-no-dmr"][0], rel=0.05)  # same start
    assert cvs["ubsmoe"][-1] < 0.8 * cvs["ubsmoe-no-dmr"][-1]


@pytest.mark.parametrize("prompt_format", ["options", "instruction"])
def test_the_generate_protocol_is_named_and_scored(setup, prompt_format):
    quick = ["federation.rounds=1", "evaluation.protocol=generate", "evaluation.max_new_tokens=4", "output.plots=false"]
    out = setup["root"] / f"generate-{prompt_format}"
    summary = run_experiment(_config(setup, *quick, f"data.prompt_format={prompt_format}"), out)
    assert summary["evaluation"]["protocol"] == "generate"
    for tier in summary["tiers"]:
        assert 0.0 <= tier["accuracy"]["mean"] <= 1.0
        assert tier["answer_perplexity"] > 1.0
        assert tier["train_flops_per_round"][0] > 0
    # every generation is written with the choice parsed from it, so a score can be audited
    records = [json.loads(line) for line in (out / "evaluations" / "round_0001.jsonl").read_text().splitlines()]
    assert {"generation", "prediction", "correct", "gold_nll", "gold_tokens", "task", "index"} <= set(records[0])
    for tier in summary["tiers"]:
        mine = [r for r in records if r["tier"] == tier["tier"]]
        for task, result in tier["accuracy"]["per_task"].items():
            assert sum(r["correct"] for r in mine if r["task"] == task) == round(result["accuracy"] * result["n"])
        # the share of generations that named no option, per tier, as the records show it
        assert tier["accuracy"]["unmatched"] == pytest.approx(sum(r["prediction"] is None for r in mine) / len(mine))
