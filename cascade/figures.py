"""Figures for runs, comparisons and sweeps (matplotlib, Agg, PNG).

Every figure is saved beside the exact data it was drawn from, as `<name>.png` plus
`<name>.csv`, so a reader can check or redraw it:
- `funnel`: recall after each stage (retrieval -> ESR -> LSR), one line per ESR variant or run;
- `latency`: per-stage latency distributions per batch, one box per variant (or run) per stage,
  plus the full funnel (every stage of a batch summed). Boxes are drawn from the quantiles in
  the CSV: box p25-p75, line at the median, whiskers p1 and p99, a dot at the mean;
- `quality_latency`: final quality (NDCG@10) against full-funnel p99 latency, one point per
  configuration, the non-dominated ones joined as the frontier, an optional latency budget line.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly, never pyplot, so
drawing needs no display and leaves no global state behind. Files are written atomically
(temporary file, then rename) with `cascade.util.fsio.atomic_write_bytes`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import polars as pl

from cascade.util.fsio import atomic_write_bytes

from cascade.metrics import FUNNEL_STAGE

if TYPE_CHECKING:
    from cascade.records import Run

DPI = 110

QUANTILES = {"p1": 0.01, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p99": 0.99}


def _new_figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def write_atomic(path: Path, data: bytes) -> Path:
    """`atomic_write_bytes` (which gives the file an ordinary file's permissions), returning
    the path."""
    atomic_write_bytes(Path(path), data)
    return Path(path)


def save_figure(fig, png: Path, data: pl.DataFrame) -> list[Path]:
    """Write `fig` to `png` and `data` to the .csv beside it, both atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    csv = png.with_suffix(".csv")
    write_atomic(csv, data.write_csv().encode())
    write_atomic(png, buf.getvalue())
    return [png, csv]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _ordered(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


# --------------------------------------------------------------------------------------------
# the three figures, each from a tidy table
# --------------------------------------------------------------------------------------------


def funnel_figure(table: pl.DataFrame, png: Path, *, title: str = "Recall through the funnel"
                  ) -> list[Path]:
    """table: series, stage, k, recall (stages in funnel order within each series)."""
    fig = _new_figure()
    ax = fig.add_subplot()
    stages = _ordered(table["stage"].to_list())
    series = _ordered(table["series"].to_list())
    x = {s: i for i, s in enumerate(stages)}
    same_k = table.group_by("stage").agg(pl.col("k").n_unique())["k"].max() == 1
    for color, name in zip(_colors(len(series)), series):
        part = table.filter(pl.col("series") == name)
        xs = [x[s] for s in part["stage"]]
        ax.plot(xs, part["recall"].to_list(), marker="o", color=color, label=name)
        if not same_k:
            for xi, r, k in zip(xs, part["recall"], part["k"]):
                ax.annotate(f"K={k}", (xi, r), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=color)
    if same_k:
        ks = dict(zip(table["stage"], table["k"]))
        labels = [f"{s}\nkeeps {ks[s]}" for s in stages]
    else:
        labels = stages
    ax.set_xticks(range(len(stages)), labels)
    ax.set_ylabel("recall (target still in the candidates)")
    ax.set_ylim(0, min(1.05, max(0.05, float(table["recall"].max()) * 1.15)))
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, png, table)


def latency_stats(frame: pl.DataFrame, by: Sequence[str] = ("series", "stage")) -> pl.DataFrame:
    """Quantiles of `ms` per group: n, p1, p25, p50, p75, p99, mean, max."""
    return frame.group_by(list(by), maintain_order=True).agg(
        pl.len().alias("n"),
        *[pl.col("ms").quantile(q, "linear").alias(k) for k, q in QUANTILES.items()],
        pl.col("ms").mean().alias("mean"),
        pl.col("ms").max().alias("max"),
    )


def latency_figure(stats: pl.DataFrame, png: Path, *,
                   title: str = "Latency per batch, by stage") -> list[Path]:
    """stats: series, stage, n, p1, p25, p50, p75, p99, mean, max (see `latency_stats`)."""
    fig = _new_figure(width=min(12.0, max(7.0, 0.45 * stats.height)))
    ax = fig.add_subplot()
    stages = _ordered(stats["stage"].to_list())
    series = _ordered(stats["series"].to_list())
    width = 0.8 / max(len(series), 1)
    colors = _colors(len(series))
    for j, (name, color) in enumerate(zip(series, colors)):
        part = stats.filter(pl.col("series") == name)
        boxes, pos = [], []
        for row in part.iter_rows(named=True):  # one row per stage
            boxes.append({"whislo": row["p1"], "q1": row["p25"], "med": row["p50"],
                          "q3": row["p75"], "whishi": row["p99"], "mean": row["mean"],
                          "fliers": [], "label": ""})
            pos.append(stages.index(row["stage"]) - 0.4 + width * (j + 0.5))
        art = ax.bxp(boxes, positions=pos, widths=width * 0.85, showmeans=True,
                     patch_artist=True, meanprops={"marker": "o", "markersize": 3,
                                                   "markerfacecolor": "black",
                                                   "markeredgecolor": "black"},
                     medianprops={"color": "black"})
        for patch in art["boxes"]:
            patch.set_facecolor(color)
            patch.set_alpha(0.75)
        art["boxes"][0].set_label(name) if art["boxes"] else None
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter


    ax.set_xticks(range(len(stages)),
                  ["full funnel" if s == FUNNEL_STAGE else s for s in stages])
    ax.set_xlim(-0.6, len(stages) - 0.4)
    lo = float(stats["p1"].min())
    hi = float(stats["p99"].max())
    if lo > 0 and hi / lo > 30:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("ms per batch (box p25-p75, whiskers p1/p99, dot mean)")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return save_figure(fig, png, stats)


def quality_latency_figure(points: pl.DataFrame, png: Path, *, budget_ms: float | None = None,
                           quality: str = "NDCG@10",
                           title: str = "Quality against full-funnel p99 latency"
                           ) -> list[Path]:
    """points: label, p99_ms, quality, frontier (bool), optional group (colour) and chosen
    (bool, drawn as a star)."""
    fig = _new_figure()
    ax = fig.add_subplot()
    groups = points["group"].to_list() if "group" in points.columns else ["all"] * points.height
    names = _ordered(groups)
    for color, g in zip(_colors(len(names)), names):
        part = points.filter(pl.Series(groups) == g)
        ax.scatter(part["p99_ms"].to_list(), part["quality"].to_list(), color=color, s=28,
                   label=None if g == "all" else g, zorder=3)
    front = points.filter(pl.col("frontier")).sort("p99_ms")
    if front.height:
        ax.step(front["p99_ms"].to_list(), front["quality"].to_list(), where="post",
                color="black", lw=1.2, alpha=0.7, label="frontier", zorder=2)
    if "chosen" in points.columns and points["chosen"].any():
        best = points.filter(pl.col("chosen"))
        ax.scatter(best["p99_ms"].to_list(), best["quality"].to_list(), marker="*", s=220,
                   facecolor="none", edgecolor="tab:red", lw=1.4, label="chosen", zorder=4)
    if points.height <= 24:
        for row in points.iter_rows(named=True):  # <= 24 labels, one per configuration
            ax.annotate(row["label"], (row["p99_ms"], row["quality"]), fontsize=6.5,
                        textcoords="offset points", xytext=(4, 3))
    if budget_ms is not None:
        ax.axvline(budget_ms, color="tab:red", ls="--", lw=1, label=f"p99 budget {budget_ms:g} ms")
    ax.set_xlabel("full-funnel p99 latency per batch (ms)")
    ax.set_ylabel(quality)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_figure(fig, png, points)


# --------------------------------------------------------------------------------------------
# figures of a run, a comparison, a sweep
# --------------------------------------------------------------------------------------------


def run_funnel_table(run: "Run") -> pl.DataFrame:
    rows = [
        {"series": v, "stage": s["name"], "k": int(s["k"]), "recall": float(s["recall"])}
        for v in run.variants
        for s in run.stages(v)
    ]
    return pl.DataFrame(rows, schema={"series": pl.String, "stage": pl.String, "k": pl.Int64,
                                      "recall": pl.Float64})


def run_latency_frame(run: "Run", series: str | None = None) -> pl.DataFrame:
    """series, stage, ms: every stage's batches plus the summed full funnel ("funnel")."""
    lat = run.stage_latency().select(pl.col("variant").alias("series"), "stage", "ms")
    tot = run.funnel_latency().select(
        pl.col("variant").alias("series"), pl.lit(FUNNEL_STAGE).alias("stage"), "ms"
    )
    order = {s: i for i, s in enumerate([*run.stage_names(), FUNNEL_STAGE])}
    out = pl.concat([lat, tot]).with_columns(
        pl.col("stage").replace_strict(order, default=len(order)).alias("_o"),
        pl.col("series").replace_strict({v: i for i, v in enumerate(run.variants)},
                                        default=len(run.variants)).alias("_v"),
    ).sort("_v", "_o", maintain_order=True).drop("_o", "_v")
    if series is not None:
        out = out.with_columns((pl.lit(series + "/") + pl.col("series")).alias("series"))
    return out
