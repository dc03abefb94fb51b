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

Everything is counted from per-request lookup tables built once per request (`history`), so a
candidate costs a few gathers, never a comparison against every event:
- item pairs: each request's kept history ids are sorted once (padding becomes the sentinel -1,
  which no item id equals); at the last event of every run of equal ids sits that id's count
  under each item pair (`run_counts`, prefix sums over the run). A candidate's counts are one
  `searchsorted` (the end of its run) and one gather, zero when the event found is another id;
- category pairs: the catalogue's distinct category sets are numbered once (`set_id`; one value
  per item: the set is the value), and each request gets a table of the number of its events
  sharing a value with each set (`set_counts`: an event histogram over sets, times the
  (S, S) "shares a value" matrix when items have several values); a candidate's counts are the
  row of its set. Above `SET_TABLE_LIMIT` distinct multi-valued sets (where the (S, S) matrix and
  the per-request tables would cost more than the candidates) the counts are per candidate: the
  event x category incidence (B, N, C) against the candidates' category masks (B, n, C), one
  batched matmul giving the shared values per (candidate, event), "> 0", then one matmul with
  the event masks of the category pairs.
The item -> category table is a buffer built once from the dataset (the cached item features that
HMA needs at serving time), so scoring never touches the feature tables. The MLP's first layer
is linear over the concatenated bucket embeddings, so it is folded into one (P(M+1), hidden)
table (`folded_table`, exact): the first layer's output is a sum of one row per pair. The sum of
the item pairs' rows depends on the (request, matched run) only and that of the category pairs'
rows on the (request, category set) only, so `history` also sums them into per-request hidden
tables (`hidden_items`, `hidden_sets`) and a candidate's first layer is two row gathers and an add.
[ours] code 0 of the category feature means unknown/padding and matches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.stages.gather import take_rows

POSITIVE_CODE = 3  # RequestBatch.hist_actions: 0 pad, 1 negative, 2 neutral, 3 positive


# multi-valued categories: at most this many distinct category sets get per-request tables
# (an (S, S) float matrix of 4 MiB); above it the counts are per candidate
SET_TABLE_LIMIT = 1024


@dataclass(frozen=True)
class HMAHistory:
    """What HMA keeps of one batch of histories (computed once per request)."""

    keys: Tensor | None  # item pairs: (B, N) kept history ids ascending, -1 where filtered out
    run_counts: Tensor | None  # (B, N, P_item) int64: at a run's last event, its id's counts
    set_counts: Tensor | None  # category pairs: (B, S, P_cat) int64 matching events per set
    incidence: Tensor | None  # per-candidate category path: (B, N, C) event x category
    cat_masks: Tensor | None  # per-candidate category path: (B, N, P_cat) float event masks
    hidden_items: Tensor | None  # (B, N + 1, hidden) item pairs' first-layer rows; N: no match
    hidden_sets: Tensor | None  # (B, S, hidden) category pairs' first-layer rows (+ the bias)


def parse_pair(pair: str) -> tuple[str, str]:
    """"category_pos" -> ("category", "pos"); "item" -> ("item", "all")."""
    feature, _, flt = pair.partition("_")
    return feature, flt or "all"


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


def category_sets(cats: Tensor, n_categories: int) -> tuple[Tensor, Tensor]:
    """(n_items, L) codes -> (set_id (n_items,), incidence (S, C) float of the distinct sets of
    non-zero codes; an item without categories gets the empty set)."""
    inc = torch.zeros(cats.shape[0], n_categories)
    inc.scatter_(1, cats, 1.0)
    inc[:, 0] = 0.0  # code 0 matches nothing
    sets, set_id = torch.unique(inc, dim=0, return_inverse=True)
    return set_id, sets


