"""Most-popular baseline: every request gets the items with the most training events.

The floor every learned stage must clear, registered as a retriever (top items, excluding the
request's history when the run excludes seen items, `FitContext.exclude_seen`), and as an ESR and
an LSR (score = log(1 + training count), the same for every user). Popularity is counted on the
training split's events only, so validation and test targets never leak into it. It has no
configuration.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cascade.data.traffic import RequestBatch
from cascade.stages.base import Candidates, FitContext, check_fitted, register
from cascade.stages.retrieval import search_with_exclusion


class _Popular:
    name = "popular"
    kind: ClassVar[str] = "ranker"

    item_scores_: Tensor | None = None  # (n_items,) float32 on the device
    order_: Tensor | None = None  # (n_items,) item ids, most popular first
    fit_report_: dict[str, Any] | None = None
    device_: torch.device | None = None

    def fit(self, ctx: FitContext) -> "_Popular":
        counts = np.bincount(ctx.split.train["item"].to_numpy(), minlength=ctx.dataset.n_items)
        self.device_ = ctx.device
        self.item_scores_ = torch.as_tensor(np.log1p(counts), dtype=torch.float32, device=ctx.device)
        # most popular first, ties by item id: deterministic on every device
        self.order_ = torch.as_tensor(np.argsort(-counts, kind="stable"), device=ctx.device)
        self.fit_report_ = {"cached": False, "seconds": 0.0, "n_train_events": int(counts.sum())}
        return self

    def _scores(self) -> Tensor:
        check_fitted(self, self.kind, "item_scores_")
        return self.item_scores_


@register("esr", "popular")
@register("lsr", "popular")
class PopularRanker(_Popular):
    """Scores each candidate by its training popularity."""

    candidate_independent: ClassVar[bool] = True

    @torch.no_grad()
    def score(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        """candidates (B, K) -> (B, K) float32 log(1 + training count)."""
        scores = self._scores()
        return scores[candidates.to(self.device_)]


@register("retrieval", "popular")
class PopularRetriever(_Popular):
    """The k most popular items (not in the request's history when the run excludes seen
    items)."""

    kind: ClassVar[str] = "retrieval"
    exclude_seen_: bool | None = None

    def fit(self, ctx: FitContext) -> "PopularRetriever":
        super().fit(ctx)
        self.exclude_seen_ = ctx.exclude_seen
        return self

    @torch.no_grad()
    def retrieve(self, batch: RequestBatch, k: int) -> Candidates:
        if k < 1:
            raise ValueError(f"retrieve: k must be >= 1, got {k}")
        scores = self._scores()
        batch = batch.to(self.device_)
        b = len(batch)
        # popularity as a one-dimensional "two-tower": user vector 1, item vector its score
        user_vecs = torch.ones((b, 1), device=self.device_)
        item_vecs = scores[:, None]
        order = self.order_

        def search(_u: Tensor, m: int) -> tuple[Tensor, Tensor]:
            top = order[:m]
            return top[None, :].expand(b, m), scores[top][None, :].expand(b, m)

        return search_with_exclusion(search, user_vecs, item_vecs, batch, k, self.exclude_seen_)
