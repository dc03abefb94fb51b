"""`cascade sweep`: the frontier, the choice under a p99 budget, reuse of trained stages, the CLI.

The sweep runs real stages on the planted dataset of `funnel_toys` (co-occurrence retrieval, a
trained MF ranker loaded from the session's checkpoint cache, popularity), over a grid that
contains run A's budgets so its numbers can be checked against `run_experiment`'s.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from cascade.cli import app
from cascade.config import RunConfig, StageSpec
from cascade.experiment import run_experiment
from cascade.sweep import best_under_budget, frontier_mask, grid_pairs, run_sweep, write_sweep
from funnel_toys import planted_dataset

MF = "funnel_toys:MFRanker"
POP = "funnel_toys:PopRanker"
COOC = "funnel_toys:CoocRetriever"


def _dominates(a: dict, b: dict) -> bool:
    return (a["ndcg@10"] >= b["ndcg@10"] and a["p99_ms"] <= b["p99_ms"]
            and (a["ndcg@10"] > b["ndcg@10"] or a["p99_ms"] < b["p99_ms"]))


def test_frontier_mask_known_points():
    q = np.array([0.50, 0.40, 0.45, 0.30, 0.50, 0.60])
    lat = np.array([10.0, 5.0, 12.0, 4.0, 9.0, 30.0])
    # (0.5, 10) is dominated by (0.5, 9); (0.45, 12) by (0.5, 9)
    assert frontier_mask(q, lat).tolist() == [False, True, False, True, True, True]
    assert best_under_budget(q, lat, 9.5) == 4
    assert best_under_budget(q, lat, 4.5) == 3
    assert best_under_budget(q, lat, 3.9) is None
    # equal quality: the faster wins; equal points are both on the frontier
    assert best_under_budget(np.array([0.5, 0.5]), np.array([3.0, 2.0]), 5) == 1
    assert frontier_mask(np.array([0.5, 0.5]), np.array([2.0, 2.0])).tolist() == [True, True]


def test_frontier_mask_random_points_pairwise():
    rng = np.random.default_rng(0)
    q = rng.random(200).round(2)  # rounding makes ties
    lat = rng.random(200).round(2)
    mask = frontier_mask(q, lat)
    pts = [{"ndcg@10": a, "p99_ms": b} for a, b in zip(q, lat)]
    for i, p in enumerate(pts):
        dominated = any(_dominates(o, p) for o in pts)
        assert mask[i] == (not dominated)


def test_grid_skips_pairs_that_cannot_form_a_funnel():
    pairs, notes = grid_pairs([40, 80], [15, 60], final_k=10, n_items=60)
    assert pairs == [(40, 15)]
    assert len(notes) == 3
    assert any("retrieval K 80" in n and "catalogue of 60" in n for n in notes)
    assert any("retrieval K 40, ESR K 60" in n and "must shrink" in n for n in notes)
    with pytest.raises(ValueError, match="no \\(retrieval K, ESR K\\) pair forms a funnel"):
        grid_pairs([20], [30], final_k=10, n_items=100)
    with pytest.raises(ValueError, match="integers >= 1"):
        grid_pairs([0], [30], final_k=10, n_items=100)


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "cascade-cache"


@pytest.fixture(scope="session")
def swept(toy_cache):
    ds = planted_dataset()
    cfg = RunConfig(
        retrieval=StageSpec(stage=COOC), lsr=StageSpec(stage=MF), device="cpu",
        cache_dir=str(toy_cache), batch_size=16, bootstrap=100,
        esr_variants=(StageSpec(stage=MF, label="mf"), StageSpec(stage=POP, label="pop")),
    )
    res = run_sweep(cfg, retrieval_ks=[30, 60], esr_ks=[15, 20, 45], dataset=ds, progress=False)
    # run A's configuration as an ordinary run, for the numbers at retrieval 60 -> esr 20
    single = run_experiment(cfg.replace(retrieval_k=60, esr_k=20, oracle=False, reference=False),
                            dataset=ds, progress=False, write=False)
    return res, single


def test_sweep_points_match_a_run_with_the_same_budgets(swept):
    res, single = swept
    pts = res.points
    # 2 ESRs x the 5 valid pairs (30 -> 45 cannot shrink)
    assert pts.height == 10
    assert any("retrieval K 30, ESR K 45" in n for n in res.notes)
    for label in ("mf", "pop"):
        row = pts.filter((pl.col("esr") == label) & (pl.col("retrieval_k") == 60)
                         & (pl.col("esr_k") == 20)).row(0, named=True)
        final = single.metrics["variants"][label]["final"]
        assert row["ndcg@10"] == pytest.approx(final["ndcg@10"])
        assert row["hr@10"] == pytest.approx(final["hr@10"])
        assert row["p99_ms"] > 0
    # a larger retrieval budget can only keep more targets (same retriever, longer list)
    rec = pts.filter(pl.col("esr") == "pop").group_by("retrieval_k").agg(
        pl.col("recall_retrieval").first()).sort("retrieval_k")["recall_retrieval"].to_list()
    assert rec[0] <= rec[1]
    # the MF was trained once for the session: the sweep fitted every stage exactly once
    assert set(res.meta["fit_seconds"]) == {"retrieval", "esr:mf", "esr:pop", "lsr"}


def test_sweep_frontier_is_non_dominated(swept):
    res, _ = swept
    rows = res.points.to_dicts()
    front = [r for r in rows if r["frontier"]]
    assert front
    for r in rows:
        dominated = any(_dominates(o, r) for o in rows)
        assert r["frontier"] == (not dominated)
    # the best-quality point is always on it
    best = max(rows, key=lambda r: (r["ndcg@10"], -r["p99_ms"]))
    assert best["frontier"]


def test_p99_budget_choice_is_the_best_qualifying_point(swept):
    res, _ = swept
    lat = sorted(res.points["p99_ms"].to_list())
    for budget in (lat[len(lat) // 2], lat[0], lat[-1] + 1.0):
        judged = res.with_budget(budget)
        row = judged.chosen_row()
        ok = [r for r in judged.points.to_dicts() if r["p99_ms"] <= budget]
        assert row is not None and row["p99_ms"] <= budget
        assert row["ndcg@10"] == max(r["ndcg@10"] for r in ok)
        assert row["frontier"]
        assert judged.points["chosen"].sum() == 1
        assert row["label"] in judged.verdict()
    none = res.with_budget(lat[0] / 2)
    assert none.chosen is None and not none.points["chosen"].any()
    assert "no configuration keeps the full-funnel p99 under" in none.verdict()


def test_sweep_folder(swept, tmp_path):
    res, _ = swept
    judged = res.with_budget(float(np.median(res.points["p99_ms"].to_numpy())))
    written = write_sweep(judged, tmp_path / "sw")
    names = {p.name for p in written}
    assert {"sweep.json", "sweep.csv", "sweep.md", "quality_latency.png",
            "quality_latency.csv"} <= names
    png = (tmp_path / "sw" / "figures" / "quality_latency.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 1024
    doc = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert doc["format"] == "cascade-sweep/1"
    assert doc["chosen"]["label"] == judged.chosen_row()["label"]
    drawn = pl.read_csv(tmp_path / "sw" / "figures" / "quality_latency.csv")
    assert drawn["frontier"].sum() == judged.points["frontier"].sum()


def _toml(tmp_path: Path, cache: Path) -> Path:
    p = tmp_path / "sweep.toml"
    p.write_text(
        'data = "synthetic:tiny"\n'
        "data_options = {n_users = 80, n_items = 150, n_events = 2400}\n"
        f'cache_dir = "{cache}"\n'
        'device = "cpu"\nbatch_size = 16\n'
        f'retrieval = "{COOC}"\nlsr = "{POP}"\n'
    )
    return p


@pytest.mark.parametrize("fmt", ["json", "csv", "markdown", "table"])
def test_cli_sweep(tmp_path, toy_cache, fmt):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [
        "sweep", "--config", str(_toml(tmp_path, toy_cache)), "--esr", POP,
        "--retrieval-k", "40,80", "--esr-k", "20", "--esr-k", "30", "--p99-ms", "1e6",
        "--format", fmt, "--out", str(out), "--no-progress",
    ])
    assert res.exit_code == 0, res.output
    assert (out / "sweep.json").is_file() and (out / "figures" / "quality_latency.png").is_file()
    if fmt == "json":
        doc = json.loads(res.stdout)
        assert len(doc["points"]) == 4 and doc["budget_ms"] == 1e6
        assert doc["chosen"] is not None and doc["chosen"]["p99_ms"] <= 1e6
        assert doc["chosen"]["ndcg@10"] == max(p["ndcg@10"] for p in doc["points"])
    elif fmt == "csv":
        frame = pl.read_csv(io.StringIO(res.stdout))
        assert frame.height == 4 and frame["chosen"].sum() == 1
        assert sorted(set(frame["retrieval_k"].to_list())) == [40, 80]
    elif fmt == "markdown":
        assert res.stdout.startswith("| esr | retrieval_k | esr_k |")
        assert "best under a 1e+06 ms full-funnel p99 budget" in res.stdout
    else:
        assert "frontier (fastest first)" in res.stdout and "best under a" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--retrieval-k", "20", "--esr-k", "40"], "no (retrieval K, ESR K) pair forms a funnel"),
    (["--retrieval-k", "40", "--esr-k", "x"], "--esr-k: 'x' is not an integer"),
    (["--retrieval-k", "40", "--esr-k", "20", "--p99-ms", "-3"], "--p99-ms must be a positive"),
    (["--esr-k", "20"], "needs --retrieval-k and --esr-k"),
])
def test_cli_sweep_bad_input(tmp_path, toy_cache, args, message):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["sweep", "--config", str(_toml(tmp_path, toy_cache)),
                                   "--esr", POP, "--out", str(out), "--no-progress", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()
