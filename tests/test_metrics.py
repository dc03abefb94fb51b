"""Funnel metrics against hand-computed cases (cascade.metrics)."""

import math

import numpy as np
import polars as pl
import pytest

from cascade import metrics as M


def test_target_ranks_positions_absent_and_padding():
    ids = np.array([[5, 3, 9, 1], [2, 4, 6, 8]])
    targets = np.array([[9, 7], [8, -1]])
    r = M.target_ranks(ids, targets)
    assert r.tolist() == [[2, -1], [3, -1]]
    # a padded target (-1) never matches a padded id (-1)
    assert M.target_ranks(np.array([[-1, 4]]), np.array([[-1]])).tolist() == [[-1]]


def test_recall_single_and_multi_target():
    ranks = np.array([[0, -1], [-1, -1], [4, 7]])
    valid = np.array([[True, True], [True, False], [True, True]])
    # request 0: 1 of 2 targets, request 1: 0 of 1, request 2: 2 of 2
    assert M.recall(ranks, valid).tolist() == [0.5, 0.0, 1.0]
    # within the top 5 only: request 2 keeps rank 4, loses rank 7
    assert M.recall(ranks, valid, k=5).tolist() == [0.5, 0.0, 0.5]
    assert math.isnan(M.recall(np.array([[-1]]), np.array([[False]]))[0])


def test_hit_rate_ndcg_mrr_hand_computed():
    ranks = np.array([[0], [2], [-1], [10]])
    assert M.hit_rate(ranks, k=10).tolist() == [1.0, 1.0, 0.0, 0.0]
    nd = M.ndcg(ranks, k=10)
    assert nd[0] == pytest.approx(1.0)
    assert nd[1] == pytest.approx(1 / math.log2(4))  # rank 2 -> position 3 -> 1/log2(4) = 0.5
    assert nd[2] == 0.0 and nd[3] == 0.0
    rr = M.reciprocal_rank(ranks)
    assert rr.tolist() == pytest.approx([1.0, 1 / 3, 0.0, 1 / 11])
    assert M.reciprocal_rank(ranks, k=10).tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.0])


def test_ndcg_two_targets_uses_ideal_of_two_hits():
    ranks = np.array([[1, 3]])  # hits at positions 2 and 4
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert M.ndcg(ranks, k=10)[0] == pytest.approx(dcg / idcg)
    # only one of two targets exists (the other is padding): ideal is one hit
    assert M.ndcg(np.array([[1, -1]]), np.array([[True, False]]), k=10)[0] == pytest.approx(
        1 / math.log2(3)
    )
    # MRR takes the best-ranked target
    assert M.reciprocal_rank(np.array([[5, 1]]))[0] == pytest.approx(0.5)


def test_ranks_from_scores_ties_count_against_the_target():
    scores = np.array([[0.1, 0.5, 0.5, 0.9, -np.inf]])
    # target column 1 (0.5): one higher (0.9) + one tie (column 2) -> rank 2
    assert M.ranks_from_scores(scores, np.array([[1]])).tolist() == [[2]]
    assert M.ranks_from_scores(scores, np.array([[3]])).tolist() == [[0]]
    assert M.ranks_from_scores(scores, np.array([[0]])).tolist() == [[3]]
    # excluded (-inf) and padded targets are absent
    assert M.ranks_from_scores(scores, np.array([[4, -1]])).tolist() == [[-1, -1]]
    # all equal: the target is last
    assert M.ranks_from_scores(np.zeros((1, 4)), np.array([[2]])).tolist() == [[3]]


def test_survival_is_conditional_on_the_previous_stage():
    retrieval = np.array([[0], [3], [-1], [7]])
    esr = np.array([[0], [-1], [-1], [2]])
    assert M.survival(None, retrieval) == pytest.approx(3 / 4)
    assert M.survival(retrieval, esr) == pytest.approx(2 / 3)
    assert M.survival(np.array([[-1]]), np.array([[-1]])) is None


