"""A run killed with -9 never costs the user anything (issue 15): killed while training or while
writing its run folder, the rerun succeeds, no half-written run folder or checkpoint is left, the
previous run at --out is never lost, and no temporary files remain after the rerun. Two runs
sharing one cache folder, started at once, both succeed and agree. A damaged cached checkpoint
is reported in one line and retrained.

The runs are real `cascade run` processes on synthetic:tiny with learned retrieval and LSR on a
schedule of a few steps (a few seconds of training); `experiments/kill_runs.py` does the same at
20 random kill points."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cascade.cli import app
from cascade.records import MARKER, is_run_folder, load_run, write_run
import polars as pl

CONFIG = """\
data = "synthetic:tiny"
retrieval = {stage = "twotower", config = {dim = 16, train = {epochs = 1, max_steps_per_epoch = 5}}}
esr = "popular"
lsr = {stage = "lsr", config = {dim = 16, train = {epochs = 1, max_steps_per_epoch = 5}, pretrain = {epochs = 1, max_steps_per_epoch = 5}}}
oracle = false
reference = false
[split]
max_requests = 50
"""


def cascade_command() -> list[str]:
    """The installed console script of this interpreter (a process of its own to kill)."""
    script = Path(sysconfig.get_path("scripts")) / "cascade"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cascade.cli"]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "CASCADE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def start(cfg: Path, out: Path, cache: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [*cascade_command(), "run", "--config", str(cfg), "--out", str(out), "--cache-dir",
             str(cache), "--no-progress"],
            stdout=fh, stderr=subprocess.STDOUT, env=_env(cache), cwd=cfg.parent,
            start_new_session=True,
        )


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL `proc` as soon as `ready()` holds; False when it ended first."""
    t0 = time.monotonic()
    while proc.poll() is None:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("the run neither reached the kill point nor ended")
        time.sleep(0.005)
    return False


def temporaries(*folders: Path) -> list[Path]:
    """Temporary files or folders (`.<name>...tmp`) in `folders` and one level below."""
    found = []
    for f in folders:
        if not f.is_dir():
            continue
        for p in (*f.iterdir(), *(q for d in f.iterdir() if d.is_dir() for q in d.iterdir())):
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                found.append(p)
    return found


def checkpoints_sound(cache: Path) -> list[str]:
    """Every checkpoint folder that holds both files loads: state dict and JSON."""
    bad = []
    for d in cache.iterdir() if cache.is_dir() else ():
        if d.is_dir() and (d / "model.pt").is_file() and (d / "meta.json").is_file():
            try:
                torch.load(d / "model.pt", weights_only=True)
                json.loads((d / "meta.json").read_text())
            except Exception as e:  # noqa: BLE001 - any failure is a half-written checkpoint
                bad.append(f"{d.name}: {e!r}")
    return bad


def quality(metrics: dict) -> dict:
    """What a run measured, without its timings."""
    out = {}
    for label, v in metrics["variants"].items():
        out[label] = {
            "stages": [(s["name"], s["k"], s["recall"]) for s in v["stages"]],
            "final": v["final"],
        }
    return out


