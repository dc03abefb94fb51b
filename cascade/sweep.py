"""Budget sweeps: `cascade sweep`, the quality-latency trade-off an early-stage ranker exists for.

(Engine-dependent part below is filled in once the engine lands.)
"""

from __future__ import annotations

import numpy as np


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
