"""NRO and RO cross attention, GESR's two cross-attention MoA modules (arXiv 2511.21095).

RO = request-only features (the user and the context: the same for every candidate of a
request); NRO = non-request-only features (per candidate item) [reading]. Query/key roles are
ours (shared/GESR.md):
- NRO cross attention: the candidate's feature tokens are the queries; the history tokens and the
  user/context tokens are the keys and values -> T_nro (B, n, D). Each candidate "reads" the
  user's history, with cost linear in history length.
- RO cross attention: the user/context tokens are the queries; the candidate's own feature tokens
  are the keys and values -> T_ro (B, n, D). The user "reads" the candidate, which makes the
  interaction symmetric.

Both are ordinary multi-head softmax attention (padding masked), with the outputs of a set of
query tokens mean-pooled into one vector per candidate [ours] (pooled before the output
projection, which is linear, so the result is the same at 1/F or 1/R of the cost).
Serving decomposition:
- the request side is projected once per request (`NROCrossAttention.context`: history and user
  K/V; `ROCrossAttention.queries`: the user/context queries);
- the item side depends on the item only, so its projections (`NROCrossAttention.item_queries`,
  `ROCrossAttention.item_kv`) are computed for the whole catalogue once after training and
  gathered at scoring time (`GESRModel.cache_items`);
- all candidates of a batch go through one batched product; no Python loop per candidate.
[ours] The user/context token set always contains a learned "null" token, so a request with an
empty history and no user features still has a key to attend to (no all-masked softmax rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _heads(x: Tensor, h: int) -> Tensor:
    """(..., D) -> (..., H, D/H)."""
    return x.unflatten(-1, (h, x.shape[-1] // h))


@dataclass(frozen=True)
class CrossContext:
    """Request-side keys/values for NRO cross attention (projected once per request)."""

    k: Tensor  # (B, H, S, d) history tokens then user/context tokens
    v: Tensor  # (B, H, S, d)
    mask: Tensor  # (B, S) bool, True at real tokens


class NROCrossAttention(nn.Module):
    """Candidate feature tokens attend to [history tokens ; user/context tokens]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def context(self, hist: Tensor, hist_mask: Tensor, user_tokens: Tensor) -> CrossContext:
        """hist (B, N, D), hist_mask (B, N), user_tokens (B, R, D) -> K/V once per request."""
        tokens = torch.cat([hist, user_tokens], dim=1)  # (B, S, D)
        mask = torch.cat(
            [hist_mask, torch.ones(user_tokens.shape[:2], dtype=torch.bool, device=hist.device)], 1
        )
        k, v = _heads(self.kv(tokens), self.heads).chunk(2, dim=-1)  # (B, S, H, 2d) -> 2x(B,S,H,d)
        return CrossContext(k=k.transpose(1, 2), v=v.transpose(1, 2), mask=mask)

    def item_queries(self, item_tokens: Tensor) -> Tensor:
        """(..., F, D) item feature tokens -> (..., F, D) queries (item-only: cacheable)."""
        return self.q(item_tokens)

    def forward(self, ctx: CrossContext, cand_q: Tensor) -> Tensor:
        """cand_q (B, n, F, D) projected candidate queries -> T_nro (B, n, D)."""
        b, n, f, d = cand_q.shape
        q = _heads(cand_q.reshape(b, n * f, d), self.heads).transpose(1, 2)  # (B, H, nF, d/H)
        # fused attention (no (B, H, nF, S) logits tensor on CPU flash paths); S always has the
        # null token, so no row is fully masked
        att = F.scaled_dot_product_attention(q, ctx.k, ctx.v, attn_mask=ctx.mask[:, None, None, :])
        att = att.transpose(1, 2).reshape(b, n, f, d).mean(dim=2)  # (B, n, D)
        return self.norm(self.out(att))  # out is linear: pooling first is the same, F x cheaper


class ROCrossAttention(nn.Module):
    """User/context tokens attend to each candidate's own feature tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def queries(self, user_tokens: Tensor) -> Tensor:
        """(B, R, D) -> (B, H, R, d) queries, once per request."""
        return _heads(self.q(user_tokens), self.heads).transpose(1, 2)

    def item_kv(self, item_tokens: Tensor) -> Tensor:
        """(..., F, D) item feature tokens -> (..., F, 2D) keys|values (item-only: cacheable)."""
        return self.kv(item_tokens)

    def forward(self, q: Tensor, cand_kv: Tensor) -> Tensor:
        """q (B, H, R, d), cand_kv (B, n, F, 2D) -> T_ro (B, n, D).

        The R query outputs are averaged, and v does not depend on the query, so the mean of
        the R softmax-weighted sums is one sum weighted by the mean of the R weight vectors."""
        b, n, f, _ = cand_kv.shape
        h = self.heads
        k, v = _heads(cand_kv, h).chunk(2, dim=-1)  # 2 x (B, n, F, H, d)
        logits = torch.einsum("bmhd,bhrd->bmhr", k.reshape(b, n * f, h, -1), q)  # (B, nF, H, R)
        w = torch.softmax(logits.view(b, n, f, h, -1) / q.shape[-1] ** 0.5, dim=2).mean(-1)
        att = (w[..., None] * v).sum(dim=2)  # (B, n, H, d)
        return self.norm(self.out(att.flatten(-2)))
