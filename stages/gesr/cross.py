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
  keys as one block-diagonal (H d_h, H S) matrix, so one product gives every head's logits side
  by side, and the values likewise, already through the output projection: out is linear and
  each head's weights sum to 1, so out(sum_s p_s v_s) = sum_s p_s out_h(v_s) with out's bias
  split over the heads; `ROCrossAttention.queries`: the user/context queries);
- the item side depends on the item only, so its projections (`NROCrossAttention.item_queries`,
  `ROCrossAttention.item_kv`) are computed for the whole catalogue once after training and
  gathered at scoring time (`GESRModel.cache_items`); with one token per item the RO attention
  has a single key, its weights are all 1 and T_ro is item-only (`ROCrossAttention.single_token`);
  with two, a softmax over two logits is a sigmoid of the key difference, so an item keeps
  k_0 - k_1, v_1 and v_0 - v_1 (`ROCrossAttention.item_fields`, `score_items`);
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


# below this many entries per row, `torch.softmax` over the last dim takes a scalar path on CPU
# (AVX-512: 16 floats a vector): 5.1 ms for 16k x 2 rows of 13, against 0.9 ms for rows of 30 and
# 0.9 ms for max/exp/sum/divide as four vectorised passes (one thread, torch 2.13)
SHORT_ROW = 16


def softmax_last(x: Tensor, dim: int = -1) -> Tensor:
    """softmax over `dim` (default the last), with short rows (< `SHORT_ROW`) and other dims
    as max, exp, sum and divide (in place without autograd); every row needs one finite entry."""
    last = dim in (-1, x.dim() - 1)
    if x.device.type != "cpu" or (last and x.shape[-1] >= SHORT_ROW):
        return torch.softmax(x, dim=dim)
    y = x - x.amax(dim, keepdim=True)
    if torch.is_grad_enabled():
        y = y.exp()
        return y / y.sum(dim, keepdim=True)
    y = y.exp_()
    return y.div_(y.sum(dim, keepdim=True))


def block_keys(k: Tensor) -> Tensor:
    """(B, H, L, e) per-head keys -> (B, H e, H L) block diagonal: queries (B, n, H e) times it
    are every head's logits side by side, (B, n, H L), without splitting the queries by head."""
    eye = torch.eye(k.shape[1], dtype=k.dtype, device=k.device)
    return torch.einsum("bhle,hg->bhegl", k, eye).flatten(3).flatten(1, 2)


def block_values(v: Tensor) -> Tensor:
    """(B, H, L, e) per-head values -> (B, H L, H e) block diagonal: weights (B, n, H L) times
    it are the heads' outputs concatenated, (B, n, H e)."""
    eye = torch.eye(v.shape[1], dtype=v.dtype, device=v.device)
    return torch.einsum("bhle,hg->bhlge", v, eye).flatten(3).flatten(1, 2)


@dataclass(frozen=True)
class CrossContext:
    """Request-side keys/values for NRO cross attention (projected once per request)."""

    k: Tensor  # (B, H d_h, H S) block-diagonal keys (history then user/context), / sqrt(d_h)
    bias: Tensor  # (B, 1, H S) logit bias: 0 at real tokens, -inf at padding
    v: Tensor  # (B, H S, D) block-diagonal values through the output projection


