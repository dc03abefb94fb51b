"""Shared feature-embedding helpers for every learned stage (retrieval, two-tower, LSR, GESR).

- `ItemFeatureEmbedder`: an item id embedding plus one embedding per categorical item feature plus
  one per multi-valued feature (mean-pooled over its non-zero codes), summed or concatenated and
  projected. The dataset's feature arrays become registered buffers once, so `.to(device)` moves
  them and lookup is a gather.
- `UserFeatureEmbedder`: the user categorical features in `RequestBatch.user_feats` column order
  (= `dataset.users.categorical` order); works with zero features (returns zeros).
- `HistoryTokenEmbedder`: one token per history event = item embedding + action-code embedding
  + time-gap-bucket embedding (+ optional recency-position embedding), zero at padding. This is
  the "MoA Config" feature fusion of GESR (shared/GESR.md) on public data.

`id_embedding_tables` finds a model's item and user id tables (sparse gradients train only the
rows a batch touches).

Training-data helpers used by several stages: `recent_history` (cut histories), `subsample`
(cheap validation) and `sequence_windows` (SASRec-style all-positions training); the negative
samplers and the sampled-softmax loss are in `cascade.stages.negatives`.

Code 0 is "unknown" for categorical features and "padding" for multi-valued ones (see
`cascade.data.dataset`), so every table uses `padding_idx=0`: unknown values contribute nothing.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.data.dataset import FeatureTable
from cascade.data.derive import N_ACTION_CODES, N_GAP_BUCKETS
from cascade.data.traffic import RequestBatch, Traffic
from cascade.stages.gather import take_rows

Combine = Literal["sum", "concat"]
CATALOGUE_CACHE_BYTES = 64 << 20  # ItemFeatureEmbedder caches every item's embedding for
#                                   serving up to this size (250k items at 64 dims)
DEDUP_MIN = 2048  # ItemFeatureEmbedder embeds distinct ids once when a call has more ids


class ServingCache(nn.Module):
    """A module whose serving path keeps tensors derived from its weights (`serving_cached`):
    each computed once per state of the weights (their storage and in-place version counters,
    so `load_state_dict`, `.to()` or an in-place edit recompute it), outside the state dict,
    pickles and deep copies, and dropped by `train()`, so that whatever training does to the
    weights (an optimiser may write them without a version bump) is never served stale.
    Weights made in inference mode carry no version counter: they key by storage alone."""

    def serving_cached(self, name: str, compute: Callable[[], Tensor]) -> Tensor:
        tensors = (*self.parameters(), *self.buffers())
        state = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)
        caches = self.__dict__.setdefault("_serving_cache", {})
        hit = caches.get(name)
        if hit is None or hit[0] != state:
            device = tensors[0].device if tensors else torch.device("cpu")
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                hit = caches[name] = (state, compute())
        return hit[1]

    def train(self, mode: bool = True) -> "ServingCache":
        self.__dict__.pop("_serving_cache", None)
        return super().train(mode)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_serving_cache", None)
        return state


def _check_combine(combine: str) -> None:
    if combine not in ("sum", "concat"):
        raise ValueError(f"combine must be 'sum' or 'concat', got {combine!r}")


def _buffer_name(name: str) -> str:
    # feature names come from data files; buffer names must be valid attribute names
    return "f_" + "".join(c if c.isalnum() else "_" for c in name)


class ItemFeatureEmbedder(ServingCache):
    """(any shape) int64 item ids -> (*shape, dim) float embeddings.

    With `combine="sum"` each part is a `dim`-wide embedding and the parts are added; with
    `"concat"` they are concatenated and projected to `dim` by one linear layer.
    """

    def __init__(
        self,
        features: FeatureTable,
        n_items: int,
        dim: int,
        *,
        combine: Combine = "sum",
        use_id: bool = True,
    ) -> None:
        super().__init__()
        _check_combine(combine)
        if features.n != n_items:
            raise ValueError(f"item feature table has {features.n} rows, expected n_items={n_items}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.n_items, self.dim, self.combine, self.use_id = n_items, dim, combine, use_id
        self.categorical_names = list(features.categorical)
        self.multi_names = list(features.multi)
        self.id_emb = nn.Embedding(n_items, dim) if use_id else None
        if self.id_emb is not None:
            nn.init.normal_(self.id_emb.weight, std=0.05)
        # (n_items, F_c) codes of all categorical features: one gather per lookup
        self.register_buffer(
            "cat_codes", torch.from_numpy(features.categorical_matrix().copy()), persistent=False
        )
        self.cat_embs = nn.ModuleList(
            nn.Embedding(int(features.cardinality[n]), dim, padding_idx=0)
            for n in self.categorical_names
        )
        self.multi_embs = nn.ModuleList(
            nn.Embedding(int(features.cardinality[n]), dim, padding_idx=0) for n in self.multi_names
        )
        for name in self.multi_names:  # (n_items, L) 0-padded codes per multi-valued feature
            codes = np.ascontiguousarray(features.multi[name], dtype=np.int64)
            self.register_buffer(_buffer_name(name), torch.from_numpy(codes), persistent=False)
        for emb in [*self.cat_embs, *self.multi_embs]:
            nn.init.normal_(emb.weight, std=0.05)
            with torch.no_grad():
                emb.weight[0].zero_()
        self.n_parts = int(use_id) + len(self.categorical_names) + len(self.multi_names)
        if self.n_parts == 0:
            raise ValueError("ItemFeatureEmbedder needs the id embedding or at least one feature")
        self.proj = nn.Linear(self.n_parts * dim, dim) if combine == "concat" else None

    def multi_codes(self, name: str) -> Tensor:
        """(n_items, L) int64 codes of a multi-valued feature (0 = padding), on the module's
        device; GESR's hard matching reads categories from here."""
        return getattr(self, _buffer_name(name))

    def parts(self, ids: Tensor) -> list[Tensor]:
        """(*shape) ids -> one (*shape, dim) embedding per part (id, each feature)."""
        parts: list[Tensor] = []
        if self.id_emb is not None:
            parts.append(self.id_emb(ids))
        if self.cat_embs:
            codes = take_rows(self.cat_codes, ids)  # (*shape, F_c)
            parts.extend(emb(codes[..., j]) for j, emb in enumerate(self.cat_embs))
        for name, emb in zip(self.multi_names, self.multi_embs):
            codes = take_rows(self.multi_codes(name), ids)  # (*shape, L)
            count = (codes > 0).sum(-1, keepdim=True).clamp_min(1).to(emb.weight.dtype)
            # the mean over non-zero codes (row 0 is zero padding): one fused gather and sum
            total = F.embedding_bag(codes.reshape(-1, codes.shape[-1]), emb.weight, mode="sum",
                                    padding_idx=0)
            parts.append(total.view(*codes.shape[:-1], -1) / count)
        return parts

    def tokens(self, ids: Tensor) -> Tensor:
        """(*shape) ids -> (*shape, P, dim): one token per part (id, each feature)."""
        return torch.stack(self.parts(ids), dim=-2)

    def forward(self, ids: Tensor) -> Tensor:
        if not (self.training or torch.is_grad_enabled()):
            table = self.catalogue()
            if table is not None:  # serving: one row gather from the catalogue's embeddings
                return F.embedding(ids, table)
        if ids.numel() > DEDUP_MIN:
            # a batch of histories repeats items many times: embed each distinct item once and
            # gather (same values; the backward touches n_unique rows instead of every id)
            uniq, inverse = torch.unique(ids, return_inverse=True)
            return self._embed(uniq)[inverse]
        return self._embed(ids)

    def catalogue(self) -> Tensor | None:
        """(n_items, dim) every item's embedding for serving (`ServingCache`), or None when the
        table would exceed `CATALOGUE_CACHE_BYTES`. Serving reads rows of it instead of
        re-embedding each id: 256 x 50 history ids of ml-100k's 1,682 items 0.81 -> 0.22 ms when
        the table was recomputed per call, and on Toys' 11,924 items the sort of the ids that
        deduplication needs goes too."""
        if self.n_items * self.dim * 4 > CATALOGUE_CACHE_BYTES:
            return None
        return self.serving_cached(
            "catalogue", lambda: self._embed(torch.arange(self.n_items, device=self.cat_codes.device)))

    def _embed(self, ids: Tensor) -> Tensor:
        parts = self.parts(ids)  # P x (*shape, dim)
        if self.proj is None:
            return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        return self.proj(torch.cat(parts, dim=-1))


