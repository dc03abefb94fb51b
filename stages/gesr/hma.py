"""Hard Matching Attention (HMA), GESR's explicit cross signals (Hong et al., arXiv 2511.21095).

For one (history feature, candidate feature) pair with history values U_1..U_N and the
candidate's value I [reading, shared/GESR.md]:
    A_i = 1 if U_i == I else 0        (hard attention: integer equality, no embeddings)
    c   = min(sum_i A_i, M)           (attention against an all-ones value, capped at M)
    e   = E[c + offset_pair]          (one table for all pairs, stride M + 1 per pair)
    T_match = MLP(concat(e_1 .. e_P))

Pairs (`MoAConfig.hma_pairs`):
- "item": history item ids vs the candidate id (re-consumption);
- "category": history categories vs candidate categories, `dataset.category_feature`, a
  multi-valued item feature: an event counts when it shares ANY value with the candidate;
- "item_pos" / "category_pos": the same over the events with a positive action only.

Everything is counted for all candidates of a request at once, never per candidate in Python:
- item pairs: each request's history ids are sorted once (padding and excluded events become
  the sentinel -1, which no item id equals) and a candidate's count is the width of its
  `searchsorted` range: O(n log N) per request, no (N x n) comparison matrix;
- category pairs, one value per item (genres of most data, k-means pseudo-categories): a
  per-request category histogram (B, C), looked up at the candidate's category;
- category pairs, several values per item: the event x category incidence (B, N, C) of the
  history against the candidates' category masks (B, n, C), one batched matmul giving the
  number of shared values per (candidate, event), then "> 0" and a sum over events.
The history part (`history`) is computed once per request and reused for every candidate; the
item -> category table is a buffer built once from the dataset (the cached item features that
HMA needs at serving time), so scoring never touches the feature tables.
[ours] code 0 of the category feature means unknown/padding and matches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

POSITIVE_CODE = 3  # RequestBatch.hist_actions: 0 pad, 1 negative, 2 neutral, 3 positive


@dataclass(frozen=True)
class HMAHistory:
    """What HMA keeps of one batch of histories (computed once per request)."""

    sorted_items: Tensor | None  # (B, N) int64, ascending, -1 at padding
    sorted_pos_items: Tensor | None  # (B, N) int64, only positive events, -1 elsewhere
    cat_hist: Tensor | None  # single-valued: (B, C) float counts; multi: (B, N, C) incidence
    cat_pos_hist: Tensor | None  # the same over positive events


def _range_count(sorted_seq: Tensor, values: Tensor) -> Tensor:
    """(B, N) ascending rows, (B, n) values -> (B, n) number of occurrences of each value."""
    hi = torch.searchsorted(sorted_seq, values, right=True)
    lo = torch.searchsorted(sorted_seq, values, right=False)
    return hi - lo


class HardMatchingAttention(nn.Module):
    """Capped match counts per pair -> bucket embeddings (stride M+1) -> MLP -> T_match."""

    def __init__(
        self,
        *,
        pairs: tuple[str, ...],
        cap: int,
        item_categories: Tensor | None,  # (n_items, L) int64 codes, 0 = none; None = no categories
        n_categories: int,  # table size of the category feature incl. code 0
        emb_dim: int,
        hidden: int,
        out_dim: int,
    ) -> None:
        super().__init__()
        needs_cats = any(p.startswith("category") for p in pairs)
        if needs_cats and item_categories is None:
            raise ValueError(
                f"HMA pairs {list(pairs)} need item categories, but none were given "
                "(the dataset has no category_feature)"
            )
        self.pairs = tuple(pairs)
        self.cap = int(cap)
        self.n_categories = int(n_categories)
        cats = (
            torch.zeros(0, 1, dtype=torch.long)
            if item_categories is None
            else torch.as_tensor(item_categories, dtype=torch.long)
        )
        if cats.dim() == 1:
            cats = cats[:, None]
        self.single_valued = cats.shape[1] == 1
        # cached item features for HMA: not learned, rebuilt from the dataset, so not persisted
        self.register_buffer("item_cats", cats, persistent=False)
        self.buckets = nn.Embedding(len(self.pairs) * (self.cap + 1), emb_dim)
        self.mlp = nn.Sequential(
            nn.Linear(len(self.pairs) * emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim)
        )

    # -- history side, once per request ------------------------------------------------------
    def _incidence(self, items: Tensor, keep: Tensor) -> Tensor:
        """(B, N) items, (B, N) bool -> category counts: (B, C) histogram (single-valued) or
        (B, N, C) event x category incidence (multi-valued), zero where not kept and at code 0."""
        cats = self.item_cats[items]  # (B, N, L)
        c = self.n_categories
        if self.single_valued:
            hist = torch.zeros(items.shape[0], c, device=items.device)
            hist.scatter_add_(1, cats[..., 0], keep.float())
            hist[:, 0] = 0.0
            return hist  # (B, C)
        inc = torch.zeros(*items.shape, c, device=items.device)
        inc.scatter_(2, cats, 1.0)  # (B, N, C); duplicated codes in one row set 1 once
        inc[..., 0] = 0.0
        return inc * keep[..., None].float()

    def history(self, hist_items: Tensor, hist_actions: Tensor, hist_len: Tensor) -> HMAHistory:
        n = hist_items.shape[1]
        valid = torch.arange(n, device=hist_items.device)[None, :] < hist_len[:, None]  # (B, N)
        pos = valid & (hist_actions == POSITIVE_CODE)
        items = torch.where(valid, hist_items, torch.zeros_like(hist_items))
        out: dict[str, Tensor | None] = dict.fromkeys(
            ("sorted_items", "sorted_pos_items", "cat_hist", "cat_pos_hist")
        )
        if "item" in self.pairs:
            out["sorted_items"] = torch.where(valid, hist_items, -1).sort(dim=1).values
        if "item_pos" in self.pairs:
            out["sorted_pos_items"] = torch.where(pos, hist_items, -1).sort(dim=1).values
        if "category" in self.pairs:
            out["cat_hist"] = self._incidence(items, valid)
        if "category_pos" in self.pairs:
            out["cat_pos_hist"] = self._incidence(items, pos)
        return HMAHistory(**out)

    # -- candidate side, all candidates of a request at once ---------------------------------
    def _category_count(self, hist: Tensor, cand: Tensor) -> Tensor:
        cats = self.item_cats[cand]  # (B, n, L)
        if self.single_valued:
            return hist.gather(1, cats[..., 0]).round().long()  # code 0 column is zero
        mask = torch.zeros(*cand.shape, self.n_categories, device=cand.device)
        mask.scatter_(2, cats, 1.0)
        mask[..., 0] = 0.0  # (B, n, C)
        shared = torch.bmm(mask, hist.transpose(1, 2))  # (B, n, N) shared values per event
        return (shared > 0.5).sum(-1)

    def counts(self, state: HMAHistory, cand: Tensor) -> Tensor:
        """Uncapped match counts (B, n, P) int64, one column per configured pair."""
        cols = []
        for pair in self.pairs:
            if pair == "item":
                cols.append(_range_count(state.sorted_items, cand))
            elif pair == "item_pos":
                cols.append(_range_count(state.sorted_pos_items, cand))
            elif pair == "category":
                cols.append(self._category_count(state.cat_hist, cand))
            else:
                cols.append(self._category_count(state.cat_pos_hist, cand))
        return torch.stack(cols, dim=-1)

    def bucket_ids(self, counts: Tensor) -> Tensor:
        """Capped counts shifted by the pair's offset: pair p owns ids p(M+1) .. p(M+1)+M."""
        offsets = torch.arange(len(self.pairs), device=counts.device) * (self.cap + 1)
        return counts.clamp(max=self.cap) + offsets

    def forward(self, state: HMAHistory, cand: Tensor) -> Tensor:
        """-> T_match (B, n, D)."""
        e = self.buckets(self.bucket_ids(self.counts(state, cand)))  # (B, n, P, E)
        return self.mlp(e.flatten(2))


