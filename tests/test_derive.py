"""Derived signals: actions from ratings, log-bucketed time gaps, pseudo-categories from k-means
(they must recover categories planted in the co-consumption structure)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from cascade.data.dataset import Dataset, FeatureTable, finalize_events
from cascade.data.derive import (
    N_ACTION_CODES,
    N_GAP_BUCKETS,
    action_codes,
    action_expr,
    add_pseudo_categories,
    gap_buckets,
    pseudo_categories,
)
from sklearn.metrics import adjusted_rand_score


def test_action_thresholds():
    ratings = pl.Series("r", [1.0, 2.0, 2.5, 3.0, 3.5, 3.99, 4.0, 5.0, None], dtype=pl.Float32)
    got = pl.DataFrame({"r": ratings}).select(action_expr(pl.col("r")).alias("a"))["a"]
    assert got.dtype == pl.Int8
    assert got.to_list() == [-1, -1, 0, 0, 0, 0, 1, 1, 1]  # no rating = implicit positive


def test_action_codes_leave_zero_for_padding():
    codes = action_codes(np.array([-1, 0, 1], dtype=np.int8))
    assert codes.tolist() == [1, 2, 3] and codes.dtype == np.int64
    assert codes.max() < N_ACTION_CODES


def test_gap_buckets_monotone_with_zero_reserved():
    gaps = np.array([0, 1, 2, 3, 4, 7, 8, 60, 3600, 86_400, 10**7, 10**9, 10**12, 10**18])
    b = gap_buckets(gaps)
    assert b.dtype == np.int64
    assert (b >= 1).all() and (b <= N_GAP_BUCKETS - 1).all()  # 0 is padding only
    assert (np.diff(b) >= 0).all()  # monotone in the gap
    # log2 buckets: 0 s -> 1, 1 s -> 2, 2..3 s -> 2 and 3, 7 s -> 4, 1 h -> 12, then capped
    assert b[:7].tolist() == [1, 2, 2, 3, 3, 4, 4]
    assert b[gaps.tolist().index(3600)] == 12
    assert b[-1] == N_GAP_BUCKETS - 1
    # a negative gap (clock skew) is treated as 0, never as padding
    assert gap_buckets(np.array([-5]))[0] == 1
    # dense check: every gap up to 2**20 s, bucket grows by at most one per doubling
    dense = gap_buckets(np.arange(2**20))
    assert (np.diff(dense) >= 0).all() and set(np.unique(np.diff(dense))) <= {0, 1}
    assert len(np.unique(dense)) == 21


def _planted(n_clusters=8, per_cluster=40, n_users=400, length=30, noise=0.1, seed=0):
    """Users each follow one planted cluster of items (with `noise` random items)."""
    rng = np.random.default_rng(seed)
    n_items = n_clusters * per_cluster
    truth = rng.permutation(np.repeat(np.arange(n_clusters), per_cluster))  # item -> cluster
    members = [np.flatnonzero(truth == c) for c in range(n_clusters)]
    fav = rng.integers(0, n_clusters, n_users)
    own = np.stack([rng.choice(members[f], length) for f in fav])  # (users, length)
    rand = rng.integers(0, n_items, (n_users, length))
    items = np.where(rng.random((n_users, length)) < noise, rand, own)
    events = finalize_events(pl.DataFrame({
        "user": np.repeat(np.arange(n_users), length),
        "item": items.ravel(),
        "ts": np.tile(np.arange(length), n_users) * 100,
    }))
    return events, n_items, truth


def test_pseudo_categories_recover_planted_clusters():
    events, n_items, truth = _planted()
    codes = pseudo_categories(events, n_items, n_clusters=8, dim=16, seed=0)
    assert codes.shape == (n_items,) and codes.dtype == np.int64
    seen = np.zeros(n_items, bool)
    seen[events["item"].to_numpy()] = True
    assert (codes[seen] >= 1).all() and (codes[seen] <= 8).all() and (codes[~seen] == 0).all()
    ari = adjusted_rand_score(truth[seen], codes[seen])
    assert ari > 0.5, f"pseudo-categories barely match the planted clusters (ARI {ari:.2f})"
    # a shuffled log (no co-consumption structure) gives near-chance agreement
    shuffled = events.with_columns(pl.Series("item", np.random.default_rng(1).permutation(
        events["item"].to_numpy())))
    noise_codes = pseudo_categories(shuffled, n_items, n_clusters=8, dim=16, seed=0)
    assert adjusted_rand_score(truth, noise_codes) < 0.2


def test_pseudo_categories_are_seeded_and_mark_unseen_items():
    events, n_items, _ = _planted(n_users=100, seed=2)
    events = events.filter(pl.col("item") != 0)  # item 0 never consumed
    a = pseudo_categories(events, n_items, n_clusters=5, seed=3)
    b = pseudo_categories(events, n_items, n_clusters=5, seed=3)
    assert (a == b).all() and a[0] == 0


def test_add_pseudo_categories_sets_the_category_feature():
    events, n_items, truth = _planted(n_users=200)
    ds = Dataset(name="planted", events=events, n_users=200, n_items=n_items,
                 items=FeatureTable(n=n_items), users=FeatureTable(n=200),
                 raw_user_ids=np.arange(200), raw_item_ids=np.arange(n_items))
    out = add_pseudo_categories(ds, n_clusters=8)
    assert out.category_feature == "pseudo_category"
    codes = out.items.multi["pseudo_category"]
    assert codes.shape == (n_items, 1) and out.items.cardinality["pseudo_category"] == 9
    assert adjusted_rand_score(truth, codes[:, 0]) > 0.5
    assert any("pseudo_category" in line for line in out.report)
    # a dataset that has categories keeps them
    assert add_pseudo_categories(out, n_clusters=3) is out


@pytest.mark.parametrize("window", [1, 5])
def test_pseudo_categories_handle_tiny_logs(window):
    events = finalize_events(pl.DataFrame({"user": [0, 0, 1], "item": [0, 1, 2], "ts": [1, 2, 3]}))
    codes = pseudo_categories(events, 5, n_clusters=4, dim=8, window=window)
    assert codes.shape == (5,) and codes[3] == 0 and codes[4] == 0 and (codes[:3] >= 1).all()
