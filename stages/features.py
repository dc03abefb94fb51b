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

Code 0 is "unknown" for categorical features and "padding" for multi-valued ones (see
`cascade.data.dataset`), so every table uses `padding_idx=0`: unknown values contribute nothing.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from cascade.data.dataset import FeatureTable
from cascade.data.derive import N_ACTION_CODES, N_GAP_BUCKETS
from cascade.data.traffic import RequestBatch

Combine = Literal["sum", "concat"]


def _check_combine(combine: str) -> None:
    if combine not in ("sum", "concat"):
        raise ValueError(f"combine must be 'sum' or 'concat', got {combine!r}")


def _buffer_name(name: str) -> str:
    # feature names come from data files; buffer names must be valid attribute names
    return "f_" + "".join(c if c.isalnum() else "_" for c in name)


class ItemFeatureEmbedder(nn.Module):
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

    def tokens(self, ids: Tensor) -> Tensor:
        """(*shape) ids -> (*shape, P, dim): one token per part (id, each feature)."""
        parts: list[Tensor] = []
        if self.id_emb is not None:
            parts.append(self.id_emb(ids))
        if self.cat_embs:
            codes = self.cat_codes[ids]  # (*shape, F_c)
            parts.extend(emb(codes[..., j]) for j, emb in enumerate(self.cat_embs))
        for name, emb in zip(self.multi_names, self.multi_embs):
            codes = self.multi_codes(name)[ids]  # (*shape, L)
            count = (codes > 0).sum(-1, keepdim=True).clamp_min(1).to(emb.weight.dtype)
            parts.append(emb(codes).sum(-2) / count)  # mean over non-zero codes
        return torch.stack(parts, dim=-2)

    def forward(self, ids: Tensor) -> Tensor:
        tok = self.tokens(ids)  # (*shape, P, dim)
        if self.proj is None:
            return tok.sum(-2)
        return self.proj(tok.flatten(-2))


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
        n = items.shape[1]
        ar = torch.arange(n, device=items.device)[None, :]
        mask = ar < hist_len[:, None]  # (B, N)
        x = self.items(items) + self.action_emb(actions) + self.gap_emb(gaps)
        if self.pos_emb is not None:
            recency = (hist_len[:, None] - 1 - ar).clamp(0, self.pos_emb.num_embeddings - 1)
            x = x + self.pos_emb(recency)
        return x * mask[..., None].to(x.dtype)

    def forward(self, batch: RequestBatch) -> Tensor:
        return self.embed(batch.hist_items, batch.hist_actions, batch.hist_gaps, batch.hist_len)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, N, D) values, (B, N) bool -> (B, D) mean over the True positions (0 when none)."""
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
