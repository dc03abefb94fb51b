"""Run records: the self-describing folder every `cascade run` writes, and reading it back.

Layout (format "cascade-run/1"):
    config.toml        the resolved RunConfig
    metrics.json       funnel metrics per ESR variant, comparison, reference (see README)
    requests.parquet   one row per (variant, request): ranks after each stage, hit/ndcg/rr
    latency.parquet    one row per (variant, stage, batch): batch size and milliseconds
    env.json           versions, CPU, GPU, torch threads, command line
    report.md, figures/ written by `cascade.report` when it is installed

The folder is written atomically: everything goes into a temporary folder beside the target,
which is renamed into place at the end, so a crash never leaves a half-written run. A run folder
carries a marker file (`.cascade-run`) that cascade writes; `--out` replaces only a folder that
holds that marker and nothing but run files, so a user's own folder is never deleted. Replacing
an earlier run swaps the two folders in one step (Linux `renameat2(RENAME_EXCHANGE)`), so the old
run is there until the new one is; where the kernel cannot swap, the old run is moved aside first
and put back if the rename fails. Temporary folders left by a killed run are removed by the next
run that writes beside them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from cascade.util.fsio import DIR_MODE, FILE_MODE, clean_stale_temporaries, temporary_prefix

FORMAT = "cascade-run/1"
RUN_FILES = ("config.toml", "metrics.json", "requests.parquet", "latency.parquet", "env.json")
MARKER = ".cascade-run"  # written by cascade into every run folder; its presence makes it one
# what a run folder may hold besides RUN_FILES; a folder with anything else is not replaced
RUN_EXTRAS = (MARKER, "report.md", "figures", "ablation.md", "ablation.json")


class RunFormatError(ValueError):
    """A folder that is not a readable cascade run (missing files, unknown format)."""


# ---- a small TOML writer (tomllib only reads) --------------------------------------------------


def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "-_" for c in k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None)
        return "{" + inner + "}"
    raise TypeError(f"cannot write {type(v).__name__} value {v!r} to TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, Mapping) for x in v)


def dumps_toml(data: Mapping[str, Any], _prefix: str = "") -> str:
    """TOML text for nested dicts of str/int/float/bool/lists; None values are left out."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in data.items():
        if v is None:
            continue
        if isinstance(v, Mapping) or _is_table_array(v):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        name = f"{_prefix}{_toml_key(k)}"
        if isinstance(v, Mapping):
            body = dumps_toml(v, f"{name}.")
            out += f"\n\n[{name}]\n{body}" if out or _prefix else f"[{name}]\n{body}"
        else:
            for item in v:
                body = dumps_toml(item, f"{name}.")
                out += f"\n\n[[{name}]]\n{body}"
    return out.strip("\n") + ("\n" if not _prefix else "")


# ---- writing -------------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """NaN/inf -> None so metrics.json stays strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Mapping):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def dumps_json(obj: Any) -> str:
    return json.dumps(_clean(obj), indent=2, default=_json_default, allow_nan=False) + "\n"


def is_run_folder(path: Path) -> bool:
    """True when `path` is a folder cascade wrote as a run: it holds the marker and nothing
    but run files (a user's notes inside a run folder keep it from being replaced)."""
    if not path.is_dir() or path.is_symlink() or not (path / MARKER).is_file():
        return False
    allowed = set(RUN_FILES) | set(RUN_EXTRAS)
    return all(p.name in allowed for p in path.iterdir())


