"""The GESR early-stage ranker (`--esr gesr`): training and serving around `GESRModel`.

Training [reading]+[ours], shared/GESR.md: pointwise log loss. Each training request (one logged
event with its history) gives its logged item as the positive and `n_negatives` sampled items as
negatives; negatives that hit the positive are masked out.
Loss = BCE(l) + aux_weight * BCE(l0): the auxiliary term keeps the primary (two-tower) logit a
usable ranker on its own. The shared loop (`stages.training.fit_model`) early-stops on the
validation `sampled_mrr` (uniform negatives: a metric whose optimum is the unbiased log p, which
is what ranking any candidate set needs); `cached_fit` caches the checkpoint by (config, data,
split, seed).
[ours] Two phases: first the two towers alone (`pretrain`, l0's loss only: a two-tower step
costs a fraction of a GESR step, so the towers see as many examples as the two-tower ESR's
do), then every module jointly (`train`); the MLPG logit layers start at zero, so phase 2 starts
from exactly the pretrained two-tower ranker and the MoA learns what it misses. Both phases
draw batches of requests of similar history length (`TrainConfig.length_batches`).
The training report adds the validation NE (normalised entropy: the log loss divided by the
entropy of the positive rate, the paper's offline metric) of l and of l0 on fixed sampled
candidate sets, and the validation sampled MRR of l and of l0.

Serving: `score` encodes each request once and scores all its candidates in one batched call
against the catalogue cache (item-tower outputs, MLPG item gates, candidate tokens,
cross-attention item projections, HMA's item -> category table), built once after `fit`. A
large replay batch is processed in groups of requests of about `score_chunk_pairs` (request,
candidate) pairs, so per-pair intermediates stay in cache (on a GPU `score_chunk_pairs_gpu`,
larger, because there each group's kernel launches, not its arithmetic, set the time). With
`compile=True` that call goes through `torch.compile` (dynamic shapes, so the smaller last
group does not recompile); if compilation fails (no C++ compiler, say) scoring says so once on
stderr and stays eager.
With `quantize="int8"` (CPU only) the linear layers at least 32 wide are quantized to dynamic
int8 (`cascade.stages.quantize`, by `LearnedStage.fit`) after the catalogue cache is built: the
cache comes from the float32 model, because it is computed once per catalogue, where int8 would
save no serving time and only add error. So int8 reaches the per-request layers (user tower,
MLPG user gates) and any item-side projection computed per batch (a catalogue too large for the
cross-attention cache); the per-pair layers are 16 wide (`moa_dim`) and stay float32.

Negatives (`sampling.py`): uniform, popularity-sampled and interest-matched (an item of the
category of a random history event), with the exact log-Q correction of that mixture.

[ours] A dataset without a `category_feature` gets k-means pseudo-categories computed from the
training events only (`cascade.data.derive.pseudo_categories`) when an HMA category pair or the
interest-matched negatives need categories.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from cascade.data.traffic import RequestBatch, Traffic
from cascade.stages.base import FitContext, register
from cascade.stages.gesr.config import GESRConfig
from cascade.stages.gesr.model import GESRModel, bce_with_mask
from cascade.stages.gesr.sampling import InterestSampler
from cascade.stages.features import subsample
from cascade.stages.learned import LearnedStage
from cascade.stages.training import fit_model, sampled_mrr

# part of the checkpoint cache key: bump when the network or its training changes, so a cached
# checkpoint of an older GESR is never loaded into a newer one
MODEL_VERSION = "v3"


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


@register("esr", "gesr")
class GESRStage(LearnedStage):
    """Generative Early Stage Ranker (see module docstring)."""

    name = "gesr"
    kind = "esr"
    config_class = GESRConfig
    serving_fields = ("compile", "score_chunk_pairs", "score_chunk_pairs_gpu", "quantize")
    cache_name = f"esr-gesr-{MODEL_VERSION}"
    candidate_independent = True  # the target mask: candidates never see each other
    # linear layers whose weights the serving path reads as tensors (NRO folds `out` into its
    # cached values, HMA folds `mlp.0` into its bucket table): a quantized layer has none, so
    # they stay float32 under quantize="int8"
    float_linears = ("nro.out", "hma.mlp.0")

    _compiled: Callable | None = None  # the compiled scorer (compile=True), built on first use

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

    def build_model(self, ctx: FitContext) -> GESRModel:
        cats, n_cats = self._categories(ctx)
        return GESRModel.from_dataset(ctx.dataset, self.config, item_categories=cats,
                                      n_categories=n_cats)

    def train_model(self, model: GESRModel, ctx: FitContext) -> dict:
        cfg = self.config
        counts = np.bincount(ctx.train.targets[:, 0], minlength=ctx.dataset.n_items)
        sampler = InterestSampler(
            counts, model.item_categories, model.n_categories, pop_frac=cfg.pop_negatives,
            interest_frac=cfg.interest_negatives, device=ctx.device,
        )
        valid = subsample(ctx.valid, cfg.valid_requests)

        def negatives(batch: RequestBatch, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
            neg = sampler.sample(batch, cfg.n_negatives, gen)
            log_e = None
            if cfg.logq_correction:
                cand = torch.cat([batch.targets[:, :1], neg], dim=1)
                log_e = sampler.log_expected(batch, cand, cfg.n_negatives)
            return neg, log_e

        def loss_fn(batch: RequestBatch, gen: torch.Generator) -> Tensor:
            neg, log_e = negatives(batch, gen)
            return pointwise_loss(model, batch, neg, cfg.aux_weight, log_e)[0]

        def tower_loss_fn(batch: RequestBatch, gen: torch.Generator) -> Tensor:
            neg, log_e = negatives(batch, gen)
            pos = batch.targets[:, :1]
            l0 = model.score_primary(batch, torch.cat([pos, neg], dim=1))
            if log_e is not None:
                l0 = l0 - log_e
            labels = torch.zeros_like(l0)
            labels[:, 0] = 1.0
            weight = torch.ones_like(l0)
            weight[:, 1:] = (neg != pos).float()
            return bce_with_mask(l0, labels, weight)

        scorers = {"": lambda b, c: model.forward_train(b, c)[0], "_primary": model.score_primary}

        def metric(which: str) -> float:
            return sampled_mrr(scorers[which], valid, ctx.device,
                               n_negatives=cfg.valid_negatives, seed=ctx.seed)

        def init_offset() -> None:
            # the loss logits start at the log base rate log(1/k) (+ the mean log-Q correction)
            gen = torch.Generator().manual_seed(ctx.seed)
            batch = ctx.train.batch(np.arange(min(len(ctx.train), 512))).to(ctx.device)
            _, log_e = negatives(batch, gen)
            offset = -math.log(cfg.n_negatives) + (float(log_e.mean()) if log_e is not None else 0.0)
            with torch.no_grad():
                model.global_bias.fill_(offset)

        init_offset()
        report: dict = {}
        has_moa = bool(cfg.moa.modules)
        if cfg.pretrain_towers or not has_moa:
            # phase 1: the towers alone, at the two-tower ESR's cost per step
            pre = fit_model(model, tower_loss_fn, lambda: metric("_primary"),
                            ctx, cfg.pretrain, desc="esr gesr towers")
            report["pretrain"] = pre
        if has_moa:  # phase 2: every module jointly, the towers included
            report.update(fit_model(model, loss_fn, lambda: metric(""),
                                    ctx, cfg.train, desc="esr gesr"))
        else:
            report.update(pre)
        report.update(
            normalized_entropy(
                model, valid, sampler, cfg.n_negatives, seed=ctx.seed + 1, device=ctx.device,
                logq=cfg.logq_correction,
            )
        )
        with torch.no_grad():
            for which in ("", "_primary"):
                report[f"valid_sampled_mrr{which}"] = metric(which)
        report["parameters"] = sum(p.numel() for p in model.parameters())
        return report

    def prepare_serving(self, model: GESRModel, ctx: FitContext) -> None:
        model.cache_items()  # from the float32 model (see the module docstring)
        self._compiled = None  # a compiled scorer belongs to the model it was built for

    @torch.inference_mode()
    def score(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        """candidates (B, K) int64 -> (B, K) float32: history encoded once per request, all
        candidates scored in one batched call against the catalogue cache. Requests are
        grouped by history length, and each group's histories are cut to its longest one: the
        per-pair attention then spans the group's real events, not the batch's padding (the
        padding contributes nothing, so the scores are the same)."""
        model = self.fitted_model()
        b, n = candidates.shape
        cfg = self.config
        pairs = cfg.score_chunk_pairs if candidates.device.type == "cpu" else cfg.score_chunk_pairs_gpu
        step = max(1, pairs // max(n, 1))
        scorer = self._scorer(model)
        out = torch.empty(b, n, dtype=torch.float32, device=candidates.device)
        for rows, group in batch.length_groups(step):
            out[rows] = scorer(group, candidates[rows]).float()
        return out

    def _scorer(self, model: GESRModel) -> Callable[[RequestBatch, Tensor], Tensor]:
        """model.score, compiled once per stage when `compile` is on."""
        if not self.config.compile:
            return model.score
        if self._compiled is None:
            compiled = torch.compile(model.score, dynamic=True)

            def guarded(batch: RequestBatch, cand: Tensor) -> Tensor:
                try:
                    return compiled(batch, cand)
                except torch._dynamo.exc.BackendCompilerFailed as e:  # no compiler, say: serve eagerly
                    print(
                        f"gesr: torch.compile failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
                        "scoring without compilation",
                        file=sys.stderr,
                    )
                    self._compiled = model.score
                    return model.score(batch, cand)

            self._compiled = guarded
        return self._compiled
