"""The `ubsmoe` command."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Resource-adaptive federated fine-tuning with a Universally Balanced Sparse MoE (UB-SMoE).",
)
console = Console()


@app.callback()
def main() -> None:
    """UB-SMoE: clients with different compute budgets fine-tune one shared sparse MoE."""


class _RichReporter:
    """Progress bars for `ubsmoe run`: rounds, the clients of the round, a client's local steps, evaluation."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.rounds = self.clients = self.step_bar = self.evaluation = None  # not `steps`: that is an event
        self.client = None
        self.local_steps = 1
        self.bars: dict[str, TaskID] = {}

    def stage(self, text: str) -> None:
        self.progress.console.print(text)

    def steps(self, what: str, done: int, total: int) -> None:
        if self.bars.get(what) is None:
            self.bars[what] = self.progress.add_task(what, total=total)
        self.progress.update(self.bars[what], completed=done, total=total)

    def round_started(self, round: int, total_rounds: int, participants: list[int], local_steps: int) -> None:
        if self.rounds is None:
            self.rounds = self.progress.add_task("rounds", total=total_rounds, completed=round)
        self.local_steps = local_steps
        for task in (self.clients, self.step_bar):
            if task is not None:
                self.progress.remove_task(task)
        self.clients = self.progress.add_task(f"  round {round + 1}: clients", total=len(participants))
        self.step_bar = self.progress.add_task("    local steps", total=local_steps)
        self.client = None

    def step(self, round: int, client: int, step: int) -> None:
        if client != self.client:
            if self.client is not None:
                self.progress.advance(self.clients)
            self.client = client
            self.progress.reset(self.step_bar, total=self.local_steps, description=f"    client {client}: local steps")
        self.progress.update(self.step_bar, completed=step)

    def round_finished(self, record) -> None:
        self.progress.update(self.clients, completed=len(record["clients"]))
        self.progress.advance(self.rounds)
        dropped = record.get("dropped") or []
        for item in dropped:
            self.progress.console.print(
                f"[yellow]round {record['round'] + 1}: dropped client {item['client_id']}: {item['reason']}"
            )
        train = record.get("train") or {}
        text = f"round {record['round'] + 1}: train loss {train.get('train_lm_loss', float('nan')):.3f}"
        if record.get("mean_utilization_cv") is not None:
            text += f", utilization CV {record['mean_utilization_cv']:.3f}"
        evaluation = record.get("eval") or {}
        if evaluation:
            text += f", mean accuracy {100 * evaluation['mean_accuracy']:.1f}%"
        self.progress.console.print(text)

    def evaluation_started(self, label: str, total: int) -> None:
        self.evaluation = self.progress.add_task(f"  {label}", total=total)

    def evaluation_advanced(self, amount: int) -> None:
        self.progress.advance(self.evaluation, amount)

    def evaluation_finished(self) -> None:
        if self.evaluation is not None:
            self.progress.remove_task(self.evaluation)
            self.evaluation = None


