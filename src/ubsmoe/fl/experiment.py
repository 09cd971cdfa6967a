"""One experiment end to end: config -> model -> data -> federated simulation -> per-tier evaluation -> outputs.

`run_experiment(config, out_dir, resume=False, reporter=None)` is what `ubsmoe run` calls:

1. locks OUT for the whole run (`ubsmoe.fl.outdir`: a second run on it fails at once), refuses a
   new run into a folder that holds files a run writes, writes the run marker and `OUT/config.yaml`
   (the full configuration; `--resume` reads it back, and accepts an edit of `federation.rounds`
   only, which extends the run; on resume `OUT/metrics.jsonl` is rebuilt from the newest checkpoint);
2. loads the model (`ubsmoe.models.loading`) and the data (`ubsmoe.data.federated`), and checks the
   config against both (N_p, clients vs examples);
3. measures each tier's training FLOPs per sample: analytic (`flops_per_token` x the mean training
   sequence length) and measured (`FlopCounterMode` over the forward + backward of a few real
   training sequences, run with the eager expert loop and eager attention, which the counter sees);
4. evaluates every tier before training (`OUT/initial_eval.json`; plotted as round 0), then runs the
   federated simulation (`ubsmoe.fl.simulation`), evaluating every tier at its K_c after every
   `evaluation.every` rounds (and after the last): accuracy per task and mean with 95% intervals,
   perplexity of the gold answers, perplexity of held-out BIG-bench text;
5. writes `OUT/summary.json` (`ubsmoe.report.summary`), `OUT/plots/*.png`, TensorBoard scalars
   (`OUT/tensorboard/`, when the package is installed) and the final adapters (`OUT/adapters/`, and
   `OUT/adapters/peft/`: the same adapters as a peft LoRA adapter of the original model, which
   `PeftModel.from_pretrained` loads; not for FLoRA/FLoRIST, a line in `OUT/run.log` says why).

Per-round checkpoints and `OUT/metrics.jsonl` come from the simulation. A `Reporter` receives
progress events (the CLI draws rich progress bars from them, or plain lines without a terminal);
the engine prints nothing itself, but appends plain progress lines to `OUT/run.log`
(`ubsmoe.report.progress.PlainReporter`, a line at least every 30 s) and times every stage of the
run (summary.json `timing.stages`: prepare, model, calibration, moefication, data, flops,
evaluation_setup, initial_evaluation, then training / evaluation / checkpoint of each round, outputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ubsmoe.config import ConfigError, ExperimentConfig, load_config, save_config
from ubsmoe.data.federated import DataError, FederatedData, experiment_data
from ubsmoe.data.prompts import pad_token_id
from ubsmoe.fl.outdir import (
    RUN_LOG,
    RUN_MARKER,
    load_resume_checkpoint,
    lock_output,
    new_run_clashes,
    output_folder,
    rebuild_metrics,
    resume_config_changes,
    write_run_marker,
)
from ubsmoe.fl.payload import GlobalState
from ubsmoe.fl.simulation import CHECKPOINT_DIR, SimulationHooks, run_simulation
from ubsmoe.fl.tiers import EVALUATIONS_DIR, Tier, TierEvaluator, evaluation_due, experiment_tiers, tier_flops
from ubsmoe.models.loading import LoadedModel, load_experiment_model
from ubsmoe.models.native import ModelLoadError
from ubsmoe.paths import write_text_atomic

__all__ = [
    "CONFIG_FILE",
    "INITIAL_EVAL_FILE",
    "ExperimentSetup",
    "Reporter",
    "initial_global_state",
    "prepare_output",
    "run_experiment",
    "set_up_experiment",
    "timed_reporter",
]

CONFIG_FILE = "config.yaml"
INITIAL_EVAL_FILE = "initial_eval.json"


class Reporter:
    """Progress events of a run; every method is a no-op here (subclass what you need)."""

    def stage(self, text: str) -> None: ...

    def steps(self, what: str, done: int, total: int) -> None: ...

    def round_started(self, round: int, total_rounds: int, participants: list[int], local_steps: int) -> None: ...

    def step(self, round: int, client: int, step: int) -> None: ...

    def round_finished(self, record: Mapping[str, Any]) -> None: ...

    def evaluation_started(self, label: str, total: int) -> None: ...

    def evaluation_advanced(self, amount: int) -> None: ...

    def evaluation_finished(self) -> None: ...


class _TimedReporter(Reporter):
    """Passes every event on to `reporter` and times the run's stages with `timer` (`timing.stages`).

    `begin(name, text)` starts a stage (and tells the reporter `text`); a `stage(text)` message from the
    model or data loaders is a part of the open stage; a round's start begins its `training` stage.
    """

    def __init__(self, reporter: Any, timer: Any):
        self.reporter, self.timer = reporter, timer

    def begin(self, name: str, text: str | None = None, **detail: Any) -> None:
        self.timer.begin(name, **detail)
        if text:
            self.reporter.stage(text)

    def stage(self, text: str) -> None:
        self.timer.note(text)
        self.reporter.stage(text)

    def steps(self, what: str, done: int, total: int) -> None:
        self.reporter.steps(what, done, total)

    def round_started(self, round: int, total_rounds: int, participants: list[int], local_steps: int) -> None:
        self.timer.begin("training", round=round + 1)
        self.reporter.round_started(round, total_rounds, participants, local_steps)

    def step(self, round: int, client: int, step: int) -> None:
        self.reporter.step(round, client, step)

    def round_finished(self, record: Mapping[str, Any]) -> None:
        self.reporter.round_finished(record)

    def evaluation_started(self, label: str, total: int) -> None:
        self.reporter.evaluation_started(label, total)

    def evaluation_advanced(self, amount: int) -> None:
        self.reporter.evaluation_advanced(amount)

    def evaluation_finished(self) -> None:
        self.reporter.evaluation_finished()


@contextlib.contextmanager
def _run_log(out: Path, first_line: str) -> Iterator[Any]:
    """A `PlainReporter` appending to `OUT/run.log` (with its heartbeat thread) for the `with` block."""
    from ubsmoe.report.progress import PlainReporter

    with open(out / RUN_LOG, "a", encoding="utf-8") as stream, PlainReporter(stream) as log:
        log.line(first_line)
        yield log


def initial_global_state(model: nn.Module, config: ExperimentConfig) -> GlobalState:
    from ubsmoe.fl.payload import global_state_from_model

    state = global_state_from_model(model)
    state.method_state = config.method_instance().initial_state(config.client_ranks())
    return state


def prepare_output(out_dir: str | os.PathLike[str], config: ExperimentConfig | None, resume: bool) -> ExperimentConfig:
    """The run's configuration: saved into a fresh OUT, or read back from OUT on resume (ConfigError otherwise).

    A new run needs a folder that holds nothing a run writes (`ubsmoe.fl.outdir.new_run_clashes`); it
    writes the run marker (with its configuration), then `config.yaml`. On resume, `config.yaml` may
    differ from the run's original configuration only in `federation.rounds` (to extend the run).
    """
    out = Path(out_dir)
    saved = out / CONFIG_FILE
    if config is not None:
        config.method_instance()  # the method's class and options, checked before anything is written
    if resume:
        if not out.is_dir():
            raise ConfigError(f"--resume {out}: {'not a folder' if out.exists() else 'no such folder'}")
        if not saved.is_file():
            raise ConfigError(f"--resume {out}: no {CONFIG_FILE} there; it is not the folder of a `ubsmoe run`")
        config = load_config(saved)
        changes = resume_config_changes(out, config.to_dict())
        if changes:
            raise ConfigError(
                [
                    f"--resume {out}: {saved} differs from the configuration the run started with:",
                    *(f"  {change}" for change in changes),
                    "only federation.rounds may change on resume (to extend the run); undo the other edits, or "
                    f"start a new run with them in another folder (--config {saved} --out NEW_FOLDER)",
                ]
            )
        return config
    if config is None:
        raise ConfigError("no configuration given")
    folder = output_folder(out)
    refuse_clashes(folder)
    write_run_marker(folder, config.to_dict())
    save_config(config, saved)
    return config


def refuse_clashes(out: Path) -> None:
    """A ConfigError when `out` holds anything a new run would write (it writes nothing itself)."""
    clashes = new_run_clashes(out)
    if not clashes:
        return
    names = ", ".join(c for c in clashes if c != RUN_MARKER) or RUN_MARKER
    if any(c in clashes for c in (RUN_MARKER, f"{CHECKPOINT_DIR}/", "summary.json", INITIAL_EVAL_FILE)):
        raise ConfigError(
            f"output folder {str(out)!r} already holds a run ({names}); pass --resume {out} to continue it, "
            "or choose another folder with --out"
        )
    raise ConfigError(
        f"output folder {str(out)!r} already holds {names}, which a new run would overwrite; choose a new or "
        "empty folder with --out"
    )


def _prepare_resume(out: Path, config: ExperimentConfig) -> ExperimentConfig:
    """Check the newest checkpoint, rebuild metrics.jsonl from it; the settings `run_simulation` resumes with.

    `federation.rounds` may have been raised: the simulation then runs with the checkpointed run's
    settings (its LR schedule; rounds past its end run at the schedule's last rate) and the new count.
    """
    found = load_resume_checkpoint(out / CHECKPOINT_DIR)
    if found is None:
        return config
    path, state, meta = found
    if config.federation.rounds < state.round:
        raise ConfigError(
            f"federation.rounds = {config.federation.rounds} in {out / CONFIG_FILE}: the run has completed "
            f"{state.round} rounds ({path}); --resume can keep or raise federation.rounds, not lower it"
        )
    extra = meta["extra"]
    if isinstance(extra.get("records"), list):
        rebuild_metrics(out, extra["records"], state.round)
    fingerprint = extra.get("fingerprint")
    settings = fingerprint.get("settings") if isinstance(fingerprint, dict) else None
    original = settings.get("total_rounds") if isinstance(settings, dict) else None
    if isinstance(original, int) and original >= 1 and original != config.federation.rounds:
        data = config.to_dict()
        data["federation"]["rounds"] = original
        return ExperimentConfig.from_dict(data)
    return config


def run_experiment(
    config: ExperimentConfig | None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run (or resume) one experiment and write its outputs; returns the summary (see the module docstring).

    The output folder stays locked for the whole run (`ubsmoe.fl.outdir.lock_output`): a second run on
    it fails at once with an `OutputFolderError` (a `ConfigError`) naming the holder's pid.
    """
    started = time.perf_counter()
    out = Path(out_dir if out_dir is not None else (config.output.dir if config else "runs/default"))
    if resume and not out.is_dir():
        raise ConfigError(f"--resume {out}: {'not a folder' if out.exists() else 'no such folder'}")
    if not resume:  # before the lock file is made: a refused folder is left exactly as it was
        if config is not None:
            config.method_instance()  # an unknown method or option: one message, nothing written
        refuse_clashes(out)
    with lock_output(out, create=not resume):
        try:
            return _run_locked(config, out, resume, reporter or Reporter(), started)
        except (ConfigError, ModelLoadError, DataError):
            if not resume:
                _undo_unstarted_run(out)
            raise


def _undo_unstarted_run(out: Path) -> None:
    """After bad input stopped a new run before its first round: remove what it wrote (config.yaml, its
    marker, run.log, the evaluation before training), so that the corrected command can use the folder.

    The folder held none of these before (`refuse_clashes`); nothing is removed once a round is saved.
    """
    if (out / CHECKPOINT_DIR).exists() or (out / "summary.json").exists():
        return
    for name in (CONFIG_FILE, RUN_MARKER, RUN_LOG, INITIAL_EVAL_FILE):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    shutil.rmtree(out / EVALUATIONS_DIR, ignore_errors=True)


def _run_locked(
    config: ExperimentConfig | None, out: Path, resume: bool, reporter: Reporter, started: float
) -> dict[str, Any]:
    from ubsmoe.report.progress import ReporterGroup, StageTimer, format_duration

    timer = StageTimer("prepare", start=started)
    config = prepare_output(out, config, resume)
    what = "resuming" if resume else "starting"
    with _run_log(
        out, f"{what} the run in {out} (method {config.method}, seed {config.seed}, pid {os.getpid()})"
    ) as log:
        try:
            summary = _run_stages(config, out, resume, _TimedReporter(ReporterGroup(log, reporter), timer), started)
        except BaseException as error:
            if isinstance(error, KeyboardInterrupt):
                reason = f"interrupted; continue with: ubsmoe run --resume {out}"
            else:
                first = str(error).strip().splitlines()
                reason = f"{type(error).__name__}: {first[0]}" if first else type(error).__name__
            log.line(f"stopped: {reason}")
            raise
        log.line(f"finished in {format_duration(summary['timing']['total_s'])}")
    return summary


@dataclasses.dataclass
class ExperimentSetup:
    """What a run needs before its first round, the same for `ubsmoe run` and the Flower ServerApp."""

    loaded: LoadedModel
    data: FederatedData
    top_ks: list[int]
    tiers: list[Tier]
    flops: dict[str, Any]
    evaluator: TierEvaluator
    load_s: float
    """Seconds from the run's start until the model and the data were loaded."""


def set_up_experiment(
    config: ExperimentConfig, reporter: Any, started: float, out: Path | None = None
) -> ExperimentSetup:
    """Load the model and the data, check them against the config, count each tier's FLOPs and prepare
    the per-tier evaluation (its per-example records go to `out/evaluations/`); `reporter` (a
    `_TimedReporter`) times each stage."""
    reporter.begin("model", "loading the model")
    loaded = load_experiment_model(config, progress=reporter.stage, steps=reporter.steps, begin=reporter.begin)
    cache = loaded.info.get("moefication_cache")
    if cache:
        outcome = "hit" if cache.get("hit") else "miss"
        reporter.timer.annotate("moefication", cache=outcome)
        reporter.reporter.stage(f"MoEfication cache {outcome}: {cache.get('path')}")  # a line, not a timed part
    top_ks = config.client_top_ks(loaded.k_max)
    reporter.begin("data", "loading the data")
    data = experiment_data(config, loaded, progress=reporter.stage)
    tiers = experiment_tiers(config, top_ks)
    load_s = time.perf_counter() - started
    reporter.begin("flops", "measuring training FLOPs per tier")
    flops = tier_flops(loaded.model, config, tiers, data)
    reporter.begin("evaluation_setup", "preparing the evaluation")
    records = out / EVALUATIONS_DIR if out is not None else None
    evaluator = TierEvaluator(loaded, config, data, tiers, reporter, records)
    return ExperimentSetup(loaded, data, top_ks, tiers, flops, evaluator, load_s)


def timed_reporter(reporter: Any, started: float) -> _TimedReporter:
    """`reporter` with the run's stages timed from `started` (`timing.stages` of summary.json)."""
    from ubsmoe.report.progress import StageTimer

    return _TimedReporter(reporter, StageTimer("prepare", start=started))


def _run_stages(
    config: ExperimentConfig, out: Path, resume: bool, reporter: _TimedReporter, started: float
) -> dict[str, Any]:
    from ubsmoe.report.summary import build_summary, write_outputs, write_summary

    settings = _prepare_resume(out, config) if resume else config
    setup = set_up_experiment(config, reporter, started, out)
    loaded, data, top_ks, tiers, flops, evaluator = (
        setup.loaded,
        setup.data,
        setup.top_ks,
        setup.tiers,
        setup.flops,
        setup.evaluator,
    )
    model, tokenizer, load_s = loaded.model, loaded.tokenizer, setup.load_s
    initial_path = out / INITIAL_EVAL_FILE
    initial = None
    if config.evaluation.initial:
        if resume and initial_path.is_file():
            initial = json.loads(initial_path.read_text(encoding="utf-8"))
        else:
            reporter.begin("initial_evaluation")
            torch.manual_seed(config.seed)
            initial = evaluator(model, None, initial_global_state(model, config))
            write_text_atomic(initial_path, json.dumps(initial, indent=2) + "\n")

    def evaluate(model: nn.Module, round: int, state: GlobalState) -> dict[str, Any]:
        result = {}
        if evaluation_due(config, round):
            reporter.begin("evaluation", round=round + 1)
            result = evaluator(model, round, state)
        reporter.begin("checkpoint", round=round + 1)  # the round's record, checkpoint and metrics lines
        return result

    try:
        hooks = SimulationHooks(
            evaluate=evaluate,
            on_round=reporter.round_finished,
            on_round_start=lambda r, p: reporter.round_started(
                r, config.federation.rounds, p, config.federation.local_steps
            ),
            on_step=reporter.step,
        )
        records = run_simulation(
            model,
            data.client_encoded,
            top_ks,
            settings,
            out,
            run={"rounds": config.federation.rounds},
            resume=resume,
            hooks=hooks,
            pad_id=pad_token_id(tokenizer),
            max_norm=config.federation.max_update_norm,
            keep_checkpoints=config.output.keep_checkpoints,
        )
    except ValueError as error:
        if not (resume and str(error).startswith("cannot resume from")):
            raise
        raise ConfigError(
            f"{error}: the data, the model or {CONFIG_FILE} changed since the run started; undo the change, or "
            "start a new run in another folder"
        ) from None
    reporter.begin("outputs", "writing the summary and plots")
    summary = build_summary(
        config=config,
        loaded=loaded,
        data=data,
        tiers=tiers,
        top_ks=top_ks,
        flops=flops,
        initial=initial,
        records=records,
        timing={"load_s": load_s, "total_s": time.perf_counter() - started},
    )
    write_outputs(summary, model, out, config, note=reporter.reporter.stage)  # a line, not a timed part
    reporter.timer.finish()  # summary.json again, now with the time its outputs took
    summary["timing"].update(total_s=time.perf_counter() - started, stages=reporter.timer.stages())
    write_summary(summary, out)
    return summary
