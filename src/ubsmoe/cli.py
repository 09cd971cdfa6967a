"""The `ubsmoe` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
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
