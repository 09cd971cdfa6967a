"""Output folders (DESIGN 6): one run at a time (locked), a new run never mixed into files it did not
write, bad folders and edited resumes give one clear message, resume restores metrics.jsonl and may
extend federation.rounds. Most tests call the folder functions directly; one runs the tiny OLMoE.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from ubsmoe.cli import app
from ubsmoe.config import ConfigError, load_config, save_config
from ubsmoe.fl.checkpoint import save_checkpoint
from ubsmoe.fl.experiment import prepare_output, run_experiment
from ubsmoe.fl.outdir import (
    LOCK_FILE,
    RUN_MARKER,
    OutputFolderError,
    load_resume_checkpoint,
    lock_output,
    rebuild_metrics,
)
from ubsmoe.fl.payload import GlobalState


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _says(result, text: str) -> bool:
    """`text` is in the CLI's output (compared without whitespace: rich wraps and folds long lines)."""
    return "".join(str(text).split()) in "".join(result.output.split())


# ---- the lock ------------------------------------------------------------------------------------
def test_a_locked_folder_refuses_a_second_run_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    with lock_output(out) as folder:
        assert folder == out and (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        held = rf"{re.escape(str(out))}.*in use by another ubsmoe run \(pid {os.getpid()}\)"
        with pytest.raises(OutputFolderError, match=held), lock_output(out):
            pass
        # a whole run is refused before it loads anything, through the CLI with one message
        result = _cli("run", "--out", str(out))
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert _says(result, f"pid {os.getpid()}") and _says(result, out)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written by the refused run
    with lock_output(out):  # released on exit
        pass


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys, time\n"
        "from ubsmoe.fl.outdir import lock_output\n"
        "lock = lock_output(sys.argv[1]); lock.__enter__()\n"
        "print('locked', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputFolderError, match=rf"pid {holder.pid}\)"), lock_output(out):
            pass
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    with lock_output(out):
        pass


# ---- a new run into an existing folder ---------------------------------------------------------------
def test_a_new_run_refuses_a_folder_holding_files_it_would_overwrite(tmp_path):
    config = load_config(None)
    (tmp_path / "config.yaml").write_text("mine: true\n")
    (tmp_path / "metrics.jsonl").write_text('{"mine": 1}\n')
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "a.bin").write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"config.yaml, metrics.jsonl, adapters/, which a new run would overwrite"):
        prepare_output(tmp_path, config, resume=False)
    result = _cli("run", "--out", str(tmp_path))  # `--out .` in a folder of one's own files
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert _says(result, "which a new run would overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "config.yaml", "metrics.jsonl"]  # no lock file
    assert (tmp_path / "config.yaml").read_text() == "mine: true\n"
    assert (tmp_path / "metrics.jsonl").read_text() == '{"mine": 1}\n'
    assert not (tmp_path / RUN_MARKER).exists()


def test_a_new_run_accepts_an_absent_or_empty_folder_and_then_calls_it_a_run(tmp_path):
    config = load_config(None)
    for folder in (tmp_path / "absent" / "deeper", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
            (folder / "notes.txt").write_text("not a file of a run")
        prepare_output(folder, config, resume=False)
        assert (folder / "config.yaml").is_file() and (folder / RUN_MARKER).is_file()
        with pytest.raises(ConfigError, match=r"already holds a run \(config.yaml\); pass --resume"):
            prepare_output(folder, config, resume=False)


@pytest.mark.parametrize("kind", ["file", "under a file", "unwritable"])
def test_a_bad_output_folder_gives_one_message(tmp_path, kind):
    (tmp_path / "afile").write_text("x")
    out = {"file": tmp_path / "afile", "under a file": tmp_path / "afile" / "sub", "unwritable": Path("/proc/x")}[kind]
    result = _cli("run", "--out", str(out))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert _says(result, f"cannot use '{out}' as the output folder")
    written = _cli("config", "--out", str(out / "c.yaml"))
    assert written.exit_code == 2 and "Traceback" not in written.output, written.output
    assert _says(written, f"cannot write {out / 'c.yaml'}")


# ---- resume --------------------------------------------------------------------------------------------
def test_resume_names_every_edited_field_but_accepts_more_rounds(tmp_path):
    prepare_output(tmp_path, load_config(None), resume=False)
    saved = tmp_path / "config.yaml"
    data = yaml.safe_load(saved.read_text())
    data["federation"]["rounds"] += 3
    saved.write_text(yaml.safe_dump(data))
    assert prepare_output(tmp_path, None, resume=True).federation.rounds == data["federation"]["rounds"]
    data["federation"]["local_steps"] += 1
    data["lora"]["rank"] = 2
    saved.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as error:
        prepare_output(tmp_path, None, resume=True)
    message = str(error.value)
    assert "differs from the configuration the run started with" in message
    assert "federation.local_steps:" in message and "lora.rank:" in message and "federation.rounds:" not in message


def _state(round: int) -> GlobalState:
    return GlobalState(adapters={"a": torch.full((2, 2), float(round))}, phi=torch.zeros(2, 4), round=round)


def test_a_corrupt_newest_checkpoint_names_the_previous_one_and_how_to_use_it(tmp_path):
    save_config(load_config(None), tmp_path / "config.yaml")
    for round in (1, 2):
        save_checkpoint(tmp_path / "checkpoint", _state(round), extra={"records": []})
    newest = tmp_path / "checkpoint" / "round_0002"
    (newest / "state.safetensors").write_bytes(b"damaged")
    result = _cli("run", "--resume", str(tmp_path))  # fails before loading any model
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert _says(result, f"checkpoint '{newest}' is corrupt")
    assert _says(result, f"previous checkpoint '{tmp_path / 'checkpoint' / 'round_0001'}' is intact")
    assert _says(result, f"mv {newest} {newest}.corrupt")
    newest.rename(f"{newest}.corrupt")  # as the message says
    path, state, _ = load_resume_checkpoint(tmp_path / "checkpoint")
    assert path.name == "round_0001" and state.round == 1


def test_metrics_are_rebuilt_only_from_records_that_cover_every_round(tmp_path):
    records = [{"round": r, "client_metrics": [{"round": r, "client_id": c} for c in (0, 1)]} for r in (0, 1, 2)]
    assert rebuild_metrics(tmp_path, records, 2)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["round"], x["client_id"]) for x in lines] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    (tmp_path / "metrics.jsonl").write_text("kept\n")
    assert not rebuild_metrics(tmp_path, records[1:], 2)  # round 0 missing: the file is left alone
    assert (tmp_path / "metrics.jsonl").read_text() == "kept\n"


