"""Putting saved runs side by side: `cascade compare RUN [RUN ...]`.

A run folder (see `cascade.records`) holds metrics.json, requests.parquet
(one row per ESR variant and request), latency.parquet (one row per variant, stage and batch),
config.toml and env.json. This module reads several of them, checks they are comparable, and
builds one aligned table over every (run, ESR variant) pair, an *entry*:

- funnel recall after each stage, the final metrics, per-stage and full-funnel latency
  percentiles and throughput, for every entry;
- when an entry replayed the same traffic as the reference (the first run's primary variant;
  same `data.traffic_key`), paired per-request deltas against the reference with paired
  bootstrap 95% intervals, the requests joined on `request_id`;
- when it did not (other data, split, seed or request sample) the table says so and shows only
  the unpaired summary values: a difference of two means over different requests has no
  meaningful paired interval.

Runs whose metrics differ in kind (other stages, other final metrics) are refused with a message
naming the folder and what differs; so is a folder that is not a run, a run of another format or
one with missing files. Errors are `ValueError`s (`cascade.records.RunFormatError`,
`DataError`) naming the folder; the CLI prints them without a traceback.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import polars as pl

from cascade.data.dataset import DataError
from cascade.metrics import FUNNEL_STAGE, final_metrics, frontier_mask
from cascade.records import Run, read_run, read_runs  # noqa: F401 - the readers compare uses
from cascade.util.fsio import FILE_MODE, clean_stale_temporaries, temporary_prefix

COMPARE_FORMAT = "cascade-compare/1"


# --------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One ESR variant of one run: a column of the comparison."""

    run: int  # index into Comparison.runs
    run_label: str
    variant: str

    @property
    def label(self) -> str:
        return f"{self.run_label}/{self.variant}"


@dataclass(frozen=True)
class Row:
    """One row of the comparison table: a budget, a recall, a final metric, a latency."""

    key: str  # e.g. "recall@esr", "ndcg@10", "p99_ms@funnel"
    label: str  # words for a person
    group: str  # "budget" | "funnel" | "final" | "latency" | "throughput"
    per_request: str | None = None  # requests.parquet column (or rank column) when paired


@dataclass
class Comparison:
    runs: list[Run]
    entries: list[Entry]
    metrics: list[Row]
    values: dict[tuple[str, str], float]  # (entry label, metric key) -> value
    deltas: dict[tuple[str, str], tuple[float, float, float]]  # -> (delta, lo, hi), paired only
    paired: dict[str, bool]  # entry label -> same traffic as the reference
    notes: list[str] = field(default_factory=list)
    n_boot: int = 1000

    @property
    def reference(self) -> Entry:
        return self.entries[0]

    def records(self) -> list[dict[str, Any]]:
        """The comparison as long rows (one per entry and metric), for JSON and CSV."""
        out = []
        ref = self.reference.label
        for e in self.entries:
            for m in self.metrics:
                v = self.values.get((e.label, m.key))
                d = self.deltas.get((e.label, m.key))
                out.append({
                    "run": e.run_label,
                    "folder": str(self.runs[e.run].path),
                    "variant": e.variant,
                    "metric": m.key,
                    "group": m.group,
                    "value": _num(v),
                    "reference": ref,
                    "paired": self.paired[e.label],
                    "delta": _num(d[0]) if d else None,
                    "ci95_lo": _num(d[1]) if d else None,
                    "ci95_hi": _num(d[2]) if d else None,
                })
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": COMPARE_FORMAT,
            "reference": self.reference.label,
            "bootstrap_resamples": self.n_boot,
            "runs": [
                {
                    "label": _run_label(self.runs, i),
                    "folder": str(r.path),
                    "name": r.name,
                    "data": r.metrics["data"],
                    "budgets": r.metrics["budgets"],
                    "variants": r.variants,
                }
                for i, r in enumerate(self.runs)
            ],
            "entries": [
                {"label": e.label, "run": e.run_label, "variant": e.variant,
                 "paired": self.paired[e.label]}
                for e in self.entries
            ],
            "notes": self.notes,
            "rows": self.records(),
        }


def _num(x: float | None) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(x)


def _run_label(runs: Sequence[Run], i: int) -> str:
    """The run's name, or its folder name when two runs share a name, or the name with its
    position when the same folder is given twice."""
    names = [r.name for r in runs]
    if names.count(names[i]) == 1:
        return names[i]
    folders = [r.path.name for r in runs]
    if folders.count(folders[i]) == 1:
        return folders[i]
    return f"{names[i]}#{i + 1}"


