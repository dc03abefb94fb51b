"""TargetAwareEncoder: HSTU layers over [history ; candidates] under the target mask.

The shared attention layer of GESR's Target-Aware Self Attention (Hong et al., arXiv 2511.21095)
and of the late-stage ranker. Layers follow HSTU (Zhai et al., arXiv 2402.17152) as written in
shared/GESR.md:

    x_hat = LN(x);  u, v, q, k = split(x_hat W);  A = attention(q, k) under the target mask
    y = SiLU(u) * LN(A v);  x <- x + dropout(y W_o)

followed by a final LayerNorm. Attention is `cascade.kernels.target_attention` ("silu" = HSTU's
pointwise attention, the default; "softmax" optional).

Because history tokens never see candidates, every layer's history representations are
candidate-independent. So `encode_history` runs the history through all layers once and caches
each layer's history K/V (`HistoryState`); `score_candidates` then runs only the candidates,
attending to the cached K/V and to themselves: O(N^2 d + n N d) per request instead of the naive
O(n N^2 d) of one sequence per candidate (`forward_naive`, kept for tests as the definition).

No positional encoding is added here [ours]: callers put order/time into the tokens (the history
token embedding carries a time-gap bucket), and the causal mask gives the history its order.

`impl` ("auto" | "triton" | "torch" | "ref") picks the attention implementation; set the
attribute (`encoder.impl = "triton"`) or pass `impl=` per call. "auto" runs Triton on CUDA at
inference and the differentiable torch path whenever gradients are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.kernels.target_attention import IMPLS, KINDS, dense_masked_attention, target_aware_attention


@dataclass(frozen=True)
class HistoryState:
    """What `score_candidates` needs from a request's history, computed once per request."""

    keys: tuple[Tensor, ...]  # per layer (B, H, N, d)
    values: tuple[Tensor, ...]  # per layer (B, H, N, d)
    hist_len: Tensor  # (B,) int64
    output: Tensor  # (B, N, D) final history representations, 0 at padding

    def __len__(self) -> int:
        return int(self.hist_len.shape[0])

    def select(self, idx: Tensor) -> "HistoryState":
        """Rows `idx` of the batch (e.g. to score candidates for a subset of requests)."""
        return HistoryState(
            keys=tuple(k[idx] for k in self.keys),
            values=tuple(v[idx] for v in self.values),
            hist_len=self.hist_len[idx],
            output=self.output[idx],
        )

    def to(self, device: torch.device | str) -> "HistoryState":
        return HistoryState(
            keys=tuple(k.to(device) for k in self.keys),
            values=tuple(v.to(device) for v in self.values),
            hist_len=self.hist_len.to(device),
            output=self.output.to(device),
        )


