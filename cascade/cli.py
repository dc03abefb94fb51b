"""The `cascade` command line. Each command group lives in `cascade.commands.<name>` and is
mounted here; a group whose module is missing is skipped so the rest keeps working."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="cascade: simulate a recommendation funnel (retrieval -> ESR -> LSR) and measure "
    "recall through it and per-stage latency.",
)



@app.callback()
def _root() -> None:
    """cascade: simulate a recommendation funnel and measure it."""


# (module, attribute, how to mount): "group" adds a sub-app, "commands" registers its commands
_GROUPS = [
    ("data", "app", "group"),
    ("run", "register", "commands"),
    ("compare", "register", "commands"),
    ("ablation", "register", "commands"),
]

for _mod, _attr, _how in _GROUPS:
    try:
        _m = importlib.import_module(f"cascade.commands.{_mod}")
    except ModuleNotFoundError as _e:
        if _e.name != f"cascade.commands.{_mod}":
            raise
        continue
    if _how == "group":
        app.add_typer(getattr(_m, _attr), name=_mod)
    else:
        getattr(_m, _attr)(app)


@app.command()
def version() -> None:
    """Print cascade's version and the versions of its main dependencies."""
    from cascade import __version__

    typer.echo(f"cascade {__version__}")


if __name__ == "__main__":  # pragma: no cover
    app()
