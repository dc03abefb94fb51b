"""`cascade run` through typer's CliRunner: a complete run folder on tiny synthetic data, flags
over TOML, and every bad input as a one-line error with exit code 2 (never a traceback)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cascade.cli import app
from cascade.records import load_run

sys.path.insert(0, str(Path(__file__).parent))  # funnel_toys, loaded as a user's plugin would be

TOYS = [
    "--retrieval", "funnel_toys:CoocRetriever",
    "--esr", "funnel_toys:MFRanker",
    "--esr-baseline", "funnel_toys:PopRanker",
    "--lsr", "funnel_toys:MFRanker",
]

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def invoke(*args: str):
    return runner.invoke(app, ["run", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    res = invoke(
        "--data", "synthetic:tiny", *TOYS, "--out", str(tmp / "run"),
        "--cache-dir", str(tmp / "cache"), "--no-progress", "--seed", "1",
    )
    return tmp, res


def test_cli_run_writes_a_complete_run_folder(cli_run):
    tmp, res = cli_run
    assert res.exit_code == 0, res.output
    out = res.output
    assert "budgets: retrieval 75 -> esr 20 -> final 10" in out  # printed before the table
    assert "recall@20 esr" in out and "final NDCG@10" in out and "Δ (95% CI)" in out
    assert "LSR, full catalogue" in out and "most popular" in out
    assert f"saved to {tmp / 'run'}" in out.replace("\n", "")
    run = load_run(tmp / "run")
    for f in ("config.toml", "metrics.json", "requests.parquet", "latency.parquet", "env.json"):
        assert (tmp / "run" / f).is_file()
    m = json.loads((tmp / "run" / "metrics.json").read_text())
    assert m["format"] == "cascade-run/2"
    assert m["budgets"] == {"retrieval": 75, "esr": 20, "final": 10}
    assert m["primary"] == "MFRanker" and m["baseline"] == "PopRanker"
    assert set(m["data"]) >= {"name", "source", "fingerprint", "split", "n_requests", "traffic_key"}
    for label in ("MFRanker", "PopRanker"):
        v = m["variants"][label]
        assert [s["name"] for s in v["stages"]] == ["retrieval", "esr", "lsr"]
        for s in v["stages"]:
            assert {"name", "k", "recall", "survival", "latency_ms", "latency_per_request_ms"} <= set(s)
            assert {"p50", "p95", "p99"} <= set(s["latency_ms"])
        assert set(v["final"]) == {"hr@10", "ndcg@10", "mrr"}
        assert v["throughput_rps"] > 0
        assert {"consistency@10", "funnel_loss", "by_history_length", "by_popularity"} <= set(v)
    for metric in ("hr@10", "ndcg@10", "mrr", "recall@esr"):
        assert set(m["comparisons"][m["primary"]][metric]) >= {"variant", "baseline", "delta", "ci95"}
    assert set(m["reference"]) >= {"lsr_full_catalogue", "most_popular"}
    assert run.config["seed"] == 1 and run.config["data"] == "synthetic:tiny"
    assert run.requests().height == 2 * m["data"]["n_requests"]


def test_cli_config_file_and_flag_overrides(cli_run):
    tmp, _ = cli_run
    cfg = tmp / "exp.toml"
    cfg.write_text(
        'name = "fromtoml"\ndata = "synthetic:tiny"\nseed = 1\noracle = false\n'
        '[retrieval]\nstage = "funnel_toys:CoocRetriever"\n'
        '[esr]\nstage = "funnel_toys:PopRanker"\n'
        '[lsr]\nstage = "funnel_toys:MFRanker"\n'
        '[budgets]\nretrieval = 60\nesr = 30\n'
    )
    res = invoke(
        "--config", str(cfg), "--esr-k", "25", "--out", str(tmp / "run2"),
        "--cache-dir", str(tmp / "cache"), "--no-progress", "--no-reference",
    )
    assert res.exit_code == 0, res.output
    m = json.loads((tmp / "run2" / "metrics.json").read_text())
    assert m["name"] == "fromtoml"
    assert m["budgets"] == {"retrieval": 60, "esr": 25, "final": 10}  # the flag won
    assert m["baseline"] is None and m["reference"] is None
    assert m["variants"]["PopRanker"]["funnel_loss"] is None  # oracle = false in the TOML
    # the LSR checkpoint of the first run (same data, seed, config) was reused
    assert m["training"]["lsr"]["cached"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (["--esr", "nosuch"], "unknown esr stage 'nosuch'; known:"),
        (["--esr", "funnel_toys:NoScore"], "missing method(s) score"),
        (["--lsr", "not_a_module_abc:X"], "cannot import module 'not_a_module_abc'"),
        (["--retrieval-k", "10", "--esr-k", "20"], "retrieval=10, esr=20"),
        (["--retrieval-k", "5000", "--esr-k", "20"], "retrieval budget 5000 exceeds the catalogue of 500"),
        (["--split", "random"], "SplitConfig.kind must be 'loo' or 'temporal'"),
        (["--device", "tpu"], "device must be one of auto, cpu, cuda"),
        (["--config", "/nonexistent/x.toml"], "cannot read"),
        (["--data", "/nonexistent/ratings.csv"], "nonexistent"),
    ],
)
def test_cli_bad_input_is_one_clean_line(tmp_path, args, message):
    base = ["--data", "synthetic:tiny", *TOYS]
    res = invoke(*base, *args, "--out", str(tmp_path / "run"), "--cache-dir",
                 str(tmp_path / "cache"), "--no-progress")
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert message in " ".join(res.output.split()), res.output
    assert res.output.strip().startswith("error:")
    # nothing was trained or written
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_cli_refuses_to_overwrite_a_folder_that_is_not_a_run(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    res = invoke("--data", "synthetic:tiny", *TOYS, "--out", str(mine), "--cache-dir",
                 str(tmp_path / "cache"), "--no-progress")
    assert res.exit_code == 2 and "refusing to overwrite" in res.output
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    assert not (tmp_path / "cache").exists()  # refused before any training


def test_cli_builtin_funnel_on_tiny_synthetic(tmp_path):
    from funnel_toys import builtin_stage_specs

    from cascade.records import dumps_toml

    stages = builtin_stage_specs(epochs=1, steps=10)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(dumps_toml({"data": "synthetic:tiny", "max_len": 20, **stages}))
    res = invoke("--config", str(cfg), "--out", str(tmp_path / "run"),
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress")
    assert res.exit_code == 0, res.output
    m = load_run(tmp_path / "run").metrics
    for label, v in m["variants"].items():
        r = [s["recall"] for s in v["stages"]]
        assert 1.0 >= r[0] >= r[1] >= r[2] >= 0.0, (label, r)
        # trained retrieval finds the planted signal: well above a random pick of the budget
        assert r[0] > 3 * m["budgets"]["retrieval"] / m["data"]["n_items"], (label, r)
