"""Budget sweeps: `cascade sweep`, the quality-latency trade-off an early-stage ranker exists for.

A sweep takes one run configuration (`cascade.config.RunConfig`: data, split, retrieval,
the ESR choices, LSR) and a grid of budgets: retrieval K x ESR K. Every stage is built and fitted
ONCE (`cascade.session.fit_funnel`; learned stages also come from their checkpoint cache), then the test traffic is replayed through a `Pipeline` per budget pair
(`cascade.replay.replay`, in this process or as one task per budget pair on Ray workers:
`cascade.backends`); all ESR choices ride in the same pipeline, so at each budget pair they
score the same retrieved candidates. Each (ESR, retrieval K, ESR K) is a point with its final
quality (NDCG@10 over the test requests) and its full-funnel latency (the per-batch sum of every
stage, p99 over batches).

The *frontier* is the set of non-dominated points: no other point has NDCG@10 at least as high
and p99 at least as low with one of them strictly better. With a latency budget (`--p99-ms X`)
the sweep names the highest-NDCG point whose full-funnel p99 is <= X (ties: the faster one), or
says that none qualifies. The chosen point is always on the frontier.

Grid pairs that cannot form a funnel (retrieval K <= ESR K, ESR K <= final K, retrieval K above
the catalogue) are skipped with a note; a grid with no valid pair is an error.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import polars as pl

from cascade.metrics import frontier_mask

if TYPE_CHECKING:
    from cascade.data.dataset import Dataset
    from cascade.config import RunConfig

SWEEP_FORMAT = "cascade-sweep/1"
QUALITY = "ndcg@10"
LATENCY = "p99_ms"


def best_under_budget(quality: np.ndarray, latency: np.ndarray, budget_ms: float) -> int | None:
    """Index of the highest-quality point whose latency is <= budget_ms (ties: the faster),
    or None when no point qualifies."""
    q = np.asarray(quality, dtype=np.float64)
    lat = np.asarray(latency, dtype=np.float64)
    ok = np.flatnonzero(lat <= budget_ms)
    if ok.size == 0:
        return None
    order = np.lexsort((lat[ok], -q[ok]))  # quality descending, then latency ascending
    return int(ok[order[0]])


def grid_pairs(
    retrieval_ks: Sequence[int], esr_ks: Sequence[int], *, final_k: int, n_items: int
) -> tuple[list[tuple[int, int]], list[str]]:
    """The (retrieval K, ESR K) pairs that form a funnel, and a note per skipped pair."""
    for name, ks in (("retrieval K", retrieval_ks), ("ESR K", esr_ks)):
        if not ks:
            raise ValueError(f"sweep: give at least one {name}")
        bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer))
               or k < 1]
        if bad:
            raise ValueError(f"sweep: {name} values must be integers >= 1, got {bad}")
    pairs, notes = [], []
    for r in sorted(set(int(k) for k in retrieval_ks)):
        for e in sorted(set(int(k) for k in esr_ks)):
            if r > n_items:
                notes.append(f"skipped retrieval K {r}, ESR K {e}: retrieval K exceeds the "
                             f"catalogue of {n_items} items")
            elif not r > e > final_k:
                notes.append(f"skipped retrieval K {r}, ESR K {e}: budgets must shrink "
                             f"(retrieval > esr > final = {final_k})")
            else:
                pairs.append((r, e))
    if not pairs:
        raise ValueError(
            "sweep: no (retrieval K, ESR K) pair forms a funnel: " + "; ".join(notes)
        )
    return pairs, notes


@dataclass
class SweepResult:
    points: pl.DataFrame  # one row per (esr, retrieval_k, esr_k); see `run_sweep`
    budget_ms: float | None
    chosen: int | None  # row of `points` chosen under the budget, None when none qualifies
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # data, config, fits, seconds

    def with_budget(self, budget_ms: float | None) -> "SweepResult":
        """The same points judged against another latency budget (nothing is re-run)."""
        chosen = None
        if budget_ms is not None:
            chosen = best_under_budget(self.points[QUALITY].to_numpy(),
                                       self.points[LATENCY].to_numpy(), float(budget_ms))
        points = self.points.with_columns(
            pl.Series("chosen", [i == chosen for i in range(self.points.height)],
                      dtype=pl.Boolean)
        )
        return SweepResult(points, None if budget_ms is None else float(budget_ms), chosen,
                           list(self.notes), dict(self.meta))

    @property
    def frontier(self) -> pl.DataFrame:
        return self.points.filter(pl.col("frontier")).sort(LATENCY)

    def chosen_row(self) -> dict[str, Any] | None:
        return None if self.chosen is None else self.points.row(self.chosen, named=True)

    def verdict(self) -> str | None:
        """One sentence on the budget: the chosen configuration, or why there is none."""
        if self.budget_ms is None:
            return None
        row = self.chosen_row()
        if row is None:
            fastest = self.points.sort(LATENCY).row(0, named=True)
            return (f"no configuration keeps the full-funnel p99 under {self.budget_ms:g} ms; "
                    f"the fastest is {fastest['label']} at {fastest[LATENCY]:.3f} ms")
        return (f"best under a {self.budget_ms:g} ms full-funnel p99 budget: {row['label']} "
                f"(ESR {row['esr']}, retrieval K {row['retrieval_k']}, ESR K {row['esr_k']}): "
                f"{QUALITY} {row[QUALITY]:.4f} at p99 {row[LATENCY]:.3f} ms")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SWEEP_FORMAT,
            "quality": QUALITY,
            "latency": "full-funnel p99 ms per batch",
            "budget_ms": self.budget_ms,
            "chosen": self.chosen_row(),
            "verdict": self.verdict(),
            "notes": self.notes,
            **self.meta,
            "points": self.points.to_dicts(),
        }


def _point_metrics(frame: pl.DataFrame, latency: pl.DataFrame, variant: str) -> dict[str, Any]:
    from cascade.metrics import final_metrics, funnel_latency, quality_summary, throughput

    q = quality_summary(frame.filter(pl.col("variant") == variant))
    per_batch, _, total_ms = funnel_latency(latency, variant)
    return {
        "recall_retrieval": q["recall"]["retrieval"],
        "recall_esr": q["recall"]["esr"],
        **{m.key: q[m.key] for m in final_metrics()},
        "p50_ms": per_batch["p50"],
        LATENCY: per_batch["p99"],
        "throughput_rps": throughput(q["n_requests"], total_ms),
    }


def run_sweep(
    cfg: "RunConfig",
    *,
    retrieval_ks: Sequence[int],
    esr_ks: Sequence[int],
    budget_ms: float | None = None,
    dataset: "Dataset | None" = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Fit every stage of `cfg` once, replay the test traffic for each budget pair of the grid
    with all of `cfg`'s ESR choices, and return the points, the frontier and the choice under
    `budget_ms` (see the module docstring). `dataset` skips loading `cfg.data`."""
    from cascade.backends import make_backend
    from cascade.env import capture
    from cascade.pipeline import Budgets
    from cascade.session import fit_funnel, traffic_key

    if budget_ms is not None and not (isinstance(budget_ms, (int, float))
                                      and math.isfinite(budget_ms) and budget_ms > 0):
        raise ValueError(f"--p99-ms must be a positive number of milliseconds, got {budget_ms!r}")
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    with make_backend(cfg) as backend:  # before training: a bad Ray address fails here
        funnel = fit_funnel(cfg, dataset=dataset, progress=progress, log=say)
        ds, split, ctx, test = funnel.prepared
        specs, esrs = funnel.specs, funnel.esrs
        pairs, notes = grid_pairs(retrieval_ks, esr_ks, final_k=cfg.final_k, n_items=ds.n_items)
        say(f"sweep over {len(pairs)} budget pairs x {len(esrs)} ESR choice(s) on {ds.name} "
            f"({len(test):,} test requests)")
        fits = {what: f["seconds"] for what, f in funnel.fits.items()}

        by_point: dict[int, list[dict]] = {}
        t_replay = time.perf_counter()
        points = [Budgets(retrieval=r_k, esr=e_k, final=cfg.final_k) for r_k, e_k in pairs]
        # each budget point is one replay (a task per point on Ray), in the order they finish
        for i, rep in backend.replay_points(funnel, test, points, batch_size=cfg.batch_size,
                                            warmup=cfg.warmup, progress=progress):
            r_k, e_k = pairs[i]
            frame = rep.requests_frame()
            by_point[i] = [{
                "label": f"{label} r{r_k} e{e_k}",
                "esr": label,
                "esr_stage": specs[label].stage,
                "retrieval_k": r_k,
                "esr_k": e_k,
                "final_k": cfg.final_k,
                **_point_metrics(frame, rep.latency, label),
            } for label in esrs]
            say(f"retrieval {r_k} -> esr {e_k}: " + ", ".join(
                f"{x['esr']} {QUALITY} {x[QUALITY]:.4f} p99 {x[LATENCY]:.2f} ms"
                for x in by_point[i]))
        execution = backend.describe()
    rows = [row for i in sorted(by_point) for row in by_point[i]]
    points = pl.DataFrame(rows)
    points = points.with_columns(
        pl.Series("frontier", frontier_mask(points[QUALITY].to_numpy(),
                                            points[LATENCY].to_numpy()))
    )
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"name": ds.name, "source": ds.source, "fingerprint": ds.fingerprint(),
                 "split": split.key(), "n_requests": len(test), "traffic_key": traffic_key(test),
                 "n_items": ds.n_items, "exclude_seen": ctx.exclude_seen},
        "stages": {"retrieval": cfg.retrieval.to_dict(), "lsr": cfg.lsr.to_dict(),
                   "esr": {k: v.to_dict() for k, v in specs.items()}},
        "grid": {"retrieval_k": sorted({p[0] for p in pairs}),
                 "esr_k": sorted({p[1] for p in pairs}), "final_k": cfg.final_k},
        "device": str(ctx.device),
        "env": capture(execution=execution),
        "execution": execution,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "fit_seconds": fits,
        "seconds": {"replay": time.perf_counter() - t_replay,
                    "total": time.perf_counter() - t_start},
    }
    return SweepResult(points, None, None, notes, meta).with_budget(budget_ms)


