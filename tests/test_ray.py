"""Replay on Ray (`cascade.backends`) against in-process replay, with a real local Ray.

The same seed must give the same per-request ranks, metrics and paired intervals on either
backend, for `cascade run` and `cascade sweep`; a worker killed while its shard is in flight is
restarted and the shard replayed without double counting; a shard that cannot finish fails the
run naming it; an unreachable Ray address fails before any training, naming the address.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")

import polars as pl  # noqa: E402
from polars.testing import assert_frame_equal  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import cascade.experiment  # noqa: E402
from cascade.backends import InProcessBackend, make_backend  # noqa: E402
from cascade.backends.ray_backend import RayBackend  # noqa: E402
from cascade.backends.shards import shard_bounds  # noqa: E402
from cascade.backends.worker import load_funnel, worker_config  # noqa: E402
from cascade.cli import app  # noqa: E402
from cascade.config import RunConfig  # noqa: E402
from cascade.experiment import run_experiment  # noqa: E402
from cascade.replay import evenly_spaced_rows  # noqa: E402
from cascade.session import fit_funnel  # noqa: E402
from cascade.stages.base import StageError  # noqa: E402
from cascade.sweep import run_sweep  # noqa: E402

BATCH = 16  # 200 test requests: 13 batches, so several shards per worker


def brief(stage: str) -> dict:
    """A learned stage trained for a few steps: it goes through the checkpoint cache."""
    train = {"epochs": 1, "max_steps_per_epoch": 5}
    return {"stage": stage, "config": {"train": train, **({"pretrain": train} if stage == "lsr" else {})}}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> RunConfig:
    return RunConfig.from_dict({
        "data": "synthetic:tiny", "max_len": 20, "device": "cpu", "seed": 3,
        "batch_size": BATCH, "oracle_requests": 60, "reference_requests": 60, "bootstrap": 200,
        "cache_dir": str(tmp_path_factory.mktemp("cache")),
        # learned retrieval, ESR and LSR (FAISS, checkpoints), with a baseline for paired CIs
        "retrieval": brief("twotower"), "esr": brief("twotower"), "esr_baseline": "popular",
        "lsr": brief("lsr"),
    })


@pytest.fixture(scope="module")
def runs(cfg, tmp_path_factory):
    """The same run on Ray (first: its driver trains, its workers must load from the cache)
    and in process."""
    tmp = tmp_path_factory.mktemp("runs")
    on_ray = run_experiment(cfg.replace(backend="ray", workers=2, out=str(tmp / "ray")),
                            progress=False)
    here = run_experiment(cfg.replace(out=str(tmp / "here")), progress=False)
    return here, on_ray


def _scrub(x):
    """metrics.json without what may differ between backends: latency, throughput, seconds,
    timestamps, training records (trained once, loaded once) and the execution record."""
    drop = ("latency", "throughput", "seconds", "created", "training", "execution")
    if isinstance(x, dict):
        return {k: _scrub(v) for k, v in x.items() if not any(d in k for d in drop)}
    if isinstance(x, list):
        return [_scrub(v) for v in x]
    return x


def test_shards_are_whole_batches_in_traffic_order():
    b = shard_bounds(200, 16, 5)
    assert b[0][0] == 0 and b[-1][1] == 200 and len(b) == 5
    assert all(a % 16 == 0 and (c % 16 == 0 or c == 200) for a, c in b)
    assert all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
    assert shard_bounds(20, 16, 8) == [(0, 16), (16, 20)]  # never more shards than batches


def test_run_on_ray_gives_the_in_process_ranks_metrics_and_intervals(runs):
    here, on_ray = runs
    assert not on_ray.fits["lsr"]["cached"]  # the Ray run's driver trained ...
    assert here.fits["lsr"]["cached"]  # ... and filled the cache the workers loaded from
    assert_frame_equal(on_ray.requests, here.requests, check_exact=True)
    assert on_ray.requests.height == 2 * 200  # two variants, every request once
    assert _scrub(on_ray.metrics) == _scrub(here.metrics)
    comp = on_ray.metrics["comparisons"]["twotower"]["ndcg@10"]
    assert comp == here.metrics["comparisons"]["twotower"]["ndcg@10"]
    assert comp["ci95"][0] is not None and comp["ci95"][0] < comp["ci95"][1]
    # the latency table has one row per (variant, stage, batch) on both: nothing twice
    assert on_ray.latency.select("variant", "stage", "batch").sort(pl.all()).equals(
        here.latency.select("variant", "stage", "batch").sort(pl.all()))


def test_the_reference_is_scored_by_the_workers_with_the_in_process_ranks(cfg, runs):
    """The full-catalogue reference runs on the workers (the driver's LSR is never asked), in
    shards, and gives the in-process ranks."""
    import numpy as np

    here, on_ray = runs
    assert on_ray.metrics["reference"] == here.metrics["reference"]
    funnel = fit_funnel(cfg, progress=False)
    test = funnel.prepared.test
    want = InProcessBackend().reference_ranks(funnel, test, batch_size=BATCH, progress=False)
    calls = []
    original = funnel.lsr.score_all
    funnel.lsr.score_all = lambda *a, **k: calls.append(1) or original(*a, **k)
    with RayBackend(workers=2) as backend:
        got = backend.reference_ranks(funnel, test, batch_size=BATCH, progress=False)
        assert backend.describe()["workers"] == 2
    assert calls == []  # not one batch scored by the driver
    np.testing.assert_array_equal(got, want)
    assert got.shape == (len(test), test.targets.shape[1]) and (got[:, 0] >= 0).any()


def test_run_records_workers_nodes_and_per_worker_latency(runs):
    here, on_ray = runs
    ex = on_ray.metrics["execution"]
    assert ex["backend"] == "ray" and ex["workers"] == 2 and ex["threads_per_worker"] == 1
    assert sum(n["workers"] for n in ex["nodes"]) == 2 and ex["nodes"][0]["hostname"]
    assert here.metrics["execution"]["backend"] == "inprocess"
    env = json.loads((on_ray.path / "env.json").read_text())
    assert env["execution"] == ex and env["versions"]["ray"] == ray.__version__
    report = (on_ray.path / "report.md").read_text() if (on_ray.path / "report.md").exists() \
        else None
    if report is None:  # run_experiment alone writes no report; cascade report does
        from cascade.report import write_report

        report = write_report(on_ray.path).read_text()
    assert "2 Ray workers" in report and "per worker" in report


def test_sweep_on_ray_gives_the_in_process_points(cfg, runs):
    kw = dict(retrieval_ks=[50, 75], esr_ks=[20], progress=False)
    here = run_sweep(cfg, **kw)
    on_ray = run_sweep(cfg.replace(backend="ray", workers=2), **kw)
    timing = ("p50_ms", "p99_ms", "throughput_rps", "frontier", "chosen")
    assert on_ray.points.height == here.points.height == 2 * 2  # ESRs x budget points
    assert_frame_equal(on_ray.points.drop(timing), here.points.drop(timing), check_exact=True)
    assert on_ray.meta["execution"]["workers"] == 2


class Killer:
    """on_dispatch: SIGKILL the worker a shard was just sent to, while `armed`, once each."""

    def __init__(self) -> None:
        self.armed, self.killed = False, []

    def __call__(self, pid: int, task) -> None:
        if self.armed:
            self.armed = False
            self.killed.append(task.shard)
            os.kill(pid, signal.SIGKILL)


def test_a_killed_worker_is_restarted_and_its_shard_replayed_once(cfg, runs):
    """One worker with one restart: killed while its first shard is in flight, it is
    restarted and the shard replayed, counted once; killed again, its restart is spent and the
    run fails naming the shard."""
    here = runs[0]  # the in-process run: the same replay settings
    funnel = fit_funnel(cfg, progress=False)
    test = funnel.prepared.test
    kw = dict(batch_size=BATCH, oracle=True, oracle_rows=evenly_spaced_rows(len(test), 60),
              progress=False)
    kill = Killer()
    with RayBackend(workers=1, max_restarts=1, on_dispatch=kill) as backend:
        backend.start_workers(funnel)
        kill.armed = True
        got = backend.replay(funnel, test, **kw)
        assert kill.killed == [0] and backend.describe()["worker_restarts"] == 1
        assert_frame_equal(got.requests_frame(),
                           here.requests.drop("hist_bucket", "pop_bucket"), check_exact=True)
        assert got.latency.height == here.latency.height  # the killed shard counted once
        assert got.latency["batch"].to_list() == here.latency["batch"].to_list()

        kill.armed = True
        with pytest.raises(StageError, match=r"replay shard 0 \(requests 0\.\.\d+\) could "
                                             r"not finish: Ray worker 0 died"):
            backend.replay(funnel, test, **kw)


def test_a_worker_never_trains(cfg, runs, tmp_path):
    funnel = fit_funnel(cfg, progress=False)
    missing = {"lsr": str(tmp_path / "lsr-gone")}
    with pytest.raises(StageError, match="lsr-gone.*is not there, and a worker never trains"):
        load_funnel(worker_config(funnel), funnel.prepared.dataset, missing)


def test_an_unreachable_ray_address_fails_before_training(cfg, monkeypatch, tmp_path):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(cascade.experiment, "fit_funnel", no_training)
    bad = cfg.replace(backend="ray", ray_address="ray://127.0.0.1:1", out=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"Ray address 'ray://127\.0\.0\.1:1': cannot reach"):
        run_experiment(bad, progress=False)
    assert not (tmp_path / "r").exists()
    res = CliRunner().invoke(app, ["run", "--data", "synthetic:tiny", "--backend", "ray",
                                   "--ray-address", "127.0.0.1:1", "--no-progress",
                                   "--out", str(tmp_path / "cli")])
    assert res.exit_code == 2 and "Ray address '127.0.0.1:1'" in res.output
    assert not (tmp_path / "cli").exists()


def test_backend_settings_are_checked_with_the_config():
    with pytest.raises(ValueError, match="backend must be one of inprocess, ray"):
        RunConfig(backend="spark")
    with pytest.raises(ValueError, match="workers needs backend = 'ray'"):
        RunConfig(workers=2)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        RunConfig(backend="ray", workers=0)
    assert isinstance(make_backend(RunConfig()), InProcessBackend)
    assert RunConfig.from_dict({"backend": "ray", "workers": 3}).workers == 3
