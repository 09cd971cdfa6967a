"""In-process simulation: one model, per-round atomic checkpoints, exact resume, dropped bad updates."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ubsmoe.fl.rounds as rounds  # noqa: E402
import ubsmoe.fl.simulation as simulation  # noqa: E402
from ubsmoe.fl.checkpoint import (  # noqa: E402
    CheckpointError,
    capture_rng_states,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from ubsmoe.fl.client import ClientSettings  # noqa: E402
from ubsmoe.fl.payload import GlobalState, global_state_from_model  # noqa: E402
from ubsmoe.fl.rounds import client_batches  # noqa: E402
from ubsmoe.fl.simulation import TIMING_KEYS, run_simulation  # noqa: E402
from ubsmoe.models import adapt_moe_model, tiny_config  # noqa: E402
from ubsmoe.moe import UBSMoEConfig, moe_blocks  # noqa: E402

TOP_KS = [1, 1, 2, 2]
ROUNDS = 3
SETTINGS = ClientSettings(lr=1e-2, min_lr=1e-3, local_steps=2, total_rounds=ROUNDS)


def build_model(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("olmoe"))
    return adapt_moe_model(model, UBSMoEConfig(lora_rank=4))


def make_client_data(num_clients: int = 4, per_client: int = 6, seed: int = 3) -> list[list[dict]]:
    rng = random.Random(seed)
    data = []
    for _ in range(num_clients):
        examples = []
        for _ in range(per_client):
            length = rng.randint(6, 12)
            ids = [rng.randint(3, 127) for _ in range(length)]
            cut = length // 2
            examples.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
        data.append(examples)
    return data


DATA = make_client_data()


def run(model, out_dir, **kwargs):
    """run_simulation with this file's run settings; run-setting and hook keywords go where they belong."""
    settings = {"rounds": ROUNDS, "fraction": 1.0, "seed": 7, "batch_size": 4}
    settings.update({k: kwargs.pop(k) for k in simulation.RUN_KEYS if k in kwargs})
    names = [f.name for f in dataclasses.fields(simulation.SimulationHooks)]
    hooks = simulation.SimulationHooks(**{k: kwargs.pop(k) for k in names if k in kwargs})
    return run_simulation(model, DATA, TOP_KS, SETTINGS, out_dir, run=settings, hooks=hooks, **kwargs)


def strip_timing(value):
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value


def metrics_lines(out_dir) -> list[dict]:
    text = (out_dir / simulation.METRICS_FILE).read_text(encoding="utf-8")
    return [strip_timing(json.loads(line)) for line in text.splitlines()]


def assert_same_state(a: GlobalState, b: GlobalState) -> None:
    assert a.adapters.keys() == b.adapters.keys()
    for key in a.adapters:
        assert torch.equal(a.adapters[key], b.adapters[key]), key
    assert torch.equal(a.phi, b.phi)