# --------------------------------------------------------------------------------------------
# rendering and writing
# --------------------------------------------------------------------------------------------

def table_columns() -> tuple[str, ...]:
    """The markdown/CSV columns: budgets, recall, every registered final metric, latency."""
    from cascade.metrics import final_metrics

    return ("esr", "retrieval_k", "esr_k", "recall_retrieval", "recall_esr",
            *(m.key for m in final_metrics()), "p50_ms", LATENCY, "throughput_rps")


RICH_COLUMNS = ("esr", "retrieval_k", "esr_k", "recall_esr", QUALITY, LATENCY, "throughput_rps")
SHORT = {"retrieval_k": "ret K", "esr_k": "esr K", "recall_retrieval": "recall ret",
         "recall_esr": "recall esr", "p50_ms": "p50 ms", LATENCY: "p99 ms",
         "throughput_rps": "req/s"}


def _cell(col: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if col in ("p50_ms", LATENCY):
        return f"{v:.3f}"
    if col == "throughput_rps":
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _marks(row: dict[str, Any]) -> str:
    return ("chosen, " if row["chosen"] else "") + ("frontier" if row["frontier"] else "")


def _sorted_points(res: SweepResult) -> pl.DataFrame:
    return res.points.sort(["esr", "retrieval_k", "esr_k"])


def to_markdown(res: SweepResult) -> str:
    columns = table_columns()
    head = [*columns, ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in _sorted_points(res).iter_rows(named=True):  # one row per grid point
        lines.append("| " + " | ".join([*(_cell(c, row[c]) for c in columns),
                                        _marks(row).strip(", ")]) + " |")
    out = "\n".join(lines) + "\n"
    front = ", ".join(f"{r['label']} ({r[QUALITY]:.4f}, {r[LATENCY]:.3f} ms)"
                      for r in res.frontier.iter_rows(named=True))
    out += f"\nFrontier ({QUALITY}, full-funnel p99), fastest first: {front}.\n"
    if res.verdict():
        out += f"\n**{res.verdict()}**\n"
    for n in res.notes:
        out += f"\n- {n}"
    return out + ("\n" if res.notes else "")


def to_rich(res: SweepResult):  # -> rich.table.Table
    from rich.table import Table

    t = Table(title=f"cascade sweep: {QUALITY} against full-funnel p99 latency per batch")
    cols = RICH_COLUMNS
    for c in cols:
        t.add_column(SHORT.get(c, c), justify="left" if c == "esr" else "right")
    t.add_column("")
    for row in _sorted_points(res).iter_rows(named=True):  # one row per grid point
        style = "bold green" if row["chosen"] else ("bold" if row["frontier"] else None)
        t.add_row(*(_cell(c, row[c]) for c in cols), _marks(row).strip(", "), style=style)
    return t


def to_csv(res: SweepResult) -> str:
    return _sorted_points(res).write_csv()


def write_sweep(res: SweepResult, out_dir: str | Path) -> list[Path]:
    """sweep.json, sweep.csv, sweep.md and figures/quality_latency.{png,csv} in `out_dir`,
    all or nothing."""
    from cascade import figures
    from cascade.compare import write_bundle

    def fill(tmp: Path) -> None:
        (tmp / "sweep.json").write_text(json.dumps(res.to_json(), indent=2, default=str))
        (tmp / "sweep.csv").write_text(to_csv(res))
        (tmp / "sweep.md").write_text(
            "# cascade sweep\n\n"
            f"Data `{res.meta.get('data', {}).get('name', '?')}`, "
            f"{res.meta.get('data', {}).get('n_requests', '?')} test requests; every stage "
            "fitted once, the test traffic replayed per budget pair.\n\n"
            "![Quality against full-funnel p99 latency](figures/quality_latency.png)\n\n"
            + to_markdown(res)
        )
        pts = res.points.select(
            "label", pl.col("esr").alias("group"), "retrieval_k", "esr_k", LATENCY,
            pl.col(QUALITY).alias("quality"), "frontier", "chosen",
        )
        figures.quality_latency_figure(pts, tmp / "figures" / "quality_latency.png",
                                       budget_ms=res.budget_ms, quality="NDCG@10")

    return write_bundle(out_dir, fill)