def test_killed_while_training_and_while_publishing_then_rerun(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG)
    cache, out = tmp_path / "cache", tmp_path / "runs" / "mine"
    frame = pl.DataFrame({"a": [1]})
    write_run(out, config_toml="", metrics={"name": "previous"}, requests=frame, latency=frame,
              env={})  # the earlier run the new one replaces

    # 1. killed during training: the first stage's checkpoint is written, the next one trains
    p = start(cfg, out, cache, tmp_path / "log1")
    assert kill_when(p, lambda: any(cache.glob("*/meta.json"))), (tmp_path / "log1").read_text()
    assert load_run(out).name == "previous" and is_run_folder(out)
    assert checkpoints_sound(cache) == []

    # 2. killed while the run folder is written beside --out
    p = start(cfg, out, cache, tmp_path / "log2")
    pattern = f".{out.name}.{p.pid}.*.tmp"
    assert kill_when(p, lambda: any(out.parent.glob(pattern))), (tmp_path / "log2").read_text()
    kept = load_run(out)  # the previous run, or the complete new one: never neither, never half
    assert kept.name == "previous" or (out / "requests.parquet").is_file()
    assert sorted(x.name for x in out.parent.iterdir() if not x.name.endswith(".tmp")) == ["mine"]

    # 3. the rerun succeeds, loads the checkpoint the killed runs completed, and cleans up
    res = subprocess.run(
        [*cascade_command(), "run", "--config", str(cfg), "--out", str(out), "--cache-dir",
         str(cache), "--no-progress"],
        capture_output=True, text=True, env=_env(cache), cwd=tmp_path, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    run = load_run(out)
    assert run.name != "previous" and (out / MARKER).is_file() and is_run_folder(out)
    assert run.metrics["training"]["retrieval"]["cached"] is True  # trained by the killed run
    assert temporaries(out.parent, cache) == []
    assert checkpoints_sound(cache) == []
    assert sorted(x.name for x in out.parent.iterdir()) == ["mine"]


def test_two_runs_sharing_a_cache_at_once_both_succeed_and_agree(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG)
    cache = tmp_path / "shared-cache"
    procs = [start(cfg, tmp_path / f"out{i}", cache, tmp_path / f"log{i}") for i in (1, 2)]
    for i, p in enumerate(procs, start=1):
        assert p.wait(300) == 0, (tmp_path / f"log{i}").read_text()
    a, b = (load_run(tmp_path / f"out{i}").metrics for i in (1, 2))
    assert quality(a) == quality(b)
    ra, rb = (pl.read_parquet(tmp_path / f"out{i}" / "requests.parquet") for i in (1, 2))
    assert ra.select("rank_retrieval", "rank_esr", "rank_lsr").equals(
        rb.select("rank_retrieval", "rank_esr", "rank_lsr"))
    assert temporaries(tmp_path, cache) == [] and checkpoints_sound(cache) == []


# ---- a damaged cached checkpoint is reported in one line and retrained --------------------------

def _corrupt(kind: str, folder: Path, other: Path) -> None:
    model, meta = folder / "model.pt", folder / "meta.json"
    if kind == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif kind == "random-bytes":
        model.write_bytes(os.urandom(4096))
    elif kind == "zero-bytes":
        model.write_bytes(b"")
    elif kind == "another-stage":
        model.write_bytes((other / "model.pt").read_bytes())
    elif kind == "meta-empty-object":
        meta.write_text("{}")


@pytest.fixture(scope="module")
def trained_cache(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("trained")
    (d / "run.toml").write_text(CONFIG)
    res = CliRunner().invoke(app, ["run", "--config", str(d / "run.toml"), "--cache-dir",
                                   str(d / "cache"), "--out", str(d / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    return d / "cache"


@pytest.mark.parametrize("retrieval_damage, lsr_damage", [
    ("truncated", "random-bytes"), ("zero-bytes", "meta-empty-object"), ("another-stage", None)])
def test_a_damaged_checkpoint_is_reported_and_retrained(trained_cache, tmp_path,
                                                         retrieval_damage, lsr_damage):
    cache = Path(shutil.copytree(trained_cache, tmp_path / "cache"))
    folder = {d.name.split("-")[0]: d for d in cache.iterdir() if d.is_dir()}
    retrieval, lsr = folder["retrieval"], folder["lsr"]
    _corrupt(retrieval_damage, retrieval, lsr)
    if lsr_damage:
        _corrupt(lsr_damage, lsr, retrieval)
    (tmp_path / "run.toml").write_text(CONFIG)
    res = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "run.toml"), "--cache-dir",
                                   str(cache), "--out", str(tmp_path / "b"), "--no-reference",
                                   "--no-oracle"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    damaged = [retrieval, lsr] if lsr_damage else [retrieval]
    for d in damaged:  # each damaged checkpoint is named on one line
        assert len([x for x in res.output.splitlines() if d.name in x]) == 1, res.output
    fits = load_run(tmp_path / "b").metrics["training"]
    assert fits["retrieval"]["cached"] is False  # retrained
    assert fits["lsr"]["cached"] is (lsr_damage is None)
    assert checkpoints_sound(cache) == [] and temporaries(cache) == []