class UserFeatureEmbedder(nn.Module):
    """(B, F_u) int64 user categorical codes -> (B, dim). Zero features -> zeros (B, dim)."""

    def __init__(self, features: FeatureTable, dim: int, *, combine: Combine = "sum") -> None:
        super().__init__()
        _check_combine(combine)
        self.dim, self.combine = dim, combine
        self.names = list(features.categorical)
        self.embs = nn.ModuleList(
            nn.Embedding(int(features.cardinality[n]), dim, padding_idx=0) for n in self.names
        )
        for emb in self.embs:
            nn.init.normal_(emb.weight, std=0.05)
            with torch.no_grad():
                emb.weight[0].zero_()
        self.proj = (
            nn.Linear(len(self.names) * dim, dim) if combine == "concat" and self.names else None
        )

    @property
    def n_features(self) -> int:
        return len(self.names)

    def tokens(self, user_feats: Tensor) -> Tensor:
        """(B, F_u) -> (B, F_u, dim); F_u may be 0."""
        if user_feats.shape[-1] != len(self.names):
            raise ValueError(
                f"user_feats has {user_feats.shape[-1]} columns, the embedder was built for "
                f"{len(self.names)} user features {self.names}"
            )
        if not self.names:
            return user_feats.new_zeros((*user_feats.shape, self.dim), dtype=torch.float32)
        return torch.stack([emb(user_feats[..., j]) for j, emb in enumerate(self.embs)], dim=-2)

    def forward(self, user_feats: Tensor) -> Tensor:
        tok = self.tokens(user_feats)
        if self.proj is None:
            return tok.sum(-2)
        return self.proj(tok.flatten(-2))


