"""Ranking arithmetic on rank arrays: where each ground-truth item stands in a list, and the
per-request quality of that position. Pure numpy; the engine's metric registry
(`cascade.metrics`) and stages that validate on ranking quality (the LSR) both use it.

Conventions:
- a rank is the 0-based position of a ground-truth item in a list, best first; -1 means the
  item is not in the list;
- `ranks` arrays are (R, T): R requests, T targets per request; `valid` (R, T) bool marks real
  targets (requests with fewer than T targets are padded);
- NDCG divides by the ideal DCG of min(T, K) hits; the reciprocal rank is that of the
  best-ranked target, 0 when no target is in the list.
"""

from __future__ import annotations

import numpy as np


def target_ranks(ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(R, T) 0-based position of each target in `ids` (R, K) (best first), -1 when absent.
    Padded targets (< 0) get -1."""
    ids = np.asarray(ids)
    targets = np.asarray(targets)
    eq = ids[:, None, :] == targets[:, :, None]  # (R, T, K)
    found = eq.any(-1) & (targets >= 0)
    return np.where(found, eq.argmax(-1), -1).astype(np.int64)


def ranks_from_scores(scores: np.ndarray, target_cols: np.ndarray) -> np.ndarray:
    """(R, T) 0-based rank of each target column among all R x N `scores` (higher is better).
    Ties count against the target: rank = #items scoring higher + #other items scoring equal.
    Columns < 0 (padding) and targets scored -inf (excluded items) get -1."""
    scores = np.asarray(scores, dtype=np.float64)
    cols = np.asarray(target_cols)
    safe = np.where(cols >= 0, cols, 0)
    s_t = np.take_along_axis(scores, safe, axis=1)  # (R, T)
    higher = (scores[:, None, :] > s_t[:, :, None]).sum(-1)
    equal = (scores[:, None, :] == s_t[:, :, None]).sum(-1) - 1
    rank = higher + equal
    ok = (cols >= 0) & np.isfinite(s_t)
    return np.where(ok, rank, -1).astype(np.int64)


def _valid(ranks: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    return np.ones(np.shape(ranks), bool) if valid is None else np.asarray(valid, bool)


def _hits(ranks: np.ndarray, valid: np.ndarray | None, k: int | None) -> np.ndarray:
    r = np.asarray(ranks)
    hit = r >= 0
    if k is not None:
        hit &= r < k
    return hit & _valid(r, valid)


# ---- per-request quality -------------------------------------------------------------------------


def recall(ranks: np.ndarray, valid: np.ndarray | None = None, k: int | None = None) -> np.ndarray:
    """(R,) fraction of each request's targets that are in the output (within the top k if given).
    A request without targets gets NaN."""
    v = _valid(ranks, valid)
    n = v.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, _hits(ranks, v, k).sum(1) / np.maximum(n, 1), np.nan)


def hit_rate(ranks: np.ndarray, valid: np.ndarray | None = None, k: int = 10) -> np.ndarray:
    """(R,) 1.0 when any target is in the top k, else 0.0."""
    return _hits(ranks, valid, k).any(1).astype(np.float64)


def ndcg(ranks: np.ndarray, valid: np.ndarray | None = None, k: int = 10) -> np.ndarray:
    """(R,) DCG of the targets in the top k over the ideal DCG of min(#targets, k) hits."""
    r = np.asarray(ranks)
    v = _valid(r, valid)
    hit = _hits(r, v, k)
    gain = np.where(hit, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0).sum(1)
    n_ideal = np.minimum(v.sum(1), k)
    ideal_table = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))])
    ideal = ideal_table[n_ideal]
    return np.where(ideal > 0, gain / np.where(ideal > 0, ideal, 1.0), 0.0)


def reciprocal_rank(
    ranks: np.ndarray, valid: np.ndarray | None = None, k: int | None = None
) -> np.ndarray:
    """(R,) 1 / (1 + rank of the best-ranked target in the output), 0 when none is there."""
    r = np.asarray(ranks)
    hit = _hits(r, valid, k)
    best = np.where(hit, r, np.iinfo(np.int64).max).min(1)
    return np.where(hit.any(1), 1.0 / (best.astype(np.float64) + 1.0), 0.0)


def overlap_at_k(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """(R,) |top-k of a ∩ top-k of b| / k for two (R, >=k) id lists, best first."""
    a = np.asarray(a)[:, :k]
    b = np.asarray(b)[:, :k]
    return (a[:, :, None] == b[:, None, :]).any(-1).sum(1) / float(k)


def mean(x: np.ndarray) -> float | None:
    """Mean ignoring NaN; None for an empty array (JSON-friendly)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else None