def _check_kind(runs: Sequence[Run]) -> None:
    """All entries must report the same stages and the same final metrics."""
    ref = runs[0]
    ref_stages, ref_final = ref.stage_names(), ref.final_names()
    for r in runs:
        for v in r.variants:
            stages, final = r.stage_names(v), r.final_names(v)
            if stages != ref_stages:
                raise DataError(
                    f"runs differ in kind: run folder {r.path} (variant {v!r}) has stages "
                    f"{stages}, run folder {ref.path} has {ref_stages}"
                )
            if sorted(final) != sorted(ref_final):
                missing = [k for k in ref_final if k not in final]
                extra = [k for k in final if k not in ref_final]
                raise DataError(
                    f"runs differ in kind: run folder {r.path} (variant {v!r}) reports final "
                    f"metrics {final}, run folder {ref.path} reports {ref_final}"
                    + (f"; missing {missing}" if missing else "")
                    + (f"; extra {extra}" if extra else "")
                )


def traffic_difference(a: Run, b: Run) -> list[str]:
    """Why two runs did not replay the same traffic, in words (empty when they did)."""
    if a.traffic_key == b.traffic_key:
        return []
    da, db = a.metrics["data"], b.metrics["data"]
    why = []
    for key, what in (("name", "data"), ("fingerprint", "data fingerprint"), ("split", "split"),
                      ("n_requests", "test requests")):
        if da.get(key) != db.get(key):
            why.append(f"{what} {da.get(key)!r} vs {db.get(key)!r}")
    if a.seed != b.seed:
        why.append(f"seed {a.seed!r} vs {b.seed!r}")
    if not why:
        why.append(f"traffic key {a.traffic_key} vs {b.traffic_key}")
    return why


def _metric_list(runs: Sequence[Run]) -> list[Row]:
    ref = runs[0]
    stages = ref.stage_names()
    out = [Row(f"k@{s}", f"{s} K", "budget") for s in stages]
    out += [Row(f"recall@{s}", f"recall after {s}", "funnel", f"rank_{s}") for s in stages]
    registry = {m.key: m for m in final_metrics()}
    for name in ref.final_names():  # a registered metric has its per-request column by its key
        m = registry.get(name)
        out.append(Row(name, m.label if m else name, "final", name if m else None))
    for s in [*stages, FUNNEL_STAGE]:
        what = "full funnel" if s == FUNNEL_STAGE else s
        for q in ("p50", "p99"):
            out.append(Row(f"{q}_ms@{s}", f"{what} {q} ms", "latency"))
    out.append(Row("throughput_rps", "throughput (requests/s)", "throughput"))
    return out


def entry_values(run: Run, variant: str) -> dict[str, float]:
    """Summary values of one entry, keyed like `Row.key`."""
    v = run.metrics["variants"][variant]
    out: dict[str, float] = {}
    for s in v["stages"]:  # a null (no request had a target to find) stays out: shown as missing
        out[f"k@{s['name']}"] = float(s["k"])
        if s["recall"] is not None:
            out[f"recall@{s['name']}"] = float(s["recall"])
    out.update((k, float(x)) for k, x in v["final"].items() if x is not None)
    lat = run.stage_latency().filter(pl.col("variant") == variant)
    stats = lat.group_by("stage").agg(
        pl.col("ms").quantile(0.5, "linear").alias("p50"),
        pl.col("ms").quantile(0.99, "linear").alias("p99"),
    )
    for row in stats.iter_rows(named=True):  # one row per stage, not per request
        out[f"p50_ms@{row['stage']}"] = row["p50"]
        out[f"p99_ms@{row['stage']}"] = row["p99"]
    for s in v["stages"]:  # metrics.json is authoritative where it has the numbers
        ms = s.get("latency_ms") or {}
        for q in ("p50", "p99"):
            if q in ms:
                out[f"{q}_ms@{s['name']}"] = float(ms[q])
    tot = run.funnel_latency().filter(pl.col("variant") == variant)["ms"]
    if len(tot):
        out[f"p50_ms@{FUNNEL_STAGE}"] = float(tot.quantile(0.5, "linear"))
        out[f"p99_ms@{FUNNEL_STAGE}"] = float(tot.quantile(0.99, "linear"))
    for q, x in (v.get("funnel_latency_ms") or {}).items():
        if q in ("p50", "p99") and x is not None:
            out[f"{q}_ms@{FUNNEL_STAGE}"] = float(x)
    if v.get("throughput_rps") is not None:
        out["throughput_rps"] = float(v["throughput_rps"])
    return out


