"""Splits and traffic: no split leaks the future (on synthetic data and on MovieLens 100k), the
leave-one-out and temporal contracts hold, and Traffic batches equal histories built by hand."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from cascade.data.derive import gap_buckets
from cascade.data.dataset import DataError, Dataset, FeatureTable, finalize_events
from cascade.data.splits import SplitConfig, make_split, training_requests
from cascade.data.synthetic import generate, preset
from cascade.data.traffic import RequestBatch, Traffic


@pytest.fixture(scope="session")
def synthetic_ds() -> Dataset:
    return generate(preset("tiny", seed=3))


@pytest.fixture(scope="session")
def ml100k_ds(ml100k_path) -> Dataset:
    from cascade.data.loaders import load_dataset

    return load_dataset(str(ml100k_path))


@pytest.fixture(params=["synthetic", "ml100k"])
def dataset(request) -> Dataset:
    return request.getfixturevalue(f"{request.param}_ds")


def _expected_histories(ds: Dataset, requests: pl.DataFrame, max_len: int) -> pl.DataFrame:
    """Each request's history built independently of Traffic (a polars join): the events of the
    same user at an earlier position, the most recent max_len of them, oldest first."""
    ev = ds.events.select("user", "pos", pl.col("item").alias("h_item"), pl.col("ts").alias("h_ts"),
                          pl.col("action").alias("h_action"), pl.col("pos").alias("h_pos"))
    joined = (
        requests.select("request_id", "user", "ts", "pos")
        .join(ev.drop("pos"), on="user", how="inner")
        .filter((pl.col("h_pos") < pl.col("pos")) & (pl.col("h_pos") >= pl.col("pos") - max_len))
        .sort("request_id", "h_pos")
    )
    return joined


def _check_no_leakage(ds: Dataset, split, max_len: int = 50) -> None:
    ev = ds.events
    n_per_user = ev.group_by("user").agg(pl.len().alias("n"))
    for name, req in (("valid", split.valid), ("test", split.test)):
        # the request is a real logged event: its (user, pos) holds its target item and time
        real = req.join(ev.select("user", "pos", pl.col("item").alias("ev_item"),
                                  pl.col("ts").alias("ev_ts")), on=["user", "pos"], how="left")
        assert real["ev_item"].null_count() == 0, f"{name}: request without its event"
        assert (real["ev_item"] == real["item"]).all() and (real["ev_ts"] == real["ts"]).all()

        hist = _expected_histories(ds, req, max_len)  # earlier positions only, by construction
        # the history Traffic builds is exactly that
        tr = Traffic(ds, req, max_len=max_len)
        b = tr.batch(np.arange(len(tr)))
        mask = b.hist_mask.numpy()
        got_items = b.hist_items.numpy()[mask]
        order = np.argsort(b.request_id.numpy(), kind="stable")  # rows are in request order
        assert (b.request_id.numpy()[order] == np.sort(req["request_id"].to_numpy())).all()
        exp_len = (
            req.select("request_id").join(
                hist.group_by("request_id").agg(pl.len().alias("n")), on="request_id", how="left"
            ).fill_null(0)["n"].to_numpy()
        )
        assert (b.hist_len.numpy() == exp_len).all(), f"{name}: history lengths differ"
        assert (got_items == hist["h_item"].to_numpy()).all(), f"{name}: history items differ"
        gaps = b.hist_gaps.numpy()[mask]
        exp_gap = np.repeat(req["ts"].to_numpy(), exp_len) - hist["h_ts"].to_numpy()
        assert (gaps == gap_buckets(exp_gap)).all(), f"{name}: history time gaps differ"
        assert (b.hist_gaps.numpy()[~mask] == 0).all()
        # valid/test requests are never training events
        clash = req.join(split.train.select("user", "pos"), on=["user", "pos"], how="inner")
        assert clash.height == 0, f"{name} requests found among training events"
    assert split.valid.join(split.test, on=["user", "pos"], how="inner").height == 0
    # training events are a per-user prefix that ends before that user's first request
    tr_stats = split.train.group_by("user").agg(
        pl.col("pos").min().alias("lo"), pl.col("pos").max().alias("hi"), pl.len().alias("k")
    )
    assert (tr_stats["lo"] == 0).all() and (tr_stats["hi"] == tr_stats["k"] - 1).all()
    first_req = pl.concat([split.valid, split.test]).group_by("user").agg(
        pl.col("pos").min().alias("first")
    )
    both = tr_stats.join(first_req, on="user", how="inner")
    assert (both["hi"] < both["first"]).all(), "a training event comes after a request"
    assert n_per_user.height == ds.n_users


@pytest.mark.parametrize("kind", ["loo", "temporal"])
def test_no_split_leaks_the_future(dataset, kind):
    split = make_split(dataset, SplitConfig(kind=kind))
    _check_no_leakage(dataset, split)
    # every event is in exactly one of train / valid / test
    assert split.train.height + split.valid.height + split.test.height == dataset.n_events


def test_leave_one_out_counts(dataset):
    split = make_split(dataset, SplitConfig(kind="loo"))
    n = dataset.events.group_by("user").agg(pl.len().alias("n"))
    eligible = n.filter(pl.col("n") >= 3)
    assert split.test.height == eligible.height == split.valid.height
    assert split.test["user"].n_unique() == split.test.height  # one test request per user
    t = split.test.join(eligible, on="user")
    v = split.valid.join(eligible, on="user")
    assert (t["pos"] == t["n"] - 1).all() and (v["pos"] == v["n"] - 2).all()
    # request ids: valid 0..V-1, then test
    assert split.valid["request_id"].to_list() == list(range(split.valid.height))
    assert split.test["request_id"].min() == split.valid.height


def test_leave_one_out_keeps_short_users_for_training():
    frame = pl.DataFrame({"user": [0, 0, 1, 1, 1, 1], "item": [1, 2, 0, 1, 2, 3],
                          "ts": [1, 2, 1, 2, 3, 4], "rating": [5.0] * 6})
    ds = _handmade(frame, n_users=2, n_items=4)
    split = make_split(ds, SplitConfig(kind="loo"))
    assert split.test["user"].to_list() == [1] and split.test["pos"].to_list() == [3]
    assert split.valid["pos"].to_list() == [2]
    assert sorted(split.train.filter(pl.col("user") == 0)["pos"].to_list()) == [0, 1]
    assert any("fewer than 3 events" in line for line in split.report)


def test_temporal_windows(dataset):
    cfg = SplitConfig(kind="temporal", valid_frac=0.1, test_frac=0.2)
    split = make_split(dataset, cfg)
    assert split.train["ts"].max() < split.valid["ts"].min()
    assert split.valid["ts"].max() < split.test["ts"].min()
    # the windows hold (about) the asked shares of events; ties at a cut go to the later window
    n = dataset.n_events
    assert split.test.height >= 0.2 * n - 1 and split.test.height < 0.2 * n + 0.02 * n
    assert abs(split.valid.height - 0.1 * n) < 0.03 * n
    # every event at or after the test cut is a test request, none is dropped
    t_test = split.test["ts"].min()
    assert split.test.height == dataset.events.filter(pl.col("ts") >= t_test).height
    assert "cold start" in " ".join(split.report)


def test_temporal_split_rejects_coarse_timestamps():
    frame = pl.DataFrame({"user": [0, 0, 0, 1, 1, 1], "item": [0, 1, 2, 0, 1, 2],
                          "ts": [5] * 6, "rating": [4.0] * 6})
    with pytest.raises(DataError, match="too coarse"):
        make_split(_handmade(frame, n_users=2, n_items=3), SplitConfig(kind="temporal"))


def test_temporal_split_rejects_an_empty_training_window():
    # 90% of the events share the first timestamp: the validation cut is the earliest time
    frame = pl.DataFrame({"user": list(range(20)), "item": [0] * 20,
                          "ts": [1] * 18 + [2, 3], "rating": [4.0] * 20})
    with pytest.raises(DataError, match="no training events"):
        make_split(_handmade(frame, n_users=20, n_items=1),
                   SplitConfig(kind="temporal", valid_frac=0.05, test_frac=0.05))


def test_max_requests_samples_deterministically(synthetic_ds):
    cfg = SplitConfig(kind="temporal", max_requests=50, seed=7)
    a, b = make_split(synthetic_ds, cfg), make_split(synthetic_ds, cfg)
    assert a.test.height == a.valid.height == 50
    assert a.test.equals(b.test)
    c = make_split(synthetic_ds, SplitConfig(kind="temporal", max_requests=50, seed=8))
    assert not a.test.equals(c.test)
    _check_no_leakage(synthetic_ds, a)


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(kind="random"), "kind"), (dict(valid_frac=0.0), "valid_frac"),
     (dict(test_frac=0.7), "test_frac"), (dict(max_requests=0), "max_requests")],
)
def test_split_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"SplitConfig.{field}"):
        SplitConfig(**kwargs)


def test_training_requests_have_histories(synthetic_ds):
    split = make_split(synthetic_ds)
    req = training_requests(split)
    assert req.height == split.train.filter(pl.col("pos") >= 1).height
    assert (req["pos"] >= 1).all()
    assert req["request_id"].to_list() == list(range(req.height))
    _check_histories_by_hand(synthetic_ds, req, max_len=7, rows=[0, 5, req.height - 1])


# --- Traffic against hand-built histories -------------------------------------------------------


def _handmade(frame: pl.DataFrame, *, n_users: int, n_items: int, user_feats=None) -> Dataset:
    users = FeatureTable(n=n_users) if user_feats is None else user_feats
    return Dataset(
        name="handmade",
        events=finalize_events(frame.with_columns(pl.col("rating").cast(pl.Float32))),
        n_users=n_users,
        n_items=n_items,
        items=FeatureTable(n=n_items),
        users=users,
        raw_user_ids=np.arange(n_users),
        raw_item_ids=np.arange(n_items),
    )


def _by_hand(ds: Dataset, user: int, pos: int, ts: int, max_len: int):
    """History of (user, pos) with per-event Python: items, action codes, gap buckets."""
    ev = ds.events.filter(pl.col("user") == user).sort("pos")
    earlier = [r for r in ev.iter_rows(named=True) if r["pos"] < pos][-max_len:]
    items = [r["item"] for r in earlier]
    rating_code = []
    for r in earlier:
        rt = r["rating"]
        a = 1 if rt is None or rt >= 4 else (-1 if rt <= 2 else 0)
        rating_code.append({-1: 1, 0: 2, 1: 3}[a])
    gaps = [1 + min(math.floor(math.log2(1 + (ts - r["ts"]))), 30) for r in earlier]
    return items, rating_code, gaps


def _check_histories_by_hand(ds, requests, *, max_len, rows):
    tr = Traffic(ds, requests, max_len=max_len)
    b = tr.batch(np.asarray(rows))
    assert b.hist_items.shape == (len(rows), max_len)
    for k, row in enumerate(rows):
        r = requests.row(row, named=True)
        items, actions, gaps = _by_hand(ds, r["user"], r["pos"], r["ts"], max_len)
        n = len(items)
        assert int(b.hist_len[k]) == n == min(r["pos"], max_len)
        assert b.hist_items[k, :n].tolist() == items
        assert b.hist_actions[k, :n].tolist() == actions
        assert b.hist_gaps[k, :n].tolist() == gaps
        # padding is 0 everywhere after the history
        for t in (b.hist_items, b.hist_actions, b.hist_gaps):
            assert (t[k, n:] == 0).all()
        assert int(b.user[k]) == r["user"] and int(b.ts[k]) == r["ts"]
        assert int(b.request_id[k]) == r["request_id"] and int(b.targets[k, 0]) == r["item"]


def test_traffic_batches_equal_hand_built_histories():
    # user 0: 12 events with known ratings and gaps, so truncation, actions and gaps all show
    ts = [0, 1, 3, 10, 100, 1000, 1001, 5000, 86_400, 90_000, 10**7, 10**9 + 5]
    ratings = [5, 1, 3, 4, 2, None, 5, 3, 1, 4, 2, 5]
    frame = pl.DataFrame({
        "user": [0] * 12 + [1] * 3,
        "item": [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8] + [7, 7, 0],
        "ts": ts + [50, 50, 60],
        "rating": ratings + [4, 4, 1],
    }, schema_overrides={"rating": pl.Float64})
    ufeat = FeatureTable(n=2, categorical={"age": np.array([2, 5])}, cardinality={"age": 7})
    ds = _handmade(frame, n_users=2, n_items=10, user_feats=ufeat)
    req = ds.events.with_row_index("request_id").select(
        pl.col("request_id").cast(pl.Int64), "user", "ts", "pos", "item")
    # every request, truncated at 5 and not truncated
    for max_len in (5, 50):
        _check_histories_by_hand(ds, req, max_len=max_len, rows=list(range(req.height)))
    b = Traffic(ds, req, max_len=5).batch(np.array([11, 0, 14]))
    # the most recent 5 events of user 0 before pos 11, oldest first
    assert b.hist_items[0].tolist() == [2, 6, 5, 3, 5]
    assert b.hist_len.tolist() == [5, 0, 2]
    assert b.user_feats.tolist() == [[2], [2], [5]]
    # same-second events of user 1: the second one's history is the first (file order)
    assert b.hist_items[2, :2].tolist() == [7, 7] and b.hist_gaps[2, :2].tolist() == [4, 4]


def test_traffic_on_real_requests_matches_hand_built(dataset):
    split = make_split(dataset)
    rows = [0, 1, split.test.height // 2, split.test.height - 1]
    _check_histories_by_hand(dataset, split.test, max_len=50, rows=rows)
    _check_histories_by_hand(dataset, split.test, max_len=3, rows=rows)


def test_batches_select_and_to(synthetic_ds):
    split = make_split(synthetic_ds)
    tr = Traffic(synthetic_ds, split.test, max_len=20)
    batches = list(tr.batches(64))
    assert len(batches) == tr.n_batches(64) == math.ceil(len(tr) / 64)
    assert sum(len(b) for b in batches) == len(tr)
    full = tr.batch(np.arange(len(tr)))
    cat = torch.cat([b.hist_items for b in batches])
    assert torch.equal(cat, full.hist_items)
    # shuffled batches cover every request once, reproducibly
    ids = torch.cat([b.request_id for b in tr.batches(50, shuffle=True, seed=1)])
    ids2 = torch.cat([b.request_id for b in tr.batches(50, shuffle=True, seed=1)])
    assert torch.equal(ids, ids2) and sorted(ids.tolist()) == sorted(full.request_id.tolist())
    assert not torch.equal(ids, full.request_id)

    idx = torch.tensor([5, 0, 17])
    sel = full.select(idx)
    direct = tr.batch(idx.numpy())
    for f in RequestBatch.__dataclass_fields__:
        assert torch.equal(getattr(sel, f), getattr(direct, f)), f
    moved = sel.to("cpu")
    assert isinstance(moved, RequestBatch) and torch.equal(moved.hist_items, sel.hist_items)
    assert moved.hist_items.dtype == torch.int64
    assert torch.equal(sel.hist_mask, torch.arange(20)[None, :] < sel.hist_len[:, None])


def test_traffic_multiple_targets_and_bad_requests(synthetic_ds):
    split = make_split(synthetic_ds)
    req = split.test.head(3).with_columns(
        pl.Series("targets", [[1, 2], [3], [4, 5, 6]], dtype=pl.List(pl.Int64))
    )
    b = Traffic(synthetic_ds, req).batch(np.arange(3))
    assert b.targets.tolist() == [[1, 2, -1], [3, -1, -1], [4, 5, 6]]
    with pytest.raises(DataError, match="lacks columns"):
        Traffic(synthetic_ds, split.test.drop("pos"))
    with pytest.raises(ValueError, match="max_len"):
        Traffic(synthetic_ds, split.test, max_len=0)
    bad = split.test.head(1).with_columns(pl.lit(10**6).cast(pl.Int64).alias("pos"))
    with pytest.raises(DataError, match="beyond"):
        Traffic(synthetic_ds, bad)
    for col, value, msg in (("user", synthetic_ds.n_users, "user ids outside"),
                            ("user", -1, "user ids outside"), ("pos", -2, "negative pos")):
        bad = split.test.head(2).with_columns(pl.lit(value).cast(pl.Int64).alias(col))
        with pytest.raises(DataError, match=msg):
            Traffic(synthetic_ds, bad)


def test_length_batches_cover_every_request_once_trimmed_and_of_similar_length(synthetic_ds):
    """`Traffic.length_batches`: a pass holds every request once, each batch's rows equal
    `batch()` of the same requests cut to the batch's longest history, and batches are far more
    uniform in history length than uniformly shuffled ones (what makes them cheaper)."""
    split = make_split(synthetic_ds)
    tr = Traffic(synthetic_ds, training_requests(split), max_len=30)
    row_of = {r: i for i, r in enumerate(tr.request_id.tolist())}
    seen, spread, spread_random = [], [], []
    for b in tr.length_batches(16, seed=4, pool=8):
        ids = b.request_id.tolist()
        seen += ids
        width = b.hist_items.shape[1]
        assert width == max(1, int(b.hist_len.max()))
        full = tr.batch(np.array([row_of[r] for r in ids]))
        assert torch.equal(b.hist_items, full.hist_items[:, :width])
        assert torch.equal(b.hist_len, full.hist_len) and torch.equal(b.targets, full.targets)
        assert (full.hist_items[:, width:] == 0).all()  # nothing but padding was cut
        spread.append(int(b.hist_len.max() - b.hist_len.min()))
    assert sorted(seen) == sorted(tr.request_id.tolist())
    for b in tr.batches(16, shuffle=True, seed=4):
        spread_random.append(int(b.hist_len.max() - b.hist_len.min()))
    assert np.mean(spread) < 0.5 * np.mean(spread_random)
    assert (tr.history_lengths() == tr.batch(np.arange(len(tr))).hist_len.numpy()).all()
    # another seed, another order; the same seed, the same batches
    first = [b.request_id.tolist() for b in tr.length_batches(16, seed=4, pool=8)]
    assert first == [b.request_id.tolist() for b in tr.length_batches(16, seed=4, pool=8)]
    assert first != [b.request_id.tolist() for b in tr.length_batches(16, seed=5, pool=8)]
