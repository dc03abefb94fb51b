"""From a replay to the numbers a run reports: each ESR variant's funnel metrics (recall and
survival per stage, every final metric, latency, throughput, funnel loss, breakdowns), the paired
comparison against the baseline, and the reference points (the LSR scoring the whole catalogue,
most-popular). Every quality number goes through the metric registry (`cascade.metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import polars as pl
import torch

from cascade.config import StageSpec
from cascade.data.traffic import Traffic
from cascade.metrics import (
    HISTORY_BUCKETS,
    POPULARITY_BUCKETS,
    breakdown,
    final_metrics,
    final_values,
    funnel_latency,
    quality_summary,
    stage_latency,
    survival_chain,
    throughput,
)
from cascade.pipeline import Budgets
from cascade.replay import evenly_spaced_rows, full_catalogue_ranks
from cascade.session import Prepared
from cascade.stages.base import ScoresCatalogue
from cascade.util.ranking import mean


@torch.no_grad()
def _score_all_fn(ranker: Any, n_items: int, device: torch.device) -> Callable:
    """batch -> (B, n_items) scores: the ranker's own `score_all` when it has one, else `score`
    over the catalogue in chunks."""
    if isinstance(ranker, ScoresCatalogue):
        return ranker.score_all

    def score_all(batch) -> torch.Tensor:
        b = len(batch)
        chunk = max(1, min(n_items, (1 << 17) // max(b, 1)))
        parts = []
        for start in range(0, n_items, chunk):
            ids = torch.arange(start, min(start + chunk, n_items), device=device)
            parts.append(ranker.score(batch, ids[None, :].expand(b, -1).contiguous()).float())
        return torch.cat(parts, 1)

    return score_all


def lsr_catalogue_ranks(
    lsr: Any, traffic: Traffic, *, exclude_seen: bool, batch_size: int, device: torch.device,
    progress: bool = False,
) -> np.ndarray:
    """(R, T) ranks of each request's targets among the whole catalogue under the LSR (the
    full-catalogue reference's own numbers)."""
    return full_catalogue_ranks(
        _score_all_fn(lsr, traffic.dataset.n_items, device), traffic, batch_size=batch_size,
        exclude_seen=exclude_seen, device=device, progress=progress,
        description="LSR over the full catalogue",
    )


def reference_metrics(
    lsr: Any,
    prepared: Prepared,
    *,
    exclude_seen: bool,
    batch_size: int,
    final_k: int,
    progress: bool,
    n_requests: int = 0,
    lsr_ranks: Callable[[Traffic], np.ndarray] | None = None,
) -> tuple[dict, np.ndarray]:
    """HR@10 / NDCG@10 / MRR of the LSR scoring the whole catalogue and of most-popular
    (training counts), with the same seen-item exclusion as retrieval, over `n_requests` evenly
    spaced test requests (0 or more than there are: all). `lsr_ranks(traffic)` computes the
    LSR's ranks elsewhere (a backend's workers); by default `lsr_catalogue_ranks` here. Returns
    the metrics and the ids of the requests scored."""
    ds, split, ctx, test = prepared
    if 0 < n_requests < len(test):
        rows = np.flatnonzero(evenly_spaced_rows(len(test), n_requests))
        test = Traffic(ds, split.test[rows], max_len=test.max_len)
    valid = test.targets >= 0
    if lsr_ranks is None:
        ranks = lsr_catalogue_ranks(lsr, test, exclude_seen=exclude_seen, batch_size=batch_size,
                                    device=ctx.device, progress=progress)
    else:
        ranks = lsr_ranks(test)
    pop = torch.as_tensor(ds.item_popularity(split.train), dtype=torch.float32, device=ctx.device)
    pop_ranks = full_catalogue_ranks(
        lambda batch: pop[None, :].expand(len(batch), -1), test, batch_size=batch_size,
        exclude_seen=exclude_seen, device=ctx.device,
    )

    def summary(r: np.ndarray) -> dict:  # the scored list is the top `final_k`
        r = np.where(r < final_k, r, -1)
        return {key: mean(x) for key, x in final_values(r, valid, final_k).items()}

    metrics = {
        "lsr_full_catalogue": summary(ranks),
        "most_popular": summary(pop_ranks),
        "n_requests": len(test),
    }
    return metrics, test.request_id


def variant_metrics(
    frame: pl.DataFrame,
    latency: pl.DataFrame,
    label: str,
    spec: StageSpec,
    stage_names: Mapping[str, str],
    budgets: Budgets,
) -> dict:
    """The metrics.json entry of one ESR variant."""
    part = frame.filter(pl.col("variant") == label)
    q = quality_summary(part)
    surv = survival_chain(part)
    stages = []
    for s, k in (("retrieval", budgets.retrieval), ("esr", budgets.esr), ("lsr", budgets.final)):
        per_batch, per_req, _ = stage_latency(latency, label, s)
        stages.append({
            "name": s,
            "stage": spec.stage if s == "esr" else stage_names[s],
            "k": k,
            "recall": q["recall"][s],
            "survival": surv[s],
            "latency_ms": per_batch,
            "latency_per_request_ms": per_req,
        })
    f_batch, f_req, total_ms = funnel_latency(latency, label)
    out: dict[str, Any] = {
        "esr": spec.stage,
        "esr_config": dict(spec.config),
        "n_requests": q["n_requests"],
        "stages": stages,
        "final": {m.key: q[m.key] for m in final_metrics()},
        "funnel_latency_ms": f_batch,
        "funnel_latency_per_request_ms": f_req,
        "throughput_rps": throughput(part.height, total_ms),
        "consistency@10": None,
        "funnel_loss": None,
    }
    if "rank_oracle" in part.columns:
        keys = [m.key for m in final_metrics()]
        sampled = part.filter(pl.col("oracle_sampled"))
        q_same = quality_summary(sampled)  # the funnel on the requests the oracle scored
        o = sampled.select(
            *[pl.col(f"oracle_{k}").mean().alias(k) for k in keys],
            pl.col("consistency").mean(),
            # of the requests the LSR would have answered from the whole retrieved set,
            # the share whose target the ESR cut
            (
                (pl.col("rank_oracle").is_not_null() & pl.col("rank_esr").is_null()).sum()
                / pl.col("rank_oracle").is_not_null().sum()
            ).alias("esr_cut_rate"),
        ).row(0, named=True)
        out["consistency@10"] = o["consistency"]
        out["funnel_loss"] = {
            "n_requests": sampled.height,
            "oracle": {k: o[k] for k in keys},
            **{k: (o[k] - q_same[k] if o[k] is not None else None) for k in keys},
            "esr_cut_rate": o["esr_cut_rate"],
        }
    out["by_history_length"] = breakdown(part, "hist_bucket", [b[0] for b in HISTORY_BUCKETS])
    out["by_popularity"] = breakdown(part, "pop_bucket", [b[0] for b in POPULARITY_BUCKETS])
    return out