class HistoryTokenEmbedder(nn.Module):
    """One token per history event: item + action code + gap bucket (+ recency position).

    `item_embedder` may be shared with the candidate side (so a history item and the same
    candidate live in one space) or owned. With `max_len`, a learned embedding of the event's
    recency (0 = newest) is added, counted from the end so left-aligned padding does not shift it.
    """

    def __init__(
        self, item_embedder: ItemFeatureEmbedder, dim: int | None = None, *, max_len: int | None = None
    ) -> None:
        super().__init__()
        dim = item_embedder.dim if dim is None else dim
        if dim != item_embedder.dim:
            raise ValueError(f"history dim {dim} differs from the item embedder's {item_embedder.dim}")
        self.dim = dim
        self.items = item_embedder
        self.action_emb = nn.Embedding(N_ACTION_CODES, dim, padding_idx=0)
        self.gap_emb = nn.Embedding(N_GAP_BUCKETS, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim) if max_len else None
        for emb in (self.action_emb, self.gap_emb, self.pos_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.05)
        with torch.no_grad():
            self.action_emb.weight[0].zero_()
            self.gap_emb.weight[0].zero_()

    def embed(self, items: Tensor, actions: Tensor, gaps: Tensor, hist_len: Tensor) -> Tensor:
        """(B, N) items/actions/gaps, (B,) lengths -> (B, N, dim), exactly zero at padding."""
        mask = torch.arange(items.shape[1], device=items.device)[None, :] < hist_len[:, None]  # (B, N)
        # action and gap embeddings summed through one (4 * 32, dim) table: one row gather
        # (F.embedding: 0.05 ms for 256 x 50 ids where table[ids] takes 0.33)
        x = self.items(items) + F.embedding(actions * N_GAP_BUCKETS + gaps, self._action_gap_table())
        if self.pos_emb is not None:
            x = x + self.pos_emb(self._recency(hist_len, items.shape[1]))
        return x * mask[..., None].to(x.dtype)

    def _action_gap_table(self) -> Tensor:
        """(N_ACTION_CODES * N_GAP_BUCKETS, dim): row a * N_GAP_BUCKETS + g = action a + gap g."""
        return (self.action_emb.weight[:, None] + self.gap_emb.weight[None, :]).flatten(0, 1)

    def _recency(self, hist_len: Tensor, n: int) -> Tensor:
        """(B, n) each position's recency-embedding row (0 = the newest event)."""
        ar = torch.arange(n, device=hist_len.device)[None, :]
        return (hist_len[:, None] - 1 - ar).clamp(0, self.pos_emb.num_embeddings - 1)

    def forward(self, batch: RequestBatch) -> Tensor:
        return self.embed(batch.hist_items, batch.hist_actions, batch.hist_gaps, batch.hist_len)

    def masked_means(self, batch: RequestBatch, masks: list[Tensor]) -> list[Tensor]:
        """`[masked_mean(self(batch), m) for m in masks]` for any (B, N) bool masks,
        without the (B, N, dim) tokens outside autograd: the tokens are sums of table rows, so
        each mean is a weighted sum of rows, one `embedding_bag` per table for all the masks
        (ml-100k, 256 x 50 ids, two masks: the tokens, their sum and two products wrote and
        re-read ~30 MB)."""
        if self.training or torch.is_grad_enabled():
            tok = self(batch)
            return [masked_mean(tok, m) for m in masks]
        items, table = batch.hist_items, self.items.catalogue()
        if table is None:  # a catalogue too large to cache: this call's distinct items
            uniq, items = torch.unique(items, return_inverse=True)
            table = self.items._embed(uniq)
        w = torch.cat([m.to(table.dtype) for m in masks])  # (M B, N)
        w = w / w.sum(1, keepdim=True).clamp_min(1.0)
        w = w * batch.hist_mask.repeat(len(masks), 1)  # padding tokens are zero: weight 0, counted
        k = len(masks)
        bag = lambda ids, rows: F.embedding_bag(ids.repeat(k, 1), rows, per_sample_weights=w, mode="sum")  # noqa: E731
        out = bag(items, table) + bag(batch.hist_actions * N_GAP_BUCKETS + batch.hist_gaps, self._action_gap_table())
        if self.pos_emb is not None:
            out = out + bag(self._recency(batch.hist_len, batch.hist_items.shape[1]), self.pos_emb.weight)
        return list(out.split(len(batch)))