def _bag_sum(ids: Tensor, table: Tensor) -> Tensor:
    """ids (*shape, P) -> (*shape, width): the sum of the P rows of `table`, one fused
    `embedding_bag` (against a gather, then a sum over the short dim P: `history` of 64 ml-100k
    requests 1.66 -> 0.98 ms, one thread)."""
    out = F.embedding_bag(ids.reshape(-1, ids.shape[-1]), table, mode="sum")
    return out.view(*ids.shape[:-1], table.shape[-1])


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
        # columns of counts() holding the item pairs and the category pairs, in pair order
        self.item_cols = [j for j, p in enumerate(self.pairs) if parse_pair(p)[0] == "item"]
        self.cat_cols = [j for j, p in enumerate(self.pairs) if parse_pair(p)[0] == "category"]
        # cached item features for HMA: not learned, rebuilt from the dataset, so not persisted
        self.register_buffer("item_cats", cats, persistent=False)
        # category sets: one value per item, the set is the value (the "shares a value" matrix
        # is the identity without code 0); several values: the distinct sets and their matrix
        set_id, overlap = cats[:, 0], None
        if self.cat_cols and not self.single_valued:
            ids, sets = category_sets(cats, self.n_categories)
            if sets.shape[0] <= SET_TABLE_LIMIT:
                set_id, overlap = ids, (sets @ sets.T > 0.5).float()  # (S, S)
            else:
                set_id = None  # per-candidate counting
        self.register_buffer("set_id", set_id, persistent=False)
        self.register_buffer("set_overlap", overlap, persistent=False)
        self.emb_dim = emb_dim
        self.buckets = nn.Embedding(len(self.pairs) * (self.cap + 1), emb_dim)
        self.mlp = nn.Sequential(
            nn.Linear(len(self.pairs) * emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim)
        )

    @property
    def n_sets(self) -> int:
        """Rows of a request's category-set table (the category codes with one value per item)."""
        if self.single_valued:
            return self.n_categories
        return 0 if self.set_overlap is None else int(self.set_overlap.shape[0])

    # -- history side, once per request ------------------------------------------------------
    def history(self, hist_items: Tensor, hist_actions: Tensor, hist_len: Tensor) -> HMAHistory:
        b, n = hist_items.shape
        keep = event_filters(hist_actions, hist_len, self.recent, n)
        filters = [parse_pair(p)[1] for p in self.pairs]
        keys = run_counts = set_counts = incidence = cat_masks = None
        if self.item_cols:
            keys, order = torch.where(keep["all"], hist_items, -1).sort(dim=1)  # (B, N)
            w = torch.stack([keep[filters[j]] for j in self.item_cols], -1).long()  # (B, N, P_i)
            cum = w.gather(1, order[..., None].expand_as(w)).cumsum(1)  # in sorted order
            ar = torch.arange(n, device=keys.device).expand(b, n)
            first = torch.ones_like(keys, dtype=torch.bool)
            first[:, 1:] = keys[:, 1:] != keys[:, :-1]
            start = torch.where(first, ar, 0).cummax(1).values  # (B, N) first event of the run
            before = cum.gather(1, (start - 1).clamp(min=0)[..., None].expand_as(cum))
            run_counts = cum - before * (start > 0)[..., None]  # (B, N, P_i)
        if self.cat_cols:
            masks = torch.stack([keep[filters[j]] for j in self.cat_cols], -1).float()  # (B, N, P_c)
            items = torch.where(keep["all"], hist_items, torch.zeros_like(hist_items))
            if self.set_id is not None:
                hist_sets = take_rows(self.set_id, items)  # (B, N)
                h = masks.new_zeros(b, self.n_sets, masks.shape[-1])
                h.scatter_add_(1, hist_sets[..., None].expand_as(masks), masks)  # (B, S, P_c)
                if self.set_overlap is None:
                    h[:, 0] = 0.0  # code 0: unknown, matches nothing
                else:
                    # events sharing a value with the set, one (B P_c, S) x (S, S) product
                    h = torch.matmul(h.transpose(1, 2), self.set_overlap).transpose(1, 2)
                set_counts = h.round().long()
            else:
                incidence = masks.new_zeros(b, n, self.n_categories)
                incidence.scatter_(2, take_rows(self.item_cats, items), 1.0)  # (B, N, C); repeats set 1 once
                incidence[..., 0] = 0.0
                cat_masks = masks
        hidden_items = hidden_sets = None
        table = self.folded_table()
        offsets = torch.arange(len(self.pairs), device=table.device) * (self.cap + 1)
        bias = self.mlp[0].bias  # in the first table a candidate reads
        if run_counts is not None:
            off = offsets[self.item_cols]
            ids = torch.cat([run_counts.clamp(max=self.cap), run_counts.new_zeros(b, 1, len(off))], 1)
            hidden_items = _bag_sum(ids + off, table) + bias  # (B, N + 1, hidden)
            bias = 0.0
        if set_counts is not None:
            ids = set_counts.clamp(max=self.cap) + offsets[self.cat_cols]
            hidden_sets = _bag_sum(ids, table) + bias  # (B, S, hidden)
        return HMAHistory(keys=keys, run_counts=run_counts, set_counts=set_counts,
                          incidence=incidence, cat_masks=cat_masks, hidden_items=hidden_items,
                          hidden_sets=hidden_sets)

    # -- candidate side, all candidates of a request at once ---------------------------------
    def _item_run(self, state: HMAHistory, cand: Tensor) -> tuple[Tensor, Tensor]:
        """(run (B, n): the index of the last event of the candidate's run, hit (B, n) bool:
        whether that run is the candidate's id)."""
        run = (torch.searchsorted(state.keys, cand.contiguous(), right=True) - 1).clamp(min=0)
        return run, state.keys.gather(1, run) == cand

    def _pair_category_counts(self, state: HMAHistory, cand: Tensor) -> Tensor:
        """(B, n, P_cat) by the per-candidate incidence product (many multi-valued sets)."""
        mask = torch.zeros(*cand.shape, self.n_categories, device=cand.device)
        mask.scatter_(2, take_rows(self.item_cats, cand), 1.0)
        mask[..., 0] = 0.0  # (B, n, C)
        shared = (torch.bmm(mask, state.incidence.transpose(1, 2)) > 0.5).float()  # (B, n, N)
        return torch.bmm(shared, state.cat_masks).round().long()

    def counts(self, state: HMAHistory, cand: Tensor) -> Tensor:
        """Uncapped match counts (B, n, P) int64, one column per configured pair."""
        out = cand.new_zeros(*cand.shape, len(self.pairs))
        if self.item_cols:
            run, hit = self._item_run(state, cand)
            got = state.run_counts.gather(1, run[..., None].expand(-1, -1, len(self.item_cols)))
            out[..., self.item_cols] = got * hit[..., None]
        if self.cat_cols:
            if state.set_counts is not None:
                sets = take_rows(self.set_id, cand)[..., None].expand(-1, -1, len(self.cat_cols))
                out[..., self.cat_cols] = state.set_counts.gather(1, sets)
            else:
                out[..., self.cat_cols] = self._pair_category_counts(state, cand)
        return out

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
        """-> T_match (B, n, D): the first layer from the per-request hidden tables (one row
        gather per pair group), then SiLU and the second layer."""
        b, n = cand.shape
        h = None
        req = torch.arange(b, device=cand.device)[:, None]
        if state.hidden_items is not None:
            run, hit = self._item_run(state, cand)
            rows = state.hidden_items.shape[1]
            row = torch.where(hit, run, rows - 1) + req * rows  # no match: the zero-count row
            h = F.embedding(row, state.hidden_items.flatten(0, 1))  # (B, n, hidden)
        if state.hidden_sets is not None:
            row = take_rows(self.set_id, cand) + req * state.hidden_sets.shape[1]
            got = F.embedding(row, state.hidden_sets.flatten(0, 1))
            h = got if h is None else h + got
        elif self.cat_cols:  # many multi-valued sets: per-candidate counts, folded rows
            offsets = torch.arange(len(self.pairs), device=cand.device)[self.cat_cols] * (self.cap + 1)
            ids = self._pair_category_counts(state, cand).clamp(max=self.cap) + offsets
            got = F.embedding_bag(ids.reshape(b * n, -1), self.folded_table(), mode="sum")
            got = got.view(b, n, -1)
            h = got + self.mlp[0].bias if h is None else h + got  # (the tables hold the bias)
        return self.mlp[2](self.mlp[1](h))


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