class HSTULayer(nn.Module):
    """One HSTU layer; the attention itself is the target-aware op."""

    def __init__(self, dim: int, n_heads: int, *, kind: str, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.kind = n_heads, kind
        self.norm = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, 4 * dim)
        self.attn_norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, L, D) -> u (B, L, D) and v, q, k (B, H, L, d) (views, no copies)."""
        u, v, q, k = self.uvqk(self.norm(x)).chunk(4, dim=-1)
        heads = lambda t: t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # noqa: E731
        return u, heads(v), heads(q), heads(k)

    def combine(self, x: Tensor, u: Tensor, a: Tensor) -> Tensor:
        """Residual update from the attention output a (B, H, L, d)."""
        a = a.transpose(1, 2).flatten(2)  # (B, L, D)
        return x + self.drop(self.proj(F.silu(u) * self.attn_norm(a)))


class TargetAwareEncoder(nn.Module):
    """HSTU-style layers over [history ; candidates] with the target mask (see module docstring).

    hist (B, N, D) left-aligned, right-padded with hist_len (B,); cand (B, n, D).
    """

    def __init__(
        self,
        dim: int,
        n_layers: int,
        n_heads: int,
        *,
        kind: str = "silu",
        dropout: float = 0.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if dim < 1 or n_heads < 1 or dim % n_heads:
            raise ValueError(f"TargetAwareEncoder: dim ({dim}) must be a positive multiple of n_heads ({n_heads})")
        if n_layers < 1:
            raise ValueError(f"TargetAwareEncoder: n_layers must be >= 1, got {n_layers}")
        if kind not in KINDS:
            raise ValueError(f"TargetAwareEncoder: kind must be one of {KINDS}, got {kind!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"TargetAwareEncoder: dropout must be in [0, 1), got {dropout}")
        self.dim, self.n_layers, self.n_heads, self.kind = dim, n_layers, n_heads, kind
        self.impl = impl  # validated on use; a plain attribute so a stage can switch it
        self._check_impl(impl)
        self.layers = nn.ModuleList(HSTULayer(dim, n_heads, kind=kind, dropout=dropout) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(dim)

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _check_impl(impl: str) -> str:
        if impl not in IMPLS:
            raise ValueError(f"TargetAwareEncoder: impl must be one of {IMPLS}, got {impl!r}")
        return impl

    def _check_inputs(self, hist: Tensor | None, hist_len: Tensor | None, cand: Tensor | None) -> None:
        for name, t in (("hist", hist), ("cand", cand)):
            if t is not None and (t.dim() != 3 or t.shape[-1] != self.dim):
                raise ValueError(f"TargetAwareEncoder: {name} must be (B, L, {self.dim}), got {tuple(t.shape)}")
        if hist is not None and cand is not None and hist.shape[0] != cand.shape[0]:
            raise ValueError(f"TargetAwareEncoder: hist has batch {hist.shape[0]} but cand has {cand.shape[0]}")
        if hist is not None and (hist_len is None or hist_len.shape != (hist.shape[0],)):
            got = None if hist_len is None else tuple(hist_len.shape)
            raise ValueError(f"TargetAwareEncoder: hist_len must have shape ({hist.shape[0]},), got {got}")

    def _mask_history(self, x: Tensor, hist_len: Tensor) -> Tensor:
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < hist_len[:, None]
        return x * valid[..., None]

    # -- cached-history path ---------------------------------------------------------------

    def encode_history(self, hist: Tensor, hist_len: Tensor, *, impl: str | None = None) -> HistoryState:
        """Run the history through all layers once; cache every layer's history K/V."""
        self._check_inputs(hist, hist_len, None)
        impl = self._check_impl(impl or self.impl)
        x, keys, values = hist, [], []
        for layer in self.layers:
            u, v, q, k = layer.project(x)
            none = q[:, :, :0]  # zero candidates: the op computes the history rows only
            _, a = target_aware_attention(none, none, none, k, v, hist_len, q_h=q, kind=self.kind, impl=impl)
            keys.append(k)
            values.append(v)
            x = layer.combine(x, u, a)
        out = self._mask_history(self.final_norm(x), hist_len)
        return HistoryState(keys=tuple(keys), values=tuple(values), hist_len=hist_len, output=out)

    def score_candidates(self, state: HistoryState, cand: Tensor, *, impl: str | None = None) -> Tensor:
        """Candidates (B, n, D) through all layers against the cached history -> (B, n, D)."""
        self._check_inputs(None, None, cand)
        if len(state.keys) != self.n_layers or cand.shape[0] != len(state):
            raise ValueError(
                f"TargetAwareEncoder.score_candidates: state has {len(state.keys)} layers and batch "
                f"{len(state)}, expected {self.n_layers} layers and cand's batch {cand.shape[0]}"
            )
        impl = self._check_impl(impl or self.impl)
        x = cand
        for layer, k_h, v_h in zip(self.layers, state.keys, state.values):
            u, v, q, k = layer.project(x)
            a, _ = target_aware_attention(q, k, v, k_h, v_h, state.hist_len, kind=self.kind, impl=impl)
            x = layer.combine(x, u, a)
        return self.final_norm(x)

    # -- full path ---------------------------------------------------------------------------

    def forward(
        self, hist: Tensor, hist_len: Tensor, cand: Tensor, *, impl: str | None = None
    ) -> tuple[Tensor, Tensor]:
        """History and candidates together (one full-mode op call per layer).
        Returns (hist_out (B, N, D), 0 at padding; cand_out (B, n, D))."""
        self._check_inputs(hist, hist_len, cand)
        impl = self._check_impl(impl or self.impl)
        xh, xc = hist, cand
        for layer in self.layers:
            uh, vh, qh, kh = layer.project(xh)
            uc, vc, qc, kc = layer.project(xc)
            ac, ah = target_aware_attention(qc, kc, vc, kh, vh, hist_len, q_h=qh, kind=self.kind, impl=impl)
            xh, xc = layer.combine(xh, uh, ah), layer.combine(xc, uc, ac)
        return self._mask_history(self.final_norm(xh), hist_len), self.final_norm(xc)

    def forward_naive(self, hist: Tensor, hist_len: Tensor, cand: Tensor) -> Tensor:
        """The definition, for tests: one sequence [history ; candidate j] per candidate, through
        the same weights with plain masked attention (fp32). Returns cand_out (B, n, D)."""
        self._check_inputs(hist, hist_len, cand)
        B, N, D = hist.shape
        n = cand.shape[1]
        # (B*n, N+1, D): every candidate gets its own copy of the (padded) history
        x = torch.cat([hist[:, None].expand(B, n, N, D), cand[:, :, None]], dim=2).flatten(0, 1)
        pos = torch.arange(N + 1, device=hist.device)
        lens = hist_len.repeat_interleave(n)  # (B*n,)
        real = (pos[None, :] < lens[:, None]) | (pos[None, :] == N)  # (B*n, N+1): history or the candidate
        mask = (pos[None, :] <= pos[:, None])[None] & real[:, None, :] & real[:, :, None]
        for layer in self.layers:
            u, v, q, k = layer.project(x)
            a = dense_masked_attention(q.float(), k.float(), v.float(), mask[:, None], kind=self.kind)
            x = layer.combine(x, u, a.to(x.dtype))
        return self.final_norm(x[:, N]).unflatten(0, (B, n))