def per_request(run: Run, variant: str, metrics: Sequence[Row]) -> pl.DataFrame:
    """request_id plus one float column per paired metric (key as column name)."""
    req = run.requests.filter(pl.col("variant") == variant)
    cols = [pl.col("request_id")]
    for m in metrics:
        if m.per_request is None:
            continue
        if m.per_request.startswith("rank_"):
            # the fraction of targets kept when the run stored it, else the first target's rank
            frac = "recall_" + m.per_request[len("rank_"):]
            if frac in req.columns:
                cols.append(pl.col(frac).cast(pl.Float64).alias(m.key))
            elif m.per_request in req.columns:
                r = pl.col(m.per_request)
                cols.append((r.is_not_null() & (r >= 0)).cast(pl.Float64).alias(m.key))
        elif m.per_request in req.columns:
            cols.append(pl.col(m.per_request).cast(pl.Float64).fill_null(0.0).alias(m.key))
    return req.select(cols)


def compare_runs(
    runs: Sequence[Run], *, n_boot: int = 1000, seed: int = 0
) -> Comparison:
    """The aligned comparison of every ESR variant of every run against the first run's
    primary variant (see module docstring)."""
    from cascade.metrics import paired_bootstrap

    runs = list(runs)
    if not runs:
        raise DataError("give at least one run folder")
    _check_kind(runs)
    metrics = _metric_list(runs)
    entries = [
        Entry(i, _run_label(runs, i), v) for i, r in enumerate(runs) for v in r.variants
    ]
    ref = entries[0]
    ref_run = runs[0]
    values = {(e.label, k): x for e in entries for k, x in entry_values(runs[e.run], e.variant).items()}
    notes: list[str] = []
    paired: dict[str, bool] = {}
    deltas: dict[tuple[str, str], tuple[float, float, float]] = {}
    ref_req = per_request(ref_run, ref.variant, metrics)
    paired_keys = [m.key for m in metrics if m.key in ref_req.columns and m.key != "request_id"]
    refused: set[int] = set()
    for e in entries:
        run = runs[e.run]
        why = traffic_difference(ref_run, run)
        if why:
            paired[e.label] = False
            if e.run not in refused:
                refused.add(e.run)
                notes.append(
                    f"{run.path} did not replay the same traffic as {ref_run.path} "
                    f"({'; '.join(why)}): no paired per-request deltas for it, only the "
                    f"unpaired summary values are comparable"
                )
            continue
        if e == ref:
            paired[e.label] = True
            continue
        other = per_request(run, e.variant, metrics)
        joined = ref_req.join(other, on="request_id", how="inner", suffix="__b")
        if joined.height != ref_req.height or joined.height != other.height:
            paired[e.label] = False
            notes.append(
                f"{e.label}: same traffic key as the reference but only {joined.height} of "
                f"{ref_req.height} request ids match; not paired"
            )
            continue
        paired[e.label] = True
        for k in paired_keys:
            if f"{k}__b" not in joined.columns:
                continue
            a = joined[k].to_numpy()
            b = joined[f"{k}__b"].to_numpy()
            res = paired_bootstrap(b, a, n_resamples=n_boot, seed=seed)
            if res["delta"] is not None:
                deltas[(e.label, k)] = (res["delta"], *res["ci95"])
    if len(entries) > 1 and any(paired[e.label] for e in entries[1:]):
        notes.append(
            f"Δ: each entry minus {ref.label}, per request over the same requests, with "
            f"paired bootstrap 95% intervals ({n_boot} resamples); latency and throughput are "
            f"unpaired summary values"
        )
    return Comparison(runs, entries, metrics, values, deltas, paired, notes, n_boot)


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _fmt(x: float | None, group: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if group == "budget":
        return f"{int(x)}"
    if group in ("latency",):
        return f"{x:.2f}"
    if group == "throughput":
        return f"{x:,.0f}"
    return f"{x:.4f}"


def _cell(c: Comparison, e: Entry, m: Row, sep: str) -> str:
    s = _fmt(c.values.get((e.label, m.key)), m.group)
    d = c.deltas.get((e.label, m.key))
    if d is not None:
        s += f"{sep}Δ {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"
    return s


def to_markdown(c: Comparison) -> str:
    head = ["metric", *[f"{e.label}" + (" (ref)" if i == 0 else "") for i, e in
                        enumerate(c.entries)]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in c.metrics:
        cells = [m.label, *[_cell(c, e, m, " ") for e in c.entries]]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    if c.notes:
        out += "\n" + "\n".join(f"- {n}" for n in c.notes) + "\n"
    return out


def to_csv(c: Comparison) -> str:
    return pl.DataFrame(c.records(), infer_schema_length=None).write_csv()


def to_rich(c: Comparison):  # -> rich.table.Table
    from rich.table import Table

    t = Table(title=f"cascade compare (reference: {c.reference.label})")
    t.add_column("metric", style="bold")
    for i, e in enumerate(c.entries):
        t.add_column(e.label + (" (ref)" if i == 0 else ""), justify="right")
    group = None
    for m in c.metrics:
        if group is not None and m.group != group:
            t.add_section()
        group = m.group
        t.add_row(m.label, *[_cell(c, e, m, "\n") for e in c.entries])
    return t


def summary_points(c: Comparison) -> pl.DataFrame:
    """One row per entry: label, final NDCG (or the first final metric) and full-funnel p99."""
    q = next((m.key for m in c.metrics if m.key.startswith("ndcg")), None)
    q = q or next(m.key for m in c.metrics if m.group == "final")
    return pl.DataFrame(
        {
            "label": [e.label for e in c.entries],
            "quality_metric": [q] * len(c.entries),
            "quality": [c.values.get((e.label, q)) for e in c.entries],
            "p99_ms": [c.values.get((e.label, f"p99_ms@{FUNNEL_STAGE}")) for e in c.entries],
        },
        schema={"label": pl.String, "quality_metric": pl.String, "quality": pl.Float64,
                "p99_ms": pl.Float64},
    )


def write_bundle(out_dir: str | Path, fill: Callable[[Path], None]) -> list[Path]:
    """Let `fill(tmp)` write files into a temporary folder beside `out_dir`, then move them
    into `out_dir` (created when absent): a failure anywhere leaves no partial output."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, expected a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out.parent)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=temporary_prefix(out), suffix=".tmp"))
    try:
        fill(tmp)
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for f in files:
            dest = out / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(f, FILE_MODE)  # mkstemp/mkdtemp make private files; these are outputs
            f.replace(dest)
            written.append(dest)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_comparison(c: Comparison, out_dir: str | Path) -> list[Path]:
    """comparison.md, comparison.json and figures/{funnel,latency,quality_latency}.{png,csv} in
    `out_dir`, all or nothing."""
    def fill(tmp: Path) -> None:
        (tmp / "comparison.md").write_text(to_markdown(c))
        (tmp / "comparison.json").write_text(json.dumps(c.to_json(), indent=2))
        comparison_figures(c, tmp / "figures")

    return write_bundle(out_dir, fill)


def comparison_figures(c: Comparison, out_dir: Path) -> list[Path]:
    """funnel, latency and quality_latency figures of a comparison, one series per entry."""
    from cascade.figures import (
        funnel_figure, latency_figure, latency_stats, quality_latency_figure, run_funnel_table,
        run_latency_frame,
    )

    out_dir = Path(out_dir)
    funnel = pl.concat([
        run_funnel_table(c.runs[e.run]).filter(pl.col("series") == e.variant)
        .with_columns(pl.lit(e.label).alias("series"))
        for e in c.entries
    ])
    written = funnel_figure(funnel, out_dir / "funnel.png")
    lat = pl.concat([
        run_latency_frame(c.runs[e.run]).filter(pl.col("series") == e.variant)
        .with_columns(pl.lit(e.label).alias("series"))
        for e in c.entries
    ])
    written += latency_figure(latency_stats(lat), out_dir / "latency.png")
    pts = summary_points(c).drop_nulls(["quality", "p99_ms"])
    if pts.height:
        pts = pts.with_columns(
            pl.Series("frontier", frontier_mask(pts["quality"].to_numpy(),
                                                pts["p99_ms"].to_numpy()))
        )
        written += quality_latency_figure(pts, out_dir / "quality_latency.png",
                                          quality=str(pts["quality_metric"][0]).upper())
    return written
