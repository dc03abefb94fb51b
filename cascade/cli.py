"""The `cascade` command line: each command group lives in `cascade.commands.<name>`, and every
command runs inside one error boundary.

The boundary (`_Boundary.invoke`): a failure the user caused (bad data, a bad config value, a
stage that fails, a file that cannot be read or written) becomes one or two lines naming the
file, key or value and what was expected, with exit status 2. So does anything raised by the
user's own code (a plugin module: any file that is neither cascade's nor an installed library's),
named by its file and line: an exception the stage boundary does not wrap (`GeneratorExit`), a
`sys.exit` at import, a `KeyboardInterrupt` raised without a Ctrl-C. Anything else is a bug of
ours: one line saying so, a hint to report it and to rerun with `--debug` (or `CASCADE_DEBUG=1`)
to see the stack, exit status 1. Ctrl-C stops with status 130 and no traceback. Usage errors
(a missing argument, an unknown option) are click's: its message and exit status 2.
"""

from __future__ import annotations

import os
import signal
import sys
import sysconfig
import threading
from pathlib import Path
from types import TracebackType

import typer
from typer.core import TyperGroup

from cascade.commands import ablation, compare, data, run
from cascade.data.dataset import DataError
from cascade.stages.base import StageError

USER_ERRORS = (DataError, StageError, ValueError, OSError)


def _click_exceptions() -> tuple[type[BaseException], ...]:
    """What click reports itself (usage errors, Exit, Abort). typer >= 0.29 ships its own copy
    of click (`typer._click`), so the classes come from the module typer's own BadParameter
    lives in, plus the standalone click's where it is installed."""
    mods = [sys.modules[typer.BadParameter.__module__]]
    try:
        import click.exceptions

        mods.append(click.exceptions)
    except ImportError:
        pass
    found: list[type[BaseException]] = [typer.Exit, typer.Abort]
    for m in mods:
        found += [getattr(m, n) for n in ("ClickException", "Exit", "Abort") if hasattr(m, n)]
    return tuple(found)


CLICK_EXCEPTIONS = _click_exceptions()


def _debug() -> bool:
    return os.environ.get("CASCADE_DEBUG", "") not in ("", "0")


def user_error_message(err: BaseException) -> str:
    """One line for a user-caused failure: OSErrors name their file and reason."""
    if isinstance(err, OSError) and not isinstance(err, (DataError,)) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    return str(err) or type(err).__name__


def _library_dirs() -> tuple[str, ...]:
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            dirs.add(sysconfig.get_path(key))
        except KeyError:
            pass
    return tuple(str(Path(d).resolve()) + os.sep for d in dirs if d)


def user_frame(tb: TracebackType | None) -> tuple[str, int] | None:
    """(file, line) of the innermost frame of `tb` that is the user's own code: a file that is
    neither a cascade module nor the interpreter's or an installed library's (a plugin module
    in the current directory, a script). None when every frame is ours or a library's."""
    libs = _library_dirs()
    found = None
    while tb is not None:
        frame = tb.tb_frame
        module = str(frame.f_globals.get("__name__", ""))
        file = frame.f_code.co_filename
        ours = module == "cascade" or module.startswith("cascade.")
        if not ours and not file.startswith("<"):
            try:
                resolved = str(Path(file).resolve())
            except (OSError, RuntimeError):
                resolved = file
            if not resolved.startswith(libs):
                found = (file, tb.tb_lineno)
        tb = tb.tb_next
    return found


class _SigintWatch:
    """Records whether a real Ctrl-C (SIGINT) arrived while a command ran, so that a
    KeyboardInterrupt a plugin raises itself is not taken for the user stopping the run."""

    def __init__(self) -> None:
        self.seen = False
        self._old = None

    def __enter__(self) -> _SigintWatch:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True, emoji=False, highlight=False).print(text, soft_wrap=True)


def _user_code_error(e: BaseException, where: tuple[str, int], what: str) -> typer.Exit:
    from rich.markup import escape

    detail = ""
    try:
        detail = str(e)
    except Exception:  # noqa: BLE001 - an exception whose str() fails still gets named
        pass
    _say(f"[red]error:[/red] {escape(what)} in {escape(where[0])}, line {where[1]}"
         + (f": {escape(detail)}" if detail and not isinstance(e, SystemExit) else ""))
    return typer.Exit(2)


class _Boundary(TyperGroup):
    def invoke(self, ctx):  # noqa: D401 - click's hook
        from rich.markup import escape

        watch = _SigintWatch()
        try:
            with watch:
                return super().invoke(ctx)
        except CLICK_EXCEPTIONS:
            raise
        except SystemExit as e:  # click never raises it inside invoke: someone's sys.exit
            where = user_frame(e.__traceback__)
            if where is None or _debug():
                raise
            raise _user_code_error(e, where, f"sys.exit({e.code!r}) called") from None
        except KeyboardInterrupt as e:
            where = None if watch.seen else user_frame(e.__traceback__)
            if where is None:
                _say("[red]interrupted[/red]")
                raise typer.Exit(130) from None
            if _debug():
                raise
            raise _user_code_error(e, where, "KeyboardInterrupt raised without a Ctrl-C") from None
        except USER_ERRORS as e:
            if _debug():
                raise
            _say(f"[red]error:[/red] {escape(user_error_message(e))}")
            raise typer.Exit(2) from None
        except BaseException as e:  # noqa: BLE001 - the boundary: the user's code, or our bug
            if _debug():
                raise
            where = user_frame(e.__traceback__)
            if where is not None:
                raise _user_code_error(e, where, f"{type(e).__name__} raised") from None
            try:
                detail = str(e)
            except Exception:  # noqa: BLE001
                detail = "(its message cannot be shown)"
            _say(
                f"[red]internal error:[/red] {escape(type(e).__name__)}: {escape(detail)}\n"
                "This is a bug in cascade: please report it with the command you ran; rerun "
                "with --debug to see where it happened."
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
