"""The GESR early-stage ranker (`--esr gesr`): training and serving around `GESRModel`.

Training [reading]+[ours], shared/GESR.md: pointwise log loss. Each training request (one logged
event with its history) gives its logged item as the positive and `n_negatives` sampled items as
negatives; negatives that hit the positive are masked out.
Loss = BCE(l) + aux_weight * BCE(l0): the auxiliary term keeps the primary (two-tower) logit a
usable ranker on its own. The shared loop (`stages.training.fit_model`) early-stops on a validation
MRR; `cached_fit` caches the checkpoint by (config, data, split, seed). [ours] By default the
MRR is taken against negatives drawn from the training mixture (`valid_metric="mixture_mrr"`:
on-interest and popular items, like an ESR's candidates) rather than uniform items
(`"sampled_mrr"`, the other stages' metric), on which the two-tower path already saturates so
training stopped before GESR had learnt to order on-interest candidates. Both are reported.
The training report adds the validation NE (normalised entropy: the log loss divided by the
entropy of the positive rate, the paper's offline metric) of l and of l0, on the same sampled
candidate sets, with a fixed seed.

Serving: `score` encodes each request once and scores all its candidates in one batched call
against the catalogue cache (item-tower outputs, MLPG item gates, candidate tokens,
cross-attention item projections, HMA's item -> category table), built once after `fit`. A
large replay batch is processed in groups of requests of about `score_chunk_pairs` (request,
candidate) pairs, so per-pair intermediates stay in cache.

Negatives (`sampling.py`): uniform, popularity-sampled and interest-matched (an item of the
category of a random history event), with the exact log-Q correction of that mixture.

[ours] A dataset without a `category_feature` gets k-means pseudo-categories computed from the
training events only (`cascade.data.derive.pseudo_categories`) when an HMA category pair or the
interest-matched negatives need categories.
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
from cascade.stages.gesr.sampling import InterestSampler
from cascade.stages.features import subsample
from cascade.stages.training import cached_fit, fit_model, sampled_mrr


def pointwise_loss(
    model: GESRModel,
    batch: RequestBatch,
    neg: Tensor,
    aux_weight: float,
    log_e: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, BCE of l, BCE of l0) for the first target of each request against the negatives
    `neg` (B, k). `log_e` (B, 1 + k): the log-Q correction of [positive ; negatives]
    (`sampling.InterestSampler.log_expected`), subtracted from both logits inside the loss."""
    pos = batch.targets[:, :1]
    cand = torch.cat([pos, neg], dim=1)  # (B, 1 + n_neg)
    logit, l0 = model.forward_train(batch, cand)
    if log_e is not None:
        logit, l0 = logit - log_e, l0 - log_e
    labels = torch.zeros_like(logit)
    labels[:, 0] = 1.0
    weight = torch.ones_like(logit)
    weight[:, 1:] = (neg != pos).float()  # a sampled "negative" equal to the positive is no label
    main = bce_with_mask(logit, labels, weight)
    aux = bce_with_mask(l0, labels, weight)
    return main + aux_weight * aux, main, aux


@torch.no_grad()
def normalized_entropy(
    model: GESRModel, traffic: Traffic, sampler: InterestSampler, n_neg: int, *, seed: int,
    device: torch.device, logq: bool = True, batch_size: int = 512,
) -> dict[str, float]:
    """Validation NE of l and l0: the log loss of the training objective (1 positive + n_neg
    negatives drawn as in training, fixed seed, log-Q corrected when training is) divided by the
    entropy of the positive rate, i.e. relative to always predicting that rate."""
    gen = torch.Generator().manual_seed(seed)
    sums = {"l": 0.0, "l0": 0.0}
    n_pos = n_all = 0.0
    model.eval()
    for batch in traffic.batches(batch_size):
        batch = batch.to(device)
        neg = sampler.sample(batch, n_neg, gen)
        log_e = None
        if logq:
            log_e = sampler.log_expected(batch, torch.cat([batch.targets[:, :1], neg], 1), n_neg)
        _, main, aux = pointwise_loss(model, batch, neg, 0.0, log_e)
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


@torch.no_grad()
def mixture_mrr(
    model: GESRModel, traffic: Traffic, sampler: InterestSampler, n_neg: int, *, seed: int,
    device: torch.device, batch_size: int = 512,
) -> tuple[float, float]:
    """(MRR of l, MRR of l0) of each request's target among n_neg negatives drawn from the
    training mixture (fixed seed; ties count against the target). Unlike uniform negatives,
    these resemble what an ESR ranks (on-interest and popular items)."""
    gen = torch.Generator().manual_seed(seed)
    rr = [0.0, 0.0]
    count = 0
    model.eval()
    for batch in traffic.batches(batch_size):
        batch = batch.to(device)
        pos = batch.targets[:, :1]
        neg = sampler.sample(batch, n_neg, gen)
        out = model.forward_train(batch, torch.cat([pos, neg], dim=1))
        for k, s in enumerate(out):
            beats = (s[:, 1:] >= s[:, :1]) & (neg != pos)
            rr[k] += float((1.0 / (1 + beats.sum(1)).float()).sum())
        count += len(batch)
    return rr[0] / max(count, 1), rr[1] / max(count, 1)


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
        needs = (moa.hma and any(p.startswith("category") for p in moa.hma_pairs)) or (
            self.config.interest_negatives > 0
        )
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
        sampler = InterestSampler(
            counts, model.item_categories, model.n_categories, pop_frac=cfg.pop_negatives,
            interest_frac=cfg.interest_negatives, device=ctx.device,
        )
        valid = subsample(ctx.valid, cfg.valid_requests)

        def loss_fn(batch: RequestBatch, gen: torch.Generator) -> Tensor:
            neg = sampler.sample(batch, cfg.n_negatives, gen)
            log_e = None
            if cfg.logq_correction:
                cand = torch.cat([batch.targets[:, :1], neg], dim=1)
                log_e = sampler.log_expected(batch, cand, cfg.n_negatives)
            return pointwise_loss(model, batch, neg, cfg.aux_weight, log_e)[0]

        def valid_fn() -> float:
            if cfg.valid_metric == "sampled_mrr":
                return sampled_mrr(
                    lambda b, c: model.forward_train(b, c)[0], valid, ctx.device,
                    n_negatives=cfg.valid_negatives, seed=ctx.seed,
                )
            return mixture_mrr(model, valid, sampler, cfg.valid_negatives, seed=ctx.seed, device=ctx.device)[0]

        def train() -> dict:
            report = fit_model(model, loss_fn, valid_fn, ctx, cfg.train, desc="esr gesr")
            report["valid_metric"] = cfg.valid_metric
            report.update(
                normalized_entropy(
                    model, valid, sampler, cfg.n_negatives, seed=ctx.seed + 1, device=ctx.device,
                    logq=cfg.logq_correction,
                )
            )
            with torch.no_grad():
                for name, k in (("", 0), ("_primary", 1)):
                    report[f"valid_sampled_mrr{name}"] = sampled_mrr(
                        lambda b, c: model.forward_train(b, c)[k], valid, ctx.device,
                        n_negatives=cfg.valid_negatives, seed=ctx.seed,
                    )
                mix = mixture_mrr(model, valid, sampler, cfg.valid_negatives, seed=ctx.seed, device=ctx.device)
                report["valid_mixture_mrr"], report["valid_mixture_mrr_primary"] = mix
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
