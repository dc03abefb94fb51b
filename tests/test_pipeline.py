"""The funnel engine end to end: budgets, Pipeline boundary checks, replay, run records, caching,
plugins and RunConfig. Uses the small real stages of `funnel_toys` (loaded as plugins, the way a
user's own stage is) on a tiny planted-signal dataset."""

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from cascade.stages.base import StageError

from cascade.config import RunConfig, StageSpec, build_stage
from cascade.experiment import run_experiment
from cascade.session import prepare
from cascade.pipeline import Budgets, Pipeline, default_budgets, resolve_budgets
from cascade.records import RunFormatError, load_run, write_run
from cascade.replay import replay

sys.path.insert(0, str(Path(__file__).parent))
from funnel_toys import (
    CoocRetriever,
    NaNRanker,
    PopRanker,
    WrongShapeRanker,
    planted_dataset,
)

TOYS = "funnel_toys"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="session")
def planted():
    return planted_dataset()


class TieFreePop(PopRanker):
    """Popularity with ties broken by id, so top-k selections are unique."""

    def fit(self, ctx):
        super().fit(ctx)
        self.pop = self.pop + torch.arange(len(self.pop)) / (10.0 * len(self.pop))
        return self


def toy_config(tmp: Path, **kw) -> RunConfig:
    base = dict(
        retrieval=StageSpec(stage=f"{TOYS}:CoocRetriever"),
        esr=StageSpec(stage=f"{TOYS}:MFRanker", label="mf"),
        esr_baseline=StageSpec(stage=f"{TOYS}:PopRanker", label="pop"),
        lsr=StageSpec(stage=f"{TOYS}:MFRanker", config={"dim": 24}),
        cache_dir=str(tmp / "cache"),
        out=str(tmp / "run"),
        device="cpu",
        bootstrap=200,
    )
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="session")
def toy_run(planted, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toyrun")
    cfg = toy_config(tmp)
    return cfg, tmp, run_experiment(cfg, dataset=planted, progress=False)


# ---- budgets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "r, e, f", [(100, 100, 10), (50, 80, 10), (100, 20, 20), (100, 20, 0)]
)
def test_budgets_must_shrink(r, e, f):
    with pytest.raises(ValueError) as err:
        Budgets(retrieval=r, esr=e, final=f)
    msg = str(err.value)
    assert str(r) in msg and str(e) in msg


def test_budgets_against_the_catalogue():
    with pytest.raises(ValueError, match="retrieval budget 300 exceeds the catalogue of 240"):
        Budgets(300, 50, 10).check_catalogue(240)


@pytest.mark.parametrize("n", [100, 240, 1682, 3706, 50_000, 1_000_000])
def test_default_budgets_make_every_stage_matter(n):
    b = default_budgets(n)
    assert b.retrieval > b.esr > b.final == 10
    assert b.retrieval <= 0.5 * n  # never passes most of a small catalogue on
    assert b.esr >= 2 * b.final
    assert b.esr <= b.retrieval / 2


def test_default_budgets_ml100k_and_partial_overrides():
    assert default_budgets(1682).as_dict() == {"retrieval": 250, "esr": 60, "final": 10}
    # an explicit esr budget above the default retrieval one raises retrieval, never contradicts
    assert resolve_budgets(1682, esr=300) == Budgets(1200, 300, 10)
    assert resolve_budgets(1682, retrieval=100) == Budgets(100, 25, 10)
    with pytest.raises(ValueError, match="too small|shrink"):
        default_budgets(20)


def test_esr_share_sets_the_default_esr_budget():
    # the ablation's binding cut: the ESR keeps a tenth of what retrieval passes on
    assert resolve_budgets(3000, esr_share=0.1) == Budgets(450, 45, 10)
    assert resolve_budgets(3000) == Budgets(450, 110, 10)
    assert resolve_budgets(1682, esr_share=0.1) == Budgets(250, 25, 10)
    assert resolve_budgets(1682, esr_share=0.05) == Budgets(250, 20, 10)  # at least 2 x final
    assert resolve_budgets(3000, esr=60, esr_share=0.1) == Budgets(450, 60, 10)  # given wins
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="esr_share"):
            resolve_budgets(3000, esr_share=bad)