def test_survival_chain_and_quality_summary_on_a_frame():
    frame = pl.DataFrame({
        "rank_retrieval": [0, 3, None, 7],
        "rank_esr": [0, None, None, 2],
        "rank_lsr": [0, None, None, None],
        "recall_retrieval": [1.0, 1.0, 0.0, 1.0],
        "recall_esr": [1.0, 0.0, 0.0, 1.0],
        "recall_lsr": [1.0, 0.0, 0.0, 0.0],
        "hr@10": [1.0, 0.0, 0.0, 0.0],
        "ndcg@10": [1.0, 0.0, 0.0, 0.0],
        "mrr": [1.0, 0.0, 0.0, 0.0],
    }, schema_overrides={c: pl.Int64 for c in ("rank_retrieval", "rank_esr", "rank_lsr")})
    s = M.survival_chain(frame)
    assert s == pytest.approx({"retrieval": 0.75, "esr": 2 / 3, "lsr": 0.5})
    q = M.quality_summary(frame)
    assert q["recall"] == pytest.approx({"retrieval": 0.75, "esr": 0.5, "lsr": 0.25})
    assert q["hr@10"] == 0.25 and q["mrr"] == 0.25 and q["n_requests"] == 4


def test_overlap_at_k():
    a = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = np.array([[3, 9, 1, 0], [1, 2, 3, 4]])
    assert M.overlap_at_k(a, b, 3).tolist() == pytest.approx([2 / 3, 0.0])


def test_latency_percentiles_hand_computed():
    p = M.latency_percentiles([1.0, 2.0, 3.0, 4.0])
    assert p["p50"] == pytest.approx(2.5)  # linear interpolation between 2 and 3
    assert p["p95"] == pytest.approx(3.85)  # 1 + 0.95 * 3 = 3.85
    assert p["p99"] == pytest.approx(3.97)
    assert p["mean"] == pytest.approx(2.5)
    # per request: a 100 ms batch of 4 and a 10 ms batch of 1 -> samples 25,25,25,25,10
    r = M.per_request_latency([100.0, 10.0], [4, 1])
    assert r["p50"] == pytest.approx(25.0)
    assert r["mean"] == pytest.approx(22.0)
    assert M.latency_percentiles([])["p50"] is None


def test_throughput():
    assert M.throughput(500, 2000.0) == pytest.approx(250.0)
    assert M.throughput(5, 0.0) is None


def test_history_buckets():
    labels = M.history_bucket(np.array([0, 1, 5, 6, 20, 21, 50, 51, 700]))
    assert labels.tolist() == ["0", "1-5", "1-5", "6-20", "6-20", "21-50", "21-50", "51+", "51+"]


def test_popularity_buckets_by_cumulative_share():
    # 100 training events: item 0 has 50 (0-50% -> head), item 1 has 30 (50-80% -> torso),
    # items 2, 3 share the rest (tail), item 4 is never seen (tail)
    counts = np.array([50, 30, 12, 8, 0])
    assert M.popularity_buckets(counts).tolist() == ["head", "torso", "tail", "tail", "tail"]
    # order by popularity, not id; an item that starts inside a share belongs to it
    counts = np.array([10, 40, 25, 25])  # sorted: 1 (0-40%) 2 (40-65%) 3 (65-90%) 0 (90-100%)
    assert M.popularity_buckets(counts).tolist() == ["tail", "head", "head", "torso"]


def test_paired_bootstrap_sign_width_and_determinism():
    rng = np.random.default_rng(1)
    n = 400
    base = rng.random(n)
    better = base + 0.1 + rng.normal(0, 0.05, n)  # a real, paired improvement of about 0.1
    res = M.paired_bootstrap(better, base, n_resamples=500, seed=3)
    lo, hi = res["ci95"]
    assert res["delta"] == pytest.approx(float((better - base).mean()))
    assert 0 < lo < res["delta"] < hi
    assert hi - lo < 0.02  # sd of the mean diff ~ 0.05/20 = 0.0025 -> width about 0.01
    assert M.paired_bootstrap(better, base, n_resamples=500, seed=3) == res
    swapped = M.paired_bootstrap(base, better, n_resamples=500, seed=3)
    assert swapped["ci95"][1] < 0
    # chunking the resamples does not change the result
    small = M.paired_bootstrap(better, base, n_resamples=500, seed=3, chunk_elems=n * 7)
    assert small["ci95"] == pytest.approx(res["ci95"])


