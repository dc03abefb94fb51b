"""Funnel metrics: the registry of final-list metrics, and summaries of latency samples and of
the per-request frame.

**The metric registry.** Each quality metric of the final list is defined once, as a `Metric`:
its key (the JSON key in metrics.json and the column in requests.parquet, one name everywhere),
its label (table headings), its per-request function of the final ranks, and whether higher is
better. Replay, the funnel table, metrics.json, the report, `compare`, `sweep` and `ablation` all
iterate `final_metrics()`, so adding a metric is one `register_metric(...)` call here (or in a
user's module) plus its test. The built-in ones are HR@10, NDCG@10 and MRR.

Conventions (shared with `cascade.replay` and the run records):
- a rank is the 0-based position of a ground-truth item in a stage's output, best first;
  -1 means the item is not in that output (it did not survive the stage);
- `ranks` arrays are (R, T): R requests, T targets per request; `valid` (R, T) bool marks real
  targets (requests with fewer than T targets are padded);
- recall after a stage is, per request, the fraction of its targets in that stage's output
  (for the usual one-target request: 1 if it survived, else 0), averaged over requests;
- survival of a stage is the fraction of targets that survived the previous stage and survive
  this one too (the first stage's previous "stage" is the whole catalogue);
- HR@K, NDCG@K and MRR are computed on the final ranking (the LSR's top `final`): NDCG divides by
  the ideal DCG of min(T, K) hits; MRR is the reciprocal rank of the best-ranked target, 0 when
  no target made the final list (so it is MRR@final);
- latency: per batch, the wall time of a stage on one batch; per request, that time divided by
  the batch size (the amortised cost of one request), weighted by the batch size;
- history length buckets count every earlier event of the user (not truncated to max_len);
- popularity buckets: items sorted by training event count, head = the most popular items that
  together make the first 50% of training events, torso = the next 30% (50-80%), tail = the rest
  (80-100%, including items never seen in training).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from cascade.util.ranking import (  # noqa: F401 - re-exported: the engine's ranking arithmetic
    _hits,
    _valid,
    hit_rate,
    mean,
    ndcg,
    overlap_at_k,
    ranks_from_scores,
    recall,
    reciprocal_rank,
    target_ranks,
)

HISTORY_BUCKETS: tuple[tuple[str, int, float], ...] = (
    ("0", 0, 0),
    ("1-5", 1, 5),
    ("6-20", 6, 20),
    ("21-50", 21, 50),
    ("51+", 51, math.inf),
)
POPULARITY_BUCKETS: tuple[tuple[str, float], ...] = (("head", 0.5), ("torso", 0.8), ("tail", 1.0))
FUNNEL_STAGES: tuple[str, ...] = ("retrieval", "esr", "lsr")
FUNNEL_STAGE = "funnel"  # the pseudo-stage of latency tables: every stage of one batch, summed


# ---- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A quality metric of a ranked list, computed per request and averaged over requests."""

    key: str  # metrics.json key and requests.parquet column, e.g. "ndcg@10"
    label: str  # table heading, e.g. "NDCG@10"
    # (ranks (R, T), valid (R, T), list length) -> (R,) values; ranks as in cascade.util.ranking
    per_request: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    description: str
    higher_is_better: bool = True

    def values(self, ranks: np.ndarray, valid: np.ndarray, list_len: int) -> np.ndarray:
        return np.asarray(self.per_request(ranks, valid, list_len), dtype=np.float64)


_METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add `metric` to the final-list metrics every report shows (a key may be registered once)."""
    if metric.key in _METRICS and _METRICS[metric.key] != metric:
        raise ValueError(f"metric {metric.key!r} is already registered")
    if metric.key in ("n_requests", "recall") or metric.key.startswith(("rank_", "recall_", "oracle_")):
        raise ValueError(f"metric key {metric.key!r} clashes with a column cascade already writes")
    _METRICS[metric.key] = metric
    return metric


def final_metrics() -> tuple[Metric, ...]:
    """The registered final-list metrics, in registration order."""
    return tuple(_METRICS.values())


def get_metric(key: str) -> Metric:
    try:
        return _METRICS[key]
    except KeyError:
        raise ValueError(
            f"unknown metric {key!r}; known: {', '.join(_METRICS)}"
        ) from None


register_metric(Metric(
    "hr@10", "HR@10", lambda r, v, n: hit_rate(r, v, min(10, n)),
    "1 when a ground-truth item is in the top 10 of the final list, else 0",
))
register_metric(Metric(
    "ndcg@10", "NDCG@10", lambda r, v, n: ndcg(r, v, min(10, n)),
    "DCG of the ground-truth items in the top 10 over the ideal DCG",
))
register_metric(Metric(
    "mrr", "MRR", lambda r, v, n: reciprocal_rank(r, v),
    "1 / (1 + rank) of the best-ranked ground-truth item in the final list, 0 when absent",
))


def final_values(ranks: np.ndarray, valid: np.ndarray, list_len: int, prefix: str = "") -> dict:
    """{prefix + key: (R,) values} of every registered metric on one ranking."""
    return {prefix + m.key: m.values(ranks, valid, list_len) for m in final_metrics()}


def survival(
    previous: np.ndarray | None, current: np.ndarray, valid: np.ndarray | None = None
) -> float | None:
    """Fraction of targets present after the previous stage (all targets when `previous` is None)
    that are still present after this one. None when nothing reached this stage."""
    v = _valid(current, valid)
    before = v if previous is None else _hits(previous, v, None)
    n = int(before.sum())
    if n == 0:
        return None
    return float((before & _hits(current, v, None)).sum() / n)


# ---- latency -------------------------------------------------------------------------------------


def latency_percentiles(ms: Sequence[float], weights: Sequence[int] | None = None) -> dict:
    """p50 / p95 / p99 / mean of latency samples (numpy's linear interpolation). With weights
    (e.g. batch sizes), each sample counts that many times."""
    x = np.asarray(ms, dtype=np.float64)
    if weights is not None:
        x = np.repeat(x, np.asarray(weights, dtype=np.int64))
    if x.size == 0:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    p = np.percentile(x, [50, 95, 99])
    return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2]), "mean": float(x.mean())}


def per_request_latency(ms: Sequence[float], batch_sizes: Sequence[int]) -> dict:
    """Percentiles of the amortised per-request latency: each request of a batch is charged the
    batch's time divided by its size."""
    ms = np.asarray(ms, dtype=np.float64)
    bs = np.asarray(batch_sizes, dtype=np.int64)
    return latency_percentiles(ms / np.maximum(bs, 1), bs)


def throughput(n_requests: int, total_ms: float) -> float | None:
    """Requests per second over the total funnel time."""
    return None if total_ms <= 0 else n_requests / (total_ms / 1000.0)


# ---- buckets -------------------------------------------------------------------------------------


def history_bucket(hist_len: np.ndarray) -> np.ndarray:
    """(R,) bucket label of each history length (see HISTORY_BUCKETS)."""
    h = np.asarray(hist_len)
    out = np.empty(h.shape, dtype=object)
    for label, lo, hi in HISTORY_BUCKETS:
        out[(h >= lo) & (h <= hi)] = label
    return out.astype(str)


def popularity_buckets(train_counts: np.ndarray) -> np.ndarray:
    """(n_items,) head / torso / tail label per item by cumulative training popularity: items in
    decreasing count order (ties by id) until the cumulative share of training events reaches
    50% are head, then 80% torso, the rest (incl. never-seen items) tail. An item that crosses a
    boundary belongs to the bucket it starts in."""
    c = np.asarray(train_counts, dtype=np.float64)
    order = np.lexsort((np.arange(c.size), -c))
    total = c.sum()
    start_share = (np.cumsum(c[order]) - c[order]) / total if total > 0 else np.ones(c.size)
    labels_sorted = np.full(c.size, POPULARITY_BUCKETS[-1][0], dtype=object)
    lower = 0.0
    for label, upper in POPULARITY_BUCKETS:
        labels_sorted[(start_share >= lower) & (start_share < upper) & (c[order] > 0)] = label
        lower = upper
    out = np.empty(c.size, dtype=object)
    out[order] = labels_sorted
    return out.astype(str)


# ---- bootstrap -----------------------------------------------------------------------------------


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    chunk_elems: int = 1 << 24,
) -> dict:
    """Mean of the paired difference a - b over requests and its percentile bootstrap
    (1 - alpha) interval: resample requests with replacement, recompute the mean difference.
    Vectorised in chunks of resamples so memory stays bounded on large traffic."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two equal 1-d arrays, got {a.shape} and {b.shape}")
    ok = ~(np.isnan(a) | np.isnan(b))
    d = (a - b)[ok]
    n = d.size
    if n == 0:
        return {"delta": None, "ci95": [None, None], "n": 0}
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, chunk_elems // n)
    for i in range(0, n_resamples, step):
        m = min(step, n_resamples - i)
        idx = rng.integers(0, n, size=(m, n))
        means[i : i + m] = d[idx].mean(1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"delta": float(d.mean()), "ci95": [float(lo), float(hi)], "n": int(n)}


# ---- summaries over the per-request frame ---------------------------------------------------------

RANK_COLUMNS = {s: f"rank_{s}" for s in FUNNEL_STAGES}
RECALL_COLUMNS = {s: f"recall_{s}" for s in FUNNEL_STAGES}


def quality_summary(frame: pl.DataFrame) -> dict:
    """Recall after each stage and every final metric (means over requests) of one variant's
    request rows (columns recall_<stage> and each metric's key)."""
    if frame.height == 0:
        return {"n_requests": 0}
    keys = [m.key for m in final_metrics()]
    row = frame.select(
        pl.len().alias("n_requests"),
        *[pl.col(c).mean().alias(s) for s, c in RECALL_COLUMNS.items()],
        *[pl.col(k).mean() for k in keys],
    ).row(0, named=True)
    return {
        "n_requests": row["n_requests"],
        "recall": {s: row[s] for s in FUNNEL_STAGES},
        **{k: row[k] for k in keys},
    }


def breakdown(frame: pl.DataFrame, by: str, order: Iterable[str]) -> dict:
    """`quality_summary` per value of column `by`, in `order` (empty buckets are left out)."""
    out = {}
    for label in order:
        part = frame.filter(pl.col(by) == label)
        if part.height:
            out[label] = quality_summary(part)
    return out


def stage_latency(latency: pl.DataFrame, variant: str, stage: str) -> tuple[dict, dict, float]:
    """Per-batch and per-request latency percentiles and the total ms of one variant's stage."""
    part = latency.filter((pl.col("variant") == variant) & (pl.col("stage") == stage))
    ms = part["ms"].to_numpy()
    bs = part["batch_size"].to_numpy()
    return latency_percentiles(ms), per_request_latency(ms, bs), float(ms.sum())


def funnel_latency(latency: pl.DataFrame, variant: str) -> tuple[dict, dict, float]:
    """Latency of the whole funnel per batch (the sum of the stages on that batch)."""
    per_batch = (
        latency.filter(pl.col("variant") == variant)
        .group_by("batch")
        .agg(pl.col("ms").sum(), pl.col("batch_size").first())
        .sort("batch")
    )
    ms = per_batch["ms"].to_numpy()
    bs = per_batch["batch_size"].to_numpy()
    return latency_percentiles(ms), per_request_latency(ms, bs), float(ms.sum())


def survival_chain(frame: pl.DataFrame) -> dict:
    """Survival of each stage given the previous one, from a variant's rank columns (first
    target only when requests have several; recall columns carry the full fractions)."""
    out, prev = {}, None
    for s in FUNNEL_STAGES:
        cur = frame[RANK_COLUMNS[s]].fill_null(-1).to_numpy()[:, None]
        out[s] = survival(prev, cur)
        prev = cur
    return out


def comparison_columns() -> dict[str, str]:
    """Reported name -> requests.parquet column of every paired comparison."""
    return {"recall@esr": "recall_esr", "recall@final": "recall_lsr",
            **{m.key: m.key for m in final_metrics()}}


def compare_variants(
    frame: pl.DataFrame,
    variant: str,
    baseline: str,
    *,
    metrics: Mapping[str, str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Paired per-request deltas variant - baseline with bootstrap 95% intervals. `metrics` maps
    a reported name to a request column (default: recall after the ESR and after the LSR, and
    every final metric); rows are paired by request_id."""
    metrics = metrics or comparison_columns()
    cols = list(dict.fromkeys(metrics.values()))
    a = frame.filter(pl.col("variant") == variant).select("request_id", *cols)
    b = frame.filter(pl.col("variant") == baseline).select("request_id", *cols)
    joined = a.join(b, on="request_id", how="inner", suffix="_b")
    out = {}
    for name, col in metrics.items():
        res = paired_bootstrap(
            joined[col].to_numpy(), joined[f"{col}_b"].to_numpy(), n_resamples=n_resamples, seed=seed
        )
        out[name] = {
            "variant": variant,
            "baseline": baseline,
            "delta": res["delta"],
            "ci95": res["ci95"],
            "n": res["n"],
        }
    return out


# ---- quality against latency -----------------------------------------------------------------


def frontier_mask(quality: np.ndarray, latency: np.ndarray) -> np.ndarray:
    """(n,) bool: True where no other point has quality >= and latency <= with one strictly
    better (the non-dominated points; higher quality and lower latency are better)."""
    q = np.asarray(quality, dtype=np.float64)
    lat = np.asarray(latency, dtype=np.float64)
    if q.shape != lat.shape or q.ndim != 1:
        raise ValueError(f"quality and latency must be 1-d of one length, got {q.shape}, {lat.shape}")
    ge = (q[None, :] >= q[:, None]) & (lat[None, :] <= lat[:, None])  # [i, j]: j at least as good
    gt = (q[None, :] > q[:, None]) | (lat[None, :] < lat[:, None])
    return ~(ge & gt).any(axis=1)
