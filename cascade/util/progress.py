"""Progress a person can follow anywhere: a rich bar on a terminal, and plain lines
("replay: 5,120/20,000 (26%), 812/s, ETA 18 s") every few seconds when stdout is not a terminal
(a log file, CI, nohup), where a bar would print nothing useful.

    with Progress("replay 20,000 requests", total=20_000, unit="requests") as bar:
        for batch in ...:
            bar.advance(len(batch), info="loss 0.41")

`enabled=False` prints nothing. The interval of plain lines is `interval` seconds (default 10,
or $CASCADE_PROGRESS_SECONDS); the last line is always printed when the work ends.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO


def _seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Progress:
    def __init__(
        self,
        description: str,
        *,
        total: int,
        unit: str = "",
        enabled: bool = True,
        interval: float | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        self.description = description
        self.total = max(int(total), 0)
        self.unit = unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        env = os.environ.get("CASCADE_PROGRESS_SECONDS")
        self.interval = interval if interval is not None else float(env) if env else 10.0
        self.done = 0
        self.info = ""
        self._bar = None
        self._task = None
        self._t0 = 0.0
        self._last = 0.0

    def _is_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def __enter__(self) -> Progress:
        self._t0 = self._last = time.perf_counter()
        if self.enabled and self._is_terminal():
            from rich.console import Console
            from rich.progress import (
                BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                TimeRemainingColumn,
            )

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, info="")
        return self

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        rate = self.done / elapsed
        unit = f" {self.unit}" if self.unit else ""
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        eta = ""
        if self.total and 0 < self.done < self.total and rate > 0:
            eta = f", ETA {_seconds((self.total - self.done) / rate)}"
        elif self.done >= self.total:
            eta = f", took {_seconds(elapsed)}"
        info = f", {self.info}" if self.info else ""
        return (f"{self.description}: {self.done:,}/{self.total:,}{unit}{share}, "
                f"{rate:,.1f}/s{eta}{info}")

    def advance(self, n: int = 1, *, info: str | None = None) -> None:
        self.done += n
        if info is not None:
            self.info = info
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=n, info=self.info)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval and self.done < self.total:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            return
        if self.enabled and exc[0] is None:
            print(self.line(), file=self.stream, flush=True)