@dataclass(frozen=True)
class ROContext:
    """Request-side queries for RO cross attention (projected once per request)."""

    q: Tensor  # (B, H d_h, H R) block-diagonal queries, / sqrt(d_h)
    mean: Tensor  # (H R, H d_h): the mean over a head's R queries, spread over its d_h columns


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
        k, v = _heads(self.kv(tokens), self.heads).chunk(2, dim=-1)  # 2 x (B, S, H, d)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, d)
        # out(concat_h sum_s p_hs v_hs) + b = sum_hs p_hs (v_hs W_out,h^T + b / H), each head's
        # p summing to 1 (S always has the null token, so no row is fully masked)
        vo = torch.matmul(block_values(v), self.out.weight.T) + self.out.bias / self.heads
        bias = torch.zeros(mask.shape, dtype=k.dtype, device=k.device).masked_fill(~mask, float("-inf"))
        return CrossContext(
            k=block_keys(k) / k.shape[-1] ** 0.5, bias=bias.repeat(1, self.heads)[:, None], v=vo
        )

    def item_queries(self, item_tokens: Tensor) -> Tensor:
        """(..., F, D) item feature tokens -> (..., F, D) queries (item-only: cacheable)."""
        return self.q(item_tokens)

    def forward(self, ctx: CrossContext, cand_q: Tensor) -> Tensor:
        """cand_q (B, n, F, D) projected candidate queries -> T_nro (B, n, D). The F query
        outputs are mean-pooled; the values are linear in the weights, so the weights are
        pooled first."""
        b, n, f, d = cand_q.shape
        logits = torch.baddbmm(ctx.bias, cand_q.reshape(b, n * f, d), ctx.k)  # (B, nF, H S)
        w = softmax_last(logits.view(b, n * f, self.heads, -1)).view(b, n, f, -1)
        w = w[:, :, 0] if f == 1 else w.mean(dim=2)  # (B, n, H S)
        return self.norm(torch.bmm(w, ctx.v))


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

    def single_token(self, item_kv: Tensor) -> Tensor:
        """(..., 1, 2D) keys|values of items with one token -> T_ro (..., D): one key, so every
        query's weight on it is 1 and the output is the item's projected value (item-only)."""
        v = item_kv[..., 0, :].unflatten(-1, (self.heads, 2, -1))[..., 1, :]  # (..., H, d)
        return self.norm(self.out(v.flatten(-2)))

    def forward(self, q: Tensor, cand_kv: Tensor) -> Tensor:
        """q (B, H, R, d), cand_kv (B, n, F, 2D) -> T_ro (B, n, D). The reference form.

        The R query outputs are averaged, and v does not depend on the query, so the mean of
        the R softmax-weighted sums is one sum weighted by the mean of the R weight vectors."""
        b, n, f, _ = cand_kv.shape
        h = self.heads
        k, v = _heads(cand_kv, h).chunk(2, dim=-1)  # 2 x (B, n, F, H, d)
        logits = torch.einsum("bmhd,bhrd->bmhr", k.reshape(b, n * f, h, -1), q)  # (B, nF, H, R)
        w = torch.softmax(logits.view(b, n, f, h, -1) / q.shape[-1] ** 0.5, dim=2).mean(-1)
        att = (w[..., None] * v).sum(dim=2)  # (B, n, H, d)
        return self.norm(self.out(att.flatten(-2)))

    # -- serving form: heads side by side, one product per request ------------------------
    def context(self, user_tokens: Tensor) -> ROContext:
        """(B, R, D) -> the block-diagonal queries and the head-mean matrix, once per request."""
        q = self.queries(user_tokens)  # (B, H, R, d)
        h, r, e = q.shape[1:]
        ones = torch.ones(1, h, r, e, dtype=q.dtype, device=q.device)
        return ROContext(q=block_keys(q) / e**0.5, mean=block_values(ones)[0] / r)

    def item_fields(self, item_kv: Tensor) -> dict[str, Tensor]:
        """(m, F, 2D) keys|values -> the item-only fields `score_items` reads (heads
        concatenated): F = 1 T_ro itself ("ro_out"); F = 2 the key difference k_0 - k_1
        ("ro_dk"), v_1 ("ro_v") and v_0 - v_1 ("ro_dv"); F > 2 all keys ("ro_k", F D) and
        values ("ro_v", F D)."""
        m, f, _ = item_kv.shape
        if f == 1:
            return {"ro_out": self.single_token(item_kv)}
        kv = item_kv.unflatten(-1, (self.heads, 2, -1))  # (m, F, H, k|v, d)
        k, v = kv[..., 0, :].flatten(-2), kv[..., 1, :].flatten(-2)  # (m, F, D)
        if f == 2:
            return {"ro_dk": k[:, 0] - k[:, 1], "ro_v": v[:, 1], "ro_dv": v[:, 0] - v[:, 1]}
        return {"ro_k": k.flatten(-2), "ro_v": v.flatten(-2)}

    def score_items(self, ctx: ROContext, item: dict[str, Tensor]) -> Tensor:
        """The fields of `item_fields` for (B, n) candidates -> T_ro (B, n, D), equal to
        `forward`. Each head's logits of all R queries are one product with the block-diagonal
        queries, and the mean over R, spread over the head's d columns, one product with
        `ctx.mean`. Two keys: a softmax over two logits is the sigmoid of their difference, so
        the mean weight w of key 0 is mean_r sigmoid((k_0 - k_1) q_r) and the attention output
        v_1 + w (v_0 - v_1). More keys: the softmax over the F keys is taken key by key."""
        inplace = not torch.is_grad_enabled()
        if "ro_out" in item:
            return item["ro_out"]
        if "ro_dk" in item:
            # the queries as the left factor read the gathered keys in place (see model.py's l0)
            s = torch.matmul(ctx.q.transpose(1, 2), item["ro_dk"].transpose(1, 2))  # (B, H R, n)
            s = s.sigmoid_() if inplace else s.sigmoid()
            w = torch.matmul(s.transpose(1, 2), ctx.mean)  # (B, n, D)
            att = torch.addcmul(item["ro_v"], w, item["ro_dv"])  # (B, n, D)
        else:
            # the softmax over the F keys one key at a time, on (B, n, H R) slices: torch's
            # softmax and reductions over a short strided dim are ~4x slower (ml-100k, F = 3)
            b, n, fd = item["ro_k"].shape
            d = ctx.mean.shape[-1]
            f = fd // d
            s = torch.bmm(item["ro_k"].reshape(b, n * f, d), ctx.q).view(b, n, f, -1)  # (B, n, F, H R)
            v = item["ro_v"].view(b, n, f, d)
            top = s[:, :, 0]
            for j in range(1, f):
                top = torch.maximum(top, s[:, :, j])
            e = [s[:, :, j] - top for j in range(f)]
            e = [x.exp_() for x in e] if inplace else [x.exp() for x in e]
            z = e[0]
            for x in e[1:]:
                z = z + x
            z = z.reciprocal()
            att = torch.matmul(e[0] * z, ctx.mean) * v[:, :, 0]  # (B, n, D)
            for j in range(1, f):
                att = torch.addcmul(att, torch.matmul(e[j] * z, ctx.mean), v[:, :, j])
        return self.norm(self.out(att))
