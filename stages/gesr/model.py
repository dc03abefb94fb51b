"""The GESR network: two towers, a Mixture of Attention beside them, MLPG on top.

Follows "Generative Early Stage Ranking" (Hong et al., arXiv 2511.21095) as specified in
shared/GESR.md; [paper]/[reading]/[HSTU]/[ours] mark where each choice comes from.

- Two towers [paper]: user tower = MLP(user features ; mean of the history tokens ; mean of the
  `recent` newest history tokens) -> u (B, D); item tower = MLP(item id + item features) -> i
  (n_items, D); primary logit l0 = <u, i> + b_item. [ours] the towers mirror the two-tower ESR
  stage (`stages/twotower.py`: the same pooling and a per-item bias), so the ablation's
  "two-tower" row and GESR with every module off are the same model family.
  Item-tower outputs (with the bias) are cached for the whole catalogue (`cache_items`).
- MoA Config [reading]: one token per history event = item embedding (id + item features, the
  same `ItemFeatureEmbedder` as the candidates) + action code (pad / negative / neutral /
  positive, derived from ratings) + log time-gap bucket + recency position
  (`cascade.stages.features.HistoryTokenEmbedder`); the history is truncated in time to the
  most recent `moa.history_len` events (`features.recent_history`).
- MoA modules, each switchable (`MoAConfig`):
  T_match: Hard Matching Attention (`hma.py`); T_self: target-aware self attention, the shared
  `cascade.stages.hstu.TargetAwareEncoder` over [history tokens ; candidate tokens] with the
  target mask [reading]+[HSTU]; T_nro / T_ro: NRO / RO cross attention (`cross.py`).
  [ours] candidate tokens for self attention = the candidate's item embedding plus a learned
  "candidate" type vector (candidates have no action or gap).
  [ours] user/context tokens = [learned null token ; user feature tokens ; u].
- Fusion: MLPG (`mlpg.py`) -> l = l0 + sum_k beta_k l_k; without MLPG an ungated concat MLP.
  With every module off the model is exactly its two towers.

Serving path (what `GESRStage.score` runs), never one sequence per candidate:
    state = model.encode_request(batch)        # history tokens, encoder K/V, cross-attention K/V,
                                                # HMA history structures: once per request
    logits = model.score_candidates(state, cand)  # all candidates of all requests, batched
Item-only quantities (item-tower outputs, candidate tokens, NRO queries, RO keys/values) come
from the catalogue cache built by `cache_items()` in eval mode (dropped again by `.train()`).
`score_naive` is the per-candidate reference: for each candidate it re-encodes the full
sequence [history ; candidate], re-projects every cross-attention K/V, counts HMA matches by
direct comparison and recomputes the item tower; the tests check the serving path against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.data.dataset import Dataset, FeatureTable
from cascade.data.traffic import RequestBatch
from cascade.stages.features import (
    HistoryTokenEmbedder,
    ItemFeatureEmbedder,
    UserFeatureEmbedder,
    masked_mean,
    recent_history,
)
from cascade.stages.gesr.config import GESRConfig
from cascade.stages.gesr.cross import CrossContext, NROCrossAttention, ROCrossAttention
from cascade.stages.gesr.hma import HardMatchingAttention, HMAHistory, naive_counts
from cascade.stages.gesr.mlpg import MLPG, UngatedFusion

# item-side caches above this size are not built; those projections run per batch instead
CACHE_LIMIT_BYTES = 1 << 30


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


@dataclass(frozen=True)
class RequestState:
    """Everything GESR computes once per request (B requests)."""

    u: Tensor  # (B, D) user tower output
    user_tokens: Tensor  # (B, R, D) null token, user feature tokens, u
    hist_len: Tensor  # (B,) after time truncation
    enc: object | None  # TargetAwareEncoder HistoryState (self attention on)
    nro: CrossContext | None  # NRO keys/values (nro on)
    ro_q: Tensor | None  # (B, H, R, d) RO queries (ro on)
    hma: HMAHistory | None  # HMA history structures (hma on)


@dataclass
class ItemCache:
    """Item-only quantities for the whole catalogue, computed once after training."""

    tower: Tensor  # (n_items, D) item tower outputs
    bias: Tensor  # (n_items,) item bias of the primary logit
    cand_tokens: Tensor | None  # (n_items, D) self-attention candidate tokens
    nro_q: Tensor | None  # (n_items, F, D) NRO queries
    ro_kv: Tensor | None  # (n_items, F, 2D) RO keys|values


class GESRModel(nn.Module):
    def __init__(
        self,
        cfg: GESRConfig,
        *,
        n_items: int,
        item_features: FeatureTable,
        user_features: FeatureTable,
        item_categories: Tensor | None = None,  # (n_items, L) codes for HMA; None = no categories
        n_categories: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        moa = cfg.moa
        d = cfg.dim
        self.n_items = n_items
        token_feats = item_features if moa.token_features else FeatureTable(n=n_items)
        self.items = ItemFeatureEmbedder(token_feats, n_items, d)
        self.history = HistoryTokenEmbedder(self.items, max_len=moa.history_len)
        self.users = UserFeatureEmbedder(user_features, d)
        self.user_tower = _mlp(3 * d, cfg.mlp_hidden, d)
        self.item_tower = _mlp(d, cfg.mlp_hidden, d)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.zeros_(self.item_bias.weight)
        self.modules_on = moa.modules
        any_user_tokens = moa.nro or moa.ro
        self.null_token = nn.Parameter(torch.randn(1, 1, d) * 0.05) if any_user_tokens else None
        self.hma = (
            HardMatchingAttention(
                pairs=moa.hma_pairs,
                cap=moa.hma_cap,
                item_categories=item_categories,
                n_categories=n_categories,
                emb_dim=cfg.hma_dim,
                hidden=cfg.mlp_hidden,
                out_dim=d,
            )
            if moa.hma
            else None
        )
        if moa.self_attn:
            from cascade.stages.hstu import TargetAwareEncoder

            self.encoder = TargetAwareEncoder(
                d, cfg.n_layers, cfg.n_heads, kind=cfg.attn_kind, dropout=cfg.dropout, impl=cfg.impl
            )
            self.cand_type = nn.Parameter(torch.randn(d) * 0.05)
        else:
            self.encoder, self.cand_type = None, None
        self.nro = NROCrossAttention(d, cfg.cross_heads) if moa.nro else None
        self.ro = ROCrossAttention(d, cfg.cross_heads) if moa.ro else None
        if not self.modules_on:
            self.fusion = None
        elif moa.mlpg:
            self.fusion = MLPG(self.modules_on, d, cfg.mlp_hidden)
        else:
            self.fusion = UngatedFusion(self.modules_on, d, cfg.mlp_hidden)
        self._cache: ItemCache | None = None

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        cfg: GESRConfig,
        *,
        item_categories: Tensor | None = None,
        n_categories: int = 0,
    ) -> "GESRModel":
        """Build for `dataset`; HMA categories default to `dataset.category_feature`."""
        if item_categories is None and dataset.category_feature is not None:
            name = dataset.category_feature
            item_categories = torch.from_numpy(dataset.items.multi[name].astype("int64"))
            n_categories = int(dataset.items.cardinality[name])
        return cls(
            cfg,
            n_items=dataset.n_items,
            item_features=dataset.items,
            user_features=dataset.users,
            item_categories=item_categories,
            n_categories=n_categories,
        )

    # -- caches ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "GESRModel":
        if mode:
            self._cache = None  # weights are about to change
        return super().train(mode)

    def _item_quantities(self, ids: Tensor, *, tokens: bool = True) -> ItemCache:
        """Item-only quantities for `ids` (1-d): the rows of the catalogue cache."""
        emb = self.items(ids)  # (m, D)
        tok = self.items.tokens(ids) if tokens and (self.nro is not None or self.ro is not None) else None  # (m, F, D)
        return ItemCache(
            tower=self.item_tower(emb),
            bias=self.item_bias(ids).squeeze(-1),
            cand_tokens=emb + self.cand_type if self.encoder is not None else None,
            nro_q=self.nro.item_queries(tok) if tok is not None and self.nro is not None else None,
            ro_kv=self.ro.item_kv(tok) if tok is not None and self.ro is not None else None,
        )

    @torch.no_grad()
    def cache_items(self, chunk: int = 65536) -> ItemCache:
        """Compute the item-only quantities for the whole catalogue (eval mode). The cross-
        attention item projections are left out above `CACHE_LIMIT_BYTES` (then projected per
        batch)."""
        self.eval()
        per_item = 4 * self.cfg.dim * (2 + 3 * self.items.n_parts)
        tokens = self.n_items * per_item <= CACHE_LIMIT_BYTES
        dev = self.items.cat_codes.device
        parts = [
            self._item_quantities(torch.arange(lo, min(lo + chunk, self.n_items), device=dev), tokens=tokens)
            for lo in range(0, self.n_items, chunk)
        ]
        cat = {
            f: (None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts]))
            for f in ("tower", "bias", "cand_tokens", "nro_q", "ro_kv")
        }
        self._cache = ItemCache(**cat)
        return self._cache

    def _item_side(self, cand: Tensor) -> tuple[ItemCache, Tensor]:
        """(quantities, index) such that quantities.x[index] is x for every candidate: the
        catalogue cache indexed by the ids, or (training, no cache) the quantities of the
        batch's distinct ids indexed by the inverse map, so that each distinct item goes
        through the item-side layers once per batch however many requests it appears in."""
        c = self.cache
        missing = c is not None and (
            (self.nro is not None and c.nro_q is None) or (self.ro is not None and c.ro_kv is None)
        )
        if c is not None and not missing:
            return c, cand
        ids, inv = torch.unique(cand, return_inverse=True)
        fresh = self._item_quantities(ids)
        if c is not None:  # keep the cached tower/tokens, take only the projections
            cand_tokens = c.cand_tokens[ids] if c.cand_tokens is not None else None
            return ItemCache(c.tower[ids], c.bias[ids], cand_tokens, fresh.nro_q, fresh.ro_kv), inv
        return fresh, inv

    @property
    def cache(self) -> ItemCache | None:
        return None if self.training else self._cache

    # -- the two towers -----------------------------------------------------------------------
    def _user(self, batch: RequestBatch, hist: Tensor) -> Tensor:
        """User tower: (B,) requests and their history tokens (B, N, D) -> u (B, D)."""
        mask = batch.hist_mask
        ar = torch.arange(hist.shape[1], device=hist.device)[None, :]
        newest = mask & (ar >= batch.hist_len[:, None] - self.cfg.recent)
        x = [self.users(batch.user_feats), masked_mean(hist, mask), masked_mean(hist, newest)]
        return self.user_tower(torch.cat(x, dim=-1))

    def _user_tokens(self, user_feats: Tensor, u: Tensor) -> Tensor:
        b = u.shape[0]
        tokens = [self.null_token.expand(b, 1, -1), self.users.tokens(user_feats), u[:, None]]
        return torch.cat(tokens, dim=1)  # (B, R, D)

    # -- serving path -------------------------------------------------------------------------
    def encode_request(self, batch: RequestBatch) -> RequestState:
        """Everything that depends on the request only, computed once per request."""
        batch = recent_history(batch, self.cfg.moa.history_len)
        hist = self.history(batch)  # (B, N, D), zero at padding
        mask = batch.hist_mask  # (B, N)
        u = self._user(batch, hist)  # (B, D)
        user_tokens = self._user_tokens(batch.user_feats, u) if self.null_token is not None else u[:, None]
        return RequestState(
            u=u,
            user_tokens=user_tokens,
            hist_len=batch.hist_len,
            enc=self.encoder.encode_history(hist, batch.hist_len) if self.encoder is not None else None,
            nro=self.nro.context(hist, mask, user_tokens) if self.nro is not None else None,
            ro_q=self.ro.queries(user_tokens) if self.ro is not None else None,
            hma=(
                self.hma.history(batch.hist_items, batch.hist_actions, batch.hist_len)
                if self.hma is not None
                else None
            ),
        )

    def score_candidates(
        self, state: RequestState, cand: Tensor, *, with_primary: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """cand (B, n) int64 -> logits (B, n) (and the primary logit l0 when asked)."""
        c, idx = self._item_side(cand)
        i = c.tower[idx]  # (B, n, D)
        l0 = (state.u[:, None, :] * i).sum(-1) + c.bias[idx]  # (B, n)
        if self.fusion is None:
            return (l0, l0) if with_primary else l0
        embs: dict[str, Tensor] = {}
        if self.hma is not None:
            embs["match"] = self.hma(state.hma, cand)
        if self.encoder is not None:
            embs["self"] = self.encoder.score_candidates(state.enc, c.cand_tokens[idx])
        if self.nro is not None:
            embs["nro"] = self.nro(state.nro, c.nro_q[idx])
        if self.ro is not None:
            embs["ro"] = self.ro(state.ro_q, c.ro_kv[idx])
        logit = self.fusion(l0, state.u, i, embs)
        return (logit, l0) if with_primary else logit

    def forward_train(self, batch: RequestBatch, cand: Tensor) -> tuple[Tensor, Tensor]:
        """Training forward: (logits (B, n), primary logits l0 (B, n)), the serving
        decomposition with autograd (the encoder's torch path)."""
        return self.score_candidates(self.encode_request(batch), cand, with_primary=True)

    def score(self, batch: RequestBatch, cand: Tensor) -> Tensor:
        return self.score_candidates(self.encode_request(batch), cand)

    def forward(self, batch: RequestBatch, cand: Tensor) -> Tensor:
        return self.score(batch, cand)

    # -- per-candidate reference ---------------------------------------------------------------
    def score_naive(self, batch: RequestBatch, cand: Tensor) -> Tensor:
        """Reference: one full [history ; candidate] pass per candidate, no shared state, no
        caches, HMA by direct comparison. O(n) times the serving cost; tests and benchmarks."""
        batch = recent_history(batch, self.cfg.moa.history_len)
        out = []
        for j in range(cand.shape[1]):
            c = cand[:, j : j + 1]  # (B, 1)
            hist = self.history(batch)
            mask = batch.hist_mask
            u = self._user(batch, hist)
            i = self.item_tower(self.items(c))
            l0 = (u[:, None, :] * i).sum(-1) + self.item_bias(c).squeeze(-1)
            if self.fusion is None:
                out.append(l0)
                continue
            user_tokens = self._user_tokens(batch.user_feats, u) if self.null_token is not None else None
            embs: dict[str, Tensor] = {}
            if self.hma is not None:
                counts = naive_counts(
                    self.hma, batch.hist_items, batch.hist_actions, batch.hist_len, c
                )
                embs["match"] = self.hma.mlp(self.hma.buckets(self.hma.bucket_ids(counts)).flatten(2))
            if self.encoder is not None:
                _, t_self = self.encoder(hist, batch.hist_len, self.items(c) + self.cand_type)
                embs["self"] = t_self
            if self.nro is not None:
                ctx = self.nro.context(hist, mask, user_tokens)
                embs["nro"] = self.nro(ctx, self.nro.item_queries(self.items.tokens(c)))
            if self.ro is not None:
                embs["ro"] = self.ro(self.ro.queries(user_tokens), self.ro.item_kv(self.items.tokens(c)))
            out.append(self.fusion(l0, u, i, embs))
        return torch.cat(out, dim=1)


def bce_with_mask(logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
    """Mean BCE over the entries with weight > 0."""
    loss = F.binary_cross_entropy_with_logits(logits, labels, weight=weight, reduction="sum")
    return loss / weight.sum().clamp_min(1.0)