# ---- one tiny run end to end -----------------------------------------------------------------------
def test_resume_extends_a_finished_run_and_rebuilds_a_deleted_metrics_file(tmp_path):
    pytest.importorskip("transformers")
    from test_run import QUICK, write_experiment

    setup = write_experiment(tmp_path)
    quick = [*QUICK, "federation.rounds=1", "evaluation.initial=false", "output.plots=false"]
    out = tmp_path / "out"
    first = run_experiment(load_config(setup["config"], quick), out)
    assert len(first["rounds"]) == 1
    round0 = (out / "metrics.jsonl").read_text()
    assert len(round0.splitlines()) == 4

    saved = out / "config.yaml"
    data = yaml.safe_load(saved.read_text())
    data["federation"]["rounds"] = 2
    saved.write_text(yaml.safe_dump(data, sort_keys=False))
    (out / "metrics.jsonl").unlink()
    result = _cli("run", "--resume", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert "\n".join(lines[:4]) + "\n" == round0  # the first round's lines, rebuilt from the checkpoint
    assert [json.loads(x)["round"] for x in lines[4:]] == [1] * 4

    data["federation"]["rounds"] = 1
    saved.write_text(yaml.safe_dump(data, sort_keys=False))
    lowered = _cli("run", "--resume", str(out))
    assert lowered.exit_code == 2 and "Traceback" not in lowered.output
    assert _says(lowered, "completed 2 rounds") and _says(lowered, "not lower it")


def test_bad_input_found_while_loading_leaves_the_folder_usable_for_the_corrected_run(tmp_path, monkeypatch):
    """A new run stopped by bad input before its first round removes what it wrote; the user's files stay."""
    from ubsmoe.fl import experiment

    def refuse(*args, **kwargs):
        raise ConfigError("lora.rank = 1000000000: too large for this machine")

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(experiment, "load_experiment_model", refuse)
    with pytest.raises(ConfigError, match="too large"):
        run_experiment(load_config(None, ["lora.rank=1000000000"]), out)
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == ["notes.txt"]
    assert prepare_output(out, load_config(None, []), resume=False).lora.rank == 8  # no longer refused