def evaluate(model, round, state):
    # a deterministic evaluation that also consumes torch randomness (seeded by the simulation)
    ids = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return {"eval_loss": float(loss), "round_seen": round}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 3-round run: (out_dir, final GlobalState, records)."""
    out = tmp_path_factory.mktemp("reference")
    model = build_model()
    records = run(model, out, evaluate=evaluate)
    return out, global_state_from_model(model), records


def test_run_writes_a_checkpoint_per_round_and_one_metrics_line_per_client_and_round(reference):
    out, final, records = reference
    checkpoints = list_checkpoints(out / simulation.CHECKPOINT_DIR)
    assert [p.name for p in checkpoints] == ["round_0001", "round_0002", "round_0003"]
    assert latest_checkpoint(out / simulation.CHECKPOINT_DIR) == checkpoints[-1]
    state, meta = load_checkpoint(checkpoints[-1])
    assert state.round == meta["round"] == ROUNDS
    assert_same_state(state, final)
    assert not list((out / simulation.CHECKPOINT_DIR).glob(".tmp-*"))

    lines = metrics_lines(out)
    assert sorted((line["round"], line["client_id"]) for line in lines) == [
        (r, c) for r in range(ROUNDS) for c in range(len(TOP_KS))
    ]
    for line in lines:
        assert line["top_k"] == TOP_KS[line["client_id"]]
        assert line["num_examples"] == len(DATA[line["client_id"]])
        assert line["accepted"] is True and line["drop_reason"] is None
        assert math.isfinite(line["train_loss"])

    assert records.resumed_from is None
    assert [r["round"] for r in records] == list(range(ROUNDS))
    for record in records:
        assert record["clients"] == [0, 1, 2, 3] and record["dropped"] == [] and record["changed"]
        assert len(record["utilization_cv"]) == len(record["dead_experts"]) == 2
        assert record["eval"]["round_seen"] == record["round"]
        assert math.isfinite(record["eval"]["eval_loss"])
        assert [m["top_k"] for m in record["client_metrics"]] == TOP_KS
    # the learning rate follows the per-round cosine schedule
    assert records[0]["client_metrics"][0]["lr"] == pytest.approx(1e-2)
    assert records[-1]["client_metrics"][0]["lr"] == pytest.approx(1e-3)
    # the global state moved
    assert not torch.equal(final.phi, torch.zeros_like(final.phi))


def test_two_fresh_runs_with_the_same_seed_are_identical(reference, tmp_path):
    out, final, records = reference
    model = build_model()
    again = run(model, tmp_path, evaluate=evaluate)
    assert_same_state(global_state_from_model(model), final)
    assert strip_timing(list(again)) == strip_timing(list(records))
    assert metrics_lines(tmp_path) == metrics_lines(out)


def test_a_different_seed_gives_a_different_run(reference, tmp_path):
    _, final, _ = reference
    model = build_model()
    run(model, tmp_path, seed=8)
    assert not torch.equal(global_state_from_model(model).phi, final.phi)


class Killed(Exception):
    pass


def test_resume_after_a_kill_matches_the_uninterrupted_run(reference, tmp_path):
    out, final, records = reference

    def kill_after_second_round(record):
        if record["round"] == 1:
            raise Killed

    with pytest.raises(Killed):
        run(build_model(), tmp_path, evaluate=evaluate, on_round=kill_after_second_round)
    assert [p.name for p in list_checkpoints(tmp_path / simulation.CHECKPOINT_DIR)] == ["round_0001", "round_0002"]
    # the interrupted third round had started writing: a full line and a cut one
    with open(tmp_path / simulation.METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"round": 2, "client_id": 0, "train_loss": 1.0}) + "\n")
        handle.write('{"round": 2, "client_id": 1, "tra')

    # a new process: the same base model (only adapters and phi are checkpointed), other adapter
    # values and global RNG states; the checkpoint must overwrite them
    model = build_model()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5)
    torch.manual_seed(12345)
    random.seed(99)
    resumed = run(model, tmp_path, evaluate=evaluate, resume=True)

    assert resumed.resumed_from == 2
    assert_same_state(global_state_from_model(model), final)
    assert strip_timing(list(resumed)) == strip_timing(list(records))
    assert metrics_lines(tmp_path) == metrics_lines(out)
    state, _ = load_checkpoint(latest_checkpoint(tmp_path / simulation.CHECKPOINT_DIR))
    assert_same_state(state, final)

    # resuming a finished run trains nothing and returns the same records
    again = run(model, tmp_path, evaluate=evaluate, resume=True)
    assert again.resumed_from == ROUNDS
    assert strip_timing(list(again)) == strip_timing(list(records))
    assert metrics_lines(tmp_path) == metrics_lines(out)


def test_resume_can_extend_a_run(tmp_path):
    model = build_model()
    run(model, tmp_path, rounds=1)
    records = run(model, tmp_path, rounds=2, resume=True)
    assert records.resumed_from == 1 and [r["round"] for r in records] == [0, 1]
    assert len(metrics_lines(tmp_path)) == 2 * len(TOP_KS)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    records = run(build_model(), tmp_path, rounds=1, resume=True)
    assert records.resumed_from is None and records.checkpoint is None
    assert len(records) == 1


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    run(build_model(), tmp_path, rounds=1)
    with pytest.raises(ValueError, match="resume=True"):
        run(build_model(), tmp_path, rounds=1)


def test_resume_with_other_settings_is_refused(tmp_path):
    run(build_model(), tmp_path, rounds=1)
    with pytest.raises(ValueError, match="settings differ.*seed"):
        run(build_model(), tmp_path, rounds=2, seed=8, resume=True)


def test_a_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    run(build_model(), tmp_path, rounds=2)
    latest = latest_checkpoint(tmp_path / simulation.CHECKPOINT_DIR)
    state_file = latest / "state.safetensors"
    raw = bytearray(state_file.read_bytes())
    raw[-1] ^= 0xFF
    state_file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt.*checksum"):
        load_checkpoint(latest)
    with pytest.raises(CheckpointError, match="round_0002.*corrupt"):
        run(build_model(), tmp_path, rounds=3, resume=True)

    state_file.write_bytes(bytes(raw[:20]))
    with pytest.raises(CheckpointError, match="corrupt.*bytes"):
        load_checkpoint(latest)
    state_file.unlink()
    with pytest.raises(CheckpointError, match="incomplete.*state.safetensors is missing"):
        load_checkpoint(latest)

    meta = latest.with_name("round_0001") / "meta.json"
    meta.write_text(meta.read_text()[:50])
    with pytest.raises(CheckpointError, match="corrupt.*not valid JSON"):
        load_checkpoint(meta.parent)
    meta.unlink()
    with pytest.raises(CheckpointError, match="incomplete.*meta.json is missing"):
        load_checkpoint(meta.parent)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_a_bad_client_update_is_dropped_and_the_run_carries_on(tmp_path, monkeypatch):
    real = rounds.client_update

    def poisoned(model, state, batches, top_k, settings, client_id, **kwargs):
        update = real(model, state, batches, top_k, settings, client_id, **kwargs)
        if client_id == 1:
            update.adapter_deltas = {k: torch.full_like(v, float("nan")) for k, v in update.adapter_deltas.items()}
        return update

    monkeypatch.setattr(rounds, "client_update", poisoned)
    model = build_model()
    records = run(model, tmp_path)
    assert len(records) == ROUNDS
    for record in records:
        assert record["accepted"] == [0, 2, 3]
        assert [d["client_id"] for d in record["dropped"]] == [1]
        assert "non-finite" in record["dropped"][0]["reason"]
    lines = metrics_lines(tmp_path)
    assert len(lines) == ROUNDS * len(TOP_KS)
    for line in lines:
        assert line["accepted"] is (line["client_id"] != 1)
        if line["client_id"] == 1:
            assert "non-finite" in line["drop_reason"]
    final = global_state_from_model(model)
    assert all(bool(torch.isfinite(v).all()) for v in final.adapters.values())
    assert bool(torch.isfinite(final.phi).all())


def test_only_one_model_is_used(tmp_path, monkeypatch):
    model = build_model()
    parameters = {name: (id(p), p.data_ptr()) for name, p in model.named_parameters()}
    blocks = [id(b) for b in moe_blocks(model)]
    seen_models = set()
    real = rounds.client_update

    def spy(m, *args, **kwargs):
        seen_models.add(id(m))
        return real(m, *args, **kwargs)

    real_deepcopy = copy.deepcopy

    def no_deepcopy(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError("the simulation must not copy a module")
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(rounds, "client_update", spy)
    monkeypatch.setattr(copy, "deepcopy", no_deepcopy)
    run(model, tmp_path, rounds=2)
    assert seen_models == {id(model)}
    assert {name: (id(p), p.data_ptr()) for name, p in model.named_parameters()} == parameters
    assert [id(b) for b in moe_blocks(model)] == blocks


def test_fraction_samples_the_same_clients_in_every_run(tmp_path):
    records = run(build_model(), tmp_path, rounds=2, fraction=0.5)
    assert all(len(r["clients"]) == 2 for r in records)
    assert len(metrics_lines(tmp_path)) == 4


def test_bad_inputs_give_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="4 clients' data but 3 top_ks"):
        run_simulation(build_model(), DATA, [1, 1, 2], SETTINGS, tmp_path, run={"rounds": 1})
    with pytest.raises(ValueError, match="client 1 has no examples"):
        run_simulation(build_model(), [DATA[0], []], [1, 1], SETTINGS, tmp_path, run={"rounds": 1})


def test_client_batches_are_a_seeded_shuffle():
    first = client_batches(DATA[0], 4, seed=1, round=0, client=0, pad_id=0)
    assert [b["input_ids"].shape[0] for b in first] == [4, 2]
    again = client_batches(DATA[0], 4, seed=1, round=0, client=0, pad_id=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again, strict=True))
    other = client_batches(DATA[0], 6, seed=1, round=1, client=0, pad_id=0)[0]
    same_round = client_batches(DATA[0], 6, seed=1, round=0, client=0, pad_id=0)[0]
    assert not torch.equal(other["input_ids"], same_round["input_ids"])


def test_checkpoint_round_trip_keep_and_rng_states(tmp_path):
    state = GlobalState(adapters={"a.lora_A": torch.randn(3, 2), "b": torch.arange(4.0)}, phi=torch.randn(2, 8))
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, dataclasses.replace(state, round=r), extra={"note": r}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round_0002", "round_0003"]
    loaded, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert loaded.round == 3 and meta["extra"] == {"note": 3}
    assert_same_state(loaded, state)
    # a crash mid-save leaves a hidden folder that is ignored, then cleaned by the next save
    (tmp_path / ".tmp-round_0004-dead").mkdir()
    assert latest_checkpoint(tmp_path).name == "round_0003"
    save_checkpoint(tmp_path, state, round=4)
    assert not list(tmp_path.glob(".tmp-*"))
    assert latest_checkpoint(tmp_path / "missing") is None

    saved = json.loads(json.dumps(capture_rng_states()))
    expected = (torch.rand(3), random.random())
    torch.rand(5)
    random.random()
    restore_rng_states(saved)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_an_experiment_config_supplies_the_settings(tmp_path):
    from ubsmoe.config import ExperimentConfig

    config = ExperimentConfig.from_dict(
        {"seed": 3, "federation": {"rounds": 2, "fraction": 0.5, "local_steps": 1, "batch_size": 3}}
    )
    records = run_simulation(build_model(), DATA, TOP_KS, config, out_dir=tmp_path)
    assert [r["round"] for r in records] == [0, 1]
    assert all(len(r["clients"]) == 2 for r in records)
    assert all(m["local_steps"] == 1 and m["examples_processed"] == 3 for r in records for m in r["client_metrics"])
