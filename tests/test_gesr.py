"""GESR (`cascade.stages.gesr`): hard-matching counts, the target mask at the model level, the
serving path against the per-candidate reference, module switches, the sampler's log-Q
density, training on a tiny synthetic log, checkpoint caching and the `cascade ablation` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from cascade.data.dataset import Dataset, FeatureTable, finalize_events
from cascade.data.splits import make_split, training_requests
from cascade.data.traffic import RequestBatch, Traffic
from cascade.stages.base import FitContext, resolve_stage_class
from cascade.stages.gesr import GESRConfig, GESRModel, GESRStage, MoAConfig
from cascade.stages.gesr.hma import HardMatchingAttention, naive_counts
from cascade.stages.gesr.sampling import InterestSampler

PAIRS = ("item", "category", "item_pos", "category_pos", "item_recent", "category_recent")
TINY = dict(dim=16, hidden=16, moa_dim=8, logit_hidden=8, hma_dim=4)


# ---- fixtures ---------------------------------------------------------------------------------


def multi_dataset(seed: int = 0, n_users: int = 40, n_items: int = 60, n_cat: int = 6, per_user: int = 25) -> Dataset:
    """Items with one or two categories (a multi-valued category feature), users with a
    categorical feature, ratings 1..5 (so all three action codes occur)."""
    rng = np.random.default_rng(seed)
    cats = np.zeros((n_items, 2), np.int64)
    cats[:, 0] = rng.integers(1, n_cat + 1, n_items)
    two = rng.random(n_items) < 0.5
    cats[two, 1] = rng.integers(1, n_cat + 1, two.sum())
    users = np.repeat(np.arange(n_users), per_user)
    frame = pl.DataFrame({
        "user": users,
        "item": rng.integers(0, n_items, users.size),
        "ts": np.sort(rng.integers(0, 10**6, users.size)),
        "rating": rng.integers(1, 6, users.size).astype(np.float32),
    })
    return Dataset(
        name="multi", events=finalize_events(frame), n_users=n_users, n_items=n_items,
        items=FeatureTable(n=n_items, categorical={"year": rng.integers(1, 5, n_items)},
                           multi={"genre": cats}, cardinality={"year": 5, "genre": n_cat + 1}),
        users=FeatureTable(n=n_users, categorical={"age": rng.integers(1, 4, n_users)},
                           cardinality={"age": 4}),
        raw_user_ids=np.arange(n_users), raw_item_ids=np.arange(n_items), category_feature="genre",
    )


@pytest.fixture(scope="module")
def multi() -> Dataset:
    return multi_dataset()


@pytest.fixture(scope="module")
def batch(multi) -> RequestBatch:
    tr = Traffic(multi, training_requests(make_split(multi)), max_len=12)
    rows = np.flatnonzero(tr.pos >= 3)[:: 7][:6]  # a few requests with mixed history lengths
    return tr.batch(np.concatenate([rows, np.flatnonzero(tr.pos == 1)[:1]]))


def perturbed(ds: Dataset, moa: MoAConfig, seed: int = 0, **cfg) -> GESRModel:
    """A GESR model with random weights everywhere (fresh MLPG logit layers start at zero, which
    would hide every MoA path), in eval mode."""
    torch.manual_seed(seed)
    model = GESRModel.from_dataset(ds, GESRConfig(moa=moa, **{**TINY, **cfg}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def synth_ctx(tmp_path_factory) -> FitContext:
    from cascade.data.synthetic import generate, preset

    ds = generate(preset("tiny"))
    split = make_split(ds)
    return FitContext(
        dataset=ds, split=split, train=Traffic(ds, training_requests(split), max_len=30),
        valid=Traffic(ds, split.valid, max_len=30), device=torch.device("cpu"),
        cache_dir=tmp_path_factory.mktemp("gesr-cache"), progress=False,
    )


TRAIN_CFG = dict(TINY, valid_requests=150,
                 pretrain=dict(epochs=2, batch_size=256, max_steps_per_epoch=20, lr=5e-3),
                 train=dict(epochs=2, batch_size=128, max_steps_per_epoch=20, patience=3, lr=5e-3))


@pytest.fixture(scope="module")
def trained(synth_ctx) -> GESRStage:
    return GESRStage(GESRConfig(**TRAIN_CFG)).fit(synth_ctx)


# ---- Hard Matching Attention ------------------------------------------------------------------

# item -> categories: 0 {1}, 1 {2,3}, 2 {3}, 3 {} (none), 4 {1,2}, 5 {4}
HAND_CATS = torch.tensor([[1, 0], [2, 3], [3, 0], [0, 0], [1, 2], [4, 0]])
HAND_HIST = dict(
    hist_items=torch.tensor([[1, 2, 1, 4, 0], [0, 0, 3, 5, 2]]),
    hist_actions=torch.tensor([[3, 1, 3, 2, 0], [3, 3, 3, 3, 1]]),  # 1 neg, 2 neutral, 3 pos
    hist_len=torch.tensor([4, 5]),  # row 0: position 4 (item 0) is padding
)
HAND_CAND = torch.tensor([[1, 0, 3, 2], [0, 2, 5, 4]])
# columns: item, category, item_pos, category_pos, item_recent, category_recent (recent = 2)
HAND_COUNTS = torch.tensor([
    [[2, 4, 2, 2, 1, 2], [0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0], [1, 3, 0, 2, 0, 1]],
    [[2, 2, 2, 2, 0, 0], [1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1], [0, 2, 0, 2, 0, 0]],
])


def hand_hma(cats: torch.Tensor = HAND_CATS, cap: int = 2) -> HardMatchingAttention:
    return HardMatchingAttention(pairs=PAIRS, cap=cap, recent=2, item_categories=cats,
                                 n_categories=6, emb_dim=3, hidden=5, out_dim=4)


def test_hma_counts_equal_hand_computed_counts():
    hma = hand_hma()
    state = hma.history(**HAND_HIST)
    assert torch.equal(hma.counts(state, HAND_CAND), HAND_COUNTS)
    assert torch.equal(naive_counts(hma, **HAND_HIST, cand=HAND_CAND), HAND_COUNTS)


def test_hma_ignores_padding():
    hma = hand_hma()
    padded = dict(HAND_HIST, hist_items=HAND_HIST["hist_items"].clone(),
                  hist_actions=HAND_HIST["hist_actions"].clone())
    padded["hist_items"][0, 4] = 1  # a real-looking item at a padding position
    padded["hist_actions"][0, 4] = 3
    assert torch.equal(hma.counts(hma.history(**padded), HAND_CAND), HAND_COUNTS)


def test_hma_cap_and_offsets():
    hma = hand_hma(cap=2)
    ids = hma.bucket_ids(HAND_COUNTS)
    p = torch.arange(len(PAIRS))
    assert torch.equal(ids // 3, p.expand_as(ids))  # pair p owns ids 3p .. 3p + 2: no collisions
    assert torch.equal(ids % 3, HAND_COUNTS.clamp(max=2))  # the cap M = 2
    assert int(ids.max()) < hma.buckets.num_embeddings == len(PAIRS) * 3
    # counts above the cap embed like the cap; below it they differ
    with torch.no_grad():
        hma.buckets.weight.normal_()
    e = hma.embed_counts(torch.tensor([[[2] * 6, [9] * 6, [1] * 6]]))
    assert torch.allclose(e[0, 0], e[0, 1]) and not torch.allclose(e[0, 0], e[0, 2])


def test_hma_single_valued_categories_and_folded_table():
    single = HAND_CATS[:, :1]  # keep one category per item: the histogram path
    hma = hand_hma(single)
    state = hma.history(**HAND_HIST)
    got = hma.counts(state, HAND_CAND)
    assert torch.equal(got, naive_counts(hma, **HAND_HIST, cand=HAND_CAND))
    # row 0, candidate 1 (category 2): events e0, e2 (item 1 -> 2); e3 is item 4 -> 1 now
    assert got[0, 0].tolist() == [2, 2, 2, 2, 1, 1]
    torch.manual_seed(0)
    with torch.no_grad():
        for prm in hma.parameters():
            prm.normal_()
    torch.testing.assert_close(hma.embed_counts(got), hma.embed_counts_unfolded(got))


# ---- the model: target mask, serving path vs naive ------------------------------------------

CONFIGS = {
    "full": MoAConfig(history_len=10),
    "no-mlpg": MoAConfig(mlpg=False),
    "self+ro": MoAConfig(hma=False, cross_attn=("ro",)),
    "nro-only": MoAConfig.two_tower(cross_attn=("nro",), mlpg=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_serving_path_equals_naive_path(multi, batch, name):
    extra = {"nro_queries": "features"} if name == "nro-only" else {}
    model = perturbed(multi, CONFIGS[name], **extra)
    cand = torch.randint(0, multi.n_items, (len(batch), 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        naive = model.score_naive(batch, cand)
        uncached = model.score(batch, cand)
        model.cache_items()
        cached = model.score(batch, cand)
    assert naive.abs().max() > 0.1  # the MoA paths contribute (not only l0)
    torch.testing.assert_close(uncached, naive, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached, naive, rtol=1e-4, atol=1e-5)


def test_candidate_score_independent_of_other_candidates(multi, batch):
    model = perturbed(multi, MoAConfig())
    model.cache_items()
    g = torch.Generator().manual_seed(2)
    cand = torch.randint(0, multi.n_items, (len(batch), 12), generator=g)
    perm = torch.randperm(12, generator=g)
    with torch.no_grad():
        full = model.score(batch, cand)
        permuted = model.score(batch, cand[:, perm])
        alone = model.score(batch, cand[:, 3:4])
        subset = model.score(batch, cand[:, [7, 3, 0]])
    torch.testing.assert_close(permuted, full[:, perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[:, 0], full[:, 3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(subset, full[:, [7, 3, 0]], rtol=1e-5, atol=1e-6)


def test_history_representation_unchanged_by_candidates(multi, batch):
    model = perturbed(multi, MoAConfig())
    with torch.no_grad():
        hist = model.to_moa(model.history(batch)) * batch.hist_mask[..., None]
        tok = model.to_moa(model.items(torch.arange(10)))[None].expand(len(batch), -1, -1)
        out_a, _ = model.encoder(hist, batch.hist_len, tok[:, :3])
        out_b, _ = model.encoder(hist, batch.hist_len, tok[:, 3:].flip(1))
        state = model.encode_request(batch)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(state.enc.output, out_a, rtol=1e-5, atol=1e-6)


# ---- switches --------------------------------------------------------------------------------


def _names(model: GESRModel) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def _count(model: GESRModel) -> int:
    return sum(p.numel() for p in model.parameters())


def test_module_switches_change_parameters(multi, batch):
    towers = GESRModel.from_dataset(multi, GESRConfig(moa=MoAConfig.two_tower(), **TINY))
    full = GESRModel.from_dataset(multi, GESRConfig(moa=MoAConfig(), **TINY))
    tower_names = _names(towers)
    assert not any(n.split(".")[0] in {"hma", "encoder", "nro", "ro", "fusion"} for n in tower_names)
    assert tower_names < _names(full)
    assert full.fusion.beta.numel() == 4  # one gated secondary logit per MoA embedding
    for switch, prefix in (("hma", "hma."), ("self_attn", "encoder."), ("cross_attn", "nro.")):
        off = GESRModel.from_dataset(multi, GESRConfig(moa=MoAConfig(**{switch: False if switch != "cross_attn" else ()}), **TINY))
        gone = _names(full) - _names(off)
        assert any(n.startswith(prefix) for n in gone) and not (_names(off) - _names(full))
        removed = sum(p.numel() for n, p in full.named_parameters() if n.startswith(prefix))
        assert _count(full) - _count(off) > removed > 0  # the module, and its MLPG gate / logit
    ungated = GESRModel.from_dataset(multi, GESRConfig(moa=MoAConfig(mlpg=False), **TINY))
    assert not any("gate" in n or "beta" in n for n in _names(ungated))
    # everything off: exactly the two-tower path, the score is the primary logit
    model = perturbed(multi, MoAConfig.two_tower())
    cand = torch.randint(0, multi.n_items, (len(batch), 5))
    with torch.no_grad():
        logit, l0 = model.forward_train(batch, cand)
    assert torch.equal(logit, l0)


@pytest.mark.parametrize("bad, field", [
    (dict(moa=dict(cross_attn=["xro"])), "cross_attn"),
    (dict(moa=dict(hma_pairs=["genre"])), "hma_pairs"),
    (dict(moa=dict(hma_cap=0)), "hma_cap"),
    (dict(moa=dict(colour=1)), "colour"),
    (dict(moa_dim=15), "moa_dim"),
    (dict(nro_queries="all"), "nro_queries"),
    (dict(pretrain={"epochs": 0}), "epochs"),
    (dict(interest_negatives=1.5), "interest_negatives"),
    (dict(train={"epochs": "2"}), r"GESRConfig\.train\.epochs must be an integer"),
    (dict(moa={"cross_attn": 3}), r"GESRConfig\.moa\.cross_attn must be a list or true or false or a string"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        GESRConfig(**bad)


def test_config_from_dicts_and_switch_forms():
    cfg = GESRConfig(moa={"cross_attn": True, "hma_pairs": ["item"]}, train={"epochs": 2})
    assert cfg.moa.cross_attn == ("nro", "ro") and cfg.moa.hma_pairs == ("item",)
    assert cfg.train.epochs == 2 and cfg.train.batch_size == GESRConfig().train.batch_size
    assert MoAConfig(cross_attn=["ro", "nro"]).cross_attn == ("nro", "ro")
    assert MoAConfig(cross_attn=False).modules == ("match", "self")


# ---- sampling --------------------------------------------------------------------------------


def test_interest_sampler_density_matches_draws(multi, batch):
    cats = torch.from_numpy(multi.items.multi["genre"])
    s = InterestSampler(np.ones(multi.n_items), cats, 7, pop_frac=0.5, interest_frac=1.0,
                        device=torch.device("cpu"))
    draws = s.sample(batch, 60_000, torch.Generator().manual_seed(0))  # all interest-matched
    emp = torch.stack([torch.bincount(d, minlength=multi.n_items) for d in draws]).float() / 60_000
    dens = s.interest_density(batch, torch.arange(multi.n_items).expand(len(batch), -1))
    torch.testing.assert_close(dens.sum(1), torch.ones(len(batch)))
    assert float((emp - dens).abs().max()) < 0.01
    # items sharing no category with the history are never drawn and have density 0
    assert torch.all(emp[dens == 0] == 0)


# ---- training and the stage -------------------------------------------------------------------


def test_trains_on_tiny_synthetic_and_beats_chance(trained, synth_ctx):
    r = trained.fit_report_
    # chance MRR among 1 + 100 uniform items is about 0.05
    assert r["valid_sampled_mrr"] > 0.2, r
    assert 0 < r["ne"] < 1.0  # better than predicting the positive rate
    assert {"epochs_run", "best_epoch", "ne_primary", "valid_sampled_mrr_primary", "pretrain"} <= set(r)
    # the trained model beats the same model untrained on the validation requests
    untrained = GESRStage(GESRConfig(**TRAIN_CFG))
    untrained.model_ = GESRModel.from_dataset(synth_ctx.dataset, untrained.config).eval()
    from cascade.stages.training import sampled_mrr

    before = sampled_mrr(untrained.score, synth_ctx.valid, synth_ctx.device)
    after = sampled_mrr(trained.score, synth_ctx.valid, synth_ctx.device)
    assert after > before + 0.1


def test_stage_is_registered_and_loads_cached_checkpoint(trained, synth_ctx):
    assert resolve_stage_class("esr", "gesr") is GESRStage
    again = GESRStage(GESRConfig(**TRAIN_CFG)).fit(synth_ctx)
    assert again.fit_report_["cached"] is True
    b = synth_ctx.valid.batch(np.arange(16))
    cand = torch.randint(0, synth_ctx.dataset.n_items, (16, 40))
    torch.testing.assert_close(again.score(b, cand), trained.score(b, cand))
    # chunked scoring (small score_chunk_pairs) gives the same scores as one call
    chunked = GESRStage(GESRConfig(**{**TRAIN_CFG, "score_chunk_pairs": 100}))
    chunked.model_ = trained.model_
    torch.testing.assert_close(chunked.score(b, cand), trained.score(b, cand))


# ---- cascade ablation -------------------------------------------------------------------------

ABLATION_TOML = """
data = "synthetic:tiny"
max_len = 20
oracles = true
bootstrap = 50
reference = false
oracle = false
[budgets]
retrieval = 300
[split]
kind = "loo"
max_requests = 80
[retrieval]
stage = "twotower"
config = {train = {epochs = 1, max_steps_per_epoch = 2}}
[lsr]
stage = "popular"
[gesr]
dim = 32
hidden = 32
moa_dim = 8
valid_requests = 40
train = {epochs = 1, max_steps_per_epoch = 2, batch_size = 64}
pretrain = {epochs = 1, max_steps_per_epoch = 2, batch_size = 64}
[twotower]
dim = 16
train = {epochs = 1, max_steps_per_epoch = 2}
"""


def test_ablation_command_end_to_end(tmp_path: Path):
    from typer.testing import CliRunner

    from cascade.cli import app

    cfg = tmp_path / "ablation.toml"
    cfg.write_text(ABLATION_TOML)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["ablation", "--config", str(cfg), "--out", str(out),
                                   "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "ablation.json").read_text())
    labels = [r["variant"] for r in record["rows"]]
    assert labels == ["two-tower", "gesr towers", "+HMA", "+self-attn", "+cross-attn",
                      "+MLPG (full GESR)", "full GESR, int8", "oracle-dot", "oracle"]
    metrics = json.loads((out / "metrics.json").read_text())
    # the int8 row serves the full GESR's checkpoint (a serving field): loaded, not trained
    fits = metrics["training"]
    assert fits["esr:full GESR, int8"]["cached"] and not fits["esr:+MLPG (full GESR)"]["cached"]
    assert (fits["esr:full GESR, int8"]["report"]["checkpoint"]
            == fits["esr:+MLPG (full GESR)"]["report"]["checkpoint"])
    for r in record["rows"]:
        esr = next(s for s in metrics["variants"][r["variant"]]["stages"] if s["name"] == "esr")
        assert r["esr_recall"] == esr["recall"] and r["esr_latency_ms"]["p50"] > 0
        assert r["throughput_rps"] > 0
        if r["variant"] != "two-tower":
            assert set(r["delta_vs_two_tower"]) == {"recall@esr", "hr@10", "ndcg@10"}
    rows = {r["variant"]: r for r in record["rows"]}
    assert rows["+MLPG (full GESR)"]["esr_config"]["moa"]["mlpg"] is True
    assert rows["full GESR, int8"]["esr_config"]["quantize"] == "int8"
    share = {k: rows[k]["share_of_oracle_gain"]["recall@esr"] for k in ("oracle", "oracle-dot")}
    if rows["oracle"]["esr_recall"] > rows["oracle-dot"]["esr_recall"]:
        assert share["oracle-dot"] == 0.0 and share["oracle"] == pytest.approx(1.0)
    else:
        assert share == {"oracle": None, "oracle-dot": None}
    md = (out / "ablation.md").read_text()
    assert md.count("\n| ") == 10 and "| full GESR, int8 |" in md  # header + 9 rows
    # no ESR budget given: the ESR keeps a tenth of the 300 retrieved candidates (a cut that
    # binds), not the run's default quarter (75)
    assert record["budgets"] == {"retrieval": 300, "esr": 30, "final": 10}
    assert "esr_share = 0.1" in (out / "config.toml").read_text()
    assert record["no_esr_cut"] is None  # the TOML turned the oracle pass off


def test_ablation_budgets_from_flags_and_toml(tmp_path: Path):
    from cascade.ablation import build_ablation_config

    assert build_ablation_config(None, {}).esr_share == 0.1
    cfg = build_ablation_config(None, {"esr_k": 30, "retrieval_k": 300})
    assert (cfg.retrieval_k, cfg.esr_k) == (300, 30)
    toml = tmp_path / "a.toml"
    toml.write_text('data = "synthetic:tiny"\n[budgets]\nesr_share = 0.2\nfinal = 5\n')
    cfg = build_ablation_config(toml, {})
    assert (cfg.esr_share, cfg.final_k, cfg.esr_k) == (0.2, 5, None)
    assert build_ablation_config(toml, {"esr_k": 12}).esr_k == 12


def test_ablation_markdown_states_the_no_cut_ceiling():
    from cascade.ablation import ablation_markdown, no_esr_cut

    oracle = {"hr@10": 0.5645, "ndcg@10": 0.4173, "mrr": 0.37}
    metrics = {"name": "x", "data": {"name": "d", "n_items": 9, "n_requests": 3}, "device": "cpu",
               "budgets": {"retrieval": 8, "esr": 4, "final": 2},
               "variants": {"a": {"funnel_loss": None}, "b": {"funnel_loss": {"oracle": oracle}}}}
    assert no_esr_cut(metrics) == oracle
    assert "no ESR cut) gets HR@10 0.5645, NDCG@10 0.4173" in ablation_markdown(metrics, [])
    metrics["variants"]["b"]["funnel_loss"] = None
    assert no_esr_cut(metrics) is None and "no ESR cut" not in ablation_markdown(metrics, [])


def test_ablation_command_rejects_esr_keys(tmp_path: Path):
    from typer.testing import CliRunner

    from cascade.cli import app

    cfg = tmp_path / "bad.toml"
    cfg.write_text('data = "synthetic:tiny"\nesr = "gesr"\n')
    res = CliRunner().invoke(app, ["ablation", "--config", str(cfg), "--no-progress"])
    assert res.exit_code == 2 and "set by the ablation" in res.output


def test_mlpg_fused_logit_equals_the_formula():
    """MLPG.forward folds the gate's factor 2 and beta into the weights; it must still equal
    l0 + sum_k beta_k MLP_k(2 sigmoid(A_k u + C_k i) * E_k) written out term by term."""
    from cascade.stages.gesr.mlpg import MLPG

    torch.manual_seed(0)
    names = ("match", "self", "nro")
    m = MLPG(names, dim=8, tower_dim=12, hidden=16)
    with torch.no_grad():
        m.mlps.w2.normal_()  # the last layers start at zero: make them count
        m.mlps.b2.normal_()
        m.beta.normal_()
    u, i = torch.randn(3, 12), torch.randn(3, 5, 12)
    embs = {k: torch.randn(3, 5, 8) for k in names}
    l0 = torch.randn(3, 5)
    gu, gi = m.user_gates(u), m.item_gates(i)
    want = l0.clone()
    for k, name in enumerate(names):
        g = 2 * torch.sigmoid(gu[:, None, k] + gi[:, :, k])  # (3, 5, 8)
        h = torch.nn.functional.silu((g * embs[name]) @ m.mlps.w1[k] + m.mlps.b1[k])
        want = want + m.beta[k] * (h @ m.mlps.w2[k] + m.mlps.b2[k])
    torch.testing.assert_close(m(l0, gu, gi, embs), want, rtol=1e-5, atol=1e-5)


def _compiled_matches_eager(eager_stage: GESRStage, ctx: FitContext) -> None:
    """compile=True runs the same scoring through torch.compile (Inductor): the same scores,
    a batch larger than one scoring group (so the smaller last group goes through the dynamic
    shapes), and the same cached checkpoint (compile is serving-only, not part of the key)."""
    import dataclasses

    from torch._dynamo.utils import counters

    # 72 // 24 = 3 requests per scoring group: 11 requests make groups of 3, 3, 3 and 2
    cfg = dataclasses.replace(eager_stage.config, compile=True, score_chunk_pairs=72)
    stage = GESRStage(cfg).fit(ctx)
    assert stage.fit_report_["cached"] is True  # same checkpoint as the eager stage's
    batch = ctx.valid.batch(np.arange(11))
    cand = torch.randint(0, ctx.dataset.n_items, (11, 24), generator=torch.Generator().manual_seed(3))
    eager = eager_stage.score(batch, cand)
    graphs = counters["stats"]["unique_graphs"]
    compiled = stage.score(batch, cand)
    assert stage._compiled is not None and stage._compiled != stage.model_.score  # no fallback
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo really captured the scoring
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert not torch.equal(stage.score(batch, cand.flip(1)), compiled)  # a real function of cand


def test_compiled_serving_matches_eager_and_does_not_change_the_checkpoint(synth_ctx):
    """The compile path on GESR's towers (its primary logit, every MoA module off): ~25 s of
    Inductor on 2 cores with a cold cache. The full model's compile is `-m heavy` (below)."""
    towers = dict(TRAIN_CFG, moa=MoAConfig.two_tower(),
                  pretrain=dict(TRAIN_CFG["pretrain"], epochs=1, max_steps_per_epoch=5))
    _compiled_matches_eager(GESRStage(GESRConfig(**towers)).fit(synth_ctx), synth_ctx)


@pytest.mark.heavy
def test_the_full_model_compiled_matches_eager(trained, synth_ctx):
    """Every MoA module through Inductor: ~160 s of compilation on 2 cores with a cold cache, so
    outside the default suite (`python -m pytest -m heavy`)."""
    _compiled_matches_eager(trained, synth_ctx)
