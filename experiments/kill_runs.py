"""Kill -9 a run at random points and check that nothing of the user's is ever lost (issue 15).

(a) Random points of whole runs: `cascade run` on synthetic:tiny with learned retrieval and LSR
    on a short schedule, replacing an earlier run at --out, is killed with SIGKILL at a random
    time of its life (`--points`, default 20): half uniformly over a whole run (data, training,
    checkpoints, replay), half while the run folder is written (after its temporary folder
    appears beside --out). Every other point starts from an empty checkpoint cache, so kills
    land in training too. After each kill, then after a rerun to completion:
      - --out holds a complete run, the previous one or the new one (never none, never half);
      - every checkpoint in the cache loads (state dict and JSON) or is absent;
      - the rerun succeeds, and leaves no temporary (`.*.tmp`) beside --out or in the cache.
(b) Exact points of `cascade.records.write_run`, in a child process that kills itself there: while
    the report is written into the temporary folder, just before publishing, right after the
    one-step swap (renameat2), and, with the swap disabled (file systems without it), after
    each of the two renames of the fallback; and for a default (unique) name after the name
    is claimed. The same checks, then a write_run that must succeed and clean up.

    python experiments/kill_runs.py                # 20 random points + the exact points
    python experiments/kill_runs.py --points 6     # fewer

Prints a table and writes experiments/results/kill_runs.json (machine, versions, every point:
when it was killed, what was found, the rerun's outcome).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "kill_runs.json"

CONFIG = """\
data = "synthetic:tiny"
retrieval = {stage = "twotower", config = {dim = 16, train = {epochs = 2, max_steps_per_epoch = 8}}}
esr = "popular"
lsr = {stage = "lsr", config = {dim = 16, train = {epochs = 2, max_steps_per_epoch = 8}, pretrain = {epochs = 1, max_steps_per_epoch = 8}}}
oracle_requests = 50
reference_requests = 50
[split]
max_requests = 100
"""


def cascade_command() -> list[str]:
    script = Path(sysconfig.get_path("scripts")) / "cascade"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cascade.cli"]


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, "CASCADE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def start(cfg: Path, out: Path, cache: Path, log: Path) -> subprocess.Popen:
    """The run, its progress lines in `log` (the last one says where a kill landed)."""
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [*cascade_command(), "run", "--config", str(cfg), "--out", str(out), "--cache-dir",
             str(cache)],
            stdout=fh, stderr=subprocess.STDOUT, env=env(cache), start_new_session=True)


def stage_of(log: Path) -> str:
    """Where a killed run was, from its last progress line."""
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    last = lines[-1] if lines else ""
    for prefix, where in (("saved to", "done"), ("reference", "writing the run folder"),
                          ("replayed", "reference points / writing the run folder"),
                          ("LSR over", "reference points"), ("replay", "replay"),
                          ("fitted lsr", "replay"), ("fitted esr", "training the LSR"),
                          ("fitted retrieval", "training the ESR / LSR"),
                          ("exclude_seen", "training retrieval"), ("budgets", "training retrieval"),
                          ("data ", "building the funnel")):
        if last.startswith(prefix):
            return where
    return "start-up (imports, data)" if not last else f"after {last[:50]!r}"


def temporaries(*folders: Path) -> list[str]:
    found = []
    for f in folders:
        if f.is_dir():
            for p in (*f.iterdir(), *(q for d in f.iterdir() if d.is_dir() for q in d.iterdir())):
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    found.append(str(p))
    return found


def broken_checkpoints(cache: Path) -> list[str]:
    import torch

    bad = []
    for d in cache.iterdir() if cache.is_dir() else ():
        if d.is_dir() and (d / "model.pt").is_file() and (d / "meta.json").is_file():
            try:
                torch.load(d / "model.pt", weights_only=True)
                json.loads((d / "meta.json").read_text())
            except Exception as e:  # noqa: BLE001
                bad.append(f"{d.name}: {type(e).__name__}")
    return bad


def run_state(out: Path) -> str:
    """'name' of the complete run at `out`, or what is wrong there."""
    from cascade.records import is_run_folder, load_run

    if not out.exists():
        return "MISSING"
    try:
        rec = load_run(out)
    except Exception as e:  # noqa: BLE001
        return f"BROKEN: {e}"
    if not is_run_folder(out):
        return "NOT A RUN FOLDER"
    return rec.name


def fake_run(path: Path, name: str, **kw) -> Path:
    import polars as pl

    from cascade.records import write_run

    frame = pl.DataFrame({"a": [1]})
    return write_run(path, config_toml="", metrics={"name": name}, requests=frame,
                     latency=frame, env={}, **kw)


# ---- (a) random points of whole runs ------------------------------------------------------------

def random_points(n: int, work: Path, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cfg = work / "run.toml"
    cfg.write_text(CONFIG)
    out = work / "runs" / "mine"
    fake_run(out, "previous")
    t0 = time.monotonic()
    ref = start(cfg, work / "runs" / "reference", work / "ref-cache", work / "ref.log")
    assert ref.wait(600) == 0, (work / "ref.log").read_text()
    whole = time.monotonic() - t0
    shutil.rmtree(work / "runs" / "reference")
    rows = []
    for i in range(n):
        cache = work / f"cache-{i // 2}"  # a new, empty cache every other point
        phase = "publish" if i % 2 else "anywhere"
        before = run_state(out)
        horizon, window = whole, 1.5
        for _attempt in range(4):  # a run that ended before its kill point is tried again, sooner
            p = start(cfg, out, cache, work / f"kill-{i}.log")
            t_start = time.monotonic()
            if phase == "anywhere":
                delay = rng.uniform(0.5, horizon)
                while p.poll() is None and time.monotonic() - t_start < delay:
                    time.sleep(0.01)
            else:  # the temporary run folder exists: the report is written, then the swap
                pattern = f".{out.name}.{p.pid}.*.tmp"
                while p.poll() is None and not any(out.parent.glob(pattern)):
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, window))
            killed_at = time.monotonic() - t_start
            finished = p.poll() is not None
            if not finished:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            if not finished:
                break
            horizon, window = 0.8 * killed_at, 0.5 * window
            if phase == "anywhere":
                shutil.rmtree(cache, ignore_errors=True)  # the kill lands in training again
        after_kill = run_state(out)
        bad_ckpt = broken_checkpoints(cache)
        rerun = subprocess.run(
            [*cascade_command(), "run", "--config", str(cfg), "--out", str(out), "--cache-dir",
             str(cache), "--no-progress"], capture_output=True, text=True, env=env(cache),
            timeout=600)
        row = {
            "point": i, "phase": phase, "killed_after_s": round(killed_at, 2),
            "killed_while": "ended" if finished else stage_of(work / f"kill-{i}.log"),
            "ended_before_kill": finished, "run_before": before, "run_after_kill": after_kill,
            "broken_checkpoints": bad_ckpt, "rerun_exit": rerun.returncode,
            "run_after_rerun": run_state(out),
            "temporaries_after_rerun": temporaries(out.parent, cache),
            "rerun_output": "" if rerun.returncode == 0 else (rerun.stdout + rerun.stderr)[-2000:],
        }
        row["ok"] = (not after_kill.startswith(("MISSING", "BROKEN", "NOT"))
                     and not bad_ckpt and rerun.returncode == 0
                     and not row["run_after_rerun"].startswith(("MISSING", "BROKEN", "NOT"))
                     and not row["temporaries_after_rerun"])
        rows.append(row)
        print(f"[{i + 1}/{n}] killed after {killed_at:5.2f} s, {row['killed_while']}: --out holds "
              f"{after_kill[:40]!r}; rerun exit {rerun.returncode}; "
              f"{'ok' if row['ok'] else 'FAILED'}", flush=True)
    return rows


# ---- (b) exact points of write_run -----------------------------------------------------------------

EXACT = ("writing-report", "before-publish", "after-swap", "fallback-after-first-rename",
         "fallback-after-second-rename", "unique-after-claim")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _child(point: str, out: Path) -> None:
    """Runs in a child process: write a run over `out`, killing itself at `point`."""
    import cascade.records as records

    real_rename, real_renameat2 = os.rename, records._renameat2
    renames = {"n": 0}

    def rename(a, b):
        real_rename(a, b)
        renames["n"] += 1
        if point == "fallback-after-first-rename" and renames["n"] == 1:
            _die()
        if point == "fallback-after-second-rename" and renames["n"] == 2:
            _die()

    swap = records._RENAME_EXCHANGE
    if point == "after-swap":
        records._renameat2 = lambda a, b, f: real_renameat2(a, b, f) and (f != swap or _die())
    if point.startswith("fallback"):  # a kernel or file system without renameat2
        records._renameat2 = lambda a, b, f: False
        records.os.rename = rename
    if point == "before-publish":
        records._publish = lambda tmp, path: _die()
    if point == "unique-after-claim":  # the fallback claims the name with an empty folder
        real_mkdir = Path.mkdir
        records._renameat2 = lambda a, b, f: False
        Path.mkdir = lambda self, *a, **k: (real_mkdir(self, *a, **k),
                                            self.name.startswith("mine-") and _die())
    finish = (lambda tmp: ((tmp / "report.md").write_text("half"), _die())) \
        if point == "writing-report" else None
    fake_run(out, "new", finish=finish, unique=point == "unique-after-claim")
    os._exit(0)


def exact_points(work: Path) -> list[dict]:
    rows = []
    for point in EXACT:
        d = work / f"exact-{point}"
        out = d / "mine"
        fake_run(out, "previous")
        child = subprocess.run([sys.executable, __file__, "--child", point, str(out)],
                               capture_output=True, text=True, timeout=300)
        killed = child.returncode == -signal.SIGKILL
        from cascade.records import check_target

        left = sorted(p.name for p in d.iterdir())
        check_target(out)  # what the next run does first: it puts back a run left aside
        after_kill = run_state(out)
        try:
            fake_run(out, "rerun")
            rerun = "ok"
        except Exception as e:  # noqa: BLE001
            rerun = f"{type(e).__name__}: {e}"
        row = {"point": point, "killed": killed, "folder_after_kill": left,
               "run_when_the_next_run_starts": after_kill, "rerun": rerun, "run_after_rerun": run_state(out),
               "left_after_rerun": sorted(p.name for p in d.iterdir())}
        row["ok"] = (killed and after_kill in ("previous", "new") and rerun == "ok"
                     and row["run_after_rerun"] == "rerun" and not temporaries(d))
        if point == "unique-after-claim":  # the default name: a new folder beside the old run
            row["ok"] = killed and after_kill == "previous" and rerun == "ok" and not temporaries(d)
        rows.append(row)
        print(f"[exact] {point:30s} killed={killed} folder {left}; --out holds {after_kill!r} "
              f"when the next run starts; after it "
              f"the folder holds {row['left_after_rerun']}: {'ok' if row['ok'] else 'FAILED'}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cascade-kill-"))
    t0 = time.perf_counter()
    try:
        exact = exact_points(work)
        rand = random_points(args.points, work, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok_r, ok_e = sum(r["ok"] for r in rand), sum(r["ok"] for r in exact)
    lost = sum(r["run_after_kill"].startswith(("MISSING", "BROKEN", "NOT")) for r in rand) + sum(
        r["run_when_the_next_run_starts"] not in ("previous", "new") for r in exact)
    half = sum(bool(r.get("broken_checkpoints")) for r in rand)
    left = sum(bool(r.get("temporaries_after_rerun")) for r in rand)
    summary = {
        "random_points": len(rand), "random_reruns_ok": ok_r, "exact_points": len(exact),
        "exact_ok": ok_e, "previous_run_lost": lost, "half_written_checkpoints": half,
        "temporaries_left_after_rerun": left,
        "killed_before_end": sum(not r["ended_before_kill"] for r in rand),
    }
    print(f"\nrandom points: {ok_r}/{len(rand)} reruns succeeded with every check; exact points "
          f"of write_run: {ok_e}/{len(exact)}; --out without a complete run after a kill: {lost}; "
          f"half-written checkpoints: {half}; temporaries left after a rerun: {left} "
          f"({summary['killed_before_end']} of the random kills landed before the run ended)")
    if not args.no_write:
        from importlib import metadata

        record = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 1),
            "machine": {"platform": platform.platform(), "cores": len(os.sched_getaffinity(0))},
            "versions": {"python": platform.python_version(),
                         **{p: metadata.version(p) for p in ("cascade-recsys", "torch", "polars")}},
            "config": CONFIG, "summary": summary, "random": rand, "exact": exact,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if ok_r == len(rand) and ok_e == len(exact) else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], Path(sys.argv[3]))
    sys.exit(main())
