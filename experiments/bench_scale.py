"""Benchmark of replay on Ray (`cascade.backends`): throughput in process against Ray with 1 and
2 local workers (more with --workers), in one run so the ratios share the machine's state.

The funnel (retrieval two-tower, ESR GESR vs two-tower, LSR; each trained briefly: this measures
replay, not quality) is fitted once, through the checkpoint cache. Each backend then replays the
test traffic as `cascade run` does (batches of 256, the oracle pass on 500 evenly spaced
requests): one untimed pass (worker start-up, warm-up batches), then `--repeats` timed passes
without warm-up batches, each Ray pass right after an in-process pass so that both see the same
load on a shared machine. Throughput is test requests over the driver's wall time of a pass
(Ray: shipping shards, replaying them in the workers, merging); the ratio to in-process is the
median of the paired ratios. Worker start-up (a process per worker importing torch and loading
every stage from the cache) is reported apart. Every Ray pass is checked to give the in-process
per-request ranks. With one worker, Ray's own share of a pass is also reported: the driver's wall
time beyond the worker's replay loops (shipping shards, rebuilding their traffic, returning and
merging results), less at the mercy of other jobs on a shared machine than the paired ratio.

Target: Ray with one worker costs at most 15% of the in-process throughput
(overhead = 1 - Ray / in-process).

    python experiments/bench_scale.py                          # synthetic:small, workers 1 and 2
    python experiments/bench_scale.py --data /path/to/ml-100k --workers 1,2,4

Prints a rich table and writes JSON (atomically) with the machine, versions and exact sizes to
experiments/results/bench_scale.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "bench_scale.json"
TARGET_OVERHEAD = 0.15


def brief(stage: str, steps: int) -> dict:
    loop = {"epochs": 1, "max_steps_per_epoch": steps}
    return {"stage": stage, "config": {"train": loop, **({"pretrain": loop} if stage in ("gesr", "lsr") else {})}}


def one_pass(backend, funnel, test, kw: dict):
    """(wall seconds, result) of one pass without warm-up batches."""
    t0 = time.perf_counter()
    rep = backend.replay(funnel, test, warmup=0, **kw)
    return time.perf_counter() - t0, rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="synthetic:small", help="dataset (default synthetic:small)")
    ap.add_argument("--workers", default="1,2", help="Ray worker counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed Ray passes per worker count, each paired with an in-process one")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30, help="training steps per stage (1 epoch)")
    ap.add_argument("--cache-dir", default=None, help="checkpoint cache (default the usual one)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import ray
    import torch
    from polars.testing import assert_frame_equal

    from cascade.backends import InProcessBackend
    from cascade.backends.ray_backend import RayBackend
    from cascade.config import RunConfig
    from cascade.env import capture
    from cascade.replay import evenly_spaced_rows
    from cascade.session import fit_funnel
    from cascade.util.fsio import atomic_write_bytes

    console = Console()
    cfg = RunConfig.from_dict({
        "data": args.data, "device": "cpu", "batch_size": args.batch_size,
        "retrieval": brief("twotower", args.steps), "esr": brief("gesr", args.steps),
        "esr_baseline": brief("twotower", args.steps), "lsr": brief("lsr", args.steps),
        **({"cache_dir": args.cache_dir} if args.cache_dir else {}),
    })
    t0 = time.perf_counter()
    funnel = fit_funnel(cfg, progress=False, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    fit_s = time.perf_counter() - t0
    test = funnel.prepared.test
    kw = dict(batch_size=args.batch_size, oracle=True,
              oracle_rows=evenly_spaced_rows(len(test), cfg.oracle_requests), progress=False)

    here = InProcessBackend()
    want_frame = here.replay(funnel, test, warmup=1, **kw).requests_frame()  # untimed
    here_s: list[float] = []
    rows = []
    ray_init_s = None
    for n in [int(x) for x in args.workers.split(",") if x.strip()]:
        console.print(f"Ray, {n} worker(s), {args.repeats} passes, each after an in-process pass")
        backend = RayBackend(workers=n)
        t = time.perf_counter()
        backend.start()
        if ray_init_s is None:
            ray_init_s = time.perf_counter() - t
        try:
            t = time.perf_counter()
            backend.start_workers(funnel)
            startup = time.perf_counter() - t
            backend.replay(funnel, test, warmup=1, **kw)  # untimed
            secs, ratios, own = [], [], []
            for _ in range(args.repeats):
                h, _ = one_pass(here, funnel, test, kw)
                r, got = one_pass(backend, funnel, test, kw)
                assert_frame_equal(got.requests_frame(), want_frame, check_exact=True)
                here_s.append(h)
                secs.append(r)
                ratios.append(h / r)
                # Ray's own share: the pass beyond the workers' replay loops (one worker only:
                # with several, their loops overlap)
                lp = backend.last_pass
                own.append(1.0 - lp["worker_replay_s"] / lp["wall_s"] if n == 1 else None)
            ex = backend.describe()
        finally:
            backend.close_workers()
        rows.append({"backend": "ray", "workers": n, "startup_s": startup, "pass_s": secs,
                     "median_s": statistics.median(secs),
                     "vs_inprocess": statistics.median(ratios), "paired_ratios": ratios,
                     "ray_own_share": own, "shards": backend.last_pass["shards"],
                     "threads_per_worker": ex["threads_per_worker"], "nodes": ex["nodes"]})
    if ray.is_initialized():
        ray.shutdown()
    rows.insert(0, {"backend": "inprocess", "workers": 1, "startup_s": 0.0, "pass_s": here_s,
                    "median_s": statistics.median(here_s), "vs_inprocess": 1.0,
                    "threads": torch.get_num_threads()})

    for r in rows:
        r["throughput_rps"] = len(test) / r["median_s"]
        r["overhead"] = 1.0 - r["vs_inprocess"]
    one = next((r for r in rows if r["backend"] == "ray" and r["workers"] == 1), None)
    met = None if one is None else one["overhead"] <= TARGET_OVERHEAD

    table = Table(title=f"replay throughput, {funnel.prepared.dataset.name}: {len(test):,} "
                        f"requests, batches of {args.batch_size}, GESR + two-tower ESRs")
    for col in ("backend", "workers", "worker start-up s", "pass s (median)", "requests/s",
                "x in-process (paired)", "overhead"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in rows:
        table.add_row(r["backend"], str(r["workers"]), f"{r['startup_s']:.1f}",
                      f"{r['median_s']:.2f}", f"{r['throughput_rps']:,.0f}",
                      f"{r['vs_inprocess']:.2f}", f"{r['overhead']:+.1%}")
    console.print(table)
    if one is not None:
        console.print(f"Ray with one worker: overhead {one['overhead']:+.1%} of the in-process "
                      f"replay (target <= {TARGET_OVERHEAD:.0%}): "
                      + ("met" if met else "NOT met")
                      + "; Ray's own share of each pass (beyond the worker's replay loop): "
                      + ", ".join(f"{x:.1%}" for x in one["ray_own_share"]))

    ds = funnel.prepared.dataset
    record = {
        "benchmark": "bench_scale",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "env": capture(sys.argv),
        "data": {"name": ds.name, "n_users": ds.n_users, "n_items": ds.n_items,
                 "n_events": ds.n_events, "n_requests": len(test)},
        "budgets": funnel.budgets.as_dict(),
        "batch_size": args.batch_size,
        "oracle_requests": int(kw["oracle_rows"].sum()),
        "stages": {k: v.to_dict() for k, v in funnel.specs.items()},
        "fit_seconds": fit_s,
        "ray_init_s": ray_init_s,
        "repeats": args.repeats,
        "rows": rows,
        "target_overhead_one_worker": TARGET_OVERHEAD,
        "met": met,
        "note": "a shared 2-core machine: other jobs may have run at the same time",
    }
    atomic_write_bytes(args.out, json.dumps(record, indent=2).encode())
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
