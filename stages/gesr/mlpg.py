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

`UngatedFusion` is the ablation row without MLPG [ours]: the MoA embeddings are concatenated and
one MLP gives one secondary logit added to l0 (no gates, no per-embedding logits), so "+MLPG"
in the ablation table measures the gating and the parallel logits, not the mere presence of the
MoA embeddings.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _logit_mlp(dim: int, hidden: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    return mlp


class MLPG(nn.Module):
    """Gated parallel secondary logits, fused with the primary logit."""

    def __init__(self, names: tuple[str, ...], dim: int, hidden: int) -> None:
        super().__init__()
        self.names = tuple(names)
        self.gates = nn.ModuleDict({k: nn.Linear(2 * dim, dim) for k in self.names})
        self.mlps = nn.ModuleDict({k: _logit_mlp(dim, hidden) for k in self.names})
        self.beta = nn.Parameter(torch.ones(len(self.names)))

    def secondary(self, u: Tensor, i: Tensor, embs: dict[str, Tensor]) -> Tensor:
        """u (B, D) user tower, i (B, n, D) item tower, embs name -> (B, n, D)
        -> (B, n, K) secondary logits l_k (before beta)."""
        ui = torch.cat([u[:, None, :].expand_as(i), i], dim=-1)  # (B, n, 2D)
        out = []
        for k in self.names:
            g = 2.0 * torch.sigmoid(self.gates[k](ui))  # (B, n, D)
            out.append(self.mlps[k](g * embs[k]).squeeze(-1))
        return torch.stack(out, dim=-1)

    def forward(self, l0: Tensor, u: Tensor, i: Tensor, embs: dict[str, Tensor]) -> Tensor:
        """-> l (B, n) = l0 + sum_k beta_k l_k."""
        return l0 + self.secondary(u, i, embs) @ self.beta


class UngatedFusion(nn.Module):
    """No MLPG: concat(E_k) -> one MLP -> one secondary logit added to l0."""

    def __init__(self, names: tuple[str, ...], dim: int, hidden: int) -> None:
        super().__init__()
        self.names = tuple(names)
        self.mlp = _logit_mlp(len(self.names) * dim, hidden)

    def forward(self, l0: Tensor, u: Tensor, i: Tensor, embs: dict[str, Tensor]) -> Tensor:
        x = torch.cat([embs[k] for k in self.names], dim=-1)
        return l0 + self.mlp(x).squeeze(-1)