def test_run_config_reads_esr_share_from_the_budgets_table(tmp_path):
    cfg = RunConfig.from_dict({"budgets": {"esr_share": 0.1}})
    assert cfg.esr_share == 0.1 and cfg.esr_k is None
    saved = tmp_path / "config.toml"
    saved.write_text(cfg.to_toml())
    assert RunConfig.load(saved).esr_share == 0.1  # survives the saved config
    assert RunConfig().esr_share == 0.25
    for bad in (0, 1.5, "a tenth", True):
        with pytest.raises(ValueError, match="budgets.esr_share"):
            RunConfig.from_dict({"budgets": {"esr_share": bad}})


def test_bad_budgets_are_rejected_before_any_training(planted, tmp_path):
    cfg = toy_config(tmp_path, retrieval_k=500, esr_k=50)  # 500 > 240 items
    with pytest.raises(ValueError, match="exceeds the catalogue of 240"):
        run_experiment(cfg, dataset=planted, progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="retrieval=50, esr=80"):
        toy_config(tmp_path, retrieval_k=50, esr_k=80)


# ---- the end-to-end run on toy stages ----------------------------------------------------------


def test_recall_never_increases_through_the_funnel(toy_run):
    _, _, res = toy_run
    f = res.requests
    for label, v in res.metrics["variants"].items():
        recalls = [s["recall"] for s in v["stages"]]
        assert recalls[0] >= recalls[1] >= recalls[2], (label, recalls)
        part = f.filter(pl.col("variant") == label)
        # per request: an item present after a stage was present after the previous one
        assert part.filter(pl.col("rank_esr").is_not_null() & pl.col("rank_retrieval").is_null()).height == 0
        assert part.filter(pl.col("rank_lsr").is_not_null() & pl.col("rank_esr").is_null()).height == 0
        assert (part["rank_esr"].drop_nulls() < res.budgets.esr).all()
        assert (part["rank_lsr"].drop_nulls() < res.budgets.final).all()
    # the learned ESR beats popularity on planted sequential signal, through the same LSR
    mf, pop = res.metrics["variants"]["mf"], res.metrics["variants"]["pop"]
    assert mf["stages"][1]["recall"] > pop["stages"][1]["recall"] + 0.2
    assert res.metrics["comparisons"]["mf"]["recall@esr"]["ci95"][0] > 0


def test_variants_share_retrieval_and_the_metrics_match_the_rows(toy_run):
    _, _, res = toy_run
    f = res.requests
    a = f.filter(pl.col("variant") == "mf").sort("request_id")
    b = f.filter(pl.col("variant") == "pop").sort("request_id")
    assert a["rank_retrieval"].equals(b["rank_retrieval"])  # both ESRs saw the same candidates
    v = res.metrics["variants"]["mf"]
    assert v["final"]["hr@10"] == pytest.approx(a["hr@10"].mean())
    assert v["final"]["hr@10"] == pytest.approx(a["rank_lsr"].is_not_null().mean())
    assert v["final"]["mrr"] == pytest.approx((1.0 / (a["rank_lsr"].drop_nulls() + 1)).sum() / a.height)
    assert v["stages"][1]["survival"] == pytest.approx(
        a["rank_esr"].is_not_null().sum() / a["rank_retrieval"].is_not_null().sum()
    )
    # history / popularity breakdowns partition the requests
    assert sum(x["n_requests"] for x in v["by_history_length"].values()) == a.height
    assert set(v["by_popularity"]) <= {"head", "torso", "tail"}
    assert sum(x["n_requests"] for x in v["by_popularity"].values()) == a.height
    # ESR = LSR model (same MF family): consistency is a fraction; oracle loss is recorded
    assert 0.0 <= v["consistency@10"] <= 1.0
    assert set(v["funnel_loss"]) >= {"oracle", "ndcg@10", "esr_cut_rate"}


