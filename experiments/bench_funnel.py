"""Benchmark of the whole funnel (issue targets), printed as tables and saved as JSON.

1. MovieLens 100k, leave-one-out, full funnel: retrieval `twotower` -> ESR `gesr` vs `twotower`
   (same candidates) -> LSR `lsr`. Trains every stage from scratch (a fresh cache), replays the
   test requests, and reports
   - total training + replay seconds (target: under 5 minutes on 2 cores),
   - the funnel's final NDCG@10 against the LSR scoring the full catalogue (target >= 90%) and
     against most-popular,
   - per-stage latency (p50 / p95 / p99 per batch of 256 requests).
2. A synthetic catalogue of 1M items: per-stage latency of the same funnel. The stages train
   briefly (one epoch of 60 steps, GESR's tower phase too): latency does not depend on how well
   they learned. The IVF run reuses the Flat run's trained stages (the index is not part of the
   retrieval checkpoint's key).

    python experiments/bench_funnel.py            # the full benchmark
    python experiments/bench_funnel.py --quick    # a check that it runs (minutes, smaller)

Writes experiments/results/bench_funnel[-quick].json atomically, with the machine and versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML100K_SHARED = ROOT.parent / "shared" / "datasets" / "ml-100k"


def _train_override(kind: str, stage: str, train: dict) -> dict:
    """{'train': train} (and 'pretrain', GESR's tower phase, and a smaller validation sample)
    for the fields the stage's config has (built-ins have `train`)."""
    from cascade.stages.base import resolve_stage_class

    if not train:
        return {}
    cc = getattr(resolve_stage_class(kind, stage), "config_class", None)
    names = {f.name for f in dataclasses.fields(cc)} if cc and dataclasses.is_dataclass(cc) else set()
    out = {k: dict(train) for k in ("train", "pretrain") if k in names}
    if "valid_requests" in names:
        out["valid_requests"] = 500
    return out


def _config(args, *, name, data, data_options=None, split=None, train=None, **kw):
    from cascade.data.splits import SplitConfig

    from cascade.config import RunConfig, StageSpec

    train = train or {}

    def spec(kind, stage, label=None):
        return StageSpec(stage=stage, label=label, config=_train_override(kind, stage, train))

    return RunConfig(
        name=name,
        data=data,
        data_options=data_options or {},
        split=split or SplitConfig(kind="loo"),
        retrieval=spec("retrieval", args.retrieval),
        esr=spec("esr", args.esr),
        esr_baseline=spec("esr", args.esr_baseline),
        lsr=spec("lsr", args.lsr),
        device=args.device,
        seed=args.seed,
        **kw,
    )


def _stage_rows(m: dict) -> list[dict]:
    rows = []
    for label, v in m["variants"].items():
        for s in v["stages"]:
            rows.append({
                "variant": label, "stage": s["name"], "k": s["k"], "recall": s["recall"],
                **{f"{p}_ms": s["latency_ms"][p] for p in ("p50", "p95", "p99")},
                "p50_ms_per_request": s["latency_per_request_ms"]["p50"],
            })
        rows.append({
            "variant": label, "stage": "funnel", "k": m["budgets"]["final"],
            "recall": v["final"]["hr@10"],
            **{f"{p}_ms": v["funnel_latency_ms"][p] for p in ("p50", "p95", "p99")},
            "p50_ms_per_request": v["funnel_latency_per_request_ms"]["p50"],
        })
    return rows


def _print_latency(console, title: str, rows: list[dict]) -> None:
    from rich.table import Table

    def ms(x: float) -> str:
        return f"{x:.1f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"

    t = Table(title=title, title_justify="left")
    for c in ("variant", "stage", "K", "recall", "p50", "p95", "p99", "p50/req"):
        t.add_column(c, justify="left" if c in ("variant", "stage") else "right", no_wrap=True)
    for r in rows:
        t.add_row(
            r["variant"], r["stage"], str(r["k"]), f"{r['recall']:.4f}",
            *(ms(r[f"{p}_ms"]) for p in ("p50", "p95", "p99")),
            ms(r["p50_ms_per_request"]),
        )
    console.print(t)


def bench_ml100k(args, console, cache: Path, out: Path) -> dict:
    from cascade.data.splits import SplitConfig

    from cascade.commands.run import funnel_table, reference_table
    from cascade.experiment import run_experiment

    data = args.ml100k or (str(ML100K_SHARED) if (ML100K_SHARED / "u.data").exists() else "ml-100k")
    quick_train = {"epochs": 1, "max_steps_per_epoch": 20} if args.quick else None
    cfg = _config(
        args, name="bench-ml100k", data=data,
        split=SplitConfig(kind="loo", max_requests=200 if args.quick else None),
        train=quick_train, cache_dir=str(cache), retrain=True, out=str(out / "ml100k"),
        batch_size=256, reference_requests=0,  # the ratios below divide over the same requests
    )
    console.rule("ml-100k, leave-one-out, full funnel")
    t0 = time.perf_counter()
    res = run_experiment(cfg, progress=not args.no_progress, log=lambda s: console.print(f"[dim]{s}[/dim]"))
    wall = time.perf_counter() - t0
    m = res.metrics
    console.print(funnel_table(m))
    ref = reference_table(m)
    if ref is not None:
        console.print(ref)
    full = m["reference"]["lsr_full_catalogue"]["ndcg@10"]
    pop = m["reference"]["most_popular"]["ndcg@10"]
    summary = {
        "data": m["data"],
        "budgets": m["budgets"],
        "train_seconds": m["seconds"]["fit"],
        "replay_seconds": m["seconds"]["replay"],
        "train_plus_replay_seconds": m["seconds"]["fit"] + m["seconds"]["replay"],
        "reference_seconds": m["seconds"].get("reference"),
        "wall_seconds": wall,
        "training": {k: {"seconds": v["seconds"], "cached": v["cached"]} for k, v in m["training"].items()},
        "lsr_full_catalogue": m["reference"]["lsr_full_catalogue"],
        "most_popular": m["reference"]["most_popular"],
        "variants": {
            label: {
                "final": v["final"],
                "ndcg@10_vs_lsr_full": v["final"]["ndcg@10"] / full if full else None,
                "ndcg@10_vs_most_popular": v["final"]["ndcg@10"] / pop if pop else None,
                "recall": {s["name"]: s["recall"] for s in v["stages"]},
                "throughput_rps": v["throughput_rps"],
            }
            for label, v in m["variants"].items()
        },
        "comparison": m["comparison"],
        "latency": _stage_rows(m),
        "targets": {
            "train_plus_replay_under_300s": m["seconds"]["fit"] + m["seconds"]["replay"] < 300,
            "ndcg@10_at_least_90pct_of_lsr_full": {
                label: (v["final"]["ndcg@10"] >= 0.9 * full) for label, v in m["variants"].items()
            },
        },
    }
    console.print(
        f"training {summary['train_seconds']:.1f}s + replay {summary['replay_seconds']:.1f}s = "
        f"{summary['train_plus_replay_seconds']:.1f}s (target < 300 s); "
        + "; ".join(
            f"{label}: NDCG@10 {v['final']['ndcg@10']:.4f} = {v['ndcg@10_vs_lsr_full']:.1%} of the "
            f"LSR over the full catalogue ({full:.4f}), {v['ndcg@10_vs_most_popular']:.1f}x most "
            f"popular ({pop:.4f})"
            for label, v in summary["variants"].items()
        )
    )
    return summary


def bench_catalogue(args, console, cache: Path, out: Path) -> list[dict]:
    from cascade.data.splits import SplitConfig

    from cascade.experiment import run_experiment

    n_items = 50_000 if args.quick else args.items
    n_users = 2_000 if args.quick else 50_000
    n_events = 50_000 if args.quick else 2_000_000
    indexes = ["Flat"] if args.quick else args.indexes
    results = []
    for index in indexes:
        console.rule(f"synthetic catalogue of {n_items:,} items, index {index}")
        cfg = _config(
            args, name=f"bench-{n_items}-items-{index.replace(',', '-')}", data="synthetic:large",
            data_options={"n_items": n_items, "n_users": n_users, "n_events": n_events},
            split=SplitConfig(kind="loo", max_requests=256 if args.quick else 4096),
            # latency does not depend on how well the stages learned: a short schedule
            train={"epochs": 1, "max_steps_per_epoch": 20 if args.quick else 60},
            cache_dir=str(cache), out=str(out / f"catalogue-{index.replace(',', '-')}"),
            index=index, oracle=False, reference=False, batch_size=256,
        )
        t0 = time.perf_counter()
        res = run_experiment(cfg, progress=not args.no_progress, log=lambda s: console.print(f"[dim]{s}[/dim]"))
        rows = _stage_rows(res.metrics)
        _print_latency(
            console, f"per-stage latency in ms per batch of 256 ({n_items:,} items, index {index})", rows
        )
        results.append({
            "n_items": n_items, "n_users": n_users, "n_events": n_events, "index": index,
            "budgets": res.metrics["budgets"], "n_requests": res.metrics["data"]["n_requests"],
            "latency": rows, "seconds": res.metrics["seconds"], "wall_seconds": time.perf_counter() - t0,
        })
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and 1 short epoch: checks that it runs")
    p.add_argument("--ml100k", help="path to MovieLens 100k (default: the shared copy, else download)")
    p.add_argument("--items", type=int, default=1_000_000, help="catalogue size of part 2")
    p.add_argument("--indexes", nargs="+", default=["Flat", "IVF1024,Flat"], help="FAISS indexes for part 2")
    p.add_argument("--skip", choices=["ml100k", "catalogue"], action="append", default=[])
    p.add_argument("--retrieval", default="twotower")
    p.add_argument("--esr", default="gesr")
    p.add_argument("--esr-baseline", default="twotower")
    p.add_argument("--lsr", default="lsr")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = p.parse_args(argv)

    from cascade.util.fsio import atomic_write_bytes
    from rich.console import Console

    from cascade.env import capture
    from cascade.records import dumps_json

    console = Console()
    env = capture(sys.argv if argv is None else ["bench_funnel.py", *argv])
    console.print(
        f"[dim]{env['cpu']['model']}, {env['cpu']['cores']} cores, GPU {env['gpu'] and env['gpu']['name']}, "
        f"torch {env['versions']['torch']}, faiss {env['versions']['faiss']}[/dim]"
    )
    result: dict = {"benchmark": "bench_funnel", "quick": args.quick, "env": env}
    with tempfile.TemporaryDirectory(prefix="cascade-bench-") as tmp:
        cache, runs = Path(tmp) / "cache", Path(tmp) / "runs"
        if "ml100k" not in args.skip:
            result["ml100k"] = bench_ml100k(args, console, cache, runs)
        if "catalogue" not in args.skip:
            result["catalogue"] = bench_catalogue(args, console, cache, runs)
    name = "bench_funnel-quick.json" if args.quick else "bench_funnel.json"
    path = args.out / name
    atomic_write_bytes(path, dumps_json(result).encode())
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
