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
and put back if the rename fails, or by the next run if this one is killed in between. Temporary
folders left by a killed run are removed by the next run that writes beside them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from cascade.util.serialize import dumps_json, dumps_toml  # noqa: F401 - re-exported
from cascade.util.fsio import (
    DIR_MODE, FILE_MODE, _pid_alive, clean_stale_temporaries, temporary_prefix,
)

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
    return all(p.name in {*RUN_FILES, *RUN_EXTRAS} for p in path.iterdir())


def check_target(path: Path) -> None:
    """Refuse, before any work, an `--out` that cascade may not write: a file, a folder that
    holds something other than a cascade run, or a place it cannot write to."""
    path = Path(path).expanduser()
    _recover(path)  # the previous run, where a killed run left it aside
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


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2: swap two paths in one step (RENAME_EXCHANGE), or move `a` to `b` only
    if `b` does not exist (RENAME_NOREPLACE: FileExistsError otherwise). False when the platform
    or file system cannot."""
    libc_name = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish_unique(tmp: Path, path: Path) -> Path:
    """Move `tmp` to `path` (or `path-2`, ... when taken) replacing nothing: in one step where the
    kernel can (RENAME_NOREPLACE; a killed run leaves no empty folder), else claim, then rename."""
    n = 1
    while True:
        cand = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            if not _renameat2(tmp, cand, _RENAME_NOREPLACE):
                cand.mkdir()
                os.rename(tmp, cand)
            return cand
        except FileExistsError:
            n += 1


def _recover(path: Path) -> None:
    """Put back the previous run that a run killed between the two renames of `_publish`'s
    fallback left in its temporary folder (`<tmp>/old`), with nothing at `path`."""
    if path.exists() or path.is_symlink() or not path.parent.is_dir():
        return
    for aside in path.parent.glob(f"{glob.escape('.' + path.name)}.*.tmp"):
        pid = aside.name.split(".")[-3]
        if pid.isdigit() and not _pid_alive(int(pid)) and is_run_folder(aside / "old"):
            os.rename(aside / "old", path)
            return


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
        (tmp / "metrics.json").write_text(_json_text("metrics.json", {"format": FORMAT, **metrics}))
        requests.write_parquet(tmp / "requests.parquet")
        latency.write_parquet(tmp / "latency.parquet")
        (tmp / "env.json").write_text(_json_text("env.json", env))
        if finish is not None:
            finish(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes a private folder; a run folder is an output
        if unique:
            path = _publish_unique(tmp, path)
        else:
            _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _json_text(name: str, obj: Any) -> str:
    """`dumps_json(obj)`, or an error naming the key whose value JSON cannot hold (a plugin's
    `fit_report_` holding a tensor or an object, say)."""
    try:
        return dumps_json(obj)
    except (TypeError, ValueError) as e:
        at = _first_unserialisable(obj) or "(top)"
        raise RunFormatError(f"cannot write {name}: the value at {at} is not JSON ({e})") from None


def _first_unserialisable(obj: Any, path: str = "") -> str | None:
    """The key path of the first value in `obj` that JSON cannot hold."""
    if isinstance(obj, (Mapping, list, tuple)):
        items = obj.items() if isinstance(obj, Mapping) else enumerate(obj)
        paths = ((f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else str(k), v)
                 for k, v in items)
        return next((f for p, v in paths if (f := _first_unserialisable(v, p)) is not None), None)
    try:
        dumps_json(obj)
    except (TypeError, ValueError):
        return path
    return None


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
    if _renameat2(tmp, path, _RENAME_EXCHANGE):  # the new run is at `path`, the old at `tmp`
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
    except (tomllib.TOMLDecodeError, RecursionError) as e:
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
        return str(self.metrics.get("name") or self.path.name)[:200]  # as config caps it

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
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFormatError(f"run folder {folder}: cannot read {path.name}: {reason}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RunFormatError(
            f"run folder {folder}: {path.name} lacks column(s) {', '.join(missing)} "
            f"(has {', '.join(frame.columns)})"
        )
    for c, dtype in frame.schema.items():
        kind = _column_kind(c)
        if kind is not None and dtype != pl.Null and not _COLUMN_KINDS[kind](dtype):
            raise RunFormatError(
                f"run folder {folder}: {path.name} column {c!r} holds {dtype}, expected {kind}")
    return frame


_COLUMN_KINDS = {"text": lambda t: t in (pl.String, pl.Categorical),
                 "integers": lambda t: t.is_integer(), "numbers": lambda t: t.is_numeric()}


def _column_kind(name: str) -> str | None:
    """What a column of requests.parquet or latency.parquet holds (None: one nothing reads)."""
    if name in ("variant", "stage", "hist_bucket", "pop_bucket"):
        return "text"
    if name in ("request_id", "user", "target", "n_targets", "hist_len", "batch",
                "batch_size") or name.startswith("rank_"):
        return "integers"
    numbers = name in ("ms", "consistency", "mrr") or "@" in name or name.startswith("recall_")
    return "numbers" if numbers or name.startswith("oracle_") and name != "oracle_sampled" else None


NUMBER = (int, float)
_KIND_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
               float: "a number", NUMBER: "a number", object: "present"}


def _expect(value: Any, kind: type | tuple, where: str, what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (NUMBER, int, float)):
        raise RunFormatError(f"{where}: {what} must be {_KIND_NAMES[kind]}, got {value!r}")
    return value


def _spec(how: str, kind: type | tuple, *paths: str) -> list[tuple[str, type | tuple, str]]:
    return [(p, kind, how) for p in paths]


# What compare and report read from metrics.json ("*": every key of an object or item of a
# list), parents first. How: "required" (there, not null), "present" (there, may be null),
# "optional" (absent, null or of the type), "value" (absent or of the type, never null).
_LATENCY = [f"variants.*{at}.{q}" for at in ("", ".stages.*")
            for q in ("latency_ms", "latency_per_request_ms", "funnel_latency_ms")]
_FIELDS = sorted([
    *_spec("required", dict, "data", "budgets", "variants", "variants.*", "variants.*.final",
           "variants.*.stages.*", "training.*", "comparisons.*.*"),
    *_spec("required", list, "variants.*.stages"), *_spec("required", int, "variants.*.stages.*.k"),
    *_spec("required", str, "variants.*.stages.*.name"),
    *_spec("required", object, "data.traffic_key"),
    *_spec("present", NUMBER, "variants.*.stages.*.recall"),
    *_spec("optional", NUMBER, "data.n_requests", "variants.*.final.*", "variants.*.throughput_rps",
           "variants.*.stages.*.survival", "comparisons.*.*.delta"),
    *_spec("optional", dict, *_LATENCY, "variants.*.by_history_length", "variants.*.by_popularity",
           "variants.*.vs_lsr_full_catalogue", "variants.*.funnel_loss", "stages", "reference",
           "variants.*.funnel_loss.oracle", "reference.lsr_full_catalogue", "training",
           "reference.most_popular", "training.*.report", "comparisons", "comparisons.*"),
    *_spec("optional", str, "primary", "baseline"), *_spec("optional", int, "reference.n_requests"),
    *_spec("value", NUMBER, *(f"{p}.*" for p in _LATENCY)),
], key=lambda field: field[0].count("."))
_ABSENT = object()


def _matches(obj: Any, parts: list[str], path: str = ""):
    """(path, value or _ABSENT) of every match of `parts` in `obj`."""
    head, rest = parts[0], parts[1:]
    if isinstance(obj, dict):
        items = list(obj.items()) if head == "*" else [(head, obj.get(head, _ABSENT))]
    else:  # a list, or not a container (its own entry reports that)
        items = list(enumerate(obj)) if isinstance(obj, list) and head == "*" else []
    for k, v in items:
        p = f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else str(k)
        if not rest:
            yield p, v
        elif v is not _ABSENT and v is not None:
            yield from _matches(v, rest, p)


def _check_metrics(m: dict[str, Any], folder: Path) -> None:
    """The fields compare and report read, with their types (`_FIELDS`): a half-valid run is
    refused whole, naming the field."""
    where = f"run folder {folder}: metrics.json"
    for path, kind, how in _FIELDS:
        for p, v in _matches(m, path.split(".")):
            if v is _ABSENT and how in ("required", "present"):
                raise RunFormatError(f"{where} lacks {p!r}")
            if v is None and how in ("required", "value"):
                raise RunFormatError(f"{where}: {p} must be {_KIND_NAMES[kind]}, got None")
            if v is not _ABSENT and v is not None:
                _expect(v, kind, where, p)
    empty = [f"variants.{k}.final" for k, v in m["variants"].items() if not v["final"]]
    if not m["variants"] or empty:
        raise RunFormatError(f"{where}: {(empty or ['variants'])[0]} is empty")
    for p, c in _matches(m, ["comparisons", "*", "*"]):  # an interval wherever a delta is
        ci = c.get("ci95")
        if (ci is not None or c.get("delta") is not None) and not (isinstance(ci, list) and len(
                ci) == 2 and all(isinstance(x, NUMBER) and not isinstance(x, bool) for x in ci)):
            raise RunFormatError(f"{where}: {p}.ci95 must be [low, high], two numbers, got {ci!r}")


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
        raise RunFormatError(f"run folder {folder}: requests.parquet has no rows for variant(s) "
                             f"{lacking}")
    return run


def read_runs(paths: Sequence[str | Path]) -> list[Run]:
    if not paths:
        raise RunFormatError("give at least one run folder")
    return [read_run(p) for p in paths]
