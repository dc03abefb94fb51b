"""Synthetic logs: seeded determinism, the configured sizes and form, Zipf popularity, events that
follow the ground-truth affinity, and knobs that really move what a cross-aware oracle gains over
a dot-product-only one."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from cascade.data.dataset import EVENT_SCHEMA, Dataset, finalize_events
from cascade.data.derive import action_expr
from cascade.data.splits import SplitConfig, make_split
from cascade.data.synthetic import GroundTruth, SyntheticConfig, generate, preset
from cascade.data.traffic import Traffic
from cascade.stages.base import FitContext, StageError, resolve_stage_class
from scipy.stats import spearmanr


@pytest.fixture(scope="session")
def tiny() -> Dataset:
    return generate(preset("tiny"))


def _all_requests(ds: Dataset, min_pos: int = 1) -> pl.DataFrame:
    return (
        ds.events.with_row_index("request_id")
        .filter(pl.col("pos") >= min_pos)
        .select(pl.col("request_id").cast(pl.Int64), "user", "ts", "pos", "item")
    )


# --- determinism, sizes, form ---------------------------------------------------------------------


def test_same_seed_same_log_other_seed_other_log(tiny):
    again = generate(preset("tiny"))
    assert again.events.equals(tiny.events)
    for name in tiny.items.names:
        a = tiny.items.categorical.get(name, tiny.items.multi.get(name))
        b = again.items.categorical.get(name, again.items.multi.get(name))
        assert np.array_equal(a, b), name
    assert torch.equal(again.truth.user_latent, tiny.truth.user_latent)
    assert again.fingerprint() == tiny.fingerprint()
    other = generate(preset("tiny", seed=1))
    assert not other.events["item"].equals(tiny.events["item"])
    assert other.fingerprint() != tiny.fingerprint()


def test_sizes_and_event_form(tiny):
    cfg = tiny.truth.config
    assert (tiny.n_users, tiny.n_items, tiny.n_events) == (200, 500, 10_000)
    assert tiny.name == "synthetic-tiny" and tiny.source.startswith("synthetic(")
    assert "cross_strength=5.0" in tiny.source
    ev = tiny.events
    assert dict(ev.schema) == EVENT_SCHEMA
    per_user = ev.group_by("user").agg(
        pl.len().alias("n"), pl.col("pos").max().alias("hi"),
        (pl.col("ts").diff().drop_nulls() > 0).all().alias("increasing"),
    )
    assert per_user.height == cfg.n_users and (per_user["n"] >= cfg.min_events_per_user).all()
    assert (per_user["hi"] == per_user["n"] - 1).all() and per_user["increasing"].all()
    assert ev["item"].min() >= 0 and ev["item"].max() < cfg.n_items
    assert ev["ts"].min() >= cfg.start_ts
    assert ev["ts"].max() < cfg.start_ts + 2 * cfg.time_span
    # sorted by (user, pos), as every downstream module assumes
    assert ev.select(pl.col("user").diff().drop_nulls().min())[0, 0] >= 0
    # the log is already finalised: finalize_events leaves it unchanged
    assert finalize_events(ev.drop("pos")).equals(ev)


def test_ratings_and_actions(tiny):
    ev = tiny.events
    r = ev["rating"].to_numpy()
    assert set(np.unique(r).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    expected = ev.select(action_expr(pl.col("rating")).alias("a"))["a"]
    assert (expected == ev["action"]).all()
    share = {a: float((ev["action"] == a).mean()) for a in (-1, 0, 1)}
    # MovieLens-like: mostly positive, yet negatives and neutrals are common enough to matter
    assert share[1] > 0.4 and share[-1] > 0.03 and share[0] > 0.1
    assert 3.0 < r.mean() < 4.3


def test_features_carry_the_latent_structure(tiny):
    items, users, truth = tiny.items, tiny.users, tiny.truth
    assert tiny.category_feature == "categories"
    cat = items.categorical["category"]
    assert np.array_equal(items.multi["categories"][:, 0], cat)
    assert np.array_equal(cat - 1, truth.item_category.numpy())
    assert set(np.unique(cat).tolist()) == set(range(1, truth.config.n_categories + 1))
    # price follows the first item latent, quality the popularity, age the user latent
    lat = truth.item_latent.numpy()
    assert spearmanr(items.categorical["price"], lat[:, 0]).statistic > 0.5
    assert spearmanr(items.categorical["quality"], truth.item_bias.numpy()).statistic > 0.4
    assert spearmanr(users.categorical["age"], truth.user_latent.numpy()[:, 0]).statistic > 0.4
    # region mostly encodes the first interest category
    region = users.categorical["region"]
    first = truth.user_interests.numpy()[:, 0] % 8 + 1
    assert (region == first).mean() > 0.6
    for table in (items, users):
        for name in table.names:
            assert len(table.vocab[name]) == table.cardinality[name]


def test_zipf_popularity(tiny):
    pop = np.sort(tiny.item_popularity())[::-1]
    assert pop[0] > 10 * np.median(pop)
    top10pct = pop[: len(pop) // 10].sum() / pop.sum()
    assert top10pct > 0.5, f"top 10% of items hold only {top10pct:.0%} of events"
    # the configured popularity order shows through the personalised choices
    rho = spearmanr(tiny.item_popularity(), tiny.truth.item_bias.numpy()).statistic
    assert rho > 0.4
    flat = generate(preset("tiny", zipf_exponent=0.0))
    flat_pop = np.sort(flat.item_popularity())[::-1]
    assert flat_pop[: len(pop) // 10].sum() / flat_pop.sum() < top10pct - 0.15


# --- the ground truth -------------------------------------------------------------------------------


def _affinity_by_hand(truth: GroundTruth, ds: Dataset, user: int, pos: int, item: int) -> dict:
    """The module docstring's formula, with per-event Python."""
    cfg = truth.config
    ev = ds.events.filter((pl.col("user") == user) & (pl.col("pos") < pos)).sort("pos")
    hist = ev["item"].to_list()
    acts = ev["action"].to_list()
    cat = truth.item_category.tolist()
    dot = float(truth.user_latent[user] @ truth.item_latent[item]) + float(truth.item_bias[item])
    n_long = n_short = 0
    for age, (h, a) in enumerate(zip(reversed(hist), reversed(acts))):
        if a == -1 or cat[h] != cat[item]:
            continue
        n_long += age < cfg.history_window
        n_short += age < cfg.recent_window
    f = math.log1p(min(n_long, cfg.cross_cap)) / math.log1p(cfg.cross_cap)
    category = cfg.cross_strength * (f + cfg.recency_weight * n_short / cfg.recent_window) / (
        1 + cfg.recency_weight)
    repeat = cfg.repeat_strength * float(item in hist[-cfg.repeat_window:])
    return {"dot": dot, "category": category, "repeat": repeat}