def id_embedding_tables(model: nn.Module, n_items: int, n_users: int) -> list[nn.Embedding]:
    """The model's id embedding tables: `nn.Embedding`s with one row per item or per user (plus
    one padding row at most). A training step touches only the rows of its batch, which is what
    sparse gradients (`TrainConfig.sparse_embeddings`) exploit; feature, position and action
    tables are small and stay dense. Each table once, even when shared."""
    sizes = {n_items, n_items + 1, n_users, n_users + 1}
    out: dict[int, nn.Embedding] = {}
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings in sizes and m.max_norm is None:
            out.setdefault(id(m.weight), m)
    return list(out.values())


def exclude_history_(scores: Tensor, batch: RequestBatch) -> Tensor:
    """In place: scores (B, n_items) set to -inf at the items of each request's history (its
    valid positions). Returns `scores`."""
    r, c = batch.hist_mask.nonzero(as_tuple=True)
    scores[r, batch.hist_items[r, c]] = -math.inf
    return scores


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, N, D) values, (B, N) bool -> (B, D) mean over the True positions (0 when none)."""
    w = mask.to(x.dtype)
    w = w / w.sum(1, keepdim=True).clamp_min(1.0)
    return torch.bmm(w[:, None, :], x).squeeze(1)  # one batched matmul instead of (B, N, D) temps


def recent_history(batch: RequestBatch, max_len: int | None) -> RequestBatch:
    """The batch with each history cut to its most recent `max_len` events (still left-aligned,
    right-padded with 0); `None` or a limit >= the batch's width returns the batch unchanged."""
    n = batch.hist_items.shape[1]
    if max_len is None or max_len >= n:
        return batch
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1 or None, got {max_len}")
    length = batch.hist_len.clamp(max=max_len)  # (B,)
    start = batch.hist_len - length  # first kept position
    ar = torch.arange(max_len, device=length.device)[None, :]
    idx = (start[:, None] + ar).clamp(max=n - 1)  # (B, max_len)
    keep = ar < length[:, None]

    def cut(x: Tensor) -> Tensor:
        return torch.where(keep, x.gather(1, idx), torch.zeros_like(idx))

    from dataclasses import replace

    return replace(
        batch,
        hist_items=cut(batch.hist_items),
        hist_actions=cut(batch.hist_actions),
        hist_gaps=cut(batch.hist_gaps),
        hist_len=length,
    )


VALID_PAIRS = 200_000_000  # a full-catalogue validation check scores at most this many pairs


