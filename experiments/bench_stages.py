"""Per-stage training time and quality: FAISS two-tower retrieval, two-tower ESR, GESR,
late-stage ranker and most-popular, each trained alone on one dataset (default ml-100k, leave-one-out).

For every stage it reports the training seconds and validation metric from its fit report, and
on the test requests:
- full-catalogue HR@10 / NDCG@10 / MRR (every item scored, the request's history excluded),
- sampled MRR (the target among 100 uniform random items, `stages.training.sampled_mrr`),
- hard MRR (the target among the 50 most popular other items),
- rerank HR@10 / NDCG@10: the stage re-ranks the retrieval stage's top-100 unseen items for the
  request (a miss when the target is not among them): the job a ranker does in the funnel.
  Only when the retrieval stage is benchmarked too (it runs first).

    python experiments/bench_stages.py                      # ml-100k, default configs
    python experiments/bench_stages.py --quick              # tiny synthetic data, short training
    python experiments/bench_stages.py --data synthetic:small --out /tmp/bench_stages.json
    python experiments/bench_stages.py --stages lsr --set lsr.train.epochs=8 --set lsr.dim=96

Prints a line per stage and the strongest one on full-catalogue NDCG@10 (issue: the LSR must
be), and writes JSON (atomically, default experiments/results/bench_stages.json) with the
machine, versions, dataset and configs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from cascade.config import RunConfig
from cascade.data.traffic import RequestBatch, Traffic
from cascade.session import prepare
from cascade.stages.gesr import GESRStage
from cascade.stages.lsr import LateStageRanker
from cascade.stages.popular import PopularRanker
from cascade.stages.retrieval import TwoTowerRetriever
from cascade.metrics import hit_rate, mean, ndcg, ranks_from_scores, reciprocal_rank
from cascade.replay import full_catalogue_ranks
from cascade.stages.training import sampled_mrr
from cascade.util.fsio import atomic_write_bytes
from cascade.stages.twotower import TwoTowerESR

ML100K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"


def configure(cls, overrides: dict[str, object], *, quick: bool):
    """The stage with its default config, `--set` overrides applied (and short training for
    --quick). Override keys are config fields, "train.<field>" for the training loop."""
    cfg = cls.config_class()
    phases = [p for p in ("train", "pretrain") if hasattr(cfg, p)]  # GESR has a tower phase
    if quick:
        cfg = replace(cfg, **{p: replace(getattr(cfg, p), epochs=2, max_steps_per_epoch=10) for p in phases})
    top = {k: v for k, v in overrides.items() if not k.startswith(("train.", "pretrain."))}
    for p in phases:
        loop = {k[len(p) + 1 :]: v for k, v in overrides.items() if k.startswith(p + ".")}
        if loop:
            top[p] = replace(getattr(cfg, p), **loop)
    return cls(replace(cfg, **top))


def parse_sets(items: list[str]) -> dict[str, dict[str, object]]:
    """["lsr.train.epochs=8", "lsr.rank_logq=false"] -> {"lsr": {"train.epochs": 8, ...}}"""
    out: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        stage, dot, field = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: expected STAGE.FIELD=VALUE, e.g. lsr.train.epochs=8")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(stage, {})[field] = value
    return out


@torch.no_grad()
def all_scores(stage, batch: RequestBatch, n_items: int) -> torch.Tensor:
    if hasattr(stage, "score_all"):
        return stage.score_all(batch)
    cand = torch.arange(n_items)[None, :].expand(len(batch), -1)
    return stage.score(batch, cand)


@torch.no_grad()
def evaluate(
    stage, test: Traffic, n_items: int, popularity: np.ndarray, batch_size: int,
    retrieved: list[torch.Tensor] | None,
) -> dict:
    """Full-catalogue HR@10 / NDCG@10 / MRR (seen items excluded, ties against the target: the
    funnel's own `full_catalogue_ranks` and `cascade.metrics`), hard MRR, and the re-ranking
    of retrieval's top 100 when given."""
    ranks = full_catalogue_ranks(
        lambda b: all_scores(stage, b, n_items), test, batch_size=batch_size, exclude_seen=True
    )
    valid = test.targets >= 0
    rerank_ranks = []
    hard = 0.0
    top = torch.as_tensor(np.argsort(-popularity, kind="stable")[:51])
    for i, batch in enumerate(test.batches(batch_size)):
        target = batch.targets[:, :1]
        if retrieved is not None:  # rank among retrieval's candidates, a miss when absent
            cand = retrieved[i]
            rs = stage.score(batch, cand).float().masked_fill(cand < 0, -torch.inf)
            found = (cand == target).any(1).numpy()
            col = (cand == target).float().argmax(1, keepdim=True).numpy()
            r = ranks_from_scores(rs.numpy(), col)
            rerank_ranks.append(np.where(found[:, None], r, -1))
        others = top[None, :].expand(len(batch), -1)
        keep = torch.sort((others == target).to(torch.int8), dim=1, stable=True).indices[:, :50]
        cand = torch.cat([target, others.gather(1, keep)], 1)
        hs = stage.score(batch, cand).float().numpy()
        hard += float(reciprocal_rank(ranks_from_scores(hs, np.zeros((len(batch), 1), np.int64))).sum())
    n = len(test)
    out = {}
    if retrieved is not None:
        rr = np.concatenate(rerank_ranks)
        v1 = valid[:, :1]
        out = {"rerank_hr@10": mean(hit_rate(rr, v1, 10)), "rerank_ndcg@10": mean(ndcg(rr, v1, 10))}
    return {
        **out,
        "hr@10": mean(hit_rate(ranks, valid, 10)),
        "ndcg@10": mean(ndcg(ranks, valid, 10)),
        "mrr": mean(reciprocal_rank(ranks, valid)),
        "sampled_mrr": sampled_mrr(stage.score, test, torch.device("cpu"), seed=1),
        "hard_mrr": hard / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="dataset spec (default: ml-100k; --quick: synthetic:tiny)")
    ap.add_argument("--quick", action="store_true", help="tiny data and two short epochs per stage")
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--stages", default="popular,retrieval,twotower,gesr,lsr")
    ap.add_argument("--cache-dir", type=Path, default=None, help="reuse trained checkpoints here")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                    help="config override, e.g. lsr.train.epochs=8 (repeatable)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "bench_stages.json")
    args = ap.parse_args()

    spec = args.data or ("synthetic:tiny" if args.quick else str(ML100K))
    t0 = time.perf_counter()
    ds, split, ctx, test = prepare(
        RunConfig(data=spec, max_len=args.max_len, device="cpu"), progress=False
    )
    ctx = replace(ctx, cache_dir=args.cache_dir)  # None: no checkpoint cache
    load_s = time.perf_counter() - t0
    popularity = ds.item_popularity(split.train)
    from cascade.stages.oracle import OracleDotRanker, OracleRanker

    makers = {
        "oracle": OracleRanker,  # synthetic data only: the ground truth's own affinity
        "oracle-dot": OracleDotRanker,
        "popular": PopularRanker,
        "retrieval": TwoTowerRetriever,
        "twotower": TwoTowerESR,
        "gesr": GESRStage,
        "lsr": LateStageRanker,
    }
    rows = []
    sets = parse_sets(args.set)
    names = args.stages.split(",")
    if "retrieval" in names:  # first: the others re-rank its candidates
        names = ["retrieval", *[n for n in names if n != "retrieval"]]
    retrieved = None
    for name in names:
        stage = configure(makers[name], sets.get(name, {}), quick=args.quick)
        t = time.perf_counter()
        stage.fit(ctx)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        if name == "retrieval":
            retrieved = [stage.retrieve(b, 100).ids for b in test.batches(128)]
        metrics = evaluate(stage, test, ds.n_items, popularity, 128, retrieved)
        rep = stage.fit_report_ or {}
        rows.append(
            {
                "stage": name,
                "fit_s": fit_s,
                "train_s": rep.get("seconds"),
                "cached": rep.get("cached"),
                "epochs_run": rep.get("epochs_run"),
                "best_valid": rep.get("best_valid"),
                "eval_s": time.perf_counter() - t,
                **metrics,
                "config": asdict(stage.config),
            }
        )
        r = rows[-1]
        print(
            f"{name:10s} fit {fit_s:7.1f}s  valid {r['best_valid'] if r['best_valid'] is not None else float('nan'):.4f}  "
            f"HR@10 {r['hr@10']:.4f}  NDCG@10 {r['ndcg@10']:.4f}  MRR {r['mrr']:.4f}  "
            f"sampled {r['sampled_mrr']:.4f}  hard {r['hard_mrr']:.4f}  "
            f"rerank NDCG@10 {r.get('rerank_ndcg@10', float('nan')):.4f}",
            flush=True,
        )
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "data": {"spec": spec, "n_users": ds.n_users, "n_items": ds.n_items, "n_events": ds.n_events,
                 "n_train_requests": len(ctx.train), "n_test_requests": len(test), "max_len": args.max_len,
                 "load_s": load_s},
        "stages": rows,
    }
    best = max(rows, key=lambda r: r["ndcg@10"])
    result["strongest_full_catalogue_ndcg@10"] = best["stage"]
    print(f"strongest single model on full-catalogue NDCG@10: {best['stage']} ({best['ndcg@10']:.4f})")
    atomic_write_bytes(args.out, json.dumps(result, indent=2, default=str).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
