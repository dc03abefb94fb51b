"""Run records: the self-describing folder every `cascade run` writes, and reading it back.

Layout (format "cascade-run/2"):
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from cascade.util.serialize import dumps_json, dumps_toml  # noqa: F401 - re-exported
from cascade.util.fsio import DIR_MODE, FILE_MODE, clean_stale_temporaries, temporary_prefix

FORMAT = "cascade-run/2"  # 2: one name per metric (hr@10, mrr columns), a marker file
RUN_FILES = ("config.toml", "metrics.json", "requests.parquet", "latency.parquet", "env.json")
MARKER = ".cascade-run"  # written by cascade into every run folder; its presence makes it one
# what a run folder may hold besides RUN_FILES; a folder with anything else is not replaced
RUN_EXTRAS = (MARKER, "report.md", "figures", "ablation.md", "ablation.json")


class RunFormatError(ValueError):
    """A folder that is not a readable cascade run (missing files, unknown format)."""


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


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise RunFormatError(f"{path}: not a regular file")
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise RunFormatError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise RunFormatError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RunFormatError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def load_run(path: str | Path) -> RunRecord:
    """Read a run folder, with clear errors for anything that is not a complete cascade run:
    missing or unreadable files, invalid JSON/TOML, another format."""
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
    metrics = _read_json(p / "metrics.json")
    fmt = metrics.get("format")
    if fmt != FORMAT:
        raise RunFormatError(f"{p}: run format {fmt!r} is not supported (expected {FORMAT!r})")
    try:
        config = tomllib.loads(_read_text(p / "config.toml"))
    except tomllib.TOMLDecodeError as e:
        raise RunFormatError(f"{p / 'config.toml'}: not valid TOML ({e})") from None
    env = _read_json(p / "env.json")
    return RunRecord(path=p, config=config, metrics=metrics, env=env)


# ---- a run as compare and report read it: every file validated --------------------------------

REQUEST_COLUMNS = ("variant", "request_id", "user", "target", "rank_retrieval", "rank_esr",
                   "rank_lsr")
LATENCY_COLUMNS = ("variant", "stage", "batch", "batch_size", "ms")


@dataclass(frozen=True)
class Run:
    """One saved run folder, validated."""

    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    env: dict[str, Any]
    requests: pl.DataFrame  # one row per (variant, request)
    latency: pl.DataFrame  # one row per (variant, stage, batch)

    @property
    def name(self) -> str:
        return str(self.metrics.get("name") or self.path.name)

    @property
    def variants(self) -> list[str]:
        """ESR variant labels, primary first, then baseline, then the others in file order."""
        labels = list(self.metrics["variants"])
        first = [x for x in (self.metrics.get("primary"), self.metrics.get("baseline")) if x]
        return [*[x for x in first if x in labels], *[x for x in labels if x not in first]]

    @property
    def primary(self) -> str:
        return self.variants[0]

    def stages(self, variant: str) -> list[dict[str, Any]]:
        return list(self.metrics["variants"][variant]["stages"])

    def stage_names(self, variant: str | None = None) -> list[str]:
        return [s["name"] for s in self.stages(variant or self.primary)]

    def final_names(self, variant: str | None = None) -> list[str]:
        return list(self.metrics["variants"][variant or self.primary]["final"])

    @property
    def traffic_key(self) -> str:
        return str(self.metrics["data"]["traffic_key"])

    @property
    def seed(self) -> Any:
        return self.config.get("seed", self.metrics.get("seed"))

    def stage_latency(self) -> pl.DataFrame:
        """latency.parquet with every row attributed to a variant: rows of a stage shared by all
        variants (a label that is not a variant, e.g. the retrieval run once per batch) are
        repeated for each variant, so that per-variant full-funnel sums include them."""
        lat = self.latency.select(
            pl.col("variant").cast(pl.String), pl.col("stage").cast(pl.String),
            pl.col("batch").cast(pl.Int64), pl.col("batch_size").cast(pl.Int64),
            pl.col("ms").cast(pl.Float64),
        )
        variants = self.variants
        own = lat.filter(pl.col("variant").is_in(variants))
        shared = lat.filter(~pl.col("variant").is_in(variants) | pl.col("variant").is_null())
        if shared.height:
            v = pl.DataFrame({"variant": variants}, schema={"variant": pl.String})
            own = pl.concat([own, shared.drop("variant").join(v, how="cross").select(lat.columns)])
        return own

    def funnel_latency(self) -> pl.DataFrame:
        """Per (variant, batch): the summed latency of every stage, what one batch of requests
        waits for end to end. Columns variant, batch, batch_size, ms."""
        return (
            self.stage_latency()
            .group_by("variant", "batch")
            .agg(pl.col("batch_size").max(), pl.col("ms").sum())
            .sort("variant", "batch")
        )


def _read_parquet(path: Path, folder: Path, columns: Sequence[str]) -> pl.DataFrame:
    try:
        frame = pl.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - polars raises several kinds for a corrupt file
        raise RunFormatError(f"run folder {folder}: cannot read {path.name}: {e}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RunFormatError(
            f"run folder {folder}: {path.name} lacks column(s) {', '.join(missing)} "
            f"(has {', '.join(frame.columns)})"
        )
    return frame


def _expect(value: Any, kind: type | tuple, where: str, what: str) -> Any:
    if isinstance(value, bool) and kind in ((int, float), int, float):
        raise RunFormatError(f"{where}: {what} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise RunFormatError(f"{where}: {what} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer",
             float: "a number", (int, float): "a number"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def _number_or_null(x: Any, where: str, what: str) -> None:
    if x is not None:
        _expect(x, (int, float), where, what)


def _check_metrics(m: dict[str, Any], folder: Path) -> None:
    """The fields compare and report read, with their types: a half-valid run is refused
    whole, naming the field."""
    where = f"run folder {folder}: metrics.json"
    for key in ("data", "budgets", "variants"):
        if key not in m:
            raise RunFormatError(f"{where} lacks {key!r}")
    _expect(m["data"], dict, where, "data")
    _expect(m["budgets"], dict, where, "budgets")
    if "traffic_key" not in m["data"]:
        raise RunFormatError(f"{where} lacks 'data.traffic_key'")
    if not isinstance(m["variants"], dict) or not m["variants"]:
        raise RunFormatError(f"{where} has no ESR variants under 'variants'")
    for label, v in m["variants"].items():
        _expect(v, dict, where, f"variants.{label}")
        for key in ("stages", "final"):
            if key not in v:
                raise RunFormatError(f"{where} lacks 'variants.{label}.{key}'")
        _expect(v["stages"], list, where, f"variants.{label}.stages")
        _expect(v["final"], dict, where, f"variants.{label}.final")
        for k, x in v["final"].items():
            _number_or_null(x, where, f"variants.{label}.final.{k}")
        _number_or_null(v.get("throughput_rps"), where, f"variants.{label}.throughput_rps")
        for i, s in enumerate(v["stages"]):
            _expect(s, dict, where, f"variants.{label}.stages[{i}]")
            lacking = [k for k in ("name", "k", "recall") if k not in s]
            if lacking:
                raise RunFormatError(f"{where}: variants.{label}.stages[{i}] lacks {lacking}")
            _expect(s["name"], str, where, f"variants.{label}.stages[{i}].name")
            _expect(s["k"], int, where, f"variants.{label}.stages[{i}].k")
            _number_or_null(s["recall"], where, f"variants.{label}.stages[{i}].recall")
            for q, x in (s.get("latency_ms") or {}).items():
                _number_or_null(x, where, f"variants.{label}.stages[{i}].latency_ms.{q}")


def read_run(path: str | Path) -> Run:
    """Read and validate one run folder: `cascade.records.load_run` (folder, files, format),
    then what a comparison needs (metrics fields, parquet columns, a request row per variant).
    Raises `RunFormatError` naming the folder and what is wrong."""
    rec = load_run(path)
    folder = rec.path
    _check_metrics(rec.metrics, folder)
    requests = _read_parquet(folder / "requests.parquet", folder, REQUEST_COLUMNS)
    latency = _read_parquet(folder / "latency.parquet", folder, LATENCY_COLUMNS)
    run = Run(folder, rec.metrics, rec.config, rec.env, requests, latency)
    have = set(requests["variant"].unique().to_list())
    lacking = [v for v in run.variants if v not in have]
    if lacking:
        raise RunFormatError(
            f"run folder {folder}: requests.parquet has no rows for variant(s) {lacking}"
        )
    return run


def read_runs(paths: Sequence[str | Path]) -> list[Run]:
    if not paths:
        raise RunFormatError("give at least one run folder")
    return [read_run(p) for p in paths]