def catalogue_valid_requests(n: int, n_items: int) -> int:
    """How many validation requests a full-catalogue check (every item scored per request)
    uses: at most `n`, fewer where that would score more than `VALID_PAIRS` request-item pairs,
    never under 200 (2,000 requests up to 100,000 items; 200 at a million)."""
    return max(min(n, 200), min(n, VALID_PAIRS // max(n_items, 1)))


def subsample(traffic: Traffic, n: int) -> Traffic:
    """At most n requests of a Traffic, evenly spaced (deterministic), e.g. for cheap validation."""
    if len(traffic) <= n:
        return traffic
    return _rows(traffic, np.linspace(0, len(traffic) - 1, n).round().astype(np.int64))


def sequence_windows(traffic: Traffic, width: int) -> Traffic:
    """The training requests that cover every training event exactly once as a target when each
    request's history is used at every position (SASRec-style causal training).

    Per user, keep the requests at positions last, last - width, last - 2*width, ... (down to 1):
    the request at p has history events p-width..p-1 and target p, so with the history's own
    next items as targets it predicts events p-width+1..p. ~n_events/width windows instead of
    n_events requests: the same examples for about 1/width of the encoder work.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if len(traffic) == 0:
        return traffic
    user, pos = traffic.user, traffic.pos
    order = np.lexsort((pos, user))
    u, p = user[order], pos[order]
    is_last = np.r_[u[1:] != u[:-1], True]
    last = np.repeat(p[is_last], np.diff(np.r_[0, np.flatnonzero(is_last) + 1]))
    keep = order[(last - p) % width == 0]
    return _rows(traffic, np.sort(keep))


def mean_batch_events(windows: Traffic, width: int, batch_size: int) -> float:
    """The mean number of history events in a uniformly drawn batch of `batch_size` windows, each
    cut to its newest `width` events. A loss that averages over events, trained in batches of
    similar length (`Traffic.length_batches`), is scaled by a batch's events over this, so every
    event weighs what it weighs in uniform batches."""
    return float(np.minimum(windows.history_lengths(), width).mean()) * batch_size


def _rows(traffic: Traffic, idx: np.ndarray) -> Traffic:
    import polars as pl

    table = pl.DataFrame(
        {
            "request_id": traffic.request_id[idx],
            "user": traffic.user[idx],
            "ts": traffic.ts[idx],
            "pos": traffic.pos[idx],
            "item": traffic.targets[idx, 0],
        }
    )
    return Traffic(traffic.dataset, table, max_len=traffic.max_len)


class MatchCounter(nn.Module):
    """Explicit user-item cross counts for each (request, candidate), as log1p features:
    [history events sharing a category with the candidate, the same among the `recent` newest
    events, history events of the candidate itself, the same among the newest]. Negatively rated
    events are not counted. Categories come from the dataset's `category_feature` (multi-valued
    codes; an item with several categories counts each shared one); without it the category
    counts are 0. Cost O(B (N + n) L + B n N): no embeddings, just integer matching."""

    n_features = 4

    def __init__(self, features: FeatureTable, category_feature: str | None, *, recent: int = 5) -> None:
        super().__init__()
        if recent < 1:
            raise ValueError(f"recent must be >= 1, got {recent}")
        self.recent = recent
        if category_feature is None:
            codes, self.n_categories = np.zeros((features.n, 1), np.int64), 1
        else:
            codes = np.ascontiguousarray(features.multi[category_feature], dtype=np.int64)
            self.n_categories = int(features.cardinality[category_feature])
        self.register_buffer("categories", torch.from_numpy(codes), persistent=False)  # (n_items, L)

    def forward(self, hist_items: Tensor, hist_actions: Tensor, hist_len: Tensor, cand: Tensor) -> Tensor:
        """hist (B, N), hist_len (B,), cand (B, n) -> (B, n, 4) float32."""
        b, n_hist = hist_items.shape
        ar = torch.arange(n_hist, device=hist_items.device)[None, :]
        liked = (ar < hist_len[:, None]) & (hist_actions != 1)  # action code 1 = negative
        recent = liked & (ar >= hist_len[:, None] - self.recent)
        hc = take_rows(self.categories, hist_items)  # (B, N, L)
        cc = take_rows(self.categories, cand)  # (B, n, L)
        out = []
        for mask in (liked, recent):
            counts = torch.zeros((b, self.n_categories), device=hc.device)
            w = mask[..., None].expand_as(hc).float()
            counts.scatter_add_(1, hc.flatten(1), w.flatten(1))
            counts[:, 0] = 0.0  # code 0 is padding
            out.append(counts.gather(1, cc.flatten(1)).view(cc.shape).sum(-1))  # (B, n)
        same = cand[:, :, None] == hist_items[:, None, :]  # (B, n, N)
        out.append((same & liked[:, None, :]).sum(-1).float())
        out.append((same & recent[:, None, :]).sum(-1).float())
        return torch.log1p(torch.stack(out, -1))
