"""Hard Matching Attention (HMA), GESR's explicit cross signals (Hong et al., arXiv 2511.21095).

For one (history feature, candidate feature) pair with history values U_1..U_N and the
candidate's value I [reading, shared/GESR.md]:
    A_i = 1 if U_i == I else 0        (hard attention: integer equality, no embeddings)
    c   = min(sum_i A_i, M)           (attention against an all-ones value, capped at M)
    e   = E[c + offset_pair]          (one table for all pairs, stride M + 1 per pair)
    T_match = MLP(concat(e_1 .. e_P))

Pairs (`MoAConfig.hma_pairs`), named `<feature>[_<filter>]`:
- "item": history item ids vs the candidate id (re-consumption);
- "category": history categories vs candidate categories, `dataset.category_feature`, a
  multi-valued item feature: an event counts when it shares ANY value with the candidate;
- "item_pos" / "category_pos": the same over the events with a positive action only;
- "item_recent" / "category_recent" [ours]: the same over the `hma_recent` newest events (a
  second time truncation, for the user's current intent; the MoA Config's "derive new signals").

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
HMA needs at serving time), so scoring never touches the feature tables. The MLP's first layer
is linear over the concatenated bucket embeddings, so it is folded into one (P(M+1), hidden)
table (`folded_table`, exact): per candidate, P gathers and a sum replace the matrix product.
[ours] code 0 of the category feature means unknown/padding and matches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSITIVE_CODE = 3  # RequestBatch.hist_actions: 0 pad, 1 negative, 2 neutral, 3 positive


@dataclass(frozen=True)
class HMAHistory:
    """What HMA keeps of one batch of histories (computed once per request)."""

    sorted_items: dict[str, Tensor]  # event filter -> (B, N) ids ascending, -1 where filtered out
    cat_hist: dict[str, Tensor]  # single-valued: event filter -> (B, C) category counts
    incidence: Tensor | None  # multi-valued: (B, N, C) event x category, 0 at padding / code 0
    masks: dict[str, Tensor]  # multi-valued: event filter -> (B, N) float event mask


def parse_pair(pair: str) -> tuple[str, str]:
    """"category_pos" -> ("category", "pos"); "item" -> ("item", "all")."""
    feature, _, flt = pair.partition("_")
    return feature, flt or "all"


def _range_count(sorted_seq: Tensor, values: Tensor) -> Tensor:
    """(B, N) ascending rows, (B, n) values -> (B, n) number of occurrences of each value."""
    values = values.contiguous()
    hi = torch.searchsorted(sorted_seq, values, right=True)
    lo = torch.searchsorted(sorted_seq, values, right=False)
    return hi - lo


def event_filters(
    hist_actions: Tensor, hist_len: Tensor, recent: int, n: int
) -> dict[str, Tensor]:
    """(B, N) bool masks of the events each filter keeps: all real events, the positive ones,
    the `recent` newest ones."""
    ar = torch.arange(n, device=hist_len.device)[None, :]
    valid = ar < hist_len[:, None]
    return {
        "all": valid,
        "pos": valid & (hist_actions == POSITIVE_CODE),
        "recent": valid & (ar >= hist_len[:, None] - recent),
    }


class HardMatchingAttention(nn.Module):
    """Capped match counts per pair -> bucket embeddings (stride M+1) -> MLP -> T_match."""

    def __init__(
        self,
        *,
        pairs: tuple[str, ...],
        cap: int,
        recent: int,
        item_categories: Tensor | None,  # (n_items, L) int64 codes, 0 = none; None = no categories
        n_categories: int,  # table size of the category feature incl. code 0
        emb_dim: int,
        hidden: int,
        out_dim: int,
    ) -> None:
        super().__init__()
        needs_cats = any(parse_pair(p)[0] == "category" for p in pairs)
        if needs_cats and item_categories is None:
            raise ValueError(
                f"HMA pairs {list(pairs)} need item categories, but none were given "
                "(the dataset has no category_feature)"
            )
        self.pairs = tuple(pairs)
        self.cap = int(cap)
        self.recent = int(recent)
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
        self.emb_dim = emb_dim
        self.buckets = nn.Embedding(len(self.pairs) * (self.cap + 1), emb_dim)
        self.mlp = nn.Sequential(
            nn.Linear(len(self.pairs) * emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim)
        )

    # -- history side, once per request ------------------------------------------------------
    def history(self, hist_items: Tensor, hist_actions: Tensor, hist_len: Tensor) -> HMAHistory:
        n = hist_items.shape[1]
        keep = event_filters(hist_actions, hist_len, self.recent, n)
        sorted_items: dict[str, Tensor] = {}
        cat_hist: dict[str, Tensor] = {}
        masks: dict[str, Tensor] = {}
        incidence = None
        items = torch.where(keep["all"], hist_items, torch.zeros_like(hist_items))
        cat_filters = [parse_pair(p)[1] for p in self.pairs if parse_pair(p)[0] == "category"]
        for pair in self.pairs:
            feature, flt = parse_pair(pair)
            if feature == "item":
                sorted_items[flt] = torch.where(keep[flt], hist_items, -1).sort(dim=1).values
        if cat_filters:
            cats = self.item_cats[items]  # (B, N, L)
            c = self.n_categories
            if self.single_valued:
                for flt in cat_filters:
                    h = torch.zeros(items.shape[0], c, device=items.device)
                    h.scatter_add_(1, cats[..., 0], keep[flt].float())
                    h[:, 0] = 0.0  # code 0: unknown, matches nothing
                    cat_hist[flt] = h  # (B, C)
            else:
                incidence = torch.zeros(*items.shape, c, device=items.device)
                incidence.scatter_(2, cats, 1.0)  # (B, N, C); repeated codes set 1 once
                incidence[..., 0] = 0.0
                masks = {flt: keep[flt].float() for flt in cat_filters}
        return HMAHistory(sorted_items=sorted_items, cat_hist=cat_hist, incidence=incidence, masks=masks)

    # -- candidate side, all candidates of a request at once ---------------------------------
    def counts(self, state: HMAHistory, cand: Tensor) -> Tensor:
        """Uncapped match counts (B, n, P) int64, one column per configured pair."""
        cols: list[Tensor] = []
        shared = None
        for pair in self.pairs:
            feature, flt = parse_pair(pair)
            if feature == "item":
                cols.append(_range_count(state.sorted_items[flt], cand))
            elif self.single_valued:
                code = self.item_cats[cand][..., 0]  # (B, n)
                cols.append(state.cat_hist[flt].gather(1, code).round().long())
            else:
                if shared is None:  # (B, n, N): does the event share any value with the candidate
                    mask = torch.zeros(*cand.shape, self.n_categories, device=cand.device)
                    mask.scatter_(2, self.item_cats[cand], 1.0)
                    mask[..., 0] = 0.0  # (B, n, C)
                    shared = (torch.bmm(mask, state.incidence.transpose(1, 2)) > 0.5).float()
                cols.append(torch.bmm(shared, state.masks[flt][..., None]).squeeze(-1).round().long())
        return torch.stack(cols, dim=-1)

    def bucket_ids(self, counts: Tensor) -> Tensor:
        """Capped counts shifted by the pair's offset: pair p owns ids p(M+1) .. p(M+1)+M."""
        offsets = torch.arange(len(self.pairs), device=counts.device) * (self.cap + 1)
        return counts.clamp(max=self.cap) + offsets

    def folded_table(self) -> Tensor:
        """(P(M+1), hidden): bucket j's embedding through its pair's slice of the first MLP
        layer. Since that layer is linear over concat(e_1..e_P), its output is the sum of one
        row per pair: the same numbers as embedding -> concat -> Linear, at P gathers per
        candidate instead of a (P E x hidden) matrix product."""
        p, m1, e = len(self.pairs), self.cap + 1, self.emb_dim
        w = self.mlp[0].weight.view(-1, p, e)  # (hidden, P, E)
        emb = self.buckets.weight.view(p, m1, e)  # (P, M+1, E)
        return torch.einsum("pme,hpe->pmh", emb, w).reshape(p * m1, -1)

    def embed_counts(self, counts: Tensor) -> Tensor:
        """(B, n, P) counts -> T_match (B, n, D) through the folded first layer."""
        ids = self.bucket_ids(counts)  # (B, n, P)
        h = F.embedding_bag(ids.reshape(-1, ids.shape[-1]), self.folded_table(), mode="sum")
        h = h.view(*ids.shape[:-1], -1) + self.mlp[0].bias  # gather + sum fused, (B, n, hidden)
        return self.mlp[2](self.mlp[1](h))

    def embed_counts_unfolded(self, counts: Tensor) -> Tensor:
        """The definition (embeddings -> concat -> MLP); the reference path uses it."""
        return self.mlp(self.buckets(self.bucket_ids(counts)).flatten(-2))

    def forward(self, state: HMAHistory, cand: Tensor) -> Tensor:
        """-> T_match (B, n, D)."""
        return self.embed_counts(self.counts(state, cand))


def naive_counts(
    hma: HardMatchingAttention, hist_items: Tensor, hist_actions: Tensor, hist_len: Tensor, cand: Tensor
) -> Tensor:
    """Reference counts by direct comparison (B, N) x (B, n) -> (B, n, P): every event against
    every candidate, category sets compared value by value. Memory O(B n N L^2); tests only."""
    n_hist = hist_items.shape[1]
    keep = event_filters(hist_actions, hist_len, hma.recent, n_hist)
    cols = []
    for pair in hma.pairs:
        feature, flt = parse_pair(pair)
        if feature == "item":
            hit = hist_items[:, None, :] == cand[:, :, None]  # (B, n, N)
        else:
            hc = hma.item_cats[hist_items]  # (B, N, L)
            cc = hma.item_cats[cand]  # (B, n, L)
            eq = (hc[:, None, :, :, None] == cc[:, :, None, None, :]) & (cc[:, :, None, None, :] > 0)
            hit = eq.flatten(3).any(-1)  # (B, n, N): the event shares a non-zero value
        cols.append((hit & keep[flt][:, None, :]).sum(-1))
    return torch.stack(cols, dim=-1)