def test_affinity_matches_the_formula(tiny):
    truth = tiny.truth
    req = _all_requests(tiny)
    rng = np.random.default_rng(0)
    rows = rng.choice(req.height, 12, replace=False)
    batch = Traffic(tiny, req, max_len=50).batch(rows)
    # candidates: the target, a few of the recent history items (repeats), random items
    cand = torch.cat([
        batch.targets[:, :1],
        batch.hist_items.gather(1, (batch.hist_len[:, None] - 1 - torch.arange(3)).clamp_min(0)),
        torch.from_numpy(rng.integers(0, tiny.n_items, (len(rows), 4))),
    ], 1)
    got = {p: truth.affinity(batch, cand, parts=(p,)) for p in ("dot", "category", "repeat")}
    n_repeat = 0
    for b, row in enumerate(rows):
        r = req.row(int(row), named=True)
        for k in range(cand.shape[1]):
            exp = _affinity_by_hand(truth, tiny, r["user"], r["pos"], int(cand[b, k]))
            for p, v in exp.items():
                assert got[p][b, k].item() == pytest.approx(v, abs=1e-4), (p, b, k)
            n_repeat += exp["repeat"] > 0
    assert n_repeat > 0  # the check saw repeat terms
    full = truth.affinity(batch, cand)
    cross = truth.affinity(batch, cand, parts=("cross",))
    torch.testing.assert_close(cross, got["category"] + got["repeat"])
    torch.testing.assert_close(full, got["dot"] + cross)


def test_affinity_depends_only_on_the_valid_recent_history(tiny):
    req = _all_requests(tiny, min_pos=40)
    rows = np.arange(0, min(64, req.height))
    cand = torch.randint(0, tiny.n_items, (len(rows), 30), generator=torch.Generator().manual_seed(0))
    a = tiny.truth.affinity(Traffic(tiny, req, max_len=tiny.truth.config.truth_window).batch(rows), cand)
    b = tiny.truth.affinity(Traffic(tiny, req, max_len=120).batch(rows), cand)
    torch.testing.assert_close(a, b)
    # garbage in the padding does not matter
    batch = Traffic(tiny, req, max_len=120).batch(rows)
    noisy = batch.hist_items.masked_fill(~batch.hist_mask, 7)
    from dataclasses import replace
    c = tiny.truth.affinity(replace(batch, hist_items=noisy), cand)
    torch.testing.assert_close(b, c)


