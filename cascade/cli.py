"""The `cascade` command line: each command group lives in `cascade.commands.<name>`, and every
command runs inside one error boundary.

The boundary (`_Boundary.invoke`): a failure the user caused (bad data, a bad config value, a
stage that fails, a file that cannot be read or written) becomes one or two lines naming the
file, key or value and what was expected, with exit status 2. Anything else is a bug of ours: one
line saying so, a hint to report it and to rerun with `--debug` (or `CASCADE_DEBUG=1`) to see the
stack, exit status 1. Ctrl-C stops with status 130 and no traceback.
"""

from __future__ import annotations

import os
import sys

import click
import typer
from typer.core import TyperGroup

from cascade.commands import ablation, compare, data, run
from cascade.data.dataset import DataError
from cascade.stages.base import StageError

USER_ERRORS = (DataError, StageError, ValueError, OSError)


def _debug() -> bool:
    return os.environ.get("CASCADE_DEBUG", "") not in ("", "0")


def user_error_message(err: BaseException) -> str:
    """One line for a user-caused failure: OSErrors name their file and reason."""
    if isinstance(err, OSError) and not isinstance(err, (DataError,)) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    return str(err) or type(err).__name__


class _Boundary(TyperGroup):
    def invoke(self, ctx: click.Context):  # noqa: D401 - click's hook
        from rich.console import Console
        from rich.markup import escape

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, typer.Exit,
                typer.Abort):
            raise
        except KeyboardInterrupt:
            Console(stderr=True, emoji=False).print("[red]interrupted[/red]")
            raise typer.Exit(130) from None
        except USER_ERRORS as e:
            if _debug():
                raise
            Console(stderr=True, emoji=False, highlight=False).print(
                f"[red]error:[/red] {escape(user_error_message(e))}", soft_wrap=True
            )
            raise typer.Exit(2) from None
        except Exception as e:  # noqa: BLE001 - the boundary: a bug of ours, said as such
            if _debug():
                raise
            Console(stderr=True, emoji=False, highlight=False).print(
                f"[red]internal error:[/red] {escape(type(e).__name__)}: {escape(str(e))}\n"
                "This is a bug in cascade: please report it with the command you ran; rerun "
                "with --debug to see where it happened.", soft_wrap=True,
            )
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Boundary,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="cascade: simulate a recommendation funnel (retrieval -> ESR -> LSR) and measure "
    "recall through it and per-stage latency.",
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full stack of any error."),
) -> None:
    """cascade: simulate a recommendation funnel and measure it."""
    if debug:
        os.environ["CASCADE_DEBUG"] = "1"


app.add_typer(data.app, name="data")
run.register(app)
compare.register(app)
ablation.register(app)


@app.command()
def version() -> None:
    """Print cascade's version and the versions of its main dependencies."""
    from cascade.env import capture

    env = capture()
    for name, v in env["versions"].items():
        typer.echo(f"{name} {v or 'not installed'}")
    typer.echo(f"python {env['python']}")


def main() -> None:  # the console script
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
