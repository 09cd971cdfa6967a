"""The ServerApp: one `ubsmoe run` experiment driven over Flower (simulation or deployment).

Run config (`[tool.flwr.app.config]` in pyproject.toml, or `flwr run ... --run-config "key=value"`):

- `config`: path of the experiment YAML/TOML (`""`: the embedded default experiment);
- `overrides`: `key=value` settings applied on top, separated by `;` (as `ubsmoe run --set`);
- `out-dir`: the output folder (`""`: the config's `output.dir`); it receives what `ubsmoe run`
  writes: config.yaml, initial_eval.json, metrics.jsonl, checkpoint/round_XXXX, summary.json,
  plots, adapters (with adapters/peft/, the final adapters in peft's format, like FlowerTune's PEFT
  checkpoints; why there is none, for FLoRA/FLoRIST, is logged);
- `round-timeout`: seconds the server waits for a round's replies before carrying on without the rest;
- `min-replies`: the fewest client updates a round may be aggregated from (below it the run stops);
  at most the number of clients a round samples, checked before anything is loaded;
- `fraction-evaluate`: share of nodes asked for a federated evaluation (their LM loss) each round;
- `resume`: continue the interrupted run in `out-dir` from its newest checkpoint (written by this app
  or by `ubsmoe run`), with the configuration saved there (`config`/`overrides`, when given, may differ
  from it only in `federation.rounds`, to extend the run), as `ubsmoe run --resume` does.

Paths are used as given, so pass absolute ones where the ServerApp may run in another folder (a
SuperLink runs it from its own working directory).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from ubsmoe.config import ConfigError, ExperimentConfig, load_config
from ubsmoe.fl.experiment import Reporter, prepare_output, refuse_clashes, set_up_experiment, timed_reporter
from ubsmoe.fl.outdir import lock_output
from ubsmoe.fl.server import sample_clients
from ubsmoe.flower.records import state_to_records
from ubsmoe.flower.runtime import make_runtime
from ubsmoe.flower.strategy import UBSMoEStrategy

__all__ = ["DEFAULTS", "ServerOptions", "app", "check_options", "clients_per_round", "make_server_app", "run_server"]

DEFAULTS: dict[str, Any] = {
    "config": "",
    "overrides": "",
    "out-dir": "",
    "round-timeout": 600.0,
    "min-replies": 1,
    "fraction-evaluate": 0.0,
    "resume": False,
}


@dataclass(frozen=True)
class ServerOptions:
    config: str = ""
    overrides: tuple[str, ...] = ()
    out_dir: str = ""
    round_timeout: float = 600.0
    min_replies: int = 1
    fraction_evaluate: float = 0.0
    resume: bool = False

    @classmethod
    def from_run_config(cls, values: Mapping[str, Any]) -> ServerOptions:
        merged = {**DEFAULTS, **values}
        overrides = merged["overrides"]
        if isinstance(overrides, str):
            overrides = [o.strip() for o in overrides.split(";")]
        return cls(
            config=str(merged["config"]),
            overrides=tuple(o for o in overrides if o),
            out_dir=str(merged["out-dir"]),
            round_timeout=float(merged["round-timeout"]),
            min_replies=int(merged["min-replies"]),
            fraction_evaluate=float(merged["fraction-evaluate"]),
            resume=_flag(merged["resume"], "resume"),
        )


def _flag(value: Any, name: str) -> bool:
    """A run-config boolean: true/false, or their text (the run config of `flwr run` may carry either)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} = {value!r}: must be true or false")


def clients_per_round(config: ExperimentConfig) -> int:
    """How many of the experiment's clients a round samples (`sample_clients`' count: the same every round)."""
    return len(sample_clients(range(config.num_clients), config.federation.fraction, 0, config.seed))


def check_options(options: ServerOptions, config: ExperimentConfig) -> None:
    """ValueError, with one message naming the setting, when `options` cannot work for `config`.

    Checked before the model is loaded and before the first round: a `min-replies` above the clients a
    round samples would otherwise stop the run only once the first round has been trained.
    """
    per_round = clients_per_round(config)
    if not 1 <= options.min_replies <= per_round:
        raise ValueError(
            f"min-replies = {options.min_replies}: must be in 1..{per_round}, the clients a round samples "
            f"({per_round} of the experiment's {config.num_clients} at federation.fraction = "
            f"{config.federation.fraction:g}); above that every round would stop the run"
        )
    if not (math.isfinite(options.round_timeout) and options.round_timeout > 0):
        raise ValueError(f"round-timeout = {options.round_timeout:g}: must be a positive number of seconds")
    if not 0.0 <= options.fraction_evaluate <= 1.0:
        raise ValueError(f"fraction-evaluate = {options.fraction_evaluate:g}: must be in [0, 1]")