def test_latency_is_recorded_per_variant_stage_and_batch(toy_run):
    _, _, res = toy_run
    lat = res.latency
    n_batches = -(-res.metrics["data"]["n_requests"] // 256)
    assert lat.height == 2 * 3 * n_batches
    assert (lat["ms"] > 0).all()
    ret = lat.filter(pl.col("stage") == "retrieval").sort("variant", "batch")
    # the shared retrieval time counts in every variant's funnel
    assert ret.filter(pl.col("variant") == "mf")["ms"].equals(ret.filter(pl.col("variant") == "pop")["ms"])
    v = res.metrics["variants"]["mf"]
    total_s = lat.filter(pl.col("variant") == "mf")["ms"].sum() / 1000
    assert v["throughput_rps"] == pytest.approx(res.metrics["data"]["n_requests"] / total_s)


def test_run_folder_is_complete_and_documented(toy_run):
    _, _, res = toy_run
    run = load_run(res.path)
    m = run.metrics
    assert m["format"] == "cascade-run/2"
    for key in ("name", "created", "data", "budgets", "primary", "baseline", "variants",
                "comparisons", "reference"):
        assert key in m
    assert set(m["data"]) >= {"name", "source", "fingerprint", "split", "n_requests", "traffic_key"}
    assert m["primary"] == "mf" and m["baseline"] == "pop"
    v = m["variants"]["mf"]
    assert [s["name"] for s in v["stages"]] == ["retrieval", "esr", "lsr"]
    assert [s["k"] for s in v["stages"]] == [50, 20, 10]
    for s in v["stages"]:
        assert set(s["latency_ms"]) == {"p50", "p95", "p99", "mean"}
        assert set(s["latency_per_request_ms"]) == {"p50", "p95", "p99", "mean"}
    assert set(v["final"]) == {"hr@10", "ndcg@10", "mrr"}
    for metric in ("hr@10", "ndcg@10", "mrr", "recall@esr"):
        c = m["comparisons"]["mf"][metric]
        assert c["variant"] == "mf" and c["baseline"] == "pop"
        assert c["ci95"][0] <= c["delta"] <= c["ci95"][1]
    assert set(m["reference"]) >= {"lsr_full_catalogue", "most_popular"}
    req = run.requests()
    for col in ("variant", "request_id", "user", "target", "hist_len", "pop_bucket",
                "rank_retrieval", "rank_esr", "rank_lsr", "hr@10", "ndcg@10", "mrr"):
        assert col in req.columns
    assert req.height == 2 * m["data"]["n_requests"]
    assert run.latency().columns == ["variant", "stage", "batch", "batch_size", "ms"]
    assert run.env["versions"]["torch"] == torch.__version__
    # written through private temporaries, published with the modes open() would have given
    import stat

    from cascade.records import DIR_MODE, FILE_MODE

    assert stat.S_IMODE(res.path.stat().st_mode) == DIR_MODE
    assert stat.S_IMODE((res.path / "metrics.json").stat().st_mode) == FILE_MODE
    # config.toml is the resolved config: loading it gives the same run settings
    again = RunConfig.load(res.path / "config.toml")
    assert (again.retrieval_k, again.esr_k, again.final_k) == (50, 20, 10)
    assert again.esr.label == "mf" and again.esr_baseline.stage == f"{TOYS}:PopRanker"
    assert again.lsr.config == {"dim": 24}


def test_cached_second_run_does_not_retrain(toy_run, planted):
    cfg, tmp, first = toy_run
    assert first.fits["esr:mf"]["cached"] is False
    ckpts = sorted((tmp / "cache").glob("*/model.pt"))
    assert ckpts
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    second = run_experiment(cfg.replace(out=str(tmp / "run2")), dataset=planted, progress=False)
    assert second.fits["esr:mf"]["cached"] is True and second.fits["lsr"]["cached"] is True
    assert [p.stat().st_mtime_ns for p in ckpts] == mtimes
    # same weights, same traffic -> the same funnel
    assert second.metrics["data"]["traffic_key"] == first.metrics["data"]["traffic_key"]
    assert second.metrics["variants"]["mf"]["final"] == first.metrics["variants"]["mf"]["final"]
    # --retrain trains again
    third = run_experiment(
        cfg.replace(out=str(tmp / "run3"), retrain=True), dataset=planted, progress=False
    )
    assert third.fits["esr:mf"]["cached"] is False


def test_reference_on_a_request_subsample_compares_like_with_like(toy_run, planted):
    """reference_requests scores evenly spaced test requests; the funnel's share of the LSR's
    full-catalogue metric is taken on exactly those requests, not on all of them."""
    cfg, tmp, first = toy_run
    n_all = first.metrics["data"]["n_requests"]
    assert first.metrics["reference"]["n_requests"] == min(n_all, 500)  # the default
    sub = run_experiment(cfg.replace(out=str(tmp / "run-ref"), reference_requests=7),
                         dataset=planted, progress=False)
    ref = sub.metrics["reference"]
    assert ref["n_requests"] == 7 < n_all
    # test requests are replayed in table order, so the k-th row is the k-th request
    table_order = sub.requests.filter(pl.col("variant") == "mf")
    picked = np.unique(np.linspace(0, table_order.height - 1, 7).round().astype(int))
    want = table_order[picked]["ndcg@10"].mean()
    v = sub.metrics["variants"]["mf"]
    assert v["final_on_reference_requests"]["ndcg@10"] == pytest.approx(want)
    assert want != pytest.approx(v["final"]["ndcg@10"])  # the subsample is not all requests
    full = ref["lsr_full_catalogue"]["ndcg@10"]
    assert full > 0
    assert v["vs_lsr_full_catalogue"]["ndcg@10"] == pytest.approx(want / full)
    with pytest.raises(ValueError, match="reference_requests"):
        cfg.replace(reference_requests=-1)


def test_the_default_reference_scores_at_most_10m_pairs():
    """Left out, reference_requests is 500, fewer on a catalogue where 500 requests would make
    the LSR score more than 10M request-item pairs (a million items: 10); given, it is kept."""
    from cascade.session import reference_request_count

    assert reference_request_count(None, 1682) == 500
    assert reference_request_count(None, 20_000) == 500
    assert reference_request_count(None, 100_000) == 100
    assert reference_request_count(None, 1_000_000) == 10
    assert reference_request_count(None, 10**9) == 10  # never fewer than 10
    assert reference_request_count(800, 1_000_000) == 800 and reference_request_count(0, 10**6) == 0


# ---- the pipeline's boundary checks -------------------------------------------------------------


@pytest.fixture(scope="session")
def fitted(planted):
    prep = prepare(RunConfig(device="cpu"), dataset=planted, progress=False)
    ret = CoocRetriever().fit(prep.ctx)
    pop = PopRanker().fit(prep.ctx)
    return prep, ret, pop


@pytest.mark.parametrize("bad, what", [(WrongShapeRanker, "shape"), (NaNRanker, "NaN")])
def test_bad_stage_output_is_caught_with_the_stage_name(fitted, bad, what):
    prep, ret, pop = fitted
    stage = bad().fit(prep.ctx)
    batch = prep.test.batch(slice(0, 8))
    for esrs, lsr in (({"bad": stage}, pop), ({"pop": pop}, stage)):
        pipe = Pipeline(ret, esrs, lsr, Budgets(40, 20, 10))
        with pytest.raises(StageError, match=what) as err:
            pipe.run_batch(batch, n_items=prep.dataset.n_items)
        assert stage.name in str(err.value) or "bad" in str(err.value)


def test_retrieval_output_is_checked(fitted):
    prep, _, pop = fitted

    class OutOfCatalogue(CoocRetriever):
        name = "outofcat"

        def retrieve(self, batch, k):
            c = super().retrieve(batch, k)
            return type(c)(ids=c.ids + 10_000, scores=c.scores)

    bad = OutOfCatalogue().fit(prep.ctx)
    batch = prep.test.batch(slice(0, 4))
    with pytest.raises(StageError, match="outofcat.*outside the catalogue"):
        Pipeline(bad, {"pop": pop}, pop, Budgets(40, 20, 10)).run_batch(batch, n_items=240)


def test_retrieval_duplicate_ids_are_rejected(fitted):
    """A retriever returning one id several times would let metrics count it twice (issue 15)."""
    prep, _, pop = fitted

    class Repeats(CoocRetriever):
        name = "repeats"

        def retrieve(self, batch, k):
            c = super().retrieve(batch, k)
            ids = c.ids.clone()
            ids[1, 5] = ids[1, 0]
            return type(c)(ids=ids, scores=c.scores)

    bad = Repeats().fit(prep.ctx)
    batch = prep.test.batch(slice(0, 4))
    with pytest.raises(StageError, match="repeats.*more than once for request 1"):
        Pipeline(bad, {"pop": pop}, pop, Budgets(40, 20, 10)).run_batch(batch, n_items=240)
    good = CoocRetriever().fit(prep.ctx)  # -1 padding may repeat; real ids may not
    out = Pipeline(good, {"pop": pop}, pop, Budgets(40, 20, 10)).run_batch(batch, n_items=240)
    assert out.retrieved.shape == (4, 40)


def test_padding_from_retrieval_is_ranked_last(fitted):
    prep, _, pop = fitted

    class Short(CoocRetriever):
        name = "short"

        def retrieve(self, batch, k):  # only 15 real candidates, then -1 padding
            c = super().retrieve(batch, k)
            ids = c.ids.clone()
            ids[:, 15:] = -1
            return type(c)(ids=ids, scores=c.scores)

    out = Pipeline(Short().fit(prep.ctx), {"pop": pop}, pop, Budgets(40, 20, 10)).run_batch(
        prep.test.batch(slice(0, 4)), n_items=240
    )
    esr_ids = out.variants["pop"].esr_ids
    assert (esr_ids[:, :15] >= 0).all() and (esr_ids[:, 15:] == -1).all()
    assert (out.variants["pop"].final_ids >= 0).all()


def test_replay_ranks_match_the_pipeline_output(fitted):
    prep, ret, _ = fitted
    pop = TieFreePop().fit(prep.ctx)
    pipe = Pipeline(ret, {"pop": pop}, pop, Budgets(40, 20, 10))
    rep = replay(pipe, prep.test, batch_size=64, oracle=True, progress=False)
    out = pipe.run_batch(prep.test.batch(slice(0, 64)), oracle=True, n_items=240)
    t = prep.test.targets[:64, 0]
    ids = out.variants["pop"].final_ids.numpy()
    expect = [int(np.flatnonzero(ids[i] == t[i])[0]) if (ids[i] == t[i]).any() else -1 for i in range(64)]
    assert rep.rank_lsr["pop"][:64, 0].tolist() == expect
    # ESR = LSR = popularity: the ESR cut costs nothing and the two agree completely
    assert np.array_equal(rep.rank_oracle, rep.rank_lsr["pop"])
    assert rep.consistency["pop"] == pytest.approx(np.ones(len(prep.test)))
    # warm-up excluded: one timed row per batch and stage
    assert rep.latency.height == 3 * prep.test.n_batches(64)


# ---- stages by name, plugins, configs -------------------------------------------------------------


def test_unknown_stage_lists_the_known_ones():
    with pytest.raises(StageError, match="unknown esr stage 'nosuch'; known: .*") as err:
        build_stage("esr", "nosuch")
    assert "module:Class" in str(err.value)


def test_plugin_missing_score_names_the_method():
    with pytest.raises(StageError, match=r"missing method\(s\) score"):
        build_stage("esr", f"{TOYS}:NoScore")
    with pytest.raises(StageError, match="cannot import module 'no_such_module_xyz'"):
        build_stage("esr", "no_such_module_xyz:Thing")


def test_unknown_config_key_names_the_allowed_fields():
    with pytest.raises(ValueError, match=r"unknown key 'dimm'; allowed: dim, n_negatives, train"):
        build_stage("esr", StageSpec(stage=f"{TOYS}:MFRanker", config={"dimm": 3}))
    with pytest.raises(ValueError, match=r"config\.train: unknown key 'epoch'"):
        build_stage("esr", StageSpec(stage=f"{TOYS}:MFRanker", config={"train": {"epoch": 3}}))
    with pytest.raises(ValueError, match="TrainConfig.epochs must be >= 1"):
        build_stage("esr", StageSpec(stage=f"{TOYS}:MFRanker", config={"train": {"epochs": 0}}))
    s = build_stage("esr", StageSpec(stage=f"{TOYS}:MFRanker", config={"dim": 3, "train": {"epochs": 1}}))
    assert s.config.dim == 3 and s.config.train.epochs == 1 and s.config.train.batch_size == 256
    with pytest.raises(ValueError, match="takes no config"):
        build_stage("esr", StageSpec(stage=f"{TOYS}:PopRanker", config={"x": 1}))


def test_a_plugin_written_by_the_user_runs_end_to_end(planted, tmp_path, monkeypatch):
    (tmp_path / "my_ranker.py").write_text(textwrap.dedent('''
        import torch

        class RecentItemRanker:
            """Scores a candidate by how recently the user had an item right before it."""
            name = "recent"

            def fit(self, ctx):
                return self

            def score(self, batch, candidates):
                last = batch.hist_items.gather(1, (batch.hist_len - 1).clamp_min(0)[:, None])
                return -(candidates - last - 1).abs().float()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = toy_config(
        tmp_path,
        esr=StageSpec(stage="my_ranker:RecentItemRanker"),
        esr_baseline=None,
        oracle=False,
        reference=False,
    )
    res = run_experiment(cfg, dataset=planted, progress=False)
    v = res.metrics["variants"]["RecentItemRanker"]
    assert v["esr"] == "my_ranker:RecentItemRanker"
    # the planted data walks to the next id: the plugin's rule finds it
    assert v["stages"][1]["recall"] > 0.5
    assert res.metrics["baseline"] is None and res.metrics["comparisons"] is None


def test_esr_variants_make_one_ablation_run(planted, tmp_path):
    cfg = toy_config(
        tmp_path,
        esr_baseline=None,
        esr_variants=(
            StageSpec(stage=f"{TOYS}:MFRanker", label="mf8", config={"dim": 8, "train": {"epochs": 1}}),
            StageSpec(stage=f"{TOYS}:MFRanker", label="mf4", config={"dim": 4, "train": {"epochs": 1}}),
            StageSpec(stage=f"{TOYS}:PopRanker", label="pop", baseline=True),
        ),
        oracle=False,
        reference=False,
    )
    res = run_experiment(cfg, dataset=planted, progress=False)
    m = res.metrics
    assert list(m["variants"]) == ["mf8", "mf4", "pop"]
    assert m["primary"] == "mf8" and m["baseline"] == "pop"
    assert set(m["comparisons"]) == {"mf8", "mf4"}
    toml = (res.path / "config.toml").read_text()
    assert "[[esr_variants]]" in toml
    again = RunConfig.load(res.path / "config.toml")
    assert again.esr_variants == cfg.esr_variants


def test_run_config_toml_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "x"\nfoo = 1\n')
    with pytest.raises(ValueError, match=r"c\.toml: unknown key 'foo'; allowed: name, data"):
        RunConfig.load(p)
    p.write_text('[budgets]\nretrieval = 10\nesr = 20\n')
    with pytest.raises(ValueError, match="retrieval=10, esr=20"):
        RunConfig.load(p)
    p.write_text('device = "tpu"\n')
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        RunConfig.load(p)
    p.write_text('[split]\nkind = "random"\n')
    with pytest.raises(ValueError, match=r"split.kind must be one of \['loo', 'temporal'\]"):
        RunConfig.load(p)
    p.write_text("name = \n")
    with pytest.raises(ValueError, match="invalid TOML"):
        RunConfig.load(p)
    with pytest.raises(ValueError, match="cannot read"):
        RunConfig.load(tmp_path / "missing.toml")


# ---- run records -----------------------------------------------------------------------------------


def test_write_run_is_atomic_and_load_run_checks(tmp_path):
    target = tmp_path / "r"
    frame = pl.DataFrame({"a": [1]})

    def boom(folder):
        assert (folder / "metrics.json").exists()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_run(target, config_toml="", metrics={}, requests=frame, latency=frame, env={}, finish=boom)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind

    write_run(target, config_toml="", metrics={"name": "r"}, requests=frame, latency=frame, env={})
    assert load_run(target).name == "r"
    (target / "latency.parquet").unlink()
    with pytest.raises(RunFormatError, match="missing latency.parquet"):
        load_run(target)
    with pytest.raises(RunFormatError, match="not a cascade run folder"):
        load_run(tmp_path)
    (target / "latency.parquet").write_bytes(b"")
    (target / "metrics.json").write_text(json.dumps({"format": "cascade-run/0"}))
    with pytest.raises(RunFormatError, match="'cascade-run/0' is not supported"):
        load_run(target)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        write_run(other, config_toml="", metrics={}, requests=frame, latency=frame, env={})


@pytest.mark.slow
def test_ml100k_end_to_end(ml100k_path, tmp_path):
    """The built-in funnel on MovieLens 100k, briefly trained, 300 test requests."""
    from cascade.data.splits import SplitConfig
    from funnel_toys import builtin_stage_specs

    stages = builtin_stage_specs(epochs=1, steps=10)
    cfg = RunConfig.from_dict({
        **stages, "data": str(ml100k_path), "max_len": 20, "cache_dir": str(tmp_path / "cache"),
        "out": str(tmp_path / "run"), "device": "cpu", "bootstrap": 200,
    }).replace(split=SplitConfig(kind="loo", max_requests=300))
    res = run_experiment(cfg, progress=False)
    m = res.metrics
    assert m["data"]["n_items"] == 1682 and m["data"]["n_requests"] == 300
    assert m["budgets"] == {"retrieval": 250, "esr": 60, "final": 10}
    assert m["data"]["exclude_seen"] is True  # MovieLens has no repeats
    for v in m["variants"].values():
        r = [s["recall"] for s in v["stages"]]
        assert r[0] >= r[1] >= r[2]
        assert r[0] > 0.3  # retrieval of 250 of 1682 items, trained briefly, beats chance (0.15)
    assert m["reference"]["most_popular"]["hr@10"] > 0.0
    assert load_run(res.path).requests().height == 300 * len(m["variants"])


def test_oracle_pass_and_reference_score_the_same_sampled_requests(planted, tmp_path):
    """The oracle pass (funnel loss) and the full-catalogue reference run on the same evenly
    spaced requests; the funnel loss compares the funnel with the oracle on exactly those."""
    from cascade.replay import evenly_spaced_rows

    cfg = toy_config(tmp_path).replace(oracle_requests=7, reference_requests=7, out=None)
    res = run_experiment(cfg, dataset=planted, progress=False, write=False)
    n = res.metrics["data"]["n_requests"]
    assert n > 7
    mf = res.requests.filter(pl.col("variant") == "mf")
    sampled = mf.filter(pl.col("oracle_sampled"))
    expected = mf["request_id"].to_numpy()[evenly_spaced_rows(n, 7)]
    assert sampled["request_id"].to_list() == expected.tolist()
    assert res.metrics["reference"]["n_requests"] == 7
    loss = res.metrics["variants"]["mf"]["funnel_loss"]
    assert loss["n_requests"] == 7
    assert mf.filter(~pl.col("oracle_sampled"))["rank_oracle"].null_count() == n - 7
    funnel_same = sampled["ndcg@10"].mean()
    assert loss["ndcg@10"] == pytest.approx(sampled["oracle_ndcg@10"].mean() - funnel_same)
    every = run_experiment(cfg.replace(oracle_requests=0), dataset=planted, progress=False,
                           write=False)
    assert every.metrics["variants"]["mf"]["funnel_loss"]["n_requests"] == n


def test_replay_prints_plain_progress_lines_when_stdout_is_not_a_terminal(fitted, capsys, monkeypatch):
    prep, ret, pop = fitted
    monkeypatch.setenv("CASCADE_PROGRESS_SECONDS", "0")
    pipe = Pipeline(ret, {"pop": pop}, pop, Budgets(40, 20, 10))
    n = len(prep.test)
    replay(pipe, prep.test, batch_size=8, progress=True, description="replay test")
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("replay test:")]
    assert len(lines) == -(-n // 8)  # one per batch at interval 0, the last one included
    assert lines[0].startswith(f"replay test: 8/{n:,} requests") and "ETA" in lines[0]
    assert lines[-1].startswith(f"replay test: {n:,}/{n:,} requests (100%)") and "took" in lines[-1]
    replay(pipe, prep.test, batch_size=8, progress=False)
    assert capsys.readouterr().out == ""
