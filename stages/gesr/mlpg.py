"""Multi-Logit Parameterized Gating (MLPG): how GESR fuses its MoA embeddings with the towers.

The paper's wording [paper]: MLPG "integrates the newly learned embeddings via gating and
produces secondary logits that are fused with the primary logit"; several logits are computed
in parallel, and a gate amplifies or suppresses feature dimensions. Our formula [ours,
shared/GESR.md], for each enabled MoA embedding E_k in {T_match, T_self, T_nro, T_ro}:
    g_k = 2 * sigmoid(W_k [u ; i])       per-dimension gate in (0, 2) from the tower outputs
    l_k = MLP_k(g_k * E_k)               one secondary logit per embedding, in parallel
    l   = l0 + sum_k beta_k * l_k        beta_k learned scalars, l0 the two-tower dot product
[ours] beta_k start at 1 and the last layer of every MLP_k starts at zero, so a fresh GESR
scores exactly like its two towers and the secondary logits grow from there.
[ours] Serving decomposition, exact: W_k [u ; i] = A_k u + C_k i, so the user part is computed
once per request (`user_gates`) and the item part once per item (`item_gates`, cached for the
catalogue with the item tower); per (request, candidate) pair only an add and a sigmoid remain.
The K MLPs keep stacked weights (K, d, h); serving runs them one embedding at a time, each a
(B n, d) x (d, h) product on the module's output as it comes (no stacked copy of the inputs).

`UngatedFusion` is the ablation row without MLPG [ours]: the MoA embeddings are concatenated and
one MLP gives one secondary logit added to l0 (no gates, no per-embedding logits), so "+MLPG"
in the ablation table measures the gating and the parallel logits, not the mere presence of the
MoA embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class StackedLogitMLPs(nn.Module):
    """K independent MLPs d -> h -> 1 (SiLU) over (..., K, d), as one batched product.
    The last layer starts at zero (see module docstring)."""

    def __init__(self, k: int, d: int, h: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(k, d, h) / d**0.5)
        self.b1 = nn.Parameter(torch.zeros(k, h))
        self.w2 = nn.Parameter(torch.zeros(k, h))
        self.b2 = nn.Parameter(torch.zeros(k))

    def hidden(self, x: Tensor, scale: float = 1.0) -> Tensor:
        """(..., K, d) -> (..., K, h): SiLU(scale * x W1_k + b1_k). Folding `scale` into the
        (K, d, h) weights saves a pass over the per-pair input."""
        w1 = self.w1 * scale if scale != 1.0 else self.w1
        return F.silu(torch.einsum("...kd,kdh->...kh", x, w1) + self.b1)

    def forward(self, x: Tensor) -> Tensor:
        """(..., K, d) -> (..., K)."""
        return (self.hidden(x) * self.w2).sum(-1) + self.b2

    def weighted_sum(self, x: Tensor, beta: Tensor, scale: float = 1.0) -> Tensor:
        """(..., K, d) -> (...): sum_k beta_k MLP_k(scale * x_k), with beta folded into the last
        layer, so the K logits are never materialised (one matrix-vector product)."""
        h = self.hidden(x, scale)  # (..., K, h)
        w = (self.w2 * beta[:, None]).reshape(-1)  # (K h,)
        return h.flatten(-2) @ w + self.b2 @ beta


class MLPG(nn.Module):
    """Gated parallel secondary logits, fused with the primary logit."""

    def __init__(self, names: tuple[str, ...], dim: int, tower_dim: int, hidden: int) -> None:
        super().__init__()
        self.names = tuple(names)
        k = len(self.names)
        self.dim = dim
        self.gate_user = nn.Linear(tower_dim, k * dim)  # A_k u + bias, all k at once
        self.gate_item = nn.Linear(tower_dim, k * dim, bias=False)  # C_k i
        self.mlps = StackedLogitMLPs(k, dim, hidden)
        self.beta = nn.Parameter(torch.ones(k))

    def user_gates(self, u: Tensor) -> Tensor:
        """(B, D) -> (B, K, d), once per request."""
        return self.gate_user(u).unflatten(-1, (len(self.names), self.dim))

    def item_gates(self, i: Tensor) -> Tensor:
        """(..., D) item tower outputs -> (..., K, d), once per item (cacheable)."""
        return self.gate_item(i).unflatten(-1, (len(self.names), self.dim))

    def forward(self, l0: Tensor, gu: Tensor, gi: Tensor, embs: dict[str, Tensor]) -> Tensor:
        """gu (B, K, d), gi (B, n, K, d), embs name -> (B, n, d) -> l (B, n) = l0 + sum_k
        beta_k l_k, with the gate's factor 2 folded into the first layers and beta into the last
        ones (so the K logits l_k are never materialised). The K gates are one add and one
        sigmoid; then one embedding at a time, each a (B n, d) x (d, h) product (bias fused)
        straight from the module's output, no (B, n, K, d) stack of the embeddings, and its
        logit accumulated in place (no grad) by one matrix-vector product."""
        m = self.mlps
        w1, w2 = m.w1 * 2.0, m.w2 * self.beta[:, None]  # (K, d, h), (K, h)
        inplace = not torch.is_grad_enabled()
        g = gi + gu[:, None]  # (B, n, K, d); g_k = 2 * sigmoid(this)
        g = g.sigmoid_() if inplace else g.sigmoid()
        out = (l0 + m.b2 @ self.beta).reshape(-1)  # (B n,)
        for k, name in enumerate(self.names):
            x = (g[..., k, :] * embs[name]).flatten(0, -2)  # (B n, d)
            h = torch.addmm(m.b1[k], x, w1[k])  # (B n, h)
            h = F.silu(h, inplace=inplace)
            out = out.addmv_(h, w2[k]) if inplace else torch.addmv(out, h, w2[k])
        return out.view(l0.shape)


class UngatedFusion(nn.Module):
    """No MLPG: concat(E_k) -> one MLP -> one secondary logit added to l0."""

    def __init__(self, names: tuple[str, ...], dim: int, hidden: int) -> None:
        super().__init__()
        self.names = tuple(names)
        self.mlp = StackedLogitMLPs(1, len(self.names) * dim, hidden)

    def forward(self, l0: Tensor, embs: dict[str, Tensor]) -> Tensor:
        """The first layer over concat(E_k) as a sum over the embeddings of E_k times its rows
        of the weight (no (B, n, K d) concatenation)."""
        m = self.mlp
        w1 = m.w1[0].view(len(self.names), -1, m.w1.shape[-1])  # (K, d, h)
        pre = sum(torch.matmul(embs[k], w1[j]) for j, k in enumerate(self.names)) + m.b1[0]
        return l0 + F.silu(pre) @ m.w2[0] + m.b2[0]