def naive_counts(
    hma: HardMatchingAttention, hist_items: Tensor, hist_actions: Tensor, hist_len: Tensor, cand: Tensor
) -> Tensor:
    """Reference counts by direct comparison (B, N) x (B, n) -> (B, n, P): every event against
    every candidate, category sets compared value by value. Memory O(B n N L^2); tests only."""
    n_hist = hist_items.shape[1]
    valid = torch.arange(n_hist, device=hist_items.device)[None, :] < hist_len[:, None]
    pos = valid & (hist_actions == POSITIVE_CODE)
    same_item = hist_items[:, None, :] == cand[:, :, None]  # (B, n, N)
    cols = []
    for pair in hma.pairs:
        if pair.startswith("item"):
            hit = same_item
        else:
            hc = hma.item_cats[hist_items]  # (B, N, L)
            cc = hma.item_cats[cand]  # (B, n, L)
            eq = (hc[:, None, :, :, None] == cc[:, :, None, None, :]) & (cc[:, :, None, None, :] > 0)
            hit = eq.flatten(3).any(-1)  # (B, n, N): the event shares a non-zero value
        keep = pos if pair.endswith("_pos") else valid
        cols.append((hit & keep[:, None, :]).sum(-1))
    return torch.stack(cols, dim=-1)