def check_target(path: Path) -> None:
    """Refuse, before any work, an `--out` that cascade may not write: a file, a folder that
    holds something other than a cascade run, or a place it cannot write to."""
    path = Path(path).expanduser()
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ValueError(f"--out {path}: exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not is_run_folder(path):
        raise ValueError(
            f"--out {path}: folder exists, is not empty and is not a cascade run (no "
            f"{MARKER} marker, or files cascade did not write); refusing to overwrite it"
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: cannot write in {parent} (permission denied)")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE). False when the
    platform or file system cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _claim_unique(path: Path) -> Path:
    """Create an empty folder at `path`, or at `path-2`, `path-3`, ... when taken. Creating it
    is the claim, so two runs started at once never pick the same name."""
    n = 1
    while True:
        cand = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            cand.mkdir(parents=True)
            return cand
        except FileExistsError:
            n += 1


def write_run(
    path: Path,
    *,
    config_toml: str,
    metrics: Mapping[str, Any],
    requests: pl.DataFrame,
    latency: pl.DataFrame,
    env: Mapping[str, Any],
    finish: Callable[[Path], None] | None = None,
    unique: bool = False,
) -> Path:
    """Write a run folder atomically at `path` (replacing an earlier run there) and return where
    it went. `finish(tmp)` may add files (report, figures) to the temporary folder before it is
    moved into place. With `unique`, an existing `path` is never replaced: the run goes to
    `path-2`, `path-3`, ... instead (default run names)."""
    path = Path(path).expanduser()
    check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp"))
    try:
        (tmp / MARKER).write_text(FORMAT + "\n")
        (tmp / "config.toml").write_text(config_toml)
        (tmp / "metrics.json").write_text(dumps_json({"format": FORMAT, **metrics}))
        requests.write_parquet(tmp / "requests.parquet")
        latency.write_parquet(tmp / "latency.parquet")
        (tmp / "env.json").write_text(dumps_json(env))
        if finish is not None:
            finish(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes a private folder; a run folder is an output
        if unique:
            path = _claim_unique(path)  # an empty folder of ours: the rename replaces it
            os.rename(tmp, path)
        else:
            _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _publish(tmp: Path, path: Path) -> None:
    """Move the finished run `tmp` to `path`, replacing an earlier run there (checked again
    here: the folder may have changed while the run was computed)."""
    if not path.exists():
        os.rename(tmp, path)
        return
    check_target(path)
    if not any(path.iterdir()):
        os.rename(tmp, path)  # an empty folder is replaced by the rename itself
        return
    if _exchange(tmp, path):  # the new run is at `path`, the old one at `tmp`
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp"))
    os.rename(path, aside / "old")
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside / "old", path)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


# ---- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    path: Path
    config: dict  # config.toml, parsed
    metrics: dict
    env: dict

    @property
    def name(self) -> str:
        return self.metrics.get("name", self.path.name)

    def requests(self) -> pl.DataFrame:
        return pl.read_parquet(self.path / "requests.parquet")

    def latency(self) -> pl.DataFrame:
        return pl.read_parquet(self.path / "latency.parquet")


def load_run(path: str | Path) -> RunRecord:
    """Read a run folder, with clear errors for anything that is not a complete cascade run."""
    import tomllib

    p = Path(path).expanduser()
    if not p.exists():
        raise RunFormatError(f"{p}: no such run folder")
    if not p.is_dir():
        raise RunFormatError(f"{p}: not a folder (a run is a folder written by `cascade run`)")
    if not (p / "metrics.json").exists():
        raise RunFormatError(f"{p}: not a cascade run folder (no metrics.json)")
    missing = [f for f in RUN_FILES if not (p / f).exists()]
    if missing:
        raise RunFormatError(f"{p}: incomplete run, missing {', '.join(missing)}")
    try:
        metrics = json.loads((p / "metrics.json").read_text())
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{p / 'metrics.json'}: not valid JSON ({e})") from None
    fmt = metrics.get("format") if isinstance(metrics, dict) else None
    if fmt != FORMAT:
        raise RunFormatError(f"{p}: run format {fmt!r} is not supported (expected {FORMAT!r})")
    try:
        config = tomllib.loads((p / "config.toml").read_text())
    except tomllib.TOMLDecodeError as e:
        raise RunFormatError(f"{p / 'config.toml'}: not valid TOML ({e})") from None
    try:
        env = json.loads((p / "env.json").read_text())
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{p / 'env.json'}: not valid JSON ({e})") from None
    return RunRecord(path=p, config=config, metrics=metrics, env=env)
