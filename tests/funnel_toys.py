"""Small but real stages and a tiny planted-signal dataset for the funnel engine's tests.

They exercise the Pipeline, replay, metrics and run records without the heavy built-in stages:
- `CoocRetriever`: item-to-next-item transition counts over the training histories (classic
  item-based retrieval), seen items excluded when the run excludes them (`ctx.exclude_seen`);
- `MFRanker`: a learned ranker (mean-pooled history embedding . item embedding + item bias) on
  `cascade.stages.learned.LearnedStage`, trained with `fit_model` inside the checkpoint cache,
  so caching is exercised for real: what a plugin author writes for a learned stage;
- `PopRanker`: training popularity;
- misbehaving rankers (wrong shape, NaN) and a class without `score` for the boundary checks.
They are loaded the way users load their own stages: `funnel_toys:CoocRetriever`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from cascade.data.dataset import Dataset, FeatureTable, finalize_events
from cascade.stages.base import Candidates
from cascade.stages.learned import LearnedStage
from cascade.stages.training import TrainConfig, fit_model, sampled_mrr


def planted_dataset(n_users: int = 150, n_items: int = 240, length: int = 30, seed: int = 0) -> Dataset:
    """Users walk through item clusters: the next item is usually the current item + 1 within
    a cluster of 12, so transitions and embeddings both carry real signal."""
    rng = np.random.default_rng(seed)
    cluster = 12
    users, items, ts = [], [], []
    for u in range(n_users):
        n = int(rng.integers(length // 2, length + 1))
        c = int(rng.integers(0, n_items // cluster))
        cur = c * cluster + int(rng.integers(0, cluster))
        for t in range(n):
            users.append(u)
            items.append(cur)
            ts.append(1_000_000 + u * 10_000 + t * 60)
            if rng.random() < 0.85:
                cur = (cur // cluster) * cluster + (cur % cluster + 1) % cluster
            else:
                cur = int(rng.integers(0, n_items))
    ev = finalize_events(
        pl.DataFrame({"user": users, "item": items, "ts": ts, "rating": np.full(len(users), 4.0, np.float32)})
    )
    item_cat = (np.arange(n_items) // cluster + 1).astype(np.int64)
    items_tab = FeatureTable(
        n=n_items,
        categorical={"cluster": item_cat},
        multi={"genres": item_cat[:, None]},
        cardinality={"cluster": n_items // cluster + 1, "genres": n_items // cluster + 1},
    )
    users_tab = FeatureTable(
        n=n_users,
        categorical={"group": (np.arange(n_users) % 3 + 1).astype(np.int64)},
        cardinality={"group": 4},
    )
    return Dataset(
        name="planted",
        events=ev,
        n_users=n_users,
        n_items=n_items,
        items=items_tab,
        users=users_tab,
        raw_user_ids=np.arange(n_users),
        raw_item_ids=np.arange(n_items),
        category_feature="genres",
        source="tests/funnel_toys.py",
    )


class CoocRetriever:
    name = "cooc"

    def fit(self, ctx):
        ev = ctx.split.train
        u = ev["user"].to_numpy()
        it = ev["item"].to_numpy()
        n = ctx.dataset.n_items
        same = u[1:] == u[:-1]
        co = np.zeros((n, n), np.float32)
        np.add.at(co, (it[:-1][same], it[1:][same]), 1.0)
        pop = np.bincount(it, minlength=n).astype(np.float32)
        self.co = torch.from_numpy(co).to(ctx.device)
        self.prior = torch.from_numpy(1e-3 * pop / max(pop.max(), 1.0)).to(ctx.device)
        self.exclude_seen_ = ctx.exclude_seen
        self.fit_report_ = {"cached": False}
        return self

    def retrieve(self, batch, k):
        h = batch.hist_items
        w = batch.hist_mask.float()
        last = (batch.hist_len - 1).clamp_min(0)
        recent = torch.arange(h.shape[1], device=h.device)[None, :] == last[:, None]
        w = w * (1.0 + 4.0 * recent.float())  # the newest event matters most
        scores = (self.co[h] * w[..., None]).sum(1) + self.prior  # (B, n_items)
        if self.exclude_seen_:
            rows = torch.arange(len(batch), device=h.device)[:, None].expand_as(h)
            m = batch.hist_mask
            scores[rows[m], h[m]] = float("-inf")
        top = torch.topk(scores, k, dim=1)
        return Candidates(ids=top.indices, scores=top.values)


class _MF(nn.Module):
    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_items, dim)
        self.out = nn.Embedding(n_items, dim)
        self.bias = nn.Embedding(n_items, 1)
        nn.init.normal_(self.emb.weight, std=0.1)
        nn.init.normal_(self.out.weight, std=0.1)
        nn.init.zeros_(self.bias.weight)

    def user(self, batch):
        last = (batch.hist_len - 1).clamp_min(0)
        newest = self.emb(batch.hist_items.gather(1, last[:, None]))[:, 0]  # (B, D)
        m = batch.hist_mask.float()[..., None]
        pooled = (self.emb(batch.hist_items) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return newest + 0.5 * pooled

    def forward(self, batch, cand):  # (B, K) -> (B, K)
        u = self.user(batch)
        return (u[:, None, :] * self.out(cand)).sum(-1) + self.bias(cand)[..., 0]


@dataclass(frozen=True, kw_only=True)
class MFConfig:
    dim: int = 16
    n_negatives: int = 32
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=3, batch_size=256, lr=2e-2, patience=2)
    )

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"MFConfig.dim must be >= 1, got {self.dim}")


class MFRanker(LearnedStage):
    name = "mf"
    kind = "ranker"
    config_class = MFConfig
    cache_name = "test-mf"

    def build_model(self, ctx):
        return _MF(ctx.dataset.n_items, self.config.dim)

    def train_model(self, model, ctx):
        cfg, n = self.config, ctx.dataset.n_items

        def loss_fn(batch, gen):
            pos = batch.targets[:, :1]
            neg = torch.randint(0, n, (len(batch), cfg.n_negatives), generator=gen).to(ctx.device)
            logits = model(batch, torch.cat([pos, neg], 1))
            return F.cross_entropy(logits, torch.zeros(len(batch), dtype=torch.long, device=ctx.device))

        def valid_fn():
            return sampled_mrr(model, ctx.valid, ctx.device, n_negatives=50)

        return fit_model(model, loss_fn, valid_fn, ctx, cfg.train, desc="test mf")

    @torch.no_grad()
    def score(self, batch, candidates):
        return self.fitted_model()(batch.to(self.device_), candidates.to(self.device_)).float()


class PopRanker:
    name = "pop"

    def fit(self, ctx):
        pop = ctx.dataset.item_popularity(ctx.split.train).astype(np.float32)
        self.pop = torch.from_numpy(pop).to(ctx.device)
        return self

    def score(self, batch, candidates):
        return self.pop[candidates]


class WrongShapeRanker(PopRanker):
    name = "wrongshape"

    def score(self, batch, candidates):
        return self.pop[candidates][:, :-1]


class NaNRanker(PopRanker):
    name = "nanranker"

    def score(self, batch, candidates):
        s = self.pop[candidates].clone()
        s[0, 0] = float("nan")
        return s


class NoScore:
    name = "noscore"

    def fit(self, ctx):
        return self


def builtin_stage_specs(epochs: int = 1, steps: int = 30) -> dict:
    """TOML-ready stage tables for the built-in funnel (retrieval twotower, ESR gesr vs twotower,
    LSR lsr), each trained briefly."""
    def brief(stage: str) -> dict:
        train = {"epochs": epochs, "max_steps_per_epoch": steps}
        config = {"train": train, **({"pretrain": train} if stage in ("gesr", "lsr") else {})}
        return {"stage": stage, "config": config}

    return {"retrieval": brief("twotower"), "esr": brief("gesr"),
            "esr_baseline": brief("twotower"), "lsr": brief("lsr")}
