"""`cascade compare`, the figures and report.md, on real small runs.

Runs are made by `run_experiment` on the planted dataset of `funnel_toys` with real stages:
co-occurrence retrieval, a trained MF ranker (ESR and LSR, trained once and then loaded from the
checkpoint cache) and training popularity. Runs A and B replay the same traffic; run C replays a
different dataset, so paired statistics against it must be refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from cascade.cli import app
from cascade.compare import compare_runs, read_run, read_runs, write_comparison
from cascade.config import RunConfig, StageSpec
from cascade.experiment import run_experiment
from cascade.report import write_report
from funnel_toys import planted_dataset

MF = "funnel_toys:MFRanker"
POP = "funnel_toys:PopRanker"
COOC = "funnel_toys:CoocRetriever"
PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(out: Path, cache: Path, **kw) -> RunConfig:
    base = dict(
        retrieval=StageSpec(stage=COOC), lsr=StageSpec(stage=MF), retrieval_k=60, esr_k=20,
        device="cpu", cache_dir=str(cache), out=str(out), bootstrap=200, batch_size=16,
    )
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory) -> Path:
    """One checkpoint cache for the session: the MF ranker trains once across test files."""
    return tmp_path_factory.getbasetemp() / "cascade-cache"


def _with_report(folder: Path, metrics: dict) -> None:
    write_report(folder)  # as `cascade run` does: inside the run folder before it appears


@pytest.fixture(scope="session")
def runs(tmp_path_factory, toy_cache) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    ds = planted_dataset()
    a = run_experiment(
        _cfg(root / "A", toy_cache, name="A", esr_variants=(
            StageSpec(stage=MF, label="mf"), StageSpec(stage=POP, label="pop", baseline=True))),
        dataset=ds, progress=False, extras=_with_report,
    )
    b = run_experiment(_cfg(root / "B", toy_cache, name="B", esr=StageSpec(stage=POP, label="pop")),
                       dataset=ds, progress=False, extras=_with_report)
    c = run_experiment(
        _cfg(root / "C", toy_cache, name="C", esr=StageSpec(stage=POP, label="pop"),
             lsr=StageSpec(stage=POP)),
        dataset=planted_dataset(seed=1), progress=False, extras=_with_report,
    )
    return {"A": a.path, "B": b.path, "C": c.path, "root": root}


def _per_request(run: Path, variant: str, col: str) -> pl.DataFrame:
    return (pl.read_parquet(run / "requests.parquet").filter(pl.col("variant") == variant)
            .select("request_id", pl.col(col).cast(pl.Float64)))


def test_same_traffic_gives_paired_deltas_with_intervals(runs):
    c = compare_runs(read_runs([runs["A"], runs["B"]]), n_boot=300)
    labels = [e.label for e in c.entries]
    assert labels == ["A/mf", "A/pop", "B/pop"]
    assert all(c.paired.values())
    # the delta is B/pop minus A/mf per request, joined on request_id: recompute it by hand
    a = _per_request(runs["A"], "mf", "ndcg@10")
    b = _per_request(runs["B"], "pop", "ndcg@10")
    j = a.join(b, on="request_id", suffix="_b")
    assert j.height == a.height == b.height > 100
    expected = float((j["ndcg@10_b"] - j["ndcg@10"]).mean())
    delta, lo, hi = c.deltas[("B/pop", "ndcg@10")]
    assert delta == pytest.approx(expected, abs=1e-12)
    # popularity is a far worse ESR than the trained MF on this data: clearly negative
    assert lo <= delta <= hi and lo < hi
    assert hi < 0
    recall_delta = c.deltas[("B/pop", "recall@esr")]
    assert recall_delta[2] < 0
    # the same stage on the same traffic in another run gives the same paired numbers...
    assert c.deltas[("A/pop", "ndcg@10")] == pytest.approx(c.deltas[("B/pop", "ndcg@10")])
    # ...which are the run's own comparison (mf - pop) with the sign flipped
    own = json.loads((runs["A"] / "metrics.json").read_text())["comparisons"]["mf"]["ndcg@10"]
    assert c.deltas[("A/pop", "ndcg@10")][0] == pytest.approx(-own["delta"])
    # latency is compared unpaired: values, no interval
    assert ("B/pop", "p99_ms@funnel") not in c.deltas
    assert c.values[("B/pop", "p99_ms@funnel")] > 0


def test_different_traffic_is_refused_for_paired_stats(runs):
    c = compare_runs(read_runs([runs["A"], runs["C"]]), n_boot=200)
    assert c.paired["A/pop"] and not c.paired["C/pop"]
    assert not [k for k in c.deltas if k[0] == "C/pop"]
    note = next(n for n in c.notes if str(runs["C"]) in n)
    assert "did not replay the same traffic" in note and "data fingerprint" in note
    # the unpaired summaries are still there
    assert c.values[("C/pop", "ndcg@10")] == pytest.approx(
        json.loads((runs["C"] / "metrics.json").read_text())["variants"]["pop"]["final"]["ndcg@10"])
    res = CliRunner().invoke(app, ["compare", str(runs["A"]), str(runs["C"]), "-f", "markdown"])
    assert res.exit_code == 0, res.output
    assert "did not replay the same traffic" in res.output


def _png_ok(p: Path) -> None:
    assert p.is_file(), p
    data = p.read_bytes()
    assert data[:8] == PNG and len(data) > 1024, p


def test_every_run_folder_has_report_and_figures(runs):
    run = runs["A"]
    text = (run / "report.md").read_text()
    for word in ("retrieval", "esr", "lsr", "`cooc`", "`mf`", "`pop`", MF, POP,
                 "## Funnel", "## Latency per stage", "## Final metrics",
                 "## Comparison against the baseline", "## References", "## Configuration"):
        assert word in text, word
    for name in ("funnel", "latency"):
        assert f"](figures/{name}.png)" in text
        _png_ok(run / "figures" / f"{name}.png")
        assert (run / "figures" / f"{name}.csv").is_file()
    # the funnel figure's data is the funnel of metrics.json
    m = json.loads((run / "metrics.json").read_text())
    funnel = pl.read_csv(run / "figures" / "funnel.csv")
    for v, vm in m["variants"].items():
        got = funnel.filter(pl.col("series") == v)["recall"].to_list()
        assert got == pytest.approx([s["recall"] for s in vm["stages"]])
    # the latency figure's data: per stage and variant, quantiles of latency.parquet's batches
    lat = pl.read_parquet(run / "latency.parquet")
    stats = pl.read_csv(run / "figures" / "latency.csv")
    ms = lat.filter((pl.col("variant") == "mf") & (pl.col("stage") == "esr"))["ms"].to_numpy()
    row = stats.filter((pl.col("series") == "mf") & (pl.col("stage") == "esr")).row(0, named=True)
    assert row["p99"] == pytest.approx(np.quantile(ms, 0.99))
    assert row["n"] == len(ms)
    funnel_ms = lat.filter(pl.col("variant") == "pop").group_by("batch").agg(pl.col("ms").sum())
    row = stats.filter((pl.col("series") == "pop") & (pl.col("stage") == "funnel")).row(0, named=True)
    assert row["p50"] == pytest.approx(float(np.median(funnel_ms["ms"].to_numpy())))


def test_report_survives_a_failing_figure(runs, tmp_path, monkeypatch):
    import cascade.figures as figs

    run = tmp_path / "run"
    shutil.copytree(runs["B"], run)
    shutil.rmtree(run / "figures")
    (run / "report.md").unlink()
    metrics_before = (run / "metrics.json").read_bytes()

    def broken(*a, **k):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(figs, "latency_figure", broken)
    write_report(run)
    text = (run / "report.md").read_text()
    assert "Figure `latency` could not be drawn: RuntimeError: no fonts today" in text
    assert "](figures/funnel.png)" in text and "](figures/latency.png)" not in text
    _png_ok(run / "figures" / "funnel.png")
    assert not (run / "figures" / "latency.png").exists()
    assert (run / "metrics.json").read_bytes() == metrics_before
    assert not [p for p in run.rglob("*.tmp")]


def test_comparison_folder_has_figures_and_data(runs, tmp_path):
    c = compare_runs(read_runs([runs["A"], runs["B"], runs["C"]]), n_boot=200)
    written = write_comparison(c, tmp_path / "cmp")
    names = {p.relative_to(tmp_path / "cmp").as_posix() for p in written}
    assert {"comparison.md", "comparison.json", "figures/funnel.png", "figures/funnel.csv",
            "figures/latency.png", "figures/latency.csv", "figures/quality_latency.png",
            "figures/quality_latency.csv"} <= names
    for n in ("funnel", "latency", "quality_latency"):
        _png_ok(tmp_path / "cmp" / "figures" / f"{n}.png")
    ql = pl.read_csv(tmp_path / "cmp" / "figures" / "quality_latency.csv")
    assert ql["label"].to_list() == ["A/mf", "A/pop", "B/pop", "C/pop"]
    assert ql.filter(pl.col("label") == "A/mf")["quality"][0] == pytest.approx(
        c.values[("A/mf", "ndcg@10")])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fmt", ["table", "markdown", "json", "csv"])
def test_cli_compare_formats(runs, fmt, tmp_path):
    out = tmp_path / "figs"
    res = CliRunner().invoke(
        app, ["compare", str(runs["A"]), str(runs["B"]), "--format", fmt, "--bootstrap", "200",
              "--out", str(out)])
    assert res.exit_code == 0, res.output
    _png_ok(out / "figures" / "funnel.png")
    if fmt == "json":
        doc = json.loads(res.stdout)
        assert doc["format"] == "cascade-compare/1" and doc["reference"] == "A/mf"
        row = next(r for r in doc["rows"] if r["run"] == "B" and r["metric"] == "ndcg@10")
        assert row["paired"] and row["ci95_lo"] <= row["delta"] <= row["ci95_hi"] < 0
    elif fmt == "csv":
        import io

        frame = pl.read_csv(io.StringIO(res.stdout))
        assert {"run", "variant", "metric", "value", "delta", "ci95_lo", "ci95_hi"} <= set(
            frame.columns)
        assert frame.filter(pl.col("metric") == "hr@10").height == 3
    elif fmt == "markdown":
        assert res.stdout.startswith("| metric | A/mf (ref) | A/pop | B/pop |")
        assert "Δ -" in res.stdout
    else:
        assert "reference: A/mf" in res.stdout and "Δ" in res.stdout


def _copy(runs, tmp_path: Path, which: str = "B") -> Path:
    dst = tmp_path / f"bad-{which}"
    shutil.copytree(runs[which], dst)
    return dst


def _edit_metrics(run: Path, edit) -> None:
    m = json.loads((run / "metrics.json").read_text())
    edit(m)
    (run / "metrics.json").write_text(json.dumps(m))


def _bad_cases(runs, tmp_path):
    yield "missing", tmp_path / "nowhere", "no such run folder"
    f = tmp_path / "file.txt"
    f.write_text("x")
    yield "file", f, "not a folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    yield "empty", empty, "not a cascade run folder"
    old = _copy(runs, tmp_path, "B")
    _edit_metrics(old, lambda m: m.update(format="cascade-run/0"))
    yield "old format", old, "'cascade-run/0' is not supported"
    gone = _copy(runs, tmp_path, "A")
    (gone / "latency.parquet").unlink()
    yield "missing file", gone, "missing latency.parquet"
    cols = _copy(runs, tmp_path, "C")
    pl.read_parquet(cols / "requests.parquet").drop("rank_esr").write_parquet(
        cols / "requests.parquet")
    yield "missing column", cols, "requests.parquet lacks column(s) rank_esr"


def test_bad_inputs_give_a_message_naming_the_folder(runs, tmp_path):
    for what, path, message in list(_bad_cases(runs, tmp_path)):
        out = tmp_path / f"out-{what.replace(' ', '-')}"
        res = CliRunner().invoke(app, ["compare", str(runs["A"]), str(path), "--out", str(out)])
        assert res.exit_code == 2, (what, res.output)
        assert message in res.output and str(path) in res.output, (what, res.output)
        assert "Traceback" not in res.output
        assert not out.exists(), what
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_runs_whose_metrics_differ_in_kind_are_refused(runs, tmp_path):
    other = _copy(runs, tmp_path, "B")

    def rename(m):
        v = m["variants"]["pop"]
        v["final"]["ndcg@20"] = v["final"].pop("ndcg@10")

    _edit_metrics(other, rename)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["compare", str(runs["A"]), str(other), "--out", str(out)])
    assert res.exit_code == 2
    assert "differ in kind" in res.output and str(other) in res.output and "ndcg@10" in res.output
    assert not out.exists()
    two = _copy(runs, tmp_path, "C")
    _edit_metrics(two, lambda m: m["variants"]["pop"]["stages"].pop(1))
    with pytest.raises(ValueError, match="differ in kind.*stages"):
        compare_runs([read_run(runs["A"]), read_run(two)])


def test_cli_report_rewrites_the_report(runs, tmp_path):
    run = _copy(runs, tmp_path, "C")
    (run / "report.md").unlink()
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert "lsr (`pop`)" in (run / "report.md").read_text()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such run folder" in res.output
