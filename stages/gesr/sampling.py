"""Training negatives for GESR, with the exact log-Q correction of their sampling density.

An early-stage ranker orders what retrieval hands it: items close to the user's interests. A
pointwise model trained only against uniform or popular negatives learns to reject off-interest
items and gets little signal about the order *within* the user's interests, which is exactly
where the cross features (category match counts, recency, repeats) matter. So GESR draws
three kinds of negatives per request [ours]:

- uniform over the catalogue;
- by popularity ** 0.75 (`cascade.stages.negatives.NegativeSampler`);
- interest-matched: pick one of the request's history events at random, one of that item's
  categories (`dataset.category_feature`) at random, then an item of that category uniformly.

Hard negatives bias a classifier: with k negatives per positive drawn from q(i | u), the
Bayes-optimal logit of a pointwise (BCE) model is log p(i | u) - log(k q(i | u)), so the model
would learn to push down exactly the on-interest items. The fix is the log-Q correction used for
sampled softmax (Bengio & Senecal 2008; Yi et al., RecSys 2019): train on s(u, i) - log E(i | u),
with E(i | u) the expected number of draws of item i among the request's negatives; then s
itself estimates log p(i | u) up to a constant and is served uncorrected. E is exact here:

    E(i | u) = n_uni / n_items + n_pop * pop(i) + n_int * sum_{c in cats(i)} P_u(c) / |I_c|
    P_u(c)   = mean over the request's history events e of [c in cats(e)] / |cats(e)|

(|I_c| = number of items with category c). The correction applies to the positive as well.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cascade.data.traffic import RequestBatch
from cascade.stages.negatives import NegativeSampler


class InterestSampler:
    """Uniform + popularity + interest-matched negatives and their log expected draw counts."""

    def __init__(
        self,
        counts: np.ndarray,  # (n_items,) training popularity
        item_categories: Tensor | None,  # (n_items, L) codes, 0 = none; None: no interest part
        n_categories: int,
        *,
        pop_frac: float,
        interest_frac: float,
        device: torch.device,
    ) -> None:
        self.n_items = len(counts)
        self.interest_frac = interest_frac if item_categories is not None else 0.0
        self.base = NegativeSampler(counts, pop_frac=pop_frac, device=device)
        self.device = device
        if item_categories is None:
            return
        cats = torch.as_tensor(item_categories, dtype=torch.long)
        cats = cats[:, None] if cats.dim() == 1 else cats
        # non-zero codes first in each row, so "the j-th category of an item" is column j
        self.cats = cats.sort(dim=1, descending=True).values.to(device)  # (n_items, L)
        self.n_cats = (self.cats > 0).sum(1)  # (n_items,)
        flat_items = torch.arange(self.n_items).repeat_interleave(cats.shape[1])
        flat_codes = cats.reshape(-1)
        keep = flat_codes > 0
        order = torch.argsort(flat_codes[keep], stable=True)
        self.members = flat_items[keep][order].to(device)  # items grouped by category
        size = torch.bincount(flat_codes[keep], minlength=n_categories)
        self.size = size.to(device)  # (C,) |I_c|
        self.start = (torch.cumsum(size, 0) - size).to(device)  # (C,) first member of c
        self.n_categories = n_categories

    def split(self, n_neg: int) -> tuple[int, int]:
        """(interest-matched, other) counts of n_neg."""
        n_int = int(round(n_neg * self.interest_frac))
        return n_int, n_neg - n_int

    def _interest(self, batch: RequestBatch, n: int, gen: torch.Generator) -> Tensor:
        b = len(batch)
        u = lambda *shape: torch.rand(*shape, generator=gen).to(self.device)  # noqa: E731
        length = batch.hist_len.clamp_min(1)
        pos = (u(b, n) * length[:, None]).long().clamp(max=batch.hist_items.shape[1] - 1)
        items = batch.hist_items.gather(1, pos)  # (B, n) a random history event's item
        m = self.n_cats[items].clamp_min(1)
        j = (u(b, n) * m).long().clamp(max=self.cats.shape[1] - 1)
        code = self.cats[items].gather(2, j[..., None]).squeeze(-1)  # (B, n) one of its cats
        k = (u(b, n) * self.size[code]).long()
        picked = self.members[(self.start[code] + k).clamp(max=self.members.numel() - 1)]
        # an event whose item has no category, or an empty history: fall back to uniform
        ok = (self.size[code] > 0) & (code > 0) & (batch.hist_len[:, None] > 0)
        return torch.where(ok, picked, torch.randint(0, self.n_items, (b, n), generator=gen).to(self.device))

    def sample(self, batch: RequestBatch, n_neg: int, gen: torch.Generator) -> Tensor:
        """(B, n_neg) negatives (may hit the positive: callers mask it)."""
        n_int, n_other = self.split(n_neg)
        parts = [self.base.sample(len(batch), n_other, gen)] if n_other else []
        if n_int:
            parts.append(self._interest(batch, n_int, gen))
        return torch.cat(parts, dim=1)

    def interest_density(self, batch: RequestBatch, ids: Tensor) -> Tensor:
        """(B, K) probability that one interest-matched draw for the request is item ids[b, k]."""
        b, n_hist = batch.hist_items.shape
        valid = torch.arange(n_hist, device=self.device)[None, :] < batch.hist_len[:, None]
        ev_cats = self.cats[batch.hist_items]  # (B, N, L)
        w = valid.float() / (self.n_cats[batch.hist_items].clamp_min(1) * batch.hist_len.clamp_min(1)[:, None])
        p_c = torch.zeros(b, self.n_categories, device=self.device)
        p_c.scatter_add_(1, ev_cats.flatten(1), (w[..., None] * (ev_cats > 0)).flatten(1))  # (B, C)
        cc = self.cats[ids]  # (B, K, L)
        per = p_c.gather(1, cc.flatten(1)).view(cc.shape) / self.size[cc].clamp_min(1)
        return (per * (cc > 0)).sum(-1)

    def log_expected(self, batch: RequestBatch, ids: Tensor, n_neg: int) -> Tensor:
        """(B, K) log E(i | u): expected draws of ids[b, k] among the request's n_neg negatives."""
        n_int, n_other = self.split(n_neg)
        e = torch.exp(self.base.log_q(ids, n_other)) if n_other else torch.zeros(ids.shape, device=self.device)
        if n_int:
            e = e + n_int * self.interest_density(batch, ids)
        return torch.log(e.clamp_min(1e-12))