def _terminal() -> bool:
    """Whether stdout is a terminal: rich progress bars there, plain progress lines otherwise."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def _reporter(label: str | None = None) -> Iterator[object]:
    """Rich progress bars on a terminal; elsewhere (nohup, a scheduler, CI) plain lines, one at least every 30 s."""
    if not _terminal():
        from ubsmoe.report.progress import PlainReporter

        with PlainReporter(sys.stdout, label=label) as reporter:
            yield reporter
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield _RichReporter(progress)


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


@app.command()
def run(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Experiment config (.yaml/.yml/.toml); default: the embedded default."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override one value, e.g. --set federation.rounds=5 (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: output.dir of the config, runs/default).")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="Start from a named preset before --config and --set: benchmark (docs/running.md)."),
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the interrupted run in this folder, with its saved configuration.")
    ] = None,
) -> None:
    """Run the federated experiment end to end: summary.json, metrics.jsonl, plots/, checkpoints in the output folder."""
    from ubsmoe.config import ConfigError, load_config

    try:
        if resume is not None:
            if config is not None or overrides or preset is not None:
                raise ConfigError(
                    f"--resume {resume} continues the run with its saved config.yaml; drop --config/--set/--preset"
                )
            if out is not None and out.resolve() != resume.resolve():
                raise ConfigError(f"--out {out} and --resume {resume} name different folders")
            experiment, folder = None, resume
        else:
            experiment = load_config(config, overrides or [], preset)
            folder = out if out is not None else Path(experiment.output.dir)
    except ConfigError as error:
        raise _fail(str(error)) from None
    _run_experiment(experiment, folder, resume is not None)


@app.command()
def compare(
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated methods, e.g. ubsmoe,fedit,hetlora,flexlora,flora,florist,smoe-naive,smoe-llb,a3smoe "
            "(also the ablations ubsmoe-no-dmr, ubsmoe-no-pg, ubsmoe-no-reg, ubsmoe-np1x/2x/4x)."
        ),
    ] = "ubsmoe,smoe-naive",
    seeds: Annotated[int, typer.Option(help="Seeds per method: config seed, seed + 1, ...")] = 1,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Base experiment config; default: the embedded default."),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override one value of the base config (repeatable).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Comparison folder; run the same command again to resume.")] = Path(
        "runs/compare"
    ),
    preset: Annotated[
        str | None,
        typer.Option(help="Start from a named preset before --config and --set: benchmark (docs/running.md)."),
    ] = None,
    finished_only: Annotated[
        bool, typer.Option("--finished-only", help="Run nothing: the table of the runs finished so far.")
    ] = False,
) -> None:
    """Run the same experiment for several methods and seeds: comparison.json, comparison.md and plots/."""
    from ubsmoe.compare import method_labels, run_comparison
    from ubsmoe.config import ConfigError, load_config

    try:
        labels = method_labels(methods)
        base = load_config(config, overrides or [], preset)
        if seeds < 1:
            raise ConfigError(f"--seeds {seeds}: must be an integer >= 1")
    except ConfigError as error:
        raise _fail(str(error)) from None

    plain = None
    if not _terminal():
        from ubsmoe.report.progress import PlainReporter

        plain = PlainReporter(sys.stdout, heartbeat=False)  # each run has its own, with the heartbeat

    def announce(label: str, seed: int, status: str) -> None:
        if plain is not None:
            plain.line(f"compare: {label} · seed {seed} · {status}")
        else:
            console.rule(f"{label} · seed {seed} · {status}")

    def one_run(experiment, folder: Path, resume: bool) -> dict:
        return _run_experiment(
            experiment, folder, resume, show_table=False, label=f"{folder.parent.name} {folder.name}"
        )

    try:
        comparison = run_comparison(base, labels, seeds, out, run=one_run, on_run=announce, finished_only=finished_only)
    except ConfigError as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; run the same command again to resume the comparison") from None
    from ubsmoe.report.comparison import comparison_markdown

    print(comparison_markdown(comparison))
    if comparison["missing"]:
        runs = ", ".join(f"{m['method']} seed {m['seed']} ({m['status']})" for m in comparison["missing"])
        console.print(f"not in the table yet: {runs}")
    console.print(f"wrote [bold]{out / 'comparison.json'}[/], comparison.md and plots/ in {out}")


@app.command("config")
def show_config(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment config (.yaml/.yml/.toml).")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override one value (repeatable).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write it to this file (.yaml/.toml/.json) instead of printing.")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="Start from a named preset before --config and --set: benchmark (docs/running.md)."),
    ] = None,
) -> None:
    """Print the full, validated configuration (the defaults, your file, your --set values): a template to edit."""
    from ubsmoe.config import ConfigError, load_config, save_config

    try:
        experiment = load_config(config, overrides or [], preset)
        if out is not None:
            save_config(experiment, out)
            console.print(f"wrote {out}")
            return
    except ConfigError as error:
        raise _fail(str(error)) from None
    except OSError as error:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else error.strerror or error
        raise _fail(f"cannot write {out}: {reason}") from None
    import yaml

    print(yaml.safe_dump(experiment.to_dict(), sort_keys=False), end="")


@app.command("export")
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished `ubsmoe run` folder (or its adapters/ folder).")],
    out_dir: Annotated[Path, typer.Argument(help="A new or empty folder to write the export to.")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="peft: a LoRA adapter of the original model for peft's PeftModel.from_pretrained (native MoE "
            "models at their native K; MoEfied models at K = M, as a dense LoRA). merged: native MoE models only, "
            "the LoRA folded into a plain transformers checkpoint.",
        ),
    ] = "peft",
) -> None:
    """Export a finished run's final adapters for use without ubsmoe (docs/models.md)."""
    from ubsmoe.models.peft_export import export_run

    try:
        written, notes = export_run(run_dir, out_dir, format, progress=console.print)
    except (ValueError, OSError) as error:  # every export error is a ValueError (PeftExportError, ModelLoadError ...)
        text = str(error).strip()
        raise _fail(text.splitlines()[0] if text else type(error).__name__) from None
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"wrote [bold]{written}[/] ({format})")


