"""`cascade data ...`: inspect datasets (`describe`) and fill the download cache (`download`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Inspect and fetch datasets.")


@app.callback()
def _group() -> None:
    """Inspect and fetch datasets."""  # a callback keeps `describe` a named subcommand


def _fail(err: Exception) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True, emoji=False).print(f"[bold red]error:[/bold red] {escape(str(err))}")
    raise typer.Exit(2)


@app.command()
def describe(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="Known name (ml-100k, ml-1m, ...), a path (format detected) or synthetic[:preset].",
        ),
    ],
    fmt: Annotated[str, typer.Option("--format", help="Output: table or json.")] = "table",
    strict: Annotated[
        bool, typer.Option("--strict", help="Duplicate events or too-short users are errors.")
    ] = False,
    cache_dir: Annotated[
        Optional[Path], typer.Option("--cache-dir", help="Where known datasets are kept.")
    ] = None,
) -> None:
    """Summarise a dataset: sizes, density, history-length and popularity percentiles,
    features, and what the loader filtered or derived.

    Bad input exits with code 2 and a message naming the file and line or column."""
    from cascade.data.dataset import DataError
    from cascade.data.describe import describe as describe_dataset
    from cascade.data.describe import render
    from cascade.data.loaders import load_dataset

    if fmt not in ("table", "json"):
        _fail(ValueError(f"--format must be 'table' or 'json', got {fmt!r}"))
    opts = {"strict": True} if strict else {}
    try:
        desc = describe_dataset(load_dataset(data, cache_dir=cache_dir, **opts))
    except (DataError, ValueError) as e:
        _fail(e)
    if fmt == "json":
        typer.echo(json.dumps(desc, indent=2))
    else:
        from rich.console import Console

        Console(emoji=False).print(render(desc))


@app.command()
def download(
    name: Annotated[str, typer.Argument(help="Known dataset name (ml-100k, ml-1m, ...).")],
    cache_dir: Annotated[
        Optional[Path], typer.Option("--cache-dir", help="Where known datasets are kept.")
    ] = None,
) -> None:
    """Download a known MovieLens dataset from GroupLens into the cache (if absent)."""
    from cascade.data.dataset import DataError
    from cascade.data.download import dataset_dir

    try:
        path = dataset_dir(name, cache_dir)
    except (DataError, ValueError) as e:
        _fail(e)
    typer.echo(str(path))
