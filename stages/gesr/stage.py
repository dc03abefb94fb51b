"""The GESR early-stage ranker (`--esr gesr`): training and serving around `GESRModel`.

Training [reading]+[ours], shared/GESR.md: pointwise log loss. Each training request (one logged
event with its history) gives its logged item as the positive and `n_negatives` sampled items as
negatives, a `pop_negatives` share drawn from the training-item popularity (the kind of item
retrieval hands the ESR) and the rest uniformly; negatives that hit the positive are masked out.
Loss = BCE(l) + aux_weight * BCE(l0): the auxiliary term keeps the primary (two-tower) logit a
usable ranker on its own. The shared loop (`stages.training.fit_model`) early-stops on the
validation `sampled_mrr`; `cached_fit` caches the checkpoint by (config, data, split, seed).
The training report adds the validation NE (normalised entropy: the log loss divided by the
entropy of the positive rate, the paper's offline metric) of l and of l0, on the same sampled
candidate sets, with a fixed seed.

Serving: `score` encodes each request once and scores all its candidates in one batched call
against the catalogue cache (item-tower outputs, MLPG item gates, candidate tokens,
cross-attention item projections, HMA's item -> category table), built once after `fit`. A
large replay batch is processed in groups of requests of about `score_chunk_pairs` (request,
candidate) pairs, so per-pair intermediates stay in cache.

[ours] A dataset without a `category_feature` gets k-means pseudo-categories computed from the
training events only (`cascade.data.derive.pseudo_categories`) when an HMA category pair is on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from cascade.data.traffic import RequestBatch, Traffic
from cascade.stages.base import FitContext, StageError, register
from cascade.stages.gesr.config import GESRConfig
from cascade.stages.gesr.model import GESRModel, bce_with_mask
from cascade.stages.features import NegativeSampler, subsample
from cascade.stages.training import cached_fit, fit_model, sampled_mrr


def pointwise_loss(
    model: GESRModel, batch: RequestBatch, neg: Tensor, aux_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, BCE of l, BCE of l0) for the first target of each request against `neg`."""
    pos = batch.targets[:, :1]
    cand = torch.cat([pos, neg], dim=1)  # (B, 1 + n_neg)
    logit, l0 = model.forward_train(batch, cand)
    labels = torch.zeros_like(logit)
    labels[:, 0] = 1.0
    weight = torch.ones_like(logit)
    weight[:, 1:] = (neg != pos).float()  # a sampled "negative" equal to the positive is no label
    main = bce_with_mask(logit, labels, weight)
    aux = bce_with_mask(l0, labels, weight)
    return main + aux_weight * aux, main, aux


@torch.no_grad()
def normalized_entropy(
    model: GESRModel, traffic: Traffic, sampler: NegativeSampler, n_neg: int, *, seed: int,
    batch_size: int = 512, device: torch.device,
) -> dict[str, float]:
    """Validation NE of l and l0 on fixed sampled candidate sets (1 positive + n_neg)."""
    gen = torch.Generator().manual_seed(seed)
    sums = {"l": 0.0, "l0": 0.0}
    n_pos = n_all = 0.0
    model.eval()
    for batch in traffic.batches(batch_size):
        batch = batch.to(device)
        neg = sampler.sample(len(batch), n_neg, gen)
        _, main, aux = pointwise_loss(model, batch, neg, 0.0)
        w = float(len(batch)) + float((neg != batch.targets[:, :1]).sum())
        sums["l"] += float(main) * w
        sums["l0"] += float(aux) * w
        n_pos += len(batch)
        n_all += w
    if n_all == 0:
        return {"ne": float("nan"), "ne_primary": float("nan")}
    p = n_pos / n_all
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    return {"ne": sums["l"] / n_all / h, "ne_primary": sums["l0"] / n_all / h}


@register("esr", "gesr")
class GESRStage:
    """Generative Early Stage Ranker (see module docstring)."""

    name = "gesr"
    config_class = GESRConfig

    def __init__(self, config: GESRConfig | dict | None = None) -> None:
        if config is None:
            config = GESRConfig()
        elif isinstance(config, dict):
            config = GESRConfig(**config)
        elif not isinstance(config, GESRConfig):
            raise StageError(f"gesr: config must be a GESRConfig or a dict, got {type(config).__name__}")
        self.config = config
        self.model: GESRModel | None = None
        self.report: dict = {}
        self.device = torch.device("cpu")

    def _categories(self, ctx: FitContext) -> tuple[Tensor | None, int]:
        ds = ctx.dataset
        moa = self.config.moa
        needs = moa.hma and any(p.startswith("category") for p in moa.hma_pairs)
        if ds.category_feature is not None or not needs:
            return None, 0
        from cascade.data.derive import pseudo_categories

        n_clusters = 32
        codes = pseudo_categories(ctx.split.train, ds.n_items, n_clusters=n_clusters, seed=ctx.seed)
        return torch.from_numpy(codes[:, None]), n_clusters + 1

    def fit(self, ctx: FitContext) -> "GESRStage":
        cfg = self.config
        self.device = ctx.device
        cats, n_cats = self._categories(ctx)
        torch.manual_seed(ctx.seed)
        model = GESRModel.from_dataset(ctx.dataset, cfg, item_categories=cats, n_categories=n_cats)
        model.to(ctx.device)
        counts = np.bincount(ctx.train.targets[:, 0], minlength=ctx.dataset.n_items)
        sampler = NegativeSampler(counts, pop_frac=cfg.pop_negatives, device=ctx.device)
        valid = subsample(ctx.valid, cfg.valid_requests)

        def loss_fn(batch: RequestBatch, gen: torch.Generator) -> Tensor:
            neg = sampler.sample(len(batch), cfg.n_negatives, gen)
            return pointwise_loss(model, batch, neg, cfg.aux_weight)[0]

        def valid_fn() -> float:
            return sampled_mrr(
                lambda b, c: model.forward_train(b, c)[0], valid, ctx.device,
                n_negatives=cfg.valid_negatives, seed=ctx.seed,
            )

        def train() -> dict:
            report = fit_model(model, loss_fn, valid_fn, ctx, cfg.train, desc="esr gesr")
            report.update(
                normalized_entropy(
                    model, valid, sampler, cfg.n_negatives, seed=ctx.seed + 1, device=ctx.device
                )
            )
            with torch.no_grad():
                report["valid_mrr_primary"] = sampled_mrr(
                    lambda b, c: model.forward_train(b, c)[1], valid, ctx.device,
                    n_negatives=cfg.valid_negatives, seed=ctx.seed,
                )
            report["parameters"] = sum(p.numel() for p in model.parameters())
            return report

        self.report = cached_fit(model, stage="esr-gesr", config=cfg, ctx=ctx, train=train)
        model.to(ctx.device).eval()
        model.cache_items()
        self.model = model
        return self

    @torch.inference_mode()
    def score(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        """candidates (B, K) int64 -> (B, K) float32: history encoded once per request, all
        candidates scored in one batched call against the catalogue cache."""
        if self.model is None:
            raise StageError("gesr: score() called before fit()")
        b, n = candidates.shape
        step = max(1, self.config.score_chunk_pairs // max(n, 1))
        if b <= step:
            return self.model.score(batch, candidates).float()
        parts = []
        for lo in range(0, b, step):
            rows = torch.arange(lo, min(lo + step, b), device=candidates.device)
            parts.append(self.model.score(batch.select(rows), candidates[lo : lo + step]))
        return torch.cat(parts).float()
