"""Dynamic int8 serving (`quantize = "int8"`, `cascade.stages.quantize`) against float32, on
MovieLens 100k at the funnel's shapes: GESR scoring 250 candidates per request, the LSR 60,
batches of 256 test requests.

The stages are the run's defaults (two-tower retrieval, full GESR, the LSR), fitted as
`cascade run` fits them: loaded from the checkpoint cache when a run or `cascade ablation`
trained them there (else trained first, minutes). The int8 stages load the same checkpoints
(`quantize` is a serving field). Candidates: retrieval's top 250 for GESR; the float GESR's top
60 of those for the LSR (the same for both LSR variants).

Per stage: ms per batch, float32 and int8 timed alternately in one process (medians of
`--repeats` calls per batch, averaged over the batches), their ratio, and how far the int8
scores are from the float ones: max and mean |diff|, the same over the score spread (per
request, the standard deviation of the float scores over its candidates), the mean and smallest
per-request Spearman rank correlation and the overlap of the top 10 (and of GESR's top 25, the
ablation's ESR cut, and top 60); and, for both variants, the hit rate and NDCG@10 of the
request's test target among the stage's candidates (GESR: also its hit rate in the top 25 and
60, what it passes on).

    python experiments/bench_quantize.py                 # ml-100k from ../shared/datasets
    python experiments/bench_quantize.py --batches 1 --repeats 2

Run it with one thread pinned to a core (`OMP_NUM_THREADS=1 taskset -c 1 ...`: the script also
sets torch to one thread). Prints a table and writes JSON (atomically) with the machine,
versions and shapes to experiments/results/bench_quantize.json (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "datasets" / "ml-100k"
RESULTS = ROOT / "experiments" / "results" / "bench_quantize.json"


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, n) x (B, n) -> (B,) rank correlation per row."""
    ra, rb = (x.argsort(1).argsort(1).double() for x in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    ta, tb = a.topk(k, 1).indices.tolist(), b.topk(k, 1).indices.tolist()
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))


def differences(want: torch.Tensor, got: torch.Tensor, ks: tuple[int, ...]) -> dict:
    diff = (got - want).abs()
    spread = float(want.std(dim=1).mean())
    rho = spearman(want, got)
    return {
        "max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "score_spread": spread,
        "max_over_spread": float(diff.max()) / spread, "mean_over_spread": float(diff.mean()) / spread,
        "max_over_max_abs_score": float(diff.max() / want.abs().max()),
        "spearman_mean": float(rho.mean()), "spearman_min": float(rho.min()),
        **{f"top{k}_overlap": overlap(want, got, k) for k in ks},
    }


