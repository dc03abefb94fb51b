"""Benchmark of GESR's serving path (`cascade.stages.gesr`), and where its time goes.

1. Shared history vs naive per candidate (target: shared >= 20x faster at history 200 and 500
   candidates per request, on CPU). The shared path is what `GESRStage.score` runs: the request
   encoded once (`encode_request`) and all candidates scored in one batched call against the
   catalogue cache (`score_candidates`). The naive path (`score_naive`) re-encodes
   [history ; candidate] and re-projects every key/value for each candidate. Both are timed on
   the same requests with every MoA module on; their outputs are compared (max |diff|).
2. ESR scoring cost at funnel shapes (default: 256 requests x 450 candidates, history 50, the
   ml-100k / synthetic-small budgets): the two-tower ESR's model against GESR with each module
   alone and all together, per batch and per (request, candidate) pair, so the cost each MoA
   module adds to the funnel is visible. GESR rows run `GESRStage.score` (the serving call,
   chunked over requests). Weights are random (timing does not depend on them); histories are
   full length (the worst case). The last row runs the same full GESR through
   `torch.compile` (`GESRConfig(compile=True)`); its first call, which compiles, is timed
   apart ("first call s").

    python experiments/bench_gesr.py            # the target shapes
    python experiments/bench_gesr.py --quick    # small shapes, seconds

Prints rich tables and writes JSON (atomically) with the machine, versions and exact shapes to
experiments/results/bench_gesr.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
from rich.console import Console
from rich.table import Table

from cascade.data.synthetic import generate, preset
from cascade.data.traffic import RequestBatch
from cascade.env import capture
from cascade.stages.gesr import GESRConfig, GESRModel, GESRStage, MoAConfig
from cascade.util.fsio import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "results" / "bench_gesr.json"


def random_batch(ds, b: int, n_hist: int, gen: torch.Generator, device: torch.device) -> RequestBatch:
    """b requests with full-length random histories over `ds`'s catalogue."""
    users = torch.randint(0, ds.n_users, (b,), generator=gen)
    feats = torch.from_numpy(ds.users.categorical_matrix())[users]
    return RequestBatch(
        request_id=torch.arange(b),
        user=users,
        ts=torch.zeros(b, dtype=torch.long),
        hist_items=torch.randint(0, ds.n_items, (b, n_hist), generator=gen),
        hist_actions=torch.randint(1, 4, (b, n_hist), generator=gen),
        hist_gaps=torch.randint(1, 32, (b, n_hist), generator=gen),
        hist_len=torch.full((b,), n_hist, dtype=torch.long),
        user_feats=feats,
        targets=torch.zeros(b, 1, dtype=torch.long),
    ).to(device)


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(ds, moa: MoAConfig, device: torch.device, n_hist: int) -> GESRModel:
    torch.manual_seed(0)
    model = GESRModel.from_dataset(ds, GESRConfig(moa=moa)).to(device)
    with torch.no_grad():  # fresh MLPG logit layers start at zero: make every path count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.cache_items()
    return model


