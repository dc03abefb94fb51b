"""The GESR network: two towers, a Mixture of Attention beside them, MLPG on top.

Follows "Generative Early Stage Ranking" (Hong et al., arXiv 2511.21095) as specified in
shared/GESR.md; [paper]/[reading]/[HSTU]/[ours] mark where each choice comes from.

- Two towers [paper]: user tower = MLP(user features ; mean of the history tokens ; mean of the
  `recent` newest history tokens) -> u (B, D); item tower = MLP(item id + item features) -> i
  (n_items, D); primary logit l0 = <u, i> + b_item. [ours] the towers mirror the two-tower ESR
  stage (`stages/twotower.py`: the same pooling and a per-item bias), so the ablation's
  "two-tower" row and GESR with every module off are the same model family.
- MoA Config [reading]: one token per history event = item embedding (id + item features, the
  same `ItemFeatureEmbedder` as the candidates) + action code (pad / negative / neutral /
  positive, derived from ratings) + log time-gap bucket + recency position
  (`cascade.stages.features.HistoryTokenEmbedder`); the history is truncated in time to the
  most recent `moa.history_len` events (`features.recent_history`).
- MoA modules, each switchable (`MoAConfig`), all of width d = `moa_dim`:
  T_match: Hard Matching Attention (`hma.py`); T_self: target-aware self attention, the shared
  `cascade.stages.hstu.TargetAwareEncoder` over [history tokens ; candidate tokens] with the
  target mask [reading]+[HSTU]; T_nro / T_ro: NRO / RO cross attention (`cross.py`).
  [ours] the MoA works at a narrower width d than the towers (D): everything it computes is per
  (request, candidate) pair, the ESR scores hundreds of candidates per request, and that cost is
  what GESR adds to the funnel; the tokens enter the MoA through one linear map D -> d.
  [ours] candidate tokens for self attention = the candidate's item embedding (mapped to d) plus
  a learned "candidate" type vector (candidates have no action or gap).
  [ours] user/context tokens = [learned null token ; user feature tokens ; u], mapped to d.
  [ours] NRO queries: by default one per candidate, its pooled item embedding (the sum of its
  feature tokens); `nro_queries="features"` uses one query per feature token as GESR.md words
  it, at F times the per-pair cost (the dominant one on CPU: (B, n F, N) attention logits).
- Fusion: MLPG (`mlpg.py`) -> l = l0 + sum_k beta_k l_k; without MLPG an ungated concat MLP.
  With every module off the model is exactly its two towers.

Serving path (what `GESRStage.score` runs), never one sequence per candidate:
    state = model.encode_request(batch)           # once per request: user tower, history
                                                  # tokens, encoder K/V, NRO K/V, RO queries,
                                                  # HMA history structures, user-side gates
    logits = model.score_candidates(state, cand)  # all candidates of all requests, batched
Item-only quantities (item-tower output and bias, MLPG item gates, self-attention candidate
tokens, NRO queries, RO keys/values) come from the catalogue cache built by `cache_items()` in
eval mode (dropped again by `.train()`); without a cache (training) they are computed once per
distinct item of the batch. `score_naive` is the per-candidate reference: for each candidate it
re-encodes the full sequence [history ; candidate] (`TargetAwareEncoder.forward`), re-projects
every cross-attention K/V, counts HMA matches by direct comparison through the unfolded MLP and
recomputes the towers; the tests check the serving path against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.data.dataset import Dataset, FeatureTable
from cascade.data.traffic import RequestBatch
from cascade.stages.features import (
    HistoryTokenEmbedder, ItemFeatureEmbedder, UserFeatureEmbedder, masked_mean, recent_history,
)
from cascade.stages.gather import dot_candidates
from cascade.stages.gesr.config import GESRConfig
from cascade.stages.gesr.cross import NROCrossAttention, ROCrossAttention, block_keys, block_values
from cascade.stages.gesr.hma import HardMatchingAttention, naive_counts
from cascade.stages.gesr.mlpg import MLPG, UngatedFusion
from cascade.stages.gesr.state import TOKEN_FIELDS, ItemCache, RequestState, SelfContext

# the cross-attention item projections (F tokens per item) are cached for the catalogue only
# below this size; above it they are projected per batch (for the batch's distinct items)
TOKEN_CACHE_LIMIT_BYTES = 512 << 20


def _mlp(d_in: int, d_hidden: int, d_out: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out)
    )


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
        big, d = cfg.dim, cfg.moa_dim
        self.n_items = n_items
        # the category table HMA and the interest-matched sampler read (None: no categories)
        self.item_categories = item_categories
        self.n_categories = n_categories
        token_feats = item_features if moa.token_features else FeatureTable(n=n_items)
        self.items = ItemFeatureEmbedder(token_feats, n_items, big)
        self.history = HistoryTokenEmbedder(self.items, max_len=moa.history_len)
        self.users = UserFeatureEmbedder(user_features, big)
        self.user_tower = _mlp(3 * big, cfg.hidden, big, cfg.dropout)
        self.item_tower = _mlp(big, cfg.hidden, big, cfg.dropout)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.zeros_(self.item_bias.weight)
        # one scalar offset of l0: irrelevant to ranking, but the log loss needs the logits near
        # the log base rate, and AdamW moves a scalar ~lr per step; the stage sets it before
        # training so the dot product never has to carry a large constant
        self.global_bias = nn.Parameter(torch.zeros(()))

        self.modules_on = moa.modules
        needs_tokens = moa.self_attn or moa.nro or moa.ro
        self.to_moa = nn.Linear(big, d) if needs_tokens else None  # item/history tokens D -> d
        needs_user = moa.nro or moa.ro
        self.user_to_moa = nn.Linear(big, d) if needs_user else None
        self.null_token = nn.Parameter(torch.randn(1, 1, d) * 0.05) if needs_user else None
        self.hma = (
            HardMatchingAttention(
                pairs=moa.hma_pairs,
                cap=moa.hma_cap,
                recent=moa.hma_recent,
                item_categories=item_categories,
                n_categories=n_categories,
                emb_dim=cfg.hma_dim,
                hidden=cfg.logit_hidden,
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
        self.fusion: MLPG | UngatedFusion | None
        if not self.modules_on:
            self.fusion = None
        elif moa.mlpg:
            self.fusion = MLPG(self.modules_on, d, big, cfg.logit_hidden)
        else:
            self.fusion = UngatedFusion(self.modules_on, d, cfg.logit_hidden)
        self._cache: ItemCache | None = None
        self._primary: Tensor | None = None  # (n_items, D + 1) [item tower ; bias], with _cache

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

    @property
    def mlpg(self) -> bool:
        return isinstance(self.fusion, MLPG)

    # -- item side -----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "GESRModel":
        if mode:
            self._cache = self._primary = None  # weights are about to change
        return super().train(mode)

    def primary_items(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(item tower outputs (*, D), item biases (*)) of `ids`: the item side of l0."""
        p = self.primary_cache
        if p is not None:
            rows = F.embedding(ids, p)
            return rows[..., :-1], rows[..., -1]
        return self.item_tower(self.items(ids)), self.item_bias(ids).squeeze(-1)

    @property
    def _silu_fast(self) -> bool:
        """Self attention through the block-diagonal serving form (silu kind, torch impl)."""
        enc = self.encoder
        return enc is not None and enc.kind == "silu" and enc.impl in ("auto", "torch")

    def _item_quantities(self, ids: Tensor, *, base: bool = True, tokens: bool = True) -> dict[str, Tensor]:
        """Item-only fields (see `ItemCache`) of `ids` (m,), each (m, width). `base=False`
        leaves out all but the cross-attention projections, `tokens=False` leaves those out."""
        out: dict[str, Tensor] = {}
        emb = self.items(ids)  # (m, D)
        emb_moa = self.to_moa(emb) if self.to_moa is not None else None  # (m, d)
        if base:
            tower = self.item_tower(emb)
            out["tower"], out["bias"] = tower, self.item_bias(ids)
            if self.mlpg:
                out["gates"] = self.fusion.item_gates(tower).flatten(-2)
            if self.encoder is not None:
                x = emb_moa + self.cand_type
                out["x"] = x
                if self._silu_fast:  # the first layer of a candidate depends on it alone
                    layer, h = self.encoder.layers[0], self.encoder.n_heads
                    u, v, q, k = layer.uvqk(layer.norm(x)).chunk(4, dim=-1)
                    q = q / (q.shape[-1] // h) ** 0.5
                    s_self = (q * k).unflatten(-1, (h, -1)).sum(-1, keepdim=True)  # (m, H, 1)
                    out["q"] = q
                    out["sv"] = (F.silu(s_self) * v.unflatten(-1, (h, -1))).flatten(-2)
                    out["su"] = F.silu(u)
        if tokens and (self.nro is not None or self.ro is not None):
            tok = self.to_moa(self.items.tokens(ids))  # (m, F, d)
            if self.nro is not None:
                q_tok = tok if self.cfg.nro_queries == "features" else emb_moa[:, None, :]
                out["nro_q"] = self.nro.item_queries(q_tok).flatten(-2)
            if self.ro is not None:
                out.update(self.ro.item_fields(self.ro.item_kv(tok)))  # tok: (m, F, d)
        return out

    def _token_width(self) -> int:
        """Columns of the cross-attention fields per item."""
        d, f = self.cfg.moa_dim, self.items.n_parts
        w = 0
        if self.nro is not None:
            w += d * (f if self.cfg.nro_queries == "features" else 1)
        if self.ro is not None:
            w += d if f == 1 else 3 * d if f == 2 else 2 * d * f
        return w

    @torch.no_grad()
    def cache_items(self, chunk: int = 65536) -> ItemCache:
        """Compute the item-only quantities for the whole catalogue (switches to eval mode).
        The cross-attention item projections are left out above `TOKEN_CACHE_LIMIT_BYTES`."""
        self.eval()
        tokens = 4 * self.n_items * self._token_width() <= TOKEN_CACHE_LIMIT_BYTES
        dev = self.item_bias.weight.device
        parts = [
            self._item_quantities(torch.arange(lo, min(lo + chunk, self.n_items), device=dev), tokens=tokens)
            for lo in range(0, self.n_items, chunk)
        ]
        fields = {f: torch.cat([p[f] for p in parts]) for f in parts[0]}
        # l0's columns apart: `score_candidates` may take l0 from the whole catalogue
        self._primary = torch.cat([fields.pop("tower"), fields.pop("bias")], dim=-1)
        self._cache = (
            ItemCache.pack(fields) if fields else ItemCache(rows=self._primary[:, :0], cols={})
        )
        return self._cache

    @property
    def cache(self) -> ItemCache | None:
        """The catalogue cache, only in eval mode (training changes the weights)."""
        return None if self.training else self._cache

    @property
    def primary_cache(self) -> Tensor | None:
        """(n_items, D + 1) [item tower ; bias] of the catalogue, beside `cache`."""
        return None if self.training else self._primary

    def _primary_logit(self, u: Tensor, cand: Tensor, item: dict[str, Tensor]) -> Tensor:
        """l0 (B, n) of u (B, D) and the candidates: from the catalogue's [tower ; bias] rows
        when cached (`gather.dot_candidates`), else from `item`'s gathered fields."""
        p = self.primary_cache
        if p is None:
            # u as the left factor: (B, 1, D) x (B, D, n) reads the candidates' tower columns in
            # place from the gathered rows (the other way round, their row stride costs ~3x)
            l0 = torch.matmul(u[:, None, :], item["tower"].transpose(1, 2))[:, 0]  # (B, n)
            return l0 + item["bias"][..., 0] + self.global_bias
        u1 = torch.cat([u, torch.ones_like(u[:, :1])], dim=-1)  # (B, D + 1)
        return dot_candidates(u1, p, cand) + self.global_bias

    def _item_side(self, cand: Tensor) -> dict[str, Tensor]:
        """field -> (B, n, width) for every candidate: the catalogue cache's rows, or (training,
        no cache) the quantities of the batch's distinct ids gathered by the inverse map, so
        each distinct item goes through the item-side layers once per batch however many
        requests it appears in."""
        c = self.cache
        if c is None:
            ids, inv = torch.unique(cand, return_inverse=True)
            return ItemCache.pack(self._item_quantities(ids)).take(inv)
        got = c.take(cand)
        if self._token_width() and not any(f in c.cols for f in TOKEN_FIELDS):
            # a catalogue too large for the cross-attention fields: those per batch
            ids, inv = torch.unique(cand, return_inverse=True)
            got.update(ItemCache.pack(self._item_quantities(ids, base=False)).take(inv))
        return got

    # -- request side --------------------------------------------------------------------------
    def _user(self, batch: RequestBatch, hist: Tensor) -> Tensor:
        """User tower: requests and their history tokens (B, N, D) -> u (B, D)."""
        mask = batch.hist_mask
        ar = torch.arange(hist.shape[1], device=hist.device)[None, :]
        newest = mask & (ar >= batch.hist_len[:, None] - self.cfg.recent)
        x = [self.users(batch.user_feats), masked_mean(hist, mask), masked_mean(hist, newest)]
        return self.user_tower(torch.cat(x, dim=-1))

    def _user_tokens(self, user_feats: Tensor, u: Tensor) -> Tensor:
        """(B, R, d): the learned null token, the user feature tokens and u."""
        tokens = torch.cat([self.users.tokens(user_feats), u[:, None]], dim=1)  # (B, R-1, D)
        null = self.null_token.expand(u.shape[0], 1, -1)
        return torch.cat([null, self.user_to_moa(tokens)], dim=1)

    def _self_context(self, enc: object) -> SelfContext:
        """The cached history K/V of every layer in block-diagonal form (per request)."""
        r = 1.0 / (enc.hist_len.to(enc.keys[0].dtype) + 1.0)  # (B,)
        n = enc.keys[0].shape[2]
        keep = (torch.arange(n, device=r.device)[None, :] < enc.hist_len[:, None]) * r[:, None]
        return SelfContext(
            hist=enc,
            k=tuple(block_keys(k) for k in enc.keys),
            v=tuple(block_values(v * keep[:, None, :, None]) for v in enc.values),
            r=r[:, None, None],
        )

    def encode_request(self, batch: RequestBatch) -> RequestState:
        """Everything that depends on the request only, computed once per request."""
        batch = recent_history(batch, self.cfg.moa.history_len)
        hist = self.history(batch)  # (B, N, D), zero at padding
        mask = batch.hist_mask  # (B, N)
        u = self._user(batch, hist)  # (B, D)
        hist_moa = self.to_moa(hist) * mask[..., None] if self.to_moa is not None else None  # (B, N, d)
        user_tokens = self._user_tokens(batch.user_feats, u) if self.user_to_moa is not None else None
        enc = self.encoder.encode_history(hist_moa, batch.hist_len) if self.encoder is not None else None
        return RequestState(
            u=u,
            gates=self.fusion.user_gates(u) if self.mlpg else None,
            enc=enc,
            self_ctx=self._self_context(enc) if self._silu_fast else None,
            nro=self.nro.context(hist_moa, mask, user_tokens) if self.nro is not None else None,
            ro=self.ro.context(user_tokens) if self.ro is not None else None,
            hma=(
                self.hma.history(batch.hist_items, batch.hist_actions, batch.hist_len)
                if self.hma is not None
                else None
            ),
        )

    # -- scoring -------------------------------------------------------------------------------
    def _self_attention(self, ctx: SelfContext, item: dict[str, Tensor]) -> Tensor:
        """T_self (B, n, d) of the candidates against the cached history, silu kind: per layer
        the heads' logits are one product with the block-diagonal keys, the attention output
        one more with the block-diagonal values plus the candidate's own (item-only) term; the
        first layer's candidate projections come from the item cache. The same arithmetic as
        `TargetAwareEncoder.score_candidates` (the kernel's torch path), regrouped."""
        inplace = not torch.is_grad_enabled()
        x, q, sv, su = item["x"], item["q"], item["sv"], item["su"]
        h = self.encoder.n_heads
        for i, layer in enumerate(self.encoder.layers):
            if i > 0:  # later layers: the candidate's projections depend on the request
                u, v, q, k = layer.uvqk(layer.norm(x)).chunk(4, dim=-1)
                q = q / (q.shape[-1] // h) ** 0.5
                s_self = (q * k).unflatten(-1, (h, -1)).sum(-1, keepdim=True)
                sv = (F.silu(s_self) * v.unflatten(-1, (h, -1))).flatten(-2)
                su = F.silu(u)
            w = F.silu(torch.matmul(q, ctx.k[i]), inplace=inplace)  # (B, n, H N)
            a = torch.baddbmm(sv * ctx.r, w, ctx.v[i])  # (B, n, d), heads concatenated
            x = x + layer.drop(layer.proj(su * layer.attn_norm(a)))
        return self.encoder.final_norm(x)

    def score_candidates(
        self, state: RequestState, cand: Tensor, *, with_primary: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """cand (B, n) int64 -> logits (B, n) (and the primary logit l0 when asked)."""
        item = self._item_side(cand)
        l0 = self._primary_logit(state.u, cand, item)
        if self.fusion is None:
            return (l0, l0) if with_primary else l0
        embs: dict[str, Tensor] = {}  # each (B, n, d)
        b, n = cand.shape
        if self.hma is not None:
            embs["match"] = self.hma(state.hma, cand)
        if self.encoder is not None:
            if state.self_ctx is not None:
                embs["self"] = self._self_attention(state.self_ctx, item)
            else:
                embs["self"] = self.encoder.score_candidates(state.enc, item["x"])
        if self.nro is not None:
            embs["nro"] = self.nro(state.nro, item["nro_q"].unflatten(-1, (-1, self.cfg.moa_dim)))
        if self.ro is not None:
            embs["ro"] = self.ro.score_items(state.ro, item)
        if self.mlpg:
            gates = item["gates"].unflatten(-1, (len(self.modules_on), -1))  # (B, n, K, d)
            logit = self.fusion(l0, state.gates, gates, embs)
        else:
            logit = self.fusion(l0, embs)
        return (logit, l0) if with_primary else logit

    def score_primary(self, batch: RequestBatch, cand: Tensor) -> Tensor:
        """l0 alone (B, n): the two towers, without computing any MoA module (pretraining and
        the two-tower path's own metrics)."""
        batch = recent_history(batch, self.cfg.moa.history_len)
        u = self._user(batch, self.history(batch))
        ids, inv = torch.unique(cand, return_inverse=True)
        tower, bias = self.primary_items(ids)
        return torch.einsum("bd,bnd->bn", u, tower[inv]) + bias[inv] + self.global_bias

    def forward_train(self, batch: RequestBatch, cand: Tensor) -> tuple[Tensor, Tensor]:
        """Training forward: (logits (B, n), primary logits l0 (B, n)), the serving
        decomposition with autograd (the encoder's differentiable torch path)."""
        return self.score_candidates(self.encode_request(batch), cand, with_primary=True)

    def score(self, batch: RequestBatch, cand: Tensor) -> Tensor:
        """The serving path: (B,) requests, (B, n) candidates -> (B, n) logits."""
        return self.score_candidates(self.encode_request(batch), cand)

    def forward(self, batch: RequestBatch, cand: Tensor) -> Tensor:
        return self.score(batch, cand)

    # -- per-candidate reference ---------------------------------------------------------------
    def score_naive(self, batch: RequestBatch, cand: Tensor) -> Tensor:
        """Reference: one full [history ; candidate] pass per candidate, no shared state, no
        caches, HMA by direct comparison through the unfolded MLP. O(n) times the serving
        cost; tests and benchmarks only."""
        batch = recent_history(batch, self.cfg.moa.history_len)
        out = []
        for j in range(cand.shape[1]):
            c = cand[:, j : j + 1]  # (B, 1)
            hist = self.history(batch)
            mask = batch.hist_mask
            u = self._user(batch, hist)
            emb = self.items(c)  # (B, 1, D)
            i = self.item_tower(emb)
            l0 = (u[:, None, :] * i).sum(-1) + self.item_bias(c).squeeze(-1) + self.global_bias
            if self.fusion is None:
                out.append(l0)
                continue
            hist_moa = self.to_moa(hist) * mask[..., None] if self.to_moa is not None else None
            user_tokens = self._user_tokens(batch.user_feats, u) if self.user_to_moa is not None else None
            item_tok = self.to_moa(self.items.tokens(c)) if user_tokens is not None else None
            embs: dict[str, Tensor] = {}
            if self.hma is not None:
                counts = naive_counts(self.hma, batch.hist_items, batch.hist_actions, batch.hist_len, c)
                embs["match"] = self.hma.embed_counts_unfolded(counts)
            if self.encoder is not None:
                _, embs["self"] = self.encoder(hist_moa, batch.hist_len, self.to_moa(emb) + self.cand_type)
            if self.nro is not None:
                ctx = self.nro.context(hist_moa, mask, user_tokens)
                q_tok = item_tok if self.cfg.nro_queries == "features" else self.to_moa(emb)[..., None, :]
                embs["nro"] = self.nro(ctx, self.nro.item_queries(q_tok))
            if self.ro is not None:
                embs["ro"] = self.ro(self.ro.queries(user_tokens), self.ro.item_kv(item_tok))
            if self.mlpg:
                out.append(self.fusion(l0, self.fusion.user_gates(u), self.fusion.item_gates(i), embs))
            else:
                out.append(self.fusion(l0, embs))
        return torch.cat(out, dim=1)


def bce_with_mask(logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
    """Mean BCE over the entries with weight > 0."""
    loss = F.binary_cross_entropy_with_logits(logits, labels, weight=weight, reduction="sum")
    return loss / weight.sum().clamp_min(1.0)
