"""The format registry: every dataset format cascade reads, found by name or by sniffing a path.

A format is a loader `load(path, **options) -> Dataset` registered with `@register_format`,
together with its sniffer `detect(path) -> bool` (does this regular file hold the format?) and,
for formats that come as a folder, the file that marks such a folder (`folder="u.data"`).
Every module of this package is imported on first use of the registry, so adding a format is
adding one module here (and its test); nothing else lists the formats. Shared parsing lives in
`text` (lines, fields, CSV tables) and `assemble` (ids, features, the Dataset).

Detection (`resolve`):
- a directory holds format F when it contains F's folder file. Two formats' files in one folder
  is an error naming both (name the file you mean). A folder with none is searched one level
  down (an unzipped archive): exactly one dataset there is taken, two are an error naming both.
- a regular file is offered to every sniffer. A `fallback` format (the generic sequence text
  and CSV/Parquet log) is chosen only when no specific format claims the file; two claims at
  the same level are an error naming both.
- anything else (a FIFO, socket or device) is refused without being opened.
"""

from __future__ import annotations

import importlib
import pkgutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cascade.data.dataset import Dataset, DataError
from cascade.data.formats.text import first_data_line, shown

__all__ = ["Format", "register_format", "names", "get_format", "resolve", "detect_format"]


@dataclass(frozen=True)
class Format:
    name: str
    load: Callable[..., Dataset]  # load(path, **options): a file, or a folder when `folder`
    detect: Callable[[Path], bool]  # called with regular files only
    describe: str  # what the user would pass, for error messages: "u.data (MovieLens 100k)"
    folder: str | None = None  # the file whose presence makes a folder this format
    fallback: bool = False  # chosen only when no specific format claims the file


_REGISTRY: dict[str, Format] = {}
_discovered = False


def register_format(
    name: str,
    *,
    detect: Callable[[Path], bool],
    describe: str,
    folder: str | None = None,
    fallback: bool = False,
) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator: register the decorated loader as format `name`."""

    def deco(load: Callable[..., Dataset]) -> Callable[..., Dataset]:
        old = _REGISTRY.get(name)
        same = (old.load.__module__, old.load.__qualname__) if old else None
        if old is not None and same != (load.__module__, load.__qualname__):
            raise ValueError(
                f"format {name!r} is already registered by {old.load.__module__}."
                f"{old.load.__qualname__}"
            )
        _REGISTRY[name] = Format(name, load, detect, describe, folder, fallback)
        return load

    return deco


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
            importlib.import_module(f"{__name__}.{mod}")


def names() -> list[str]:
    """The registered format names."""
    _discover()
    return list(_REGISTRY)


def get_format(name: str) -> Format:
    _discover()
    if name not in _REGISTRY:
        raise DataError(f"unknown format {name!r}; the known formats are {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _in_folder(d: Path) -> list[Format]:
    return [f for f in _REGISTRY.values() if f.folder and (d / f.folder).is_file()]


def _listing(p: Path) -> list[Path]:
    try:
        return sorted(p.iterdir())
    except OSError as e:
        raise DataError(f"{p}: cannot list the directory: {e.strerror or e}") from None


def _resolve_dir(p: Path) -> tuple[Format, Path]:
    found = _in_folder(p)
    if len(found) > 1:
        raise DataError(
            f"{p}: this directory holds more than one dataset: "
            + ", ".join(f"{f.folder} ({f.name})" for f in found)
            + "; pass the file you mean"
        )
    if found:
        return found[0], p
    # an unzipped archive: the data sits one folder down
    subs = [s for s in _listing(p) if s.is_dir() and _in_folder(s)]
    if len(subs) == 1:
        return _resolve_dir(subs[0])
    if subs:
        raise DataError(
            f"{p}: more than one dataset one folder down: "
            + ", ".join(f"{s.name}/ ({', '.join(f.name for f in _in_folder(s))})" for s in subs)
            + "; pass the one you mean"
        )
    folders = [f.describe for f in _REGISTRY.values() if f.folder]
    files = [f.describe for f in _REGISTRY.values() if not f.folder]
    content = [x.name for x in _listing(p)]
    found = ", ".join(content[:12]) + (" ..." if len(content) > 12 else "")
    raise DataError(
        f"{p}: no known dataset format in this directory: expected "
        + ", ".join(folders)
        + (f"; for {' or '.join(files)} pass the file itself" if files else "")
        + ". Found: "
        + (found or "nothing")
    )


def resolve(path: str | Path) -> tuple[Format, Path]:
    """The format of a file or directory and the path its loader reads (see the docstring)."""
    _discover()
    if isinstance(path, str) and not path.strip():
        raise DataError("the empty string is not a path: expected a dataset file or folder")
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{p}: no such file or directory") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read it: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        return _resolve_dir(p)
    if not stat.S_ISREG(mode):
        raise DataError(f"{p}: not a regular file or directory; expected a dataset file or folder")
    claims = [f for f in _REGISTRY.values() if f.detect(p)]
    specific = [f for f in claims if not f.fallback]
    for level in (specific, [f for f in claims if f.fallback]):
        if len(level) > 1:
            raise DataError(
                f"{p}: the file looks like more than one format "
                f"({', '.join(f.name for f in level)}); choose one with format=..."
            )
        if level:
            return level[0], p
    line, first = first_data_line(p)
    if not first:
        raise DataError(f"{p}: the file is empty")
    known = sorted(_REGISTRY.values(), key=lambda f: f.fallback)  # specific formats first
    raise DataError(
        f"{p}, line {line}: cannot tell the format: expected "
        + ", ".join(f.describe for f in known[:-1])
        + f" or {known[-1].describe}; found {shown(first)}"
    )


def detect_format(path: str | Path) -> str:
    """The name of the format of a file or directory (see the module docstring)."""
    return resolve(path)[0].name