def target_metrics(scores: torch.Tensor, cand: torch.Tensor, target: torch.Tensor, ks) -> dict:
    """Hit rate at each k and NDCG@10 of the request's test target among its scored candidates
    (a miss when the target is not a candidate)."""
    order = torch.gather(cand, 1, scores.argsort(1, descending=True))
    pos = (order == target[:, None]).float().argmax(1)
    hit = (order == target[:, None]).any(1)
    out = {f"hr@{k}": float((hit & (pos < k)).float().mean()) for k in ks}
    out["ndcg@10"] = float(torch.where(hit & (pos < 10), 1 / torch.log2(pos.float() + 2), 0.0).mean())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ML100K)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=3, help="batches of test requests timed")
    ap.add_argument("--esr-candidates", type=int, default=250)
    ap.add_argument("--lsr-candidates", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per batch and variant")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not (args.data / "u.data").exists():
        sys.exit(f"bench_quantize: {args.data} is not a MovieLens 100k folder")

    from cascade.config import RunConfig, StageSpec
    from cascade.env import capture
    from cascade.session import fit_funnel
    from cascade.stages.gesr import GESRStage
    from cascade.stages.lsr import LateStageRanker
    from cascade.stages.quantize import is_quantized
    from cascade.util.fsio import atomic_write_bytes
    from cascade.util.serialize import dumps_json

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    funnel = fit_funnel(RunConfig(data=str(args.data), esr=StageSpec(stage="gesr")), progress=False)
    ctx, test = funnel.prepared.ctx, funnel.prepared.test
    esr, lsr = funnel.esrs["gesr"], funnel.lsr
    variants = {
        "gesr": (esr, GESRStage(replace(esr.config, quantize="int8")).fit(ctx), args.esr_candidates, (10, 25, 60)),
        "lsr": (lsr, LateStageRanker(replace(lsr.config, quantize="int8")).fit(ctx), args.lsr_candidates, (10,)),
    }
    fits = {"retrieval": funnel.fits["retrieval"]["cached"], "gesr": funnel.fits["esr:gesr"]["cached"],
            "lsr": funnel.fits["lsr"]["cached"]}
    for name, (_, q8, _, _) in variants.items():
        fits[f"{name} int8"] = q8.fit_report_["cached"]
    quantized = {name: [n for n, m in q8.model_.named_modules() if is_quantized(m)]
                 for name, (_, q8, _, _) in variants.items()}

    n_batches = min(args.batches, len(test) // args.batch)
    times = {name: {"float32": [], "int8": []} for name in variants}
    scores = {name: {"float32": [], "int8": []} for name in variants}
    cands, targets = {name: [] for name in variants}, []
    for i in range(n_batches):
        batch = test.batch(np.arange(i * args.batch, (i + 1) * args.batch))
        cand = funnel.retriever.retrieve(batch, args.esr_candidates).ids
        if (cand < 0).any():
            sys.exit("bench_quantize: retrieval returned fewer candidates than asked")
        inputs = {"gesr": cand}
        for name, (flt, q8, n_cand, _) in variants.items():
            if name == "lsr":  # the float GESR's top candidates, for both LSR variants
                top = scores["gesr"]["float32"][-1].topk(n_cand, dim=1).indices
                inputs["lsr"] = torch.gather(cand, 1, top)
            c = inputs[name]
            per = {"float32": [], "int8": []}
            for _ in range(args.repeats):  # alternated, so load changes hit both alike
                for label, stage in (("float32", flt), ("int8", q8)):
                    t0 = time.perf_counter()
                    stage.score(batch, c)
                    per[label].append(time.perf_counter() - t0)
            for label, stage in (("float32", flt), ("int8", q8)):  # the first call: warm-up
                times[name][label].append(statistics.median(per[label][1:] or per[label]) * 1e3)
                scores[name][label].append(stage.score(batch, c))
            cands[name].append(c)
        targets.append(batch.targets[:, 0])

    results = {}
    target = torch.cat(targets)
    for name, (_, _, n_cand, ks) in variants.items():
        want, got = torch.cat(scores[name]["float32"]), torch.cat(scores[name]["int8"])
        c = torch.cat(cands[name])
        ms = {label: float(np.mean(v)) for label, v in times[name].items()}
        results[name] = {
            "candidates_per_request": n_cand, "ms_per_batch": ms,
            "ms_per_batch_each": times[name], "speedup": ms["float32"] / ms["int8"],
            "quantized_layers": quantized[name], **differences(want, got, ks),
            "target": {label: target_metrics(s, c, target, ks)
                       for label, s in (("float32", want), ("int8", got))},
        }
        if name == "lsr":
            results[name]["serves"] = variants[name][0].fit_report_.get("serves")

    t = Table(title=f"int8 vs float32 serving, ml-100k, {n_batches} x {args.batch} requests, one thread",
              title_justify="left")
    for c in ("stage", "cands", "float32 ms", "int8 ms", "speedup", "max |diff|", "max / spread",
              "mean / spread", "Spearman mean (min)", "top-10 overlap", "target NDCG@10 f32 / int8"):
        t.add_column(c, justify="left" if c == "stage" else "right")
    for name, r in results.items():
        t.add_row(name, str(r["candidates_per_request"]), f"{r['ms_per_batch']['float32']:.1f}",
                  f"{r['ms_per_batch']['int8']:.1f}", f"{r['speedup']:.2f}x", f"{r['max_abs']:.4f}",
                  f"{r['max_over_spread']:.4f}", f"{r['mean_over_spread']:.4f}",
                  f"{r['spearman_mean']:.4f} ({r['spearman_min']:.4f})", f"{r['top10_overlap']:.3f}",
                  f"{r['target']['float32']['ndcg@10']:.4f} / {r['target']['int8']['ndcg@10']:.4f}")
    Console(width=200).print(t)
    out = {
        "benchmark": "bench_quantize",
        "machine": capture(sys.argv if argv is None else ["bench_quantize.py", *argv]),
        "data": str(args.data), "batch": args.batch, "batches": n_batches, "repeats": args.repeats,
        "history_max_len": test.max_len, "cached_checkpoints": fits, "results": results,
        "seconds": time.perf_counter() - t_start,
    }
    atomic_write_bytes(args.out, dumps_json(out).encode())
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
