"""Derived signals: GESR's "MoA Config" on public data (see shared/GESR.md).

- action from rating: rating >= 4 positive (+1), <= 2 negative (-1), otherwise neutral (0);
  a log without ratings is implicit feedback, so every event is positive.
- log-bucketed time gaps between an event and the request it is history for.
- pseudo-categories for catalogues without categories: k-means (scikit-learn) over item vectors
  from a truncated SVD of the item-item co-occurrence of user histories.
"""

from __future__ import annotations

import numpy as np
import polars as pl

POSITIVE, NEUTRAL, NEGATIVE = 1, 0, -1
N_ACTION_CODES = 4  # token codes: 0 padding, 1 negative, 2 neutral, 3 positive
N_GAP_BUCKETS = 32  # token codes: 0 padding, 1..31 log2 buckets of the gap in seconds


def action_expr(rating: pl.Expr) -> pl.Expr:
    """Polars expression: action (+1/0/-1, Int8) from a rating column; null rating -> positive."""
    return (
        pl.when(rating.is_null())
        .then(POSITIVE)
        .when(rating >= 4)
        .then(POSITIVE)
        .when(rating <= 2)
        .then(NEGATIVE)
        .otherwise(NEUTRAL)
        .cast(pl.Int8)
    )


def action_codes(action: np.ndarray) -> np.ndarray:
    """Map actions (-1/0/+1) to embedding codes (1/2/3); 0 stays free for padding."""
    return action.astype(np.int64) + 2


def gap_buckets(gap_seconds: np.ndarray) -> np.ndarray:
    """Log2 buckets 1..N_GAP_BUCKETS-1 of non-negative gaps (0 is reserved for padding)."""
    g = np.maximum(gap_seconds.astype(np.float64), 0.0)
    b = np.floor(np.log2(1.0 + g)).astype(np.int64)
    return 1 + np.clip(b, 0, N_GAP_BUCKETS - 2)


def pseudo_categories(
    events: pl.DataFrame,
    n_items: int,
    *,
    n_clusters: int = 32,
    dim: int = 32,
    window: int = 20,
    seed: int = 0,
) -> np.ndarray:
    """(n_items,) int64 pseudo-category codes in 1..n_clusters (0 for items never seen).

    Item vectors: truncated SVD of the item co-occurrence matrix, counting pairs of items that
    appear within `window` positions of each other in a user's sequence (so the matrix stays
    sparse on large logs). Clusters: k-means on the normalised vectors.
    """
    from scipy import sparse
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD

    users = events["user"].to_numpy()
    items = events["item"].to_numpy()
    # one sparse matrix per lag, summed as we go: memory stays O(events + distinct pairs)
    # instead of O(events * window) for all pairs at once (gigabytes on a 10M-event log)
    co = sparse.csr_matrix((n_items, n_items), dtype=np.float32)
    for lag in range(1, window + 1):
        same = users[lag:] == users[:-lag]
        r, c = items[lag:][same], items[:-lag][same]
        if r.size == 0:
            continue
        pairs = sparse.coo_matrix(
            (np.ones(r.size, np.float32), (r, c)), shape=(n_items, n_items)
        ).tocsr()
        co = co + pairs
    co = (co + co.T).tocsr()  # co-occurrence is symmetric: add the transpose once
    co.data = np.log1p(co.data)
    seen = np.zeros(n_items, dtype=bool)
    seen[items] = True
    codes = np.zeros(n_items, dtype=np.int64)
    k = int(min(n_clusters, max(1, seen.sum())))
    d = int(min(dim, max(1, n_items - 1)))
    if co.nnz == 0 or d < 1:
        codes[seen] = 1
        return codes
    vec = TruncatedSVD(n_components=d, random_state=seed).fit_transform(co)
    vec = vec / (np.linalg.norm(vec, axis=1, keepdims=True) + 1e-8)
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(vec[seen])
    codes[seen] = km.labels_.astype(np.int64) + 1
    return codes


def add_pseudo_categories(dataset, *, n_clusters: int = 32, seed: int = 0):
    """Return `dataset` with a multi-valued item feature "pseudo_category" (one value per item)
    used as its `category_feature`, unless it already has a category feature."""
    from dataclasses import replace

    if dataset.category_feature is not None:
        return dataset
    codes = pseudo_categories(dataset.events, dataset.n_items, n_clusters=n_clusters, seed=seed)
    items = dataset.items.with_multi("pseudo_category", codes[:, None], n_clusters + 1)
    return replace(
        dataset,
        items=items,
        category_feature="pseudo_category",
        report=(*dataset.report, f"derived pseudo_category: k-means into {n_clusters} clusters"),
    )