@torch.inference_mode()
def shared_vs_naive(ds, args, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    b, n_hist, n_cand = args.naive_batch, args.naive_history, args.naive_candidates
    model = build(ds, MoAConfig(history_len=n_hist), device, n_hist)
    batch = random_batch(ds, b, n_hist, gen, device)
    cand = torch.randint(0, ds.n_items, (b, n_cand), generator=gen).to(device)
    shared = timeit(lambda: model.score(batch, cand), args.repeats)
    naive = timeit(lambda: model.score_naive(batch, cand), max(1, args.repeats // 3), warmup=0)
    diff = float((model.score(batch, cand) - model.score_naive(batch, cand)).abs().max())
    return {
        "requests": b, "history": n_hist, "candidates_per_request": n_cand,
        "shared_ms": shared * 1e3, "naive_ms": naive * 1e3, "speedup": naive / shared,
        "max_abs_diff": diff,
    }


def twotower_model(ds, device):
    from cascade.stages.twotower import TwoTowerConfig, TwoTowerModel

    torch.manual_seed(0)
    model = TwoTowerModel(SimpleNamespace(dataset=ds), TwoTowerConfig()).to(device).eval()
    vecs = model.all_items()
    return lambda batch, cand: model.combine(model.user(batch), vecs[cand])


@torch.inference_mode()
def funnel_costs(ds, args, device) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    b, n_hist, n_cand = args.batch, args.history, args.candidates
    batch = random_batch(ds, b, n_hist, gen, device)
    cand = torch.randint(0, ds.n_items, (b, n_cand), generator=gen).to(device)
    off = MoAConfig.two_tower(history_len=n_hist)
    rows = [("twotower ESR", None), ("gesr: towers only", off),
            ("gesr: +HMA only", MoAConfig.two_tower(history_len=n_hist, hma=True, mlpg=True)),
            ("gesr: +self-attn only", MoAConfig.two_tower(history_len=n_hist, self_attn=True, mlpg=True)),
            ("gesr: +NRO only", MoAConfig.two_tower(history_len=n_hist, cross_attn=("nro",), mlpg=True)),
            ("gesr: +RO only", MoAConfig.two_tower(history_len=n_hist, cross_attn=("ro",), mlpg=True)),
            ("gesr: full, no MLPG", MoAConfig(history_len=n_hist, mlpg=False)),
            ("gesr: full", MoAConfig(history_len=n_hist))]
    if not args.no_compile:
        rows.append(("gesr: full, compiled", MoAConfig(history_len=n_hist)))
    out = []
    for label, moa in rows:
        first = None
        if moa is None:
            fn = twotower_model(ds, device)
            score = lambda fn=fn: fn(batch, cand)  # noqa: E731
        else:  # the stage's serving call: chunked over requests, catalogue cache built
            stage = GESRStage(GESRConfig(moa=moa, compile=label.endswith("compiled")))
            stage.model_ = build(ds, moa, device, n_hist)
            score = lambda stage=stage: stage.score(batch, cand)  # noqa: E731
            if stage.config.compile:  # the first call compiles: time it apart
                t0 = time.perf_counter()
                score()
                first = time.perf_counter() - t0
        sec = timeit(score, args.repeats)
        out.append({"variant": label, "batch_ms": sec * 1e3, "us_per_pair": sec * 1e6 / (b * n_cand),
                    "requests": b, "candidates_per_request": n_cand, "history": n_hist,
                    "first_call_s": first})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds), to check the script")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    full = dict(naive_batch=4, naive_history=200, naive_candidates=500,
                batch=256, history=50, candidates=450, repeats=5)
    quick = dict(naive_batch=2, naive_history=200, naive_candidates=60,
                 batch=32, history=50, candidates=100, repeats=2)
    for k, v in (quick if args.quick else full).items():
        setattr(args, k, v)
    ds = generate(preset("tiny" if args.quick else "small"))
    console = Console()

    naive = shared_vs_naive(ds, args, device)
    t = Table(title="GESR: shared history vs naive per-candidate scoring (all modules on)")
    for col in ("requests", "history", "cand/req", "shared ms", "naive ms", "speedup", "max |diff|"):
        t.add_column(col, justify="right")
    t.add_row(str(naive["requests"]), str(naive["history"]), str(naive["candidates_per_request"]),
              f"{naive['shared_ms']:.1f}", f"{naive['naive_ms']:.1f}", f"{naive['speedup']:.1f}x",
              f"{naive['max_abs_diff']:.1e}")
    console.print(t)

    costs = funnel_costs(ds, args, device)
    base = costs[0]["batch_ms"]
    t = Table(title=f"ESR scoring cost: {args.batch} requests x {args.candidates} candidates, "
                    f"history {args.history} ({ds.n_items:,} items)")
    for col in ("variant", "ms / batch", "us / pair", "x two-tower", "first call s"):
        t.add_column(col, justify="right" if col != "variant" else "left")
    for r in costs:
        first = "" if r["first_call_s"] is None else f"{r['first_call_s']:.1f}"
        t.add_row(r["variant"], f"{r['batch_ms']:.1f}", f"{r['us_per_pair']:.3f}",
                  f"{r['batch_ms'] / base:.1f}", first)
    console.print(t)

    record = {
        "benchmark": "bench_gesr",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "catalogue_items": ds.n_items,
        "config": json.loads(json.dumps(GESRConfig(), default=lambda o: o.__dict__)),
        "shared_vs_naive": naive,
        "esr_cost": costs,
        "env": capture(sys.argv),
    }
    atomic_write_bytes(args.out, json.dumps(record, indent=2).encode())
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
