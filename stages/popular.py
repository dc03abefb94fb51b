"""Most-popular baseline: every request gets the items with the most training events.

The floor every learned stage must clear, registered as a retriever (top items, excluding the
request's history when `exclude_seen`), and as an ESR and an LSR (score = log(1 + training
count), the same for every user). Popularity is counted on the training split's events only, so
validation and test targets never leak into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cascade.data.traffic import RequestBatch
from cascade.stages.base import Candidates, FitContext, StageError, register
from cascade.stages.features import PAD_SCORE
from cascade.stages.retrieval import search_with_exclusion


@dataclass(frozen=True, kw_only=True)
class PopularConfig:
    exclude_seen: bool = True  # retrieval only: drop items already in the request's history

    def __post_init__(self) -> None:
        if not isinstance(self.exclude_seen, bool):
            raise ValueError(f"PopularConfig.exclude_seen must be a bool, got {self.exclude_seen!r}")


class _Popular:
    name = "popular"
    config_class = PopularConfig

    def __init__(self, config: PopularConfig | None = None) -> None:
        self.config = config or PopularConfig()
        if not isinstance(self.config, PopularConfig):
            raise ValueError(f"config must be a PopularConfig, got {type(self.config).__name__}")
        self.item_scores: Tensor | None = None  # (n_items,) float32 on the device
        self.order: Tensor | None = None  # (n_items,) item ids, most popular first
        self.report: dict = {}
        self.device = torch.device("cpu")

    def fit(self, ctx: FitContext) -> "_Popular":
        counts = np.bincount(ctx.split.train["item"].to_numpy(), minlength=ctx.dataset.n_items)
        self.device = ctx.device
        self.item_scores = torch.as_tensor(np.log1p(counts), dtype=torch.float32, device=ctx.device)
        # most popular first, ties by item id: deterministic on every device
        self.order = torch.as_tensor(np.argsort(-counts, kind="stable"), device=ctx.device)
        self.report = {"cached": False, "seconds": 0.0, "n_train_events": int(counts.sum())}
        return self

    def _scores(self) -> Tensor:
        if self.item_scores is None:
            raise StageError(f"stage {self.name!r} is used before fit()")
        return self.item_scores

    @torch.no_grad()
    def score(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        """candidates (B, K) -> (B, K) float32 log(1 + training count)."""
        c = candidates.to(self.device)
        return self._scores()[c.clamp_min(0)].masked_fill(c < 0, PAD_SCORE)


@register("esr", "popular")
@register("lsr", "popular")
class PopularRanker(_Popular):
    """Scores each candidate by its training popularity."""


@register("retrieval", "popular")
class PopularRetriever(_Popular):
    """The k most popular items not in the request's history."""

    @torch.no_grad()
    def retrieve(self, batch: RequestBatch, k: int) -> Candidates:
        if k < 1:
            raise ValueError(f"retrieve: k must be >= 1, got {k}")
        scores = self._scores()
        batch = batch.to(self.device)
        b = len(batch)
        # popularity as a one-dimensional "two-tower": user vector 1, item vector its score
        user_vecs = torch.ones((b, 1), device=self.device)
        item_vecs = scores[:, None]
        order = self.order

        def search(_u: Tensor, m: int) -> tuple[Tensor, Tensor]:
            top = order[:m]
            return top[None, :].expand(b, m), scores[top][None, :].expand(b, m)

        return search_with_exclusion(
            search, user_vecs, item_vecs, batch, k, self.config.exclude_seen
        )