def test_affinity_rejects_bad_input(tiny):
    batch = Traffic(tiny, _all_requests(tiny)).batch(np.arange(4))
    cand = torch.zeros(4, 3, dtype=torch.int64)
    for parts in (("dot", "nope"), (), ("cross", "repeat"), ("dot", "dot")):
        with pytest.raises(ValueError, match="parts"):
            tiny.truth.affinity(batch, cand, parts=parts)
    with pytest.raises(ValueError, match="candidate ids"):
        tiny.truth.affinity(batch, cand + tiny.n_items)
    with pytest.raises(ValueError, match="candidates must be"):
        tiny.truth.affinity(batch, cand[:2])


def test_events_follow_the_ground_truth(tiny):
    """The log-likelihood of the observed items under softmax(affinity) over the catalogue is
    close to its expectation (the entropy) if the events were drawn from that softmax; the
    dot-only affinity explains them much worse."""
    req = _all_requests(tiny).sample(n=4000, seed=0)
    tr = Traffic(tiny, req, max_len=50)
    nll, ent, nll_dot = [], [], []
    cand = torch.arange(tiny.n_items)
    for batch in tr.batches(1000):
        c = cand.expand(len(batch), -1)
        logp = torch.log_softmax(tiny.truth.affinity(batch, c), 1)
        nll.append(-logp.gather(1, batch.targets[:, :1]))
        ent.append(-(logp.exp() * logp).sum(1))
        logp_dot = torch.log_softmax(tiny.truth.affinity(batch, c, parts=("dot",)), 1)
        nll_dot.append(-logp_dot.gather(1, batch.targets[:, :1]))
    nll, ent, nll_dot = (torch.cat(x).mean().item() for x in (nll, ent, nll_dot))
    # finite proposal pools make the sampler slightly flatter than the exact softmax
    assert abs(nll - ent) < 0.3, (nll, ent)
    assert nll_dot > nll + 0.4, (nll_dot, nll)


# --- the knobs, through the oracle rankers --------------------------------------------------------


def _context(ds: Dataset) -> FitContext:
    from cascade.config import RunConfig
    from cascade.session import prepare

    return prepare(RunConfig(device="cpu"), dataset=ds, progress=False).ctx


def _full_catalogue_metrics(ranker, ds: Dataset, ctx: FitContext) -> tuple[float, float]:
    tr = Traffic(ds, ctx.split.test, max_len=50)
    hits, ndcg = [], []
    for batch in tr.batches(256):
        cand = torch.arange(ds.n_items).expand(len(batch), -1)
        s = ranker.score(batch, cand)
        assert s.shape == cand.shape and s.dtype == torch.float32
        rank = (s > s.gather(1, batch.targets[:, :1])).sum(1)
        hits.append((rank < 10).float())
        ndcg.append((rank < 10).float() / torch.log2(rank.float() + 2))
    return torch.cat(hits).mean().item(), torch.cat(ndcg).mean().item()


def _oracle_gap(cross_strength: float) -> dict:
    ds = generate(preset("tiny", n_users=600, n_events=30_000, cross_strength=cross_strength,
                         repeat_strength=0.0, seed=5))
    ctx = _context(ds)
    out = {}
    for name in ("oracle", "oracle-dot", "popular"):
        ranker = resolve_stage_class("esr", name)().fit(ctx)
        out[name] = _full_catalogue_metrics(ranker, ds, ctx)
    return out


@pytest.fixture(scope="module")
def knob_results() -> dict:
    return {cs: _oracle_gap(cs) for cs in (0.0, 5.0)}


def test_cross_knob_moves_the_oracle_gap(knob_results):
    gap = {cs: [a - b for a, b in zip(r["oracle"], r["oracle-dot"])]
           for cs, r in knob_results.items()}
    # no cross signal: the cross-aware oracle has nothing to add
    assert abs(gap[0.0][0]) < 0.01 and abs(gap[0.0][1]) < 0.01
    # a strong cross signal: it gains clearly in HR@10 and NDCG@10
    assert gap[5.0][0] > 0.08 and gap[5.0][1] > 0.06, gap
    for r in knob_results.values():  # and both oracles beat most-popular
        assert r["oracle-dot"][0] > r["popular"][0] + 0.05


