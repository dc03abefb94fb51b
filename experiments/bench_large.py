"""The 1M-item, 10M-event log end to end (issue 14), in two parts, one process tree, one machine:

1. Sparse against dense id-table gradients: every learned stage of the default funnel (two-tower
   retrieval, GESR, two-tower ESR, LSR) is trained for `--steps` steps on synthetic:large, once
   with dense gradients and AdamW over every parameter, once with sparse gradients and
   SparseAdam for the item/user id tables (`TrainConfig.sparse_embeddings`), no checkpoint cache.
   Reported per stage: seconds per training step and the optimiser's share of a step
   (zero_grad, clipping and the optimiser steps; `fit_model`'s `optimizer_s` / `train_step_s`).
2. The README's main command on the large log, as a user runs it:
   `cascade run --data synthetic:large --esr gesr --esr-baseline twotower --max-requests N`
   (training every stage from scratch in a fresh cache, replaying N test requests), timed, its
   peak memory (the largest resident set of the process, `getrusage`), and each stage's fit
   time and optimiser share from the run's metrics.json.

Targets: the run <= 30 minutes on a quiet 2-core machine, peak memory <= 8 GiB.

    python experiments/bench_large.py                       # both parts
    python experiments/bench_large.py --skip-run            # part 1 only
    python experiments/bench_large.py --skip-steps --max-requests 2000

Prints tables and writes JSON (atomically) with the machine, versions and shapes to
experiments/results/bench_large.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "bench_large.json"
TARGET_S = 30 * 60
TARGET_RSS_GIB = 8.0


def step_costs(data: str, steps: int, console: Console) -> list[dict]:
    """Part 1: per learned stage, dense vs sparse id-table gradients over `steps` steps."""
    import dataclasses

    from cascade.config import RunConfig, build_stage
    from cascade.session import prepare

    cfg = RunConfig.from_dict({"data": data, "device": "cpu", "esr": "gesr",
                               "esr_baseline": "twotower"})
    t = time.perf_counter()
    prepared = prepare(cfg, progress=False)
    console.print(f"[dim]data prepared in {time.perf_counter() - t:.0f} s[/dim]")
    rows = []
    specs = [("retrieval", cfg.retrieval), ("esr", cfg.esr), ("esr", cfg.esr_baseline),
             ("lsr", cfg.lsr)]
    for kind, spec in specs:
        for sparse in (False, True):
            stage = build_stage(kind, spec)
            conf = stage.config
            brief = {"epochs": 1, "max_steps_per_epoch": steps, "sparse_embeddings": sparse}
            changes = {"train": dataclasses.replace(conf.train, **brief)}
            if hasattr(conf, "pretrain"):  # GESR: its tower phase too
                changes["pretrain"] = dataclasses.replace(conf.pretrain, **brief)
            stage = type(stage)(dataclasses.replace(conf, **changes))
            with tempfile.TemporaryDirectory() as cache:
                ctx = dataclasses.replace(prepared.ctx, cache_dir=Path(cache), retrain=True)
                t = time.perf_counter()
                stage.fit(ctx)
                fit_s = time.perf_counter() - t
            rep = stage.fit_report_
            phases = [rep[k] for k in ("pretrain",) if isinstance(rep.get(k), dict)] + [rep]
            n = sum(min(steps, p.get("epochs_run", 1) * steps) for p in phases)
            step_s = sum(p["train_step_s"] for p in phases)
            opt_s = sum(p["optimizer_s"] for p in phases)
            rows.append({"kind": kind, "stage": stage.name, "sparse": sparse, "steps": n,
                         "ms_per_step": 1e3 * step_s / max(n, 1),
                         "optimizer_share": opt_s / step_s if step_s else None,
                         "fit_s": fit_s})
            console.print(f"[dim]{kind} {stage.name} sparse={sparse}: "
                          f"{rows[-1]['ms_per_step']:.0f} ms/step, optimiser "
                          f"{rows[-1]['optimizer_share']:.0%}[/dim]")
    return rows


def main_command(data: str, max_requests: int, console: Console) -> dict:
    """Part 2: the main command in a subprocess with a fresh cache; wall time, peak RSS, fits."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "cascade.cli", "run", "--data", data, "--esr", "gesr",
               "--esr-baseline", "twotower", "--max-requests", str(max_requests),
               "--out", str(out), "--cache-dir", str(Path(tmp) / "cache")]
        console.print("[bold]" + " ".join(cmd[2:]))
        t = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, "CASCADE_PROGRESS_SECONDS": "60"})
        wall = time.perf_counter() - t
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
        if proc.returncode != 0:
            raise SystemExit(f"the run failed with exit code {proc.returncode}")
        m = json.loads((out / "metrics.json").read_text())
    fits = []
    for label, f in m.get("training", {}).items():
        rep = f.get("report") or {}
        phases = [rep[k] for k in ("pretrain",) if isinstance(rep.get(k), dict)] + [rep]
        step_s = sum(p.get("train_step_s") or 0.0 for p in phases)
        opt_s = sum(p.get("optimizer_s") or 0.0 for p in phases)
        fits.append({"stage": label, "fit_s": f.get("seconds"), "train_step_s": step_s,
                     "optimizer_share": opt_s / step_s if step_s else None,
                     "sparse_embeddings": rep.get("sparse_embeddings")})
    final = {v: x["final"] for v, x in m["variants"].items()}
    return {"command": " ".join(cmd[2:]), "wall_s": wall, "peak_rss_gib": peak_kib / 2**20,
            "fits": fits, "final": final, "n_requests": m["data"].get("n_requests"),
            "budgets": m["budgets"], "seconds": m.get("seconds"), "met_time": wall <= TARGET_S,
            "met_memory": peak_kib / 2**20 <= TARGET_RSS_GIB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="synthetic:large")
    ap.add_argument("--steps", type=int, default=20, help="part 1: training steps per stage")
    ap.add_argument("--max-requests", type=int, default=10_000, help="part 2: test requests")
    ap.add_argument("--skip-steps", action="store_true", help="skip part 1")
    ap.add_argument("--skip-run", action="store_true", help="skip part 2")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from cascade.env import capture
    from cascade.util.fsio import atomic_write_bytes

    console = Console()
    record: dict = {"benchmark": "bench_large",
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "env": capture(sys.argv), "data": args.data}
    if args.out.exists():  # keep the part this invocation skips
        old = json.loads(args.out.read_text())
        record.update({k: old[k] for k in ("steps", "run") if k in old})
    if not args.skip_run:
        # first, so the run's time is not taken after part 1 has warmed every cache
        record["run"] = main_command(args.data, args.max_requests, console)
    if not args.skip_steps:
        record["steps"] = step_costs(args.data, args.steps, console)

    if "steps" in record:
        t = Table(title=f"{args.data}: a training step, dense vs sparse id-table gradients")
        for c in ("stage", "dense ms/step", "optimiser share", "sparse ms/step",
                  "optimiser share", "step speed-up"):
            t.add_column(c, justify="left" if c == "stage" else "right")
        by = {(r["kind"], r["stage"], r["sparse"]): r for r in record["steps"]}
        for (kind, stage, sparse), r in by.items():
            if sparse:
                continue
            s = by[(kind, stage, True)]
            t.add_row(f"{kind} {stage}", f"{r['ms_per_step']:.0f}", f"{r['optimizer_share']:.0%}",
                      f"{s['ms_per_step']:.0f}", f"{s['optimizer_share']:.0%}",
                      f"{r['ms_per_step'] / s['ms_per_step']:.1f}x")
        console.print(t)
    if "run" in record:
        r = record["run"]
        t = Table(title=f"{r['command']}: {r['wall_s'] / 60:.1f} min (target <= 30), peak "
                        f"{r['peak_rss_gib']:.1f} GiB (target <= 8)")
        for c in ("stage", "fit s", "optimiser share", "sparse"):
            t.add_column(c, justify="left" if c == "stage" else "right")
        for f in r["fits"]:
            share = f["optimizer_share"]
            t.add_row(f["stage"], f"{f['fit_s']:.0f}", "" if share is None else f"{share:.0%}",
                      str(f["sparse_embeddings"]))
        console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(record, indent=2) + "\n").encode())
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
