"""The funnel's built-in stages: FAISS retrieval, two-tower ESR, late-stage ranker, most-popular,
and the shared feature helpers. Trained once per session on a tiny log with a known signal
(tests/stage_data.py), with real FAISS indexes and real training."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.data.traffic import Traffic
from cascade.stages.base import NotFittedError, StageError, resolve_stage_class
from cascade.stages.features import (
    HistoryTokenEmbedder,
    ItemFeatureEmbedder,
    UserFeatureEmbedder,
    masked_mean,
    recent_history,
    sequence_windows,
)
from cascade.stages.lsr import LateStageRanker, LSRConfig, rerank_ndcg
from cascade.stages.negatives import NegativeSampler
from cascade.stages.popular import PopularRanker, PopularRetriever
from cascade.stages.retrieval import (
    FAISS_BLAS_MIN_QUERIES, RetrievalConfig, TwoTowerRetriever, build_index, index_search,
)
from cascade.stages.training import TrainConfig, sampled_mrr
from cascade.stages.twotower import TwoTowerConfig, TwoTowerESR
from cascade.util.tables import ConfigError

from stage_data import fit_context, tiny_dataset

RETRIEVAL = RetrievalConfig(
    dim=32, train=TrainConfig(epochs=8, batch_size=64, lr=3e-3, patience=3)
)
TWOTOWER = TwoTowerConfig(
    dim=32, hidden=64, train=TrainConfig(epochs=5, batch_size=128, lr=3e-3, max_steps_per_epoch=50)
)
LSR = LSRConfig(
    dim=32, hidden=64, train=TrainConfig(epochs=5, batch_size=32, lr=4e-3, max_steps_per_epoch=20),
    pretrain=TrainConfig(epochs=4, batch_size=64, lr=3e-3, max_steps_per_epoch=10),
)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stage-cache")


@pytest.fixture(scope="session")
def ctx(cache_dir):
    return fit_context(tiny_dataset(), max_len=20, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def test_traffic(ctx):
    return Traffic(ctx.dataset, ctx.split.test, max_len=ctx.train.max_len)


@pytest.fixture(scope="session")
def batch(test_traffic):
    return test_traffic.batch(np.arange(0, len(test_traffic), 7))  # ~43 requests


@pytest.fixture(scope="session")
def retriever(ctx):
    return TwoTowerRetriever(RETRIEVAL).fit(ctx)


@pytest.fixture(scope="session")
def twotower(ctx):
    return TwoTowerESR(TWOTOWER).fit(ctx)


@pytest.fixture(scope="session")
def lsr(ctx):
    return LateStageRanker(LSR).fit(ctx)


@pytest.fixture(scope="session")
def popular(ctx):
    return PopularRanker().fit(ctx)


def history_sets(batch):
    return [set(row[:n].tolist()) for row, n in zip(batch.hist_items, batch.hist_len)]


# -- retrieval ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_queries", [3, 64])  # below and above FAISS_BLAS_MIN_QUERIES
def test_flat_search_on_both_faiss_paths_is_brute_force(n_queries):
    """`index_search` on a Flat index, one query at a time (few queries) or by BLAS products
    (the path it turns on from FAISS_BLAS_MIN_QUERIES): the exact top-k scores, and the exact ids
    wherever the k-th place is not a near-tie."""
    import faiss

    g = np.random.default_rng(n_queries)
    items = g.standard_normal((5000, 16)).astype(np.float32)
    users = torch.from_numpy(g.standard_normal((n_queries, 16)).astype(np.float32))
    index = faiss.IndexFlatIP(16)
    index.add(items)
    scores, ids = index_search(index, users, 40, ef_search=16)
    assert faiss.cvar.distance_compute_blas_threshold == FAISS_BLAS_MIN_QUERIES
    ip = users.numpy() @ items.T
    want = np.argsort(-ip, axis=1)[:, :40]
    np.testing.assert_allclose(scores, np.take_along_axis(ip, want, 1), atol=1e-4)
    assert (np.sort(ids, 1) == np.sort(want, 1)).mean() > 0.99


# the whole table's product; gathered rows in one group; in groups of 1 request (7 // 30)
@pytest.mark.parametrize("chunk_pairs,ratio", [(16384, 32), (16384, 0), (7, 0)])
def test_dot_candidates_on_each_path_equals_the_gathered_dot_product(chunk_pairs, ratio, monkeypatch):
    import cascade.stages.gather as fe

    monkeypatch.setattr(fe, "GATHER_CHUNK_PAIRS", chunk_pairs)
    monkeypatch.setattr(fe, "FULL_PRODUCT_RATIO", ratio)
    g = torch.Generator().manual_seed(chunk_pairs + ratio)
    q, table = torch.randn(9, 5, generator=g), torch.randn(200, 5, generator=g)
    cand = torch.randint(0, 200, (9, 30), generator=g)
    want = (q[:, None, :] * table[cand]).sum(-1)
    torch.testing.assert_close(fe.dot_candidates(q, table, cand), want, rtol=1e-5, atol=1e-5)


def test_length_groups_cover_every_request_once_trimmed(batch):
    groups = list(batch.length_groups(5))
    rows = torch.cat([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(len(batch)))
    lens = [batch.hist_len[r] for r, _ in groups]
    assert all(a.max() <= b.min() for a, b in zip(lens, lens[1:]))  # shortest first
    for r, group in groups:
        assert torch.equal(group.hist_len, batch.hist_len[r])
        assert group.hist_items.shape[1] == max(int(group.hist_len.max()), 1)
        n = group.hist_items.shape[1]
        assert torch.equal(group.hist_items, batch.hist_items[r][:, :n])
    (r_all, whole), = batch.length_groups(len(batch))  # one group: every request, in order
    assert torch.equal(r_all, torch.arange(len(batch))) and torch.equal(whole.hist_len, batch.hist_len)


def test_flat_index_returns_brute_force_top_k(retriever, batch):
    k = 15
    # what fit remembered of the run's exclude_seen; only `retrieve` reads it
    retriever.exclude_seen_ = False
    try:
        got = retriever.retrieve(batch, k)
    finally:
        retriever.exclude_seen_ = True
    u = retriever.user_vectors(batch).numpy()
    ip = u @ retriever.item_vecs_.numpy().T  # (B, n_items)
    want = np.argsort(-ip, axis=1, kind="stable")[:, :k]
    np.testing.assert_allclose(got.scores.numpy(), np.take_along_axis(ip, want, 1), atol=1e-5)
    # ids agree wherever the top-k scores are not tied
    sorted_ip = np.take_along_axis(ip, want, 1)
    gaps = np.minimum(
        np.abs(np.diff(sorted_ip, axis=1, prepend=np.inf)),
        np.abs(np.diff(sorted_ip, axis=1, append=-np.inf)),
    )
    untied = gaps > 1e-5
    assert untied.mean() > 0.9
    assert (got.ids.numpy()[untied] == want[untied]).all()


def test_exclude_seen_removes_history_and_returns_k(retriever, batch):
    k = 20
    got = retriever.retrieve(batch, k)
    assert got.ids.shape == (len(batch), k) and got.ids.dtype == torch.int64
    assert got.scores.shape == (len(batch), k) and got.scores.dtype == torch.float32
    assert (got.ids >= 0).all()
    for row, seen in zip(got.ids.tolist(), history_sets(batch)):
        assert not seen & set(row)
        assert len(set(row)) == k
    # and it is the brute-force top-k of the unseen items
    ip = retriever.user_vectors(batch).numpy() @ retriever.item_vecs_.numpy().T
    for b, seen in enumerate(history_sets(batch)):
        ip[b, list(seen)] = -np.inf
    want = np.sort(ip, axis=1)[:, ::-1][:, :k]
    np.testing.assert_allclose(got.scores.numpy(), want, atol=1e-5)


def test_exclude_seen_pads_only_when_catalogue_is_too_small(retriever, batch):
    n_items = retriever.item_vecs_.shape[0]
    distinct = np.array([len(s) for s in history_sets(batch)])
    k = n_items - int(distinct.min()) + 3  # more than some rows can have
    got = retriever.retrieve(batch, k)
    assert got.ids.shape == (len(batch), k)
    n_real = (got.ids >= 0).sum(1).numpy()
    np.testing.assert_array_equal(n_real, np.minimum(k, n_items - distinct))
    # padding sits at the end with -inf scores
    for row, n in zip(got.ids, n_real):
        assert (row[n:] == -1).all() and (row[:n] >= 0).all()
    assert torch.isinf(got.scores[got.ids < 0]).all()


@pytest.mark.parametrize("spec", ["IVF4,Flat", "HNSW32"])
def test_other_index_specs_reuse_the_trained_towers(retriever, ctx, batch, spec):
    other = TwoTowerRetriever(replace(retriever.config, index=spec, nprobe=2)).fit(ctx)
    assert other.fit_report_["cached"] is True  # only the index was rebuilt
    got = other.retrieve(batch, 10)
    exact = retriever.retrieve(batch, 10)
    assert (got.ids >= 0).all()
    for row, seen in zip(got.ids.tolist(), history_sets(batch)):
        assert not seen & set(row) and len(set(row)) == 10
    overlap = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(got.ids.tolist(), exact.ids.tolist())]
    )
    assert overlap > 0.5


def test_hnsw_searches_at_least_as_wide_as_it_fetches():
    # FAISS's HNSW with efSearch below k returns fewer than k ids and loses recall (faiss#1244);
    # index_search widens efSearch to the fetch size. A sparse graph (HNSW4) with efSearch 8 on
    # random vectors: plain search misses most of the exact top 300
    gen = torch.Generator().manual_seed(0)
    items = torch.randn(3000, 16, generator=gen)
    queries = torch.randn(20, 16, generator=gen)
    index = build_index(items, "HNSW4", RetrievalConfig(dim=16, n_heads=1, ef_search=8))
    exact = (queries @ items.T).topk(300, dim=1).indices.numpy()

    def recall(ids: np.ndarray) -> float:
        return float(np.mean([len(set(a) & set(b)) / 300 for a, b in zip(ids, exact)]))

    _, plain = index.search(queries.numpy(), 300)
    _, wide = index_search(index, queries, 300, ef_search=8)
    assert (wide >= 0).all()
    assert recall(wide) > 0.6 and recall(wide) > recall(plain) + 0.3


def test_ivf_with_one_probe_still_returns_k(retriever, ctx, batch):
    # 8 lists of ~15 items probed one at a time cannot fill k=40: the exact fallback does
    other = TwoTowerRetriever(replace(retriever.config, index="IVF8,Flat", nprobe=1)).fit(ctx)
    got = other.retrieve(batch, 40)
    assert (got.ids >= 0).all()
    for row, seen in zip(got.ids.tolist(), history_sets(batch)):
        assert not seen & set(row) and len(set(row)) == 40


def test_bad_index_spec_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'IVF,Bogus'.*index_factory.*examples: Flat"):
        RetrievalConfig(index="IVF,Bogus")
    with pytest.raises(ValueError, match="index"):
        RetrievalConfig(index="")


def test_index_too_large_for_the_catalogue_is_a_stage_error(retriever, ctx):
    with pytest.raises(StageError, match="IVF4096"):
        TwoTowerRetriever(replace(retriever.config, index="IVF4096,Flat")).fit(ctx)


# -- learned stages against popularity ----------------------------------------------------------


def test_learned_stages_beat_popularity(retriever, twotower, lsr, popular, test_traffic, ctx):
    def mrr(stage):
        return sampled_mrr(stage.score, test_traffic, ctx.device, seed=1)

    pop = mrr(popular)
    chance = sum(1 / r for r in range(1, 102)) / 101  # a random scorer's expected MRR
    assert pop > chance  # popularity itself carries signal on this data
    # margin 0.1: the retriever reaches ~0.28 vs popularity's ~0.16 with 2 torch threads (0.15
    # held only single-threaded); a stage that learned nothing sits at popularity or below
    scores = {stage.name: mrr(stage) for stage in (retriever, twotower, lsr)}
    for name, value in scores.items():
        assert value > pop + 0.10, (name, value, pop)


def test_retrieval_recall_beats_popular_retrieval(retriever, ctx, test_traffic):
    pop = PopularRetriever().fit(ctx)
    b = test_traffic.batch(np.arange(len(test_traffic)))

    def recall(stage):
        ids = stage.retrieve(b, 10).ids
        return float((ids == b.targets[:, :1]).any(1).float().mean())

    assert recall(retriever) > recall(pop) + 0.2


# -- two-tower ESR ------------------------------------------------------------------------------


def test_twotower_cached_item_vectors_equal_recomputation(twotower, batch):
    cand = torch.randint(0, twotower.item_vecs_.shape[0], (len(batch), 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fresh = twotower.model_(batch, cand)  # runs the item tower again
    torch.testing.assert_close(twotower.score(batch, cand), fresh, rtol=1e-5, atol=1e-5)


# -- late-stage ranker --------------------------------------------------------------------------


def test_lsr_cached_history_equals_naive_per_candidate(lsr, batch):
    cand = torch.randint(0, 120, (len(batch), 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(lsr.score(batch, cand), lsr.score_naive(batch, cand), rtol=1e-4, atol=1e-4)


def test_lsr_scores_do_not_depend_on_other_candidates(lsr, batch):
    cand = torch.randint(0, 120, (len(batch), 12), generator=torch.Generator().manual_seed(2))
    full = lsr.score(batch, cand)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(lsr.score(batch, cand[:, perm]), full[:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lsr.score(batch, cand[:, :4]), full[:, :4], rtol=1e-5, atol=1e-5)


def test_lsr_score_all_matches_score(lsr, batch):
    every = lsr.score_all(batch, chunk=17)  # chunk does not divide the catalogue
    assert every.shape == (len(batch), 120) and every.dtype == torch.float32
    cand = torch.randint(0, 120, (len(batch), 10), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(every.gather(1, cand), lsr.score(batch, cand), rtol=1e-5, atol=1e-5)


def test_lsr_skips_the_crossing_only_when_it_adds_exactly_zero(lsr, batch):
    # the joint phase may keep its zero-initialised crossing head: serving then computes the
    # generative score alone, equal bit for bit to the full computation
    model = copy.deepcopy(lsr.fitted_model())
    cand = torch.randint(0, 120, (len(batch), 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        enc = model.encode(batch)
        model.head.weight.zero_(), model.head.bias.zero_(), model.dot_weight.zero_()
        assert model.crossing_is_zero()
        assert torch.equal(model.score_with(enc, cand), model.score_with(enc, cand, full=True))
        generative_only = model.score_with(enc, cand)
        model.head.bias.fill_(0.5)  # a non-zero head: every part is computed
        assert not model.crossing_is_zero()
        torch.testing.assert_close(model.score_with(enc, cand), generative_only + 0.5)
        model.head.bias.zero_()
        model.head.weight.normal_(generator=torch.Generator().manual_seed(6))
        assert not torch.allclose(model.score_with(enc, cand), generative_only)
        torch.testing.assert_close(model.score_with(enc, cand), model.score_with(enc, cand, full=True))


def test_lsr_score_all_of_the_generative_head_equals_scoring_the_candidates(lsr, batch):
    """A crossing head of exactly zero: `score_all` takes one product per chunk of the
    catalogue's keys, and agrees with `score` (which gathers) on any candidates."""
    stage = copy.deepcopy(lsr)
    model = stage.fitted_model()
    with torch.no_grad():
        model.head.weight.zero_(), model.head.bias.zero_(), model.dot_weight.zero_()
    assert model.crossing_is_zero()
    every = stage.score_all(batch, chunk=17)
    assert every.shape == (len(batch), 120)
    cand = torch.randint(0, 120, (len(batch), 10), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(every.gather(1, cand), stage.score(batch, cand), rtol=1e-5, atol=1e-5)


def test_lsr_serving_keys_equal_recomputed_keys(lsr, batch):
    """Serving reads the candidates' next-item keys from the catalogue's, computed once; with
    autograd (training) they are recomputed from the embeddings: the same scores. Training mode
    drops the catalogue's keys (the weights are about to change)."""
    model = copy.deepcopy(lsr.fitted_model())
    cand = torch.randint(0, 120, (len(batch), 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        enc = model.encode(batch)
        served = model.score_with(enc, cand)
    keys = model.catalogue_keys(cand.device)
    assert keys.shape[0] == 120 and model.catalogue_keys(cand.device) is keys  # computed once
    with torch.enable_grad():
        recomputed = model.score_with(enc, cand).detach()
    torch.testing.assert_close(served, recomputed, rtol=1e-5, atol=1e-5)
    model.eval().load_state_dict(lsr.fitted_model().state_dict())  # new weights: new keys
    assert model.catalogue_keys(cand.device) is not keys
    model.train()
    assert "_serving_cache" not in model.__dict__


def test_lsr_outranks_a_pointwise_twotower(lsr, test_traffic, ctx):
    # the sequence signal of this data (the successor of the last favourite-category item) is
    # only partly visible to the two-tower's pooled history: trained pointwise, as GESR's ESR, it
    # stays below the LSR. (The default two-tower, a sampled softmax over shared negatives,
    # passes the briefly trained LSR of these tests on this tiny log: sampled MRR 0.70 vs 0.67.)
    twotower = TwoTowerESR(replace(TWOTOWER, loss="bce")).fit(ctx)

    def mrr(stage):
        return sampled_mrr(stage.score, test_traffic, ctx.device, seed=2)

    assert mrr(lsr) > mrr(twotower) + 0.02


# -- every ranker -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["retriever", "twotower", "lsr", "popular"])
def test_score_shape_and_dtype(request, name, batch):
    stage = request.getfixturevalue(name)
    cand = torch.randint(0, 120, (len(batch), 6), generator=torch.Generator().manual_seed(5))
    s = stage.score(batch, cand)
    assert s.shape == (len(batch), 6) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert s.std() > 0  # a real function of the candidates


@pytest.mark.parametrize(
    "cls,config", [(TwoTowerRetriever, RETRIEVAL), (TwoTowerESR, TWOTOWER), (LateStageRanker, LSR)]
)
def test_second_fit_loads_the_checkpoint(ctx, batch, cls, config, request):
    first = request.getfixturevalue(
        {TwoTowerRetriever: "retriever", TwoTowerESR: "twotower", LateStageRanker: "lsr"}[cls]
    )
    again = cls(config).fit(ctx)
    assert first.fit_report_["cached"] is False and again.fit_report_["cached"] is True
    assert again.fit_report_["best_valid"] == first.fit_report_["best_valid"]
    cand = torch.randint(0, 120, (len(batch), 8), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(again.score(batch, cand), first.score(batch, cand), rtol=0, atol=0)


def test_retrain_ignores_the_checkpoint(ctx, retriever):
    cfg = replace(RETRIEVAL, train=replace(RETRIEVAL.train, epochs=1))
    assert TwoTowerRetriever(cfg).fit(ctx).fit_report_["cached"] is False
    assert TwoTowerRetriever(cfg).fit(ctx).fit_report_["cached"] is True
    assert TwoTowerRetriever(cfg).fit(replace(ctx, retrain=True)).fit_report_["cached"] is False


# -- most popular -------------------------------------------------------------------------------


def test_popular_retriever_is_most_popular_unseen(ctx, batch):
    counts = np.bincount(ctx.split.train["item"].to_numpy(), minlength=120)
    order = np.argsort(-counts, kind="stable")
    got = PopularRetriever().fit(ctx).retrieve(batch, 10)
    for row, seen in zip(got.ids.tolist(), history_sets(batch)):
        assert row == [i for i in order if i not in seen][:10]
    keep = PopularRetriever().fit(replace(ctx, exclude_seen=False)).retrieve(batch, 10)
    assert (keep.ids == torch.as_tensor(order[:10])).all()


def test_popular_ranker_scores_training_counts(ctx, batch, popular):
    counts = np.bincount(ctx.split.train["item"].to_numpy(), minlength=120)
    cand = torch.arange(120)[None, :].expand(len(batch), -1)
    s = popular.score(batch, cand)
    assert (s[0] == s[-1]).all()  # the same for everyone
    np.testing.assert_allclose(s[0].numpy(), np.log1p(counts), atol=1e-6)


# -- construction, registry and configs ----------------------------------------------------------


@pytest.mark.parametrize(
    "kind,name,cls",
    [
        ("retrieval", "twotower", TwoTowerRetriever),
        ("esr", "twotower", TwoTowerESR),
        ("lsr", "lsr", LateStageRanker),
        ("esr", "popular", PopularRanker),
        ("lsr", "popular", PopularRanker),
        ("retrieval", "popular", PopularRetriever),
    ],
)
def test_registered_and_constructible(kind, name, cls):
    assert resolve_stage_class(kind, name) is cls
    assert cls().name == name
    if cls in (PopularRanker, PopularRetriever):  # nothing to configure
        assert getattr(cls, "config_class", None) is None
        return
    assert cls(config=cls.config_class()).config == cls.config_class()
    with pytest.raises(ValueError, match="config must be"):
        cls(config=object())


def test_learned_stage_config_from_a_table():
    # a table overrides the stage's defaults, nested tables included
    stage = TwoTowerESR({"dim": 8, "train": {"epochs": 1}})
    assert stage.config.dim == 8 and stage.config.train.epochs == 1
    assert stage.config.train.batch_size == TwoTowerConfig().train.batch_size == 512
    with pytest.raises(ConfigError, match="esr stage 'twotower' config: unknown key 'dimm'"):
        TwoTowerESR({"dimm": 8})


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: RetrievalConfig(dim=30, n_heads=4), "dim"),
        (lambda: RetrievalConfig(temperature=0), "temperature"),
        (lambda: RetrievalConfig(nprobe=0), "nprobe"),
        (lambda: TwoTowerConfig(pop_negatives=1.5), "pop_negatives"),
        (lambda: TwoTowerConfig(n_negatives=0), "n_negatives"),
        (lambda: TwoTowerConfig(loss="hinge"), "loss"),
        (lambda: TwoTowerConfig(n_uniform_negatives=-1), "n_uniform_negatives"),
        (lambda: LSRConfig(attention="relu"), "attention"),
        (lambda: LSRConfig(impl="cuda"), "impl"),
        (lambda: LSRConfig(prefixes_per_window=0), "prefixes_per_window"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_max_len_limits_the_history_a_stage_reads(ctx, batch):
    short = TrainConfig(epochs=1, batch_size=64, max_steps_per_epoch=3)
    cand = torch.randint(0, 120, (len(batch), 5), generator=torch.Generator().manual_seed(7))
    # events older than the newest 5 replaced: a stage with max_len=5 must not notice
    old = torch.arange(batch.hist_items.shape[1])[None, :] < (batch.hist_len[:, None] - 5)
    other = replace(batch, hist_items=torch.where(old, (batch.hist_items + 1) % 120, batch.hist_items))
    for stage in (
        TwoTowerRetriever(RetrievalConfig(dim=16, max_len=5, train=short)),
        TwoTowerESR(TwoTowerConfig(dim=16, max_len=5, train=short)),
        LateStageRanker(LSRConfig(dim=16, max_len=5, train=short, pretrain=short)),
    ):
        stage.fit(replace(ctx, cache_dir=None))
        s = stage.score(batch, cand)
        assert torch.isfinite(s).all()
        torch.testing.assert_close(stage.score(other, cand), s)
        # control: the stage does read its recent history (changing the newest event matters)
        newest = torch.arange(batch.hist_items.shape[1])[None, :] == (batch.hist_len[:, None] - 1)
        recent = replace(batch, hist_items=torch.where(newest, (batch.hist_items + 7) % 120, batch.hist_items))
        assert not torch.allclose(stage.score(recent, cand), s)


@pytest.mark.parametrize("stage,kind,method", [
    (TwoTowerRetriever(), "retrieval", "retrieve"),
    (TwoTowerRetriever(), "retrieval", "score"),
    (TwoTowerESR(), "esr", "score"),
    (LateStageRanker(), "lsr", "score"),
    (LateStageRanker(), "lsr", "score_all"),
    (PopularRanker(), "ranker", "score"),
    (PopularRetriever(), "retrieval", "retrieve"),
    ("gesr", "esr", "score"),
    ("oracle", "ranker", "score"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_every_stage_used_before_fit_gives_the_one_error(batch, stage, kind, method):
    if isinstance(stage, str):
        stage = resolve_stage_class("esr", stage)()
    args = (5,) if method == "retrieve" else () if method == "score_all" else (
        torch.zeros((len(batch), 3), dtype=torch.long),)
    want = f"{kind} stage {stage.name!r} used before fit(); call fit(ctx) first"
    with pytest.raises(NotFittedError) as err:
        getattr(stage, method)(batch, *args)
    assert str(err.value) == want and isinstance(err.value, StageError)


def test_a_failed_fit_leaves_the_stage_unfitted(ctx, batch):
    stage = TwoTowerRetriever(replace(RETRIEVAL, train=replace(RETRIEVAL.train, epochs=1)))
    stage.fit(replace(ctx, cache_dir=None))
    with pytest.raises(StageError, match="IVF4096"):  # cannot be trained on 120 items
        stage.fit(replace(ctx, cache_dir=None, index="IVF4096,Flat"))
    with pytest.raises(NotFittedError):
        stage.retrieve(batch, 5)


# -- feature helpers ----------------------------------------------------------------------------


def test_sequence_windows_cover_each_training_event_once(ctx):
    win = sequence_windows(ctx.train, ctx.train.max_len)
    assert len(win) < len(ctx.train) / 5
    predicted = []
    for b in win.batches(256):
        # prefix l of a window predicts event l: its history's next item, or the window target
        nxt = torch.cat([b.hist_items, b.targets[:, :1]], 1)
        nxt = nxt.scatter(1, b.hist_len[:, None], b.targets[:, :1])
        for u, row, n in zip(b.user.tolist(), nxt.tolist(), b.hist_len.tolist()):
            predicted.extend((u, item) for item in row[1 : n + 1])
    want = sorted(zip(ctx.train.user.tolist(), ctx.train.targets[:, 0].tolist()))
    assert sorted(predicted) == want


def test_recent_history_keeps_the_newest_events(batch):
    cut = recent_history(batch, 5)
    for b in range(len(batch)):
        n = int(batch.hist_len[b])
        keep = batch.hist_items[b, max(0, n - 5) : n]
        assert int(cut.hist_len[b]) == min(n, 5)
        assert cut.hist_items[b, : len(keep)].tolist() == keep.tolist()
        assert (cut.hist_items[b, len(keep) :] == 0).all()
        assert cut.hist_gaps[b, : len(keep)].tolist() == batch.hist_gaps[b, max(0, n - 5) : n].tolist()


def test_item_embedder_pools_multi_valued_features_and_dedups(ctx):
    ds = ctx.dataset
    emb = ItemFeatureEmbedder(ds.items, ds.n_items, 8)
    ids = torch.randint(0, ds.n_items, (50, 60), generator=torch.Generator().manual_seed(0))
    assert ids.numel() > 2048  # the distinct-ids path
    torch.testing.assert_close(emb(ids), emb._embed(ids))
    assert ids.numel() >= 4 * ds.n_items
    emb.eval()
    with torch.no_grad():  # serving: rows of the cached catalogue table
        torch.testing.assert_close(emb(ids), emb._embed(ids))
        torch.testing.assert_close(emb(ids[:1, :3]), emb._embed(ids[:1, :3]))  # a small call too
    emb.train()
    # the genres part is the mean over non-zero codes
    item = int(np.flatnonzero(ds.items.multi["genres"][:, 1] > 0)[0])
    codes = ds.items.multi["genres"][item]
    tok = emb.tokens(torch.tensor([item]))[0]  # (parts, 8): id, decade, genres
    torch.testing.assert_close(tok[2], emb.multi_embs[0].weight[torch.as_tensor(codes)].mean(0))
    concat = ItemFeatureEmbedder(ds.items, ds.n_items, 8, combine="concat")
    assert concat(ids[:2]).shape == (2, 60, 8)


def test_item_embedder_serving_cache_follows_the_weights(ctx, monkeypatch):
    import copy
    import pickle

    import cascade.stages.features as features

    ds = ctx.dataset
    emb = ItemFeatureEmbedder(ds.items, ds.n_items, 8).eval()
    ids = torch.randint(0, ds.n_items, (4, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        first = emb(ids)
    table = emb.catalogue()
    assert emb.catalogue() is table  # computed once
    assert not any("catalogue" in k or "cache" in k for k in emb.state_dict())
    with torch.no_grad():  # an in-place change of the weights (an optimiser step, say)
        emb.id_emb.weight.add_(1.0)
    assert emb.catalogue() is not table
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), first + 1.0)
    other = ItemFeatureEmbedder(ds.items, ds.n_items, 8).eval()
    other.load_state_dict(emb.state_dict())
    other.catalogue()
    other.load_state_dict(ItemFeatureEmbedder(ds.items, ds.n_items, 8).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(ids), other._embed(ids))
    assert "_serving_cache" not in copy.deepcopy(emb).__dict__
    assert "_serving_cache" not in pickle.loads(pickle.dumps(emb)).__dict__
    emb.train()  # training reads the weights directly, and drops the table
    assert "_serving_cache" not in emb.__dict__
    with torch.no_grad():
        emb.id_emb.weight.data.add_(1.0)  # an update no version counter sees
    torch.testing.assert_close(emb(ids), first + 2.0)
    with torch.no_grad():
        torch.testing.assert_close(emb.eval()(ids), first + 2.0)
    with torch.inference_mode():  # weights made in inference mode: keyed by their storage
        wide = copy.deepcopy(emb).eval().to(torch.float64)
        assert wide.catalogue() is wide.catalogue()
        torch.testing.assert_close(wide(ids), wide._embed(ids))
    monkeypatch.setattr(features, "CATALOGUE_CACHE_BYTES", 8)  # too large to cache: embedded per call
    assert emb.eval().catalogue() is None
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), emb._embed(ids))


def test_user_and_history_embedders(ctx, batch):
    from cascade.data.dataset import FeatureTable

    none = UserFeatureEmbedder(FeatureTable(n=3), 8)
    assert none(torch.zeros((4, 0), dtype=torch.long)).shape == (4, 8)
    users = UserFeatureEmbedder(ctx.dataset.users, 8)
    assert users(batch.user_feats).shape == (len(batch), 8)
    with pytest.raises(ValueError, match="columns"):
        users(batch.user_feats[:, :1])
    hist = HistoryTokenEmbedder(ItemFeatureEmbedder(ctx.dataset.items, 120, 8), max_len=20)
    x = hist(batch)
    assert x.shape == (*batch.hist_items.shape, 8)
    assert (x[~batch.hist_mask] == 0).all() and (x[batch.hist_mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("max_len", [None, 20])
@pytest.mark.parametrize("cached", [True, False], ids=["catalogue", "distinct-items"])
def test_history_masked_means_by_bags_equal_the_token_path(ctx, batch, max_len, cached, monkeypatch):
    import cascade.stages.features as features

    if not cached:  # a catalogue too large to cache: the bags run over the call's distinct items
        monkeypatch.setattr(features, "CATALOGUE_CACHE_BYTES", 8)
    hist = HistoryTokenEmbedder(ItemFeatureEmbedder(ctx.dataset.items, 120, 8), max_len=max_len)
    ar = torch.arange(batch.hist_items.shape[1])[None, :]
    newest = batch.hist_mask & (ar >= batch.hist_len[:, None] - 3)
    # the last two: no events (mean 0), and every position, padding too (counted, adds nothing)
    masks = [batch.hist_mask, newest, torch.zeros_like(newest), torch.ones_like(newest)]
    assert (~batch.hist_mask).any()
    want = [masked_mean(hist(batch), m) for m in masks]
    hist.eval()
    assert (hist.items.catalogue() is not None) == cached
    with torch.no_grad():  # serving: weighted bags of table rows
        got = hist.masked_means(batch, masks)
    for g, w in zip(got, want):
        assert g.shape == (len(batch), 8)
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    assert (got[2] == 0).all() and got[0].abs().sum() > 0
    assert not torch.allclose(got[0], got[1]) and not torch.allclose(got[0], got[3])


def test_negative_sampler_mixture_and_log_q():
    counts = np.array([100, 10, 0, 0, 1] * 20)
    s = NegativeSampler(counts, pop_frac=0.5)
    draws = s.sample(2000, 10, torch.Generator().manual_seed(0))
    freq = np.bincount(draws.flatten().numpy(), minlength=100) / draws.numel()
    expected = (0.5 * s.probs.numpy() + 0.5 / 100)
    np.testing.assert_allclose(freq, expected, atol=0.004)
    # log_q is the log of the expected number of draws among n_neg
    np.testing.assert_allclose(
        s.log_q(torch.arange(100), 10).exp().numpy(), 10 * expected, rtol=1e-5
    )


@pytest.mark.parametrize("cls, cfg", [
    (TwoTowerRetriever, RETRIEVAL), (TwoTowerESR, TWOTOWER), (LateStageRanker, LSR),
], ids=["retrieval", "twotower", "lsr"])
def test_trained_weights_depend_on_the_seed_not_on_what_ran_before(cls, cfg, tmp_path):
    """The checkpoint cache is keyed by (config, data, split, seed), so the weights must be a
    function of those alone: consuming the global RNG before `fit` must not change them.
    (Multi-threaded CPU training itself differs in the last bits from run to run, which two
    Adam steps grow to ~1e-4; a different initialisation differs by O(0.1).)"""
    short = replace(cfg, train=replace(cfg.train, epochs=1, max_steps_per_epoch=2))
    states = []
    for i, burn in enumerate((0, 1000)):
        torch.rand(burn)  # whatever another stage drew before this one
        c = fit_context(tiny_dataset(), max_len=20, cache_dir=tmp_path / str(i))
        states.append(cls(short).fit(c).model_.state_dict())
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=3e-3, msg=k)


def test_checkpoints_are_published_whole_with_ordinary_modes(ctx, retriever):
    import stat

    from cascade.util.fsio import FILE_MODE

    folder = Path(retriever.fit_report_["checkpoint"])
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.pt"]  # no temporaries
    for p in folder.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == FILE_MODE  # not mkstemp's private 0600


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_lsr_validation_ndcg_is_the_full_catalogue_ndcg_when_it_reranks_everything(
    lsr, test_traffic, exclude_seen
):
    """The LSR's early-stopping metric re-ranks the generative head's top n items; with n = the
    catalogue it must equal the run's full-catalogue NDCG@10 of the same model (cascade.replay,
    cascade.metrics), seen items excluded or not as the run says."""
    from cascade.metrics import ndcg
    from cascade.replay import full_catalogue_ranks

    n_items = test_traffic.dataset.n_items
    ranks = full_catalogue_ranks(lsr.score_all, test_traffic, exclude_seen=exclude_seen)
    want = float(ndcg(ranks[:, :1], k=10).mean())
    assert want > 0

    def rerank(n):
        return rerank_ndcg(lsr.model_, test_traffic, n, exclude_seen, lsr.device_)

    assert rerank(n_items) == pytest.approx(want, abs=1e-6)
    # fewer candidates can only lose targets the head ranks low
    assert rerank(5) <= want + 1e-9


# -- run settings from the FitContext -----------------------------------------------------------


def test_the_run_index_overrides_the_configured_one(retriever, ctx, batch):
    import faiss

    other = TwoTowerRetriever(RETRIEVAL).fit(replace(ctx, index="HNSW32"))
    assert other.fit_report_["cached"] is True  # the index is serving-only: same towers
    assert other.config.index == "Flat"
    assert isinstance(other.index_, faiss.IndexHNSWFlat)
    assert type(retriever.index_) is faiss.IndexFlat  # ctx.index None: the config's "Flat"
    assert retriever.index_.metric_type == faiss.METRIC_INNER_PRODUCT
    with pytest.raises(StageError, match="'IVF,Bogus'.*index_factory"):
        TwoTowerRetriever(RETRIEVAL).fit(replace(ctx, index="IVF,Bogus"))


def test_exclude_seen_comes_from_the_run_and_keys_the_checkpoint(ctx, batch, tmp_path):
    short = replace(RETRIEVAL, train=replace(RETRIEVAL.train, epochs=1, max_steps_per_epoch=3))
    c = replace(ctx, cache_dir=tmp_path)
    keep = TwoTowerRetriever(short).fit(replace(c, exclude_seen=False))
    drop = TwoTowerRetriever(short).fit(c)
    # validation (early stopping) depends on exclude_seen: two checkpoints, not one
    assert keep.fit_report_["cached"] is False and drop.fit_report_["cached"] is False
    assert keep.fit_report_["checkpoint"] != drop.fit_report_["checkpoint"]
    seen = history_sets(batch)
    k = 60  # half the catalogue: a request's own history items are among them when allowed
    kept = keep.retrieve(batch, k).ids.tolist()
    dropped = drop.retrieve(batch, k).ids.tolist()
    assert any(s & set(row) for s, row in zip(seen, kept))
    assert not any(s & set(row) for s, row in zip(seen, dropped))


def test_lsr_validation_follows_the_run_exclude_seen(ctx):
    """What the LSR early-stops on is NDCG with seen items hidden exactly when the run hides
    them: the fit report's best validation value is `rerank_ndcg` under ctx.exclude_seen."""
    from cascade.stages.features import subsample

    short = replace(LSR, train=replace(LSR.train, epochs=1, max_steps_per_epoch=3), pretrain=None)
    valid = subsample(ctx.valid, short.valid_requests)
    got = {}
    for exclude in (True, False):
        stage = LateStageRanker(short).fit(replace(ctx, cache_dir=None, exclude_seen=exclude))
        both = {e: rerank_ndcg(stage.model_, valid, short.valid_candidates, e, stage.device_)
                for e in (True, False)}
        assert both[True] != both[False]  # the switch matters on this data
        got[exclude] = stage.fit_report_["best_valid"]
        assert got[exclude] == pytest.approx(both[exclude], abs=1e-9)


def test_full_catalogue_validation_uses_fewer_requests_only_on_huge_catalogues():
    """Retrieval, the LSR and sasrec validate by scoring every item: 2,000 requests up to
    100,000 items (ml-100k and the Toys file unchanged), fewer past that, never under 200."""
    from cascade.stages.features import catalogue_valid_requests

    assert catalogue_valid_requests(2000, 1682) == 2000
    assert catalogue_valid_requests(2000, 100_000) == 2000
    assert catalogue_valid_requests(2000, 1_000_000) == 200
    assert catalogue_valid_requests(2000, 10**8) == 200
    assert catalogue_valid_requests(50, 10**8) == 50  # never more than asked


def test_lsr_dropout_search_keeps_the_best_validating_rate_deterministically(ctx):
    """Each rate is pretrained from the same initial weights; the best-validating one is kept
    with its weights, so the fit equals a fit at that rate alone, and repeats under a seed."""
    short = TrainConfig(epochs=2, batch_size=64, lr=3e-3, max_steps_per_epoch=4)
    cfg = replace(LSR, dropout=0.9, dropout_search=(0.0, 0.8), token_search=(), pretrain=short,
                  train=replace(LSR.train, epochs=1, max_steps_per_epoch=2))
    assert cfg.dropout_rates() == (0.9, 0.0, 0.8)
    fresh = replace(ctx, cache_dir=None)
    a, b = LateStageRanker(cfg).fit(fresh), LateStageRanker(cfg).fit(fresh)
    pre = a.fit_report_["pretrain"]
    tried = {t["dropout"]: t["best_valid"] for t in pre["search"]}
    assert list(tried) == [0.9, 0.0, 0.8] and pre["dropout"] == max(tried, key=tried.get)
    # a winner after the first rate: its run had to start again from the initial weights
    assert pre["dropout"] != 0.9 and len(set(tried.values())) == 3
    timeless = lambda rows: [{k: v for k, v in t.items() if not k.endswith("_s") and k != "seconds"}  # noqa: E731
                             for t in rows]
    assert timeless(b.fit_report_["pretrain"]["search"]) == timeless(pre["search"])
    alone = LateStageRanker(replace(cfg, dropout=pre["dropout"], dropout_search=())).fit(fresh)
    assert "search" not in alone.fit_report_["pretrain"]
    layers = [m for m in a.model_.modules()
              if isinstance(m, torch.nn.Dropout) and m is not a.model_.token_drop]
    assert {m.p for m in layers} == {pre["dropout"]}
    for name, w in a.model_.state_dict().items():
        assert torch.equal(w, b.model_.state_dict()[name]), name
        assert torch.equal(w, alone.model_.state_dict()[name]), name


def test_lsr_token_search_keeps_the_best_pair_and_its_scale_survives_the_checkpoint(ctx, batch, tmp_path):
    """The pretraining phase tries each (token_scale, token_dropout) pair from the same initial
    weights and keeps the best-validating one; the kept scale is part of the model's state, so a
    checkpoint loaded from the cache scores exactly as the fitted stage."""
    short = TrainConfig(epochs=2, batch_size=64, lr=3e-3, max_steps_per_epoch=4)
    cfg = replace(LSR, token_search=((20.0, 0.5), (4.0, 0.0)), pretrain=short,
                  train=replace(LSR.train, epochs=1, max_steps_per_epoch=2))
    assert [(t["token_scale"], t["token_dropout"]) for t in cfg.pretrain_settings()] == [
        (1.0, 0.0), (20.0, 0.5), (4.0, 0.0)]
    where = replace(ctx, cache_dir=tmp_path)
    fitted = LateStageRanker(cfg).fit(where)
    pre = fitted.fit_report_["pretrain"]
    tried = {t["token_scale"]: t["best_valid"] for t in pre["search"]}
    assert list(tried) == [1.0, 20.0, 4.0] and pre["token_scale"] == max(tried, key=tried.get)
    assert pre["token_scale"] != cfg.token_scale  # else the checkpoint check below proves little
    assert len(set(tried.values())) == 3  # the pairs train different models
    model = fitted.model_
    assert float(model.token_scale) == pre["token_scale"]
    assert float(model.state_dict()["token_scale"]) == pre["token_scale"]  # saved with the weights
    assert model.token_drop.p == pre["token_dropout"]
    loaded = LateStageRanker(cfg).fit(where)
    assert loaded.fit_report_["cached"] is True
    assert float(loaded.model_.token_scale) == pre["token_scale"]
    cand = torch.arange(12).expand(len(batch), -1)
    torch.testing.assert_close(loaded.score(batch, cand), fitted.score(batch, cand), rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    ({"dropout_search": (1.0,)}, r"\[0, 1\)"),
    ({"dropout_search": (0.5, 0.5)}, "repeats"),
    ({"dropout_search": ("x",)}, "'x'"),
    ({"dropout_search": 0.5}, "a list of dropout rates"),
    ({"dropout_search": (0.5,), "pretrain": None}, "needs pretrain"),
    ({"dropout_search": (0.5,), "next_item_weight": 0.0}, "needs pretrain"),
    ({"token_search": ((0.0, 0.1),)}, r"token_search\[0\] scale must be a number > 0"),
    ({"token_search": ((2.0, 0.2), (2.0, 1.0))}, r"token_search\[1\] dropout must be in \[0, 1\)"),
    ({"token_scale": -1.0}, "LSRConfig.token_scale must be a number > 0"),
    ({"token_search": ((2.0, 0.5), (2, 0.5))}, "repeats a pair"),
    ({"token_search": (3.0,)}, "pairs"),
])
def test_lsr_dropout_search_refuses_bad_rates(change, message):
    with pytest.raises(ValueError, match=message):
        LSRConfig(**change)


def test_a_search_drops_the_configured_setting_it_would_repeat():
    """A user who sets the value a default search holds gets no second run of it, not an
    error."""
    cfg = LSRConfig(token_scale=20, token_dropout=0.5, dropout_search=(0.3, 0.5), dropout=0.5)
    assert cfg.token_search == () and cfg.dropout_search == (0.3,)
    assert [(t["dropout"], t["token_scale"]) for t in cfg.pretrain_settings()] == [(0.5, 20.0), (0.3, 20.0)]
    assert LSRConfig(token_search=[[20, 0.5]]) == LSRConfig()  # the same config, the same cache key


def test_lsr_pretraining_trains_the_generative_head_and_early_stops_on_its_ndcg(ctx, test_traffic):
    """The LSR's first phase (next-item loss alone) is reported apart; its early-stopping value
    is `generative_ndcg`, the head's full-catalogue NDCG@10, which equals the NDCG of ranking
    every item by <query, key> by hand; and the phase learns (the head beats its initial self)."""
    from cascade.metrics import ndcg
    from cascade.replay import full_catalogue_ranks
    from cascade.stages.features import subsample
    from cascade.stages.lsr import generative_ndcg, newest_output

    cfg = replace(LSR, train=replace(LSR.train, epochs=1, max_steps_per_epoch=1))
    untrained = LateStageRanker(replace(cfg, pretrain=TrainConfig(epochs=1, max_steps_per_epoch=1, lr=1e-9)))
    untrained.fit(replace(ctx, cache_dir=None))
    stage = LateStageRanker(cfg).fit(replace(ctx, cache_dir=None))
    pre = stage.fit_report_["pretrain"]
    assert pre["epochs_run"] >= 1 and pre["best_valid"] > 0
    valid = subsample(ctx.valid, cfg.valid_requests)
    model = stage.model_

    def head_scores(batch):
        enc = model.encode(batch)
        q = model.next_query(newest_output(enc.state.output, batch.hist_len) + enc.user)
        return q @ model.next_key(model.items(torch.arange(model.items.n_items))).T

    for exclude in (True, False):
        by_hand = float(ndcg(full_catalogue_ranks(head_scores, test_traffic, exclude_seen=exclude)[:, :1], k=10).mean())
        assert generative_ndcg(model, test_traffic, exclude, stage.device_) == pytest.approx(by_hand, abs=1e-6)
    assert generative_ndcg(model, valid, True, stage.device_) > 1.5 * generative_ndcg(
        untrained.model_, valid, True, untrained.device_)


@pytest.mark.parametrize("kind", ["lsr", "twotower"])
def test_softmax_loss_is_the_full_softmax_up_to_full_softmax_items(ctx, kind):
    """The LSR's next-item loss and the two-tower's softmax score the whole catalogue when it has
    at most `full_softmax_items` items, else shared sampled negatives; the two train different
    weights, and the fit report names the loss."""
    if kind == "lsr":
        one = TrainConfig(epochs=1, batch_size=64, lr=3e-3, max_steps_per_epoch=2)
        base = replace(LSR, pretrain=one, train=replace(LSR.train, epochs=1, max_steps_per_epoch=1))
        cls, key, weight = LateStageRanker, "next_item_loss", lambda m: m.next_item.weight
    else:
        base = replace(TWOTOWER, train=replace(TWOTOWER.train, epochs=1, max_steps_per_epoch=2))
        cls, key, weight = TwoTowerESR, "loss", lambda m: m.item_bias.weight
    base = replace(base, in_batch_negatives=16, n_uniform_negatives=16)
    n_items = ctx.dataset.n_items
    assert n_items > 32
    full = cls(replace(base, full_softmax_items=n_items)).fit(replace(ctx, cache_dir=None))
    sampled = cls(replace(base, full_softmax_items=n_items - 1)).fit(replace(ctx, cache_dir=None))
    assert full.fit_report_[key] == "full softmax"
    assert sampled.fit_report_[key] == "sampled softmax (32 negatives, logQ)"
    assert not torch.equal(weight(full.model_), weight(sampled.model_))
    with pytest.raises(ValueError, match="full_softmax_items"):
        type(base)(full_softmax_items=0)