def _run_experiment(experiment, folder: Path, resume: bool, show_table: bool = True, label: str | None = None) -> dict:
    from ubsmoe.config import ConfigError
    from ubsmoe.data.bigbench import BigBenchError
    from ubsmoe.data.commonsense import CommonsenseDataError
    from ubsmoe.data.federated import DataError
    from ubsmoe.fl.checkpoint import CheckpointError
    from ubsmoe.fl.experiment import run_experiment
    from ubsmoe.models.native import ModelLoadError
    from ubsmoe.report.tables import summary_table

    try:  # our own bars replace transformers' per-load bars
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        with _reporter(label) as reporter:
            summary = run_experiment(experiment, folder, resume=resume, reporter=reporter)
    except (ConfigError, ModelLoadError, DataError, CommonsenseDataError, BigBenchError, CheckpointError) as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        if not show_table:  # inside `ubsmoe compare`, which says how to resume
            raise
        raise _fail(f"interrupted; continue with: ubsmoe run --resume {folder}") from None
    if show_table:
        console.print(summary_table(summary))
        console.print(
            f"\nwrote [bold]{folder / 'summary.json'}[/], metrics.jsonl, run.log, plots/ and checkpoint/ in {folder}"
        )
    return summary


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for demo.json and demo.png.")] = Path("runs/demo"),
    rounds: Annotated[int, typer.Option(min=1, max=1000, help="Federated rounds.")] = 10,
    local_steps: Annotated[int, typer.Option(min=1, max=10_000, help="Local steps per client and round.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of weights, data and training.")] = 0,
) -> None:
    """Demonstrate the UB-SMoE block: four budget tiers, DMR and PG versus plain Top-K (synthetic, ~1 min)."""
    import torch

    from ubsmoe.demo import DemoSettings, run_demo

    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = DemoSettings(rounds=rounds, local_steps=local_steps, seed=seed)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        names = iter(["UB-SMoE (DMR + PG)", "SMoE-naive (plain Top-K)"])

        def new_bar(total: int):
            task = progress.add_task(f"training {next(names)}", total=total)
            return lambda steps: progress.advance(task, steps)

        summary = run_demo(settings, out, new_bar)
    _print_demo(summary)
    console.print(f"\nwrote [bold]{out / 'demo.json'}[/] and [bold]{out / 'demo.png'}[/]")


def _print_demo(summary: dict) -> None:
    methods = summary["methods"]
    table = Table(title="Final round, per budget tier (test loss relative to the untrained layer; lower is better)")
    table.add_column("tier (K of 8)")
    table.add_column("train FLOPs/token vs K=8", justify="right")
    for name in methods:
        table.add_column(name, justify="right")
    for tier, k in enumerate(summary["top_k_per_tier"]):
        row = [f"K={k}", f"{summary['flops_relative_to_full_k'][k]:.2f}"]
        row += [f"{methods[name]['rounds'][-1]['relative_test_loss'][tier]:.3f}" for name in methods]
        table.add_row(*row)
    table.add_row(
        "utilization CV", "", *[f"{methods[n]['rounds'][-1]['utilization_cv']:.3f}" for n in methods], end_section=True
    )
    table.add_row("dead experts", "", *[str(methods[n]["rounds"][-1]["dead_experts"]) for n in methods])
    console.print(table)


if __name__ == "__main__":
    app()