def run_server(grid: Grid, options: ServerOptions) -> dict[str, Any]:
    """Run the experiment of `options` over `grid`; writes the outputs and returns the summary.

    The output folder is checked and locked as for `ubsmoe run` (`ubsmoe.fl.outdir`).
    """
    started = time.perf_counter()
    config = load_config(options.config or None, list(options.overrides))
    out = Path(options.out_dir or config.output.dir)
    if options.resume:
        if not out.is_dir():
            raise ConfigError(f"resume: {out} is {'not a folder' if out.exists() else 'no such folder'}")
        given = config if (options.config or options.overrides) else None
        config = prepare_output(out, given, resume=True)  # the run's own config (rounds may be extended)
    check_options(options, config)  # before the output folder, the model and the first round
    if not options.resume:
        config.method_instance()  # an unknown method or option: one message, nothing written
        refuse_clashes(out)  # before the lock file is made: a refused folder is left exactly as it was
    with lock_output(out, create=not options.resume):  # one run per output folder, as `ubsmoe run`
        return _run_locked(grid, options, config, out, started)


def _run_locked(grid: Grid, options: ServerOptions, config: ExperimentConfig, out: Path, started: float) -> dict:
    from ubsmoe.report.summary import build_summary, write_outputs, write_summary

    if not options.resume:
        config = prepare_output(out, config, resume=False)
    reporter = timed_reporter(_LogReporter(), started)
    setup = set_up_experiment(config, reporter, started, out)  # the same set-up as `ubsmoe run`
    runtime = make_runtime(config, setup.loaded, setup.data)
    model = runtime.loaded.model
    reporter.begin("federation", "starting the federation")
    strategy = UBSMoEStrategy(
        runtime,
        setup.evaluator,
        out,
        min_replies=options.min_replies,
        round_timeout=options.round_timeout,
        fraction_evaluate=options.fraction_evaluate,
        keep_checkpoints=config.output.keep_checkpoints,
        resume=options.resume,
    )
    if strategy.rounds_left <= 0:
        raise ConfigError(f"resume: the run in {out} has finished its {config.federation.rounds} round(s)")
    log(
        INFO,
        "%s at round %s of %s",
        "resuming" if options.resume else "starting",
        strategy.state.round,
        config.federation.rounds,
    )
    arrays, _ = state_to_records(strategy.state)
    strategy.start(
        grid,
        arrays,
        num_rounds=strategy.rounds_left,
        timeout=options.round_timeout,
        evaluate_fn=strategy.evaluate_global,
    )
    reporter.begin("outputs", "writing the summary and plots")
    summary = build_summary(
        config=config,
        loaded=runtime.loaded,
        data=runtime.data,
        tiers=setup.tiers,
        top_ks=setup.top_ks,
        flops=setup.flops,
        initial=strategy.initial_eval,
        records=strategy.records,
        timing={"load_s": setup.load_s, "total_s": time.perf_counter() - started},
    )
    summary["runtime"] = {"kind": "flower", "nodes": {str(c): n.budget for c, n in sorted(strategy.nodes.items())}}
    write_outputs(summary, model, out, config, note=lambda line: log(INFO, "%s", line))
    reporter.timer.finish()  # summary.json again, with the stages' times (the federation's as one stage)
    summary["timing"].update(total_s=time.perf_counter() - started, stages=reporter.timer.stages())
    write_summary(summary, out)
    return summary


class _LogReporter(Reporter):
    """The set-up's stage lines in the ServerApp's log (Flower's logger)."""

    def stage(self, text: str) -> None:
        log(INFO, "%s", text)


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run-config defaults are `defaults` (the run config still wins)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, ServerOptions.from_run_config({**(defaults or {}), **dict(context.run_config)}))

    return server_app


app = make_server_app()