def test_sequential_and_repeat_knobs():
    """recency_weight makes sessions: the next item shares the last item's category more than
    an older one's; repeat_strength makes users re-consume recent items."""
    def stats(**kw):
        ds = generate(preset("tiny", **kw))
        ev = ds.events
        cat = ds.truth.item_category.numpy()[ev["item"].to_numpy()]
        user = ev["user"].to_numpy()

        def same(lag):
            return np.mean((cat[lag:] == cat[:-lag])[user[lag:] == user[:-lag]])

        prev = ev.with_columns(pl.col("item").shift(1).over("user").alias("p"))
        return same(1) - same(25), float((prev["item"] == prev["p"]).mean())

    calm_decay, calm_rep = stats(recency_weight=0.0, repeat_strength=0.0)
    sessions, _ = stats(recency_weight=6.0, repeat_strength=0.0)
    _, loopy_rep = stats(recency_weight=0.0, repeat_strength=2.0)
    assert abs(calm_decay) < 0.05 and sessions > calm_decay + 0.15, (sessions, calm_decay)
    assert loopy_rep > calm_rep + 0.1, (loopy_rep, calm_rep)


# --- the oracle stages ------------------------------------------------------------------------------


def test_oracle_stages(tiny):
    ctx = _context(tiny)
    oracle = resolve_stage_class("lsr", "oracle")().fit(ctx)
    dot = resolve_stage_class("lsr", "oracle-dot")().fit(ctx)
    assert oracle.config.parts == ("dot", "cross") and dot.config.parts == ("dot",)
    batch = Traffic(tiny, ctx.split.test).batch(np.arange(8))
    cand = torch.randint(0, tiny.n_items, (8, 20), generator=torch.Generator().manual_seed(1))
    s = oracle.score(batch, cand)
    torch.testing.assert_close(s, tiny.truth.affinity(batch, cand))
    torch.testing.assert_close(dot.score(batch, cand),
                               tiny.truth.affinity(batch, cand, parts=("dot",)))
    cls = resolve_stage_class("esr", "oracle")
    custom = cls(config=cls.config_class(parts=["category"])).fit(ctx)
    torch.testing.assert_close(custom.score(batch, cand[:, :-1]),
                               tiny.truth.affinity(batch, cand[:, :-1], parts=("category",)))
    with pytest.raises(ValueError, match="OracleConfig.parts"):
        cls.config_class(parts=("dot", "bogus"))
    with pytest.raises(StageError, match="before fit"):
        cls().score(batch, cand)


def test_oracle_needs_a_ground_truth(tiny):
    from dataclasses import replace

    plain = replace(tiny, truth=None, name="logged", source="/data/log.csv")
    with pytest.raises(StageError, match="only synthetic data has.*'logged'"):
        resolve_stage_class("esr", "oracle").__call__().fit(_context(plain))
    smaller = replace(tiny.truth.config, n_items=400)
    mismatched = replace(tiny, truth=replace(tiny.truth, config=smaller))
    with pytest.raises(StageError, match="covers 400 items"):
        resolve_stage_class("esr", "oracle-dot")().fit(_context(mismatched))


# --- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_users=0), "n_users"),
        (dict(n_events=10), "n_events"),
        (dict(n_categories=10_000), "n_categories"),
        (dict(interests_per_user=50), "interests_per_user"),
        (dict(cross_strength=-1.0), "cross_strength"),
        (dict(cross_strength=float("nan")), "cross_strength"),
        (dict(recent_window=40, history_window=30), "recent_window"),
        (dict(cross_cap=0.0), "cross_cap"),
        (dict(popularity_pool=0), "popularity_pool"),
        (dict(name="a b"), "name"),
        (dict(latent_dim=2.5), "latent_dim"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"SyntheticConfig.{field}"):
        preset("tiny", **kwargs)


def test_presets():
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'; known: tiny, small"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown SyntheticConfig field"):
        preset("tiny", n_user=5)
    large = preset("large")
    assert (large.n_items, large.n_users, large.n_events) == (1_000_000, 100_000, 10_000_000)
    small = preset("small", seed=9)
    assert small.name == "small" and small.seed == 9 and small.n_events == 100_000
    assert isinstance(SyntheticConfig(), SyntheticConfig)
    # every preset's truth is exact under Traffic's default history length
    assert all(preset(p).truth_window <= 50 for p in ("tiny", "small", "medium", "large"))
