"""Quality benchmark: every stage alone over the full catalogue and the whole funnel, on
MovieLens 100k (dense) and the Amazon Toys file (sparse), beside `sasrec` and most-popular.

For each data set it runs what `cascade run --data X --esr gesr --esr-baseline twotower` runs,
with the same defaults (leave-one-out, full catalogue, seen items excluded as the run decides),
training every stage from scratch in a fresh checkpoint cache, and reports:
- each stage alone scoring every catalogue item (retrieval, the two-tower ESR, GESR, the LSR,
  `sasrec`, most-popular): HR@10, NDCG@10, MRR over the test requests, and recall at the
  default retrieval budget;
- the funnel's final HR@10 / NDCG@10 with each ESR, and the paired GESR - two-tower intervals
  for ESR recall and final NDCG@10;
- wall times: each stage's fit, the run (training, replay, reference) end to end.

    python experiments/bench_quality.py                      # both data sets
    python experiments/bench_quality.py --data ml-100k       # one
    python experiments/bench_quality.py --requests 2000      # stage-alone rows on a sample

Writes experiments/results/bench_quality.{json,md} atomically, with the commit, machine and
versions. The data sets are read from ../shared/datasets (never copied into the repository).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
DATA = {
    "ml-100k": SHARED / "ml-100k",
    "toys": SHARED / "amazon-toys" / "Toys_and_Games.txt",
}
RESULTS = ROOT / "experiments" / "results"


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def stage_alone(stage, prepared, rows: np.ndarray, retrieval_k: int) -> dict:
    """Full-catalogue HR@10 / NDCG@10 / MRR of one stage on the test requests `rows`, and its
    recall@retrieval_k (the target among the stage's top retrieval_k)."""
    from cascade.data.traffic import Traffic
    from cascade.measure import _score_all_fn
    from cascade.metrics import final_values
    from cascade.replay import full_catalogue_ranks
    from cascade.util.ranking import mean

    ds, split, ctx, test = prepared
    sub = Traffic(ds, split.test[np.flatnonzero(rows)], max_len=test.max_len)
    t0 = time.perf_counter()
    ranks = full_catalogue_ranks(_score_all_fn(stage, ds.n_items, ctx.device), sub,
                                 exclude_seen=ctx.exclude_seen, device=ctx.device)
    valid = sub.targets >= 0
    out = {k: mean(v) for k, v in final_values(np.where(ranks < 10, ranks, -1), valid, 10).items()}
    out[f"recall@{retrieval_k}"] = mean(((ranks >= 0) & (ranks < retrieval_k))[:, 0].astype(float))
    out["score_seconds"] = time.perf_counter() - t0
    return out


def bench(name: str, path: Path, args) -> dict:
    from cascade.config import RunConfig, StageSpec
    from cascade.experiment import run_experiment
    from cascade.replay import evenly_spaced_rows
    from cascade.session import fit_stage, fit_funnel
    from cascade.config import build_stage

    cache = Path(tempfile.mkdtemp(prefix=f"bench-quality-{name}-"))
    cfg = RunConfig(data=str(path), esr=StageSpec(stage="gesr"),
                    esr_baseline=StageSpec(stage="twotower"), cache_dir=str(cache), seed=args.seed)
    say = print if args.verbose else (lambda _m: None)
    t0 = time.perf_counter()
    run = run_experiment(cfg, progress=args.verbose, write=False, log=say)
    run_seconds = time.perf_counter() - t0
    m = run.metrics
    print(f"{name}: run in {run_seconds:.0f} s (fit {m['seconds']['fit']:.0f} s, replay "
          f"{m['seconds']['replay']:.0f} s, reference {m['seconds']['reference']:.0f} s)",
          flush=True)

    # the same fitted stages, loaded from the cache the run just filled
    funnel = fit_funnel(cfg, progress=False)
    prepared = funnel.prepared
    rows = evenly_spaced_rows(len(prepared.test), args.requests)
    sas = build_stage("lsr", StageSpec(stage="sasrec"))
    sas_fit = fit_stage(sas, "lsr", prepared.ctx, say)
    from cascade.stages.popular import PopularRanker

    pop = PopularRanker()
    pop.fit(prepared.ctx)
    k = m["budgets"]["retrieval"]
    stages = {
        f"retrieval ({cfg.retrieval.stage})": funnel.retriever,
        "ESR two-tower": funnel.esrs["twotower"],
        "ESR gesr": funnel.esrs["gesr"],
        f"LSR ({cfg.lsr.stage})": funnel.lsr,
        "sasrec": sas,
        "most popular": pop,
    }
    alone = {label: stage_alone(stage, prepared, rows, k) for label, stage in stages.items()}
    fits = {label: f["seconds"] for label, f in m["training"].items()}
    fits["sasrec"] = sas_fit["seconds"]
    comp = (m.get("comparisons") or {}).get("gesr") or {}
    return {
        "data": m["data"],
        "budgets": m["budgets"],
        "stage_alone_requests": int(rows.sum()),
        "stage_alone": alone,
        "funnel": {v: m["variants"][v]["final"] for v in m["variants"]},
        "funnel_recall": {v: {s["name"]: s["recall"] for s in m["variants"][v]["stages"]}
                          for v in m["variants"]},
        "gesr_vs_twotower": {key: comp.get(key) for key in ("recall@esr", "ndcg@10", "hr@10")},
        "reference": m["reference"],
        "fit_seconds": fits,
        "fit_reports": {label: f["report"] for label, f in m["training"].items()},
        "run_seconds": run_seconds,
        "run_phases": m["seconds"],
    }


def to_markdown(out: dict) -> str:
    lines = [f"# Quality benchmark (commit {out['commit']}, {out['machine']['cpu']['model']}, "
             f"{out['machine']['cpu']['cores']} cores, torch threads {out['machine']['torch_threads']})", ""]
    for name, r in out["results"].items():
        k = r["budgets"]["retrieval"]
        lines += [f"## {name}: {r['data']['n_items']:,} items, {r['data']['n_requests']:,} test "
                  f"requests, budgets {r['budgets']['retrieval']} -> {r['budgets']['esr']} -> "
                  f"{r['budgets']['final']}", "",
                  f"Each stage alone, every catalogue item scored ({r['stage_alone_requests']:,} "
                  "test requests):", "",
                  f"| stage | HR@10 | NDCG@10 | MRR | recall@{k} | fit s |", "|---|---:|---:|---:|---:|---:|"]
        fit_of = {"ESR two-tower": "esr:twotower", "ESR gesr": "esr:gesr", "sasrec": "sasrec"}
        for label, v in r["stage_alone"].items():
            key = fit_of.get(label) or ("retrieval" if label.startswith("retrieval") else
                                        "lsr" if label.startswith("LSR") else None)
            fit = r["fit_seconds"].get(key) if key else None
            lines.append(f"| {label} | {v['hr@10']:.4f} | {v['ndcg@10']:.4f} | {v['mrr']:.4f} | "
                         f"{v[f'recall@{k}']:.4f} | {'-' if fit is None else f'{fit:.0f}'} |")
        lines += ["", "The funnel (final list):", "", "| ESR | HR@10 | NDCG@10 | recall after retrieval | after ESR |",
                  "|---|---:|---:|---:|---:|"]
        for v, f in r["funnel"].items():
            rec = r["funnel_recall"][v]
            lines.append(f"| {v} | {f['hr@10']:.4f} | {f['ndcg@10']:.4f} | {rec['retrieval']:.4f} | {rec['esr']:.4f} |")
        g = r["gesr_vs_twotower"]
        if g.get("ndcg@10"):
            lines += ["", "GESR - two-tower, paired 95% CI: " + "; ".join(
                f"{key} {c['delta']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
                for key, c in g.items() if c)]
        lines += ["", f"Run end to end (training every stage, replay, reference): "
                  f"{r['run_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=sorted(DATA), action="append")
    ap.add_argument("--requests", type=int, default=0, help="stage-alone rows on N evenly spaced test requests (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_quality.json")
    args = ap.parse_args()
    from cascade.env import capture
    from cascade.util.fsio import atomic_write_bytes
    from cascade.util.serialize import dumps_json

    names = args.data or ["ml-100k", "toys"]
    for n in names:
        if not DATA[n].exists():
            sys.exit(f"bench_quality: {DATA[n]} not found (the data sets live in ../shared/datasets)")
    t0 = time.perf_counter()
    results = {n: bench(n, DATA[n], args) for n in names}
    out = {"commit": _commit(), "machine": capture(), "seed": args.seed,
           "results": results, "seconds": time.perf_counter() - t0}
    atomic_write_bytes(args.out, dumps_json(out).encode())
    md = to_markdown(out)
    atomic_write_bytes(args.out.with_suffix(".md"), md.encode())
    print(md)


if __name__ == "__main__":
    main()