def test_paired_bootstrap_covers_zero_without_a_difference():
    rng = np.random.default_rng(2)
    a = rng.random(300)
    b = a.copy()
    rng.shuffle(b[:150])  # same distribution, no systematic difference
    res = M.paired_bootstrap(a, b, n_resamples=1000, seed=0)
    assert res["ci95"][0] < 0 < res["ci95"][1]


def test_paired_bootstrap_coverage_on_a_known_mean():
    # the 95% interval should contain the true mean difference (0.2) in most of 40 samples
    rng = np.random.default_rng(7)
    covered = 0
    for i in range(40):
        d = rng.normal(0.2, 1.0, 200)
        res = M.paired_bootstrap(d, np.zeros(200), n_resamples=400, seed=i)
        covered += res["ci95"][0] <= 0.2 <= res["ci95"][1]
    assert covered >= 34  # expected 38; a broken interval (too narrow, shifted) falls far short


def test_compare_variants_pairs_by_request_id():
    frame = pl.DataFrame({
        "variant": ["a"] * 4 + ["b"] * 4,
        "request_id": [1, 2, 3, 4, 4, 3, 2, 1],  # b's rows in another order
        "recall_esr": [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0],
        "recall_lsr": [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        "hr@10": [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        "ndcg@10": [1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.5],
        "mrr": [1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.5],
    })
    c = M.compare_variants(frame, "a", "b", n_resamples=200)
    # paired: request 4 gains 1 hit, the others are equal -> delta 0.25
    assert c["hr@10"]["delta"] == pytest.approx(0.25)
    assert c["ndcg@10"]["delta"] == pytest.approx((0.5 - 0.0 + 1.0 - 0.5) / 4)
    assert c["recall@esr"]["delta"] == pytest.approx(0.25)
    assert c["hr@10"]["variant"] == "a" and c["hr@10"]["baseline"] == "b"


# ---- the metric registry ---------------------------------------------------------------------------


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown metric 'ndcg@5'; known: hr@10, ndcg@10, mrr"):
        M.get_metric("ndcg@5")
    assert M.get_metric("mrr").label == "MRR"


def test_registry_refuses_a_clashing_or_duplicate_key():
    with pytest.raises(ValueError, match="clashes"):
        M.register_metric(M.Metric("recall_esr", "x", lambda r, v, n: r[:, 0], "x"))
    with pytest.raises(ValueError, match="already registered"):
        M.register_metric(M.Metric("mrr", "MRR2", lambda r, v, n: r[:, 0], "another mrr"))


@pytest.fixture
def hr_at_1():
    """The worked example of adding a metric: one `register_metric` call."""
    metric = M.register_metric(M.Metric(
        "hr@1", "HR@1", lambda r, v, n: M.hit_rate(r, v, 1), "the target is ranked first"))
    yield metric
    M._METRICS.pop("hr@1")


def test_a_registered_metric_reaches_replay_metrics_json_and_the_table(hr_at_1, tmp_path):
    """A new metric flows through every consumer without touching them."""
    from typer.testing import CliRunner

    from cascade.cli import app
    from cascade.records import read_run

    res = CliRunner().invoke(app, [
        "run", "--data", "synthetic:tiny", "--retrieval", "popular", "--esr", "popular",
        "--esr-baseline", "popular", "--lsr", "popular", "--out", str(tmp_path / "r"),
        "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "final HR@1" in res.output and "funnel loss HR@1" in res.output
    run = read_run(tmp_path / "r")
    v = run.metrics["variants"]["popular"]
    rows = run.requests.filter(pl.col("variant") == "popular")
    assert v["final"]["hr@1"] == pytest.approx(rows["hr@1"].mean())
    assert v["final"]["hr@1"] == pytest.approx((rows["rank_lsr"].fill_null(-1) == 0).mean())
    assert v["final"]["hr@1"] <= v["final"]["hr@10"]
    assert "hr@1" in run.metrics["comparisons"]["popular"]
    assert "hr@1" in run.metrics["reference"]["lsr_full_catalogue"]
    assert "HR@1" in (tmp_path / "r" / "report.md").read_text()
