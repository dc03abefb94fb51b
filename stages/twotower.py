"""Two-tower early-stage ranker: the classic ESR (and the baseline GESR must beat).

As in YouTube's candidate model (Covington et al., RecSys 2016) and the ESR described in GESR
(Hong et al., arXiv 2511.21095): the user and item towers never see each other until the final
dot product, so the item side is computed once and cached.

- user tower: MLP over [user features ; mean of all history tokens ; mean of the `recent` newest
  history tokens], a history token being item + action + time gap (`cascade.stages.features`).
- item tower: MLP over the item id + item feature embedding (shared with the history tokens),
  plus a scalar item bias.
- score: <user, item> + bias. After `fit` (or loading the cached checkpoint) the item tower runs
  once over the catalogue into an (n_items, D + 1) tensor on the device, so `score` is one gather
  and a batched dot product.
- training: a sampled softmax of the logged positive against negatives shared by the batch
  (in-batch and uniform, logQ-corrected: `negatives.shared_negative_softmax`), or (`loss="bce"`)
  pointwise log loss against `n_negatives` sampled items per request (uniform plus a share drawn
  by popularity); in batches of requests of similar history length
  (`TrainConfig.length_batches`); early stopping on `sampled_mrr`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.data.traffic import RequestBatch
from cascade.stages.base import FitContext, register
from cascade.stages.features import (
    HistoryTokenEmbedder,
    ItemFeatureEmbedder,
    UserFeatureEmbedder,
    recent_history,
    subsample,
)
from cascade.stages.negatives import NegativeSampler, shared_negative_softmax, softmax_kind
from cascade.stages.gather import dot_candidates
from cascade.stages.learned import LearnedStage
from cascade.stages.training import TrainConfig, fit_model, sampled_mrr


@dataclass(frozen=True, kw_only=True)
class TwoTowerConfig:
    dim: int = 64
    hidden: int = 128
    recent: int = 5  # the user tower also pools this many newest history events
    max_len: int | None = None  # use at most this many recent history events (None: all given)
    n_negatives: int = 16  # loss="bce": sampled negatives per request
    pop_negatives: float = 0.25  # loss="bce": share of negatives drawn by popularity ** 0.75
    dropout: float = 0.1
    valid_requests: int = 2000
    # "softmax": sampled softmax of the positive against negatives shared by the batch
    # (`in_batch_negatives` of the batch's positives, at most one per request, plus
    # `n_uniform_negatives` uniform ones, logQ-corrected); "bce": pointwise log loss against
    # `n_negatives` per request, `pop_negatives` of them by popularity. Amazon Toys, one thread,
    # validation sampled MRR: bce 0.3051, softmax 512 + 512 0.3126, 2048 + 2048 0.3226 (test ESR
    # alone HR@10 0.042 -> 0.053, fit 54 s -> 41 s), 2048 + 8192 0.3200
    loss: str = "softmax"
    in_batch_negatives: int = 2048
    n_uniform_negatives: int = 2048
    # loss="softmax": the full softmax over the catalogue up to this many items (or when the
    # sample above would be as large), else the sampled one. All test requests, ESR alone,
    # one thread: ml-100k (1,682 items) HR@10 / NDCG@10 0.193 / 0.098 sampled -> 0.208 / 0.108
    # full; Amazon Toys (11,924 items) 0.0641 / 0.0352 -> 0.0640 / 0.0353 for 3x the fit time
    # (46 s -> 136 s): so not past the sample's size
    full_softmax_items: int = 4096
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            # up to 200 steps an epoch and patience 2 (was 50 and 1: it stopped undertrained).
            # All test requests, ESR alone, HR@10 / NDCG@10 (measured with patience 3, whose
            # best epochs patience 2 also reaches): Amazon Toys 0.0491 / 0.0274 -> 0.0641 /
            # 0.0352 (fit 14 s -> 46 s, one thread); ml-100k 0.158 / 0.078 -> 0.193 / 0.098
            epochs=20, batch_size=512, lr=3e-3, patience=2, max_steps_per_epoch=200,
            # requests of similar history length per batch: Amazon Toys validation sampled MRR
            # 0.2995 -> 0.3051 (test ESR alone HR@10 0.038 -> 0.042, 2,000 requests)
            length_batches=True,
        )
    )

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "recent", "n_negatives", "valid_requests", "full_softmax_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"TwoTowerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"TwoTowerConfig.max_len must be >= 1 or None, got {self.max_len}")
        if not 0.0 <= self.pop_negatives <= 1.0:
            raise ValueError(f"TwoTowerConfig.pop_negatives must be in [0, 1], got {self.pop_negatives}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TwoTowerConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.loss not in ("softmax", "bce"):
            raise ValueError(f"TwoTowerConfig.loss must be 'softmax' or 'bce', got {self.loss!r}")
        if self.in_batch_negatives < 0 or self.n_uniform_negatives < 0:
            raise ValueError("TwoTowerConfig.in_batch_negatives and n_uniform_negatives must be >= 0")
        if not isinstance(self.train, TrainConfig):
            raise ValueError("TwoTowerConfig.train must be a TrainConfig")


def mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    # the input LayerNorm puts small-initialised embeddings on a unit scale, so the dot product
    # of the two towers gets useful gradients from the first step
    return nn.Sequential(
        nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out)
    )


class TwoTowerModel(nn.Module):
    def __init__(self, ctx: FitContext, cfg: TwoTowerConfig) -> None:
        super().__init__()
        ds = ctx.dataset
        d = cfg.dim
        self.max_len, self.recent = cfg.max_len, cfg.recent
        self.items = ItemFeatureEmbedder(ds.items, ds.n_items, d)
        self.history = HistoryTokenEmbedder(self.items)
        self.user_feats = UserFeatureEmbedder(ds.users, d)
        self.user_tower = mlp(3 * d, cfg.hidden, d, cfg.dropout)
        self.item_tower = mlp(d, cfg.hidden, d, cfg.dropout)
        self.item_bias = nn.Embedding(ds.n_items, 1)
        nn.init.zeros_(self.item_bias.weight)

    def user(self, batch: RequestBatch) -> Tensor:
        """(B,) requests -> (B, D)."""
        batch = recent_history(batch, self.max_len)
        ar = torch.arange(batch.hist_items.shape[1], device=batch.hist_items.device)[None, :]
        mask = batch.hist_mask
        newest = mask & (ar >= (batch.hist_len[:, None] - self.recent))
        means = self.history.masked_means(batch, [mask, newest])
        x = torch.cat([self.user_feats(batch.user_feats), *means], -1)
        return self.user_tower(x)

    def item(self, ids: Tensor) -> Tensor:
        """(*) ids -> (*, D + 1): the item vector with its bias as the last column."""
        return torch.cat([self.item_tower(self.items(ids)), self.item_bias(ids)], dim=-1)

    @staticmethod
    def combine(u: Tensor, v: Tensor) -> Tensor:
        """u (B, D), v (B, K, D + 1) -> (B, K) logits."""
        return torch.einsum("bd,bkd->bk", u, v[..., :-1]) + v[..., -1]

    def forward(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        return self.combine(self.user(batch), self.item(candidates))

    @torch.no_grad()
    def all_items(self, chunk: int = 65536) -> Tensor:
        n = self.items.n_items
        dev = self.item_bias.weight.device
        return torch.cat(
            [self.item(torch.arange(s, min(s + chunk, n), device=dev)) for s in range(0, n, chunk)]
        )


@register("esr", "twotower")
class TwoTowerESR(LearnedStage):
    """Two-tower ESR with cached item vectors (see the module docstring)."""

    name = "twotower"
    kind = "esr"
    config_class = TwoTowerConfig
    candidate_independent = True  # towers meet only in the final dot product

    item_vecs_: Tensor | None = None  # (n_items, D + 1) on the device

    def build_model(self, ctx: FitContext) -> TwoTowerModel:
        return TwoTowerModel(ctx, self.config)

    def train_model(self, model: TwoTowerModel, ctx: FitContext) -> dict:
        cfg = self.config
        counts = np.bincount(ctx.train.targets[:, 0], minlength=ctx.dataset.n_items)
        sampler = NegativeSampler(counts, pop_frac=cfg.pop_negatives, device=ctx.device)
        valid = subsample(ctx.valid, cfg.valid_requests)

        freq = torch.as_tensor(counts / max(counts.sum(), 1), dtype=torch.float32, device=ctx.device)

        n_items = ctx.dataset.n_items
        full, loss_name = softmax_kind(
            n_items, cfg.full_softmax_items, cfg.in_batch_negatives + cfg.n_uniform_negatives)
        every = torch.arange(n_items, device=ctx.device)

        def loss_fn(batch: RequestBatch, gen: torch.Generator) -> Tensor:
            if cfg.loss == "softmax":  # <[u; 1], [v; bias]> = the served score
                u = model.user(batch)
                q = torch.cat([u, torch.ones_like(u[:, :1])], 1)
                if full:  # the exact loss over every item
                    return F.cross_entropy(q @ model.item(every).T, batch.targets[:, 0])
                return shared_negative_softmax(
                    q, batch.targets[:, 0], model.item, freq, gen,
                    n_in_batch=cfg.in_batch_negatives, n_uniform=cfg.n_uniform_negatives,
                    inv_temp=1.0,
                )
            pos = batch.targets[:, :1]  # (B, 1)
            neg = sampler.sample(len(batch), cfg.n_negatives, gen)  # (B, n)
            logits = model(batch, torch.cat([pos, neg], 1))  # (B, 1 + n)
            labels = torch.zeros_like(logits)
            labels[:, 0] = 1.0
            weight = torch.ones_like(logits)
            weight[:, 1:] = (neg != pos).float()  # a sampled positive is not a negative
            return F.binary_cross_entropy_with_logits(logits, labels, weight=weight, reduction="sum") / weight.sum()

        def valid_fn() -> float:
            return sampled_mrr(model, valid, ctx.device, seed=ctx.seed)

        report = fit_model(model, loss_fn, valid_fn, ctx, cfg.train, desc="esr twotower")
        if cfg.loss == "softmax":
            report["loss"] = loss_name
        return report

    def prepare_serving(self, model: TwoTowerModel, ctx: FitContext) -> None:
        self.item_vecs_ = model.all_items()

    @torch.no_grad()
    def score(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        """candidates (B, K) int64 -> (B, K) float32: [u ; 1] times the cached rows [v ; bias]
        (`gather.dot_candidates`)."""
        model = self.fitted_model()
        u = model.user(batch.to(self.device_))
        u = torch.cat([u, torch.ones_like(u[:, :1])], dim=1)  # (B, D + 1)
        return dot_candidates(u, self.item_vecs_, candidates.to(self.device_)).float()
