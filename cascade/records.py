"""Run records: the self-describing folder every `cascade run` writes, and reading it back.

Layout (format "cascade-run/1"):
    config.toml        the resolved RunConfig
    metrics.json       funnel metrics per ESR variant, comparison, reference (see README)
    requests.parquet   one row per (variant, request): ranks after each stage, hit/ndcg/rr
    latency.parquet    one row per (variant, stage, batch): batch size and milliseconds
    env.json           versions, CPU, GPU, torch threads, command line
    report.md, figures/ written by `cascade.report` when it is installed

The folder is written atomically: everything goes into a temporary folder beside the target,
which is renamed into place at the end, so a crash never leaves a half-written run.
"""

from __future__ import annotations

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

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would have given: mkstemp / mkdtemp are private
DIR_MODE = 0o777 & ~_UMASK

FORMAT = "cascade-run/1"
RUN_FILES = ("config.toml", "metrics.json", "requests.parquet", "latency.parquet", "env.json")


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


def check_target(path: Path) -> None:
    """Refuse to write a run over a folder that holds something other than a run."""
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--out {path}: exists and is not a folder")
        entries = [p.name for p in path.iterdir()]
        if entries and "metrics.json" not in entries:
            raise ValueError(
                f"--out {path}: folder exists, is not empty and is not a cascade run; "
                "refusing to overwrite it"
            )


def write_run(
    path: Path,
    *,
    config_toml: str,
    metrics: Mapping[str, Any],
    requests: pl.DataFrame,
    latency: pl.DataFrame,
    env: Mapping[str, Any],
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Write a run folder atomically at `path` (replacing an earlier run there). `finish(tmp)` may
    add files (report, figures) to the temporary folder before it is moved into place."""
    path = Path(path).expanduser()
    check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
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
        old = None
        if path.exists():  # replace an earlier run: move it aside, move the new one in, drop it
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


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
