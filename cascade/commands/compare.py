"""`cascade compare`, `cascade report` and `cascade sweep`: reading saved runs side by side, a
run's report.md, and budget sweeps under a latency budget. Command bodies are short; the work is
in `cascade.compare`, `cascade.report` and `cascade.sweep`."""

from __future__ import annotations

import contextlib
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from cascade.data.dataset import DataError


class Format(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"
    csv = "csv"


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    """Bad input -> one line on stderr and exit code 2, never a traceback."""
    from cascade.stages.base import StageError

    try:
        yield
    except (DataError, StageError, ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders; the first is the reference.")],
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Folder for comparison.md/.json and the figures."),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples for the paired 95% intervals.", min=100)
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resampling.")] = 0,
) -> None:
    """Put saved runs side by side: funnel recall, final metrics, latency and throughput of every
    ESR variant of every run, with paired per-request deltas and bootstrap 95% intervals against
    the first run's primary variant when the runs replayed the same traffic."""
    from cascade import compare as cmp

    with _clean_errors():
        c = cmp.compare_runs(cmp.read_runs(runs), n_boot=bootstrap, seed=seed)
        written = cmp.write_comparison(c, out) if out is not None else []
    if fmt is Format.json:
        typer.echo(json.dumps(c.to_json(), indent=2))
    elif fmt is Format.csv:
        typer.echo(cmp.to_csv(c), nl=False)
    elif fmt is Format.markdown:
        typer.echo(cmp.to_markdown(c), nl=False)
    else:
        from rich.console import Console

        con = Console()
        con.print(cmp.to_rich(c))
        for note in c.notes:
            con.print(f"- {note}", highlight=False)
    if written:
        typer.echo(f"wrote {len(written)} files to {out}", err=fmt is not Format.table)


def report(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
) -> None:
    """(Re)draw a run's figures and write its report.md."""
    from cascade.report import write_report

    with _clean_errors():
        path = write_report(run)
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
    app.command("report")(report)
