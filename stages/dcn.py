"""DCN-v2 cross layers (Wang et al., "DCN V2", WWW 2021), the LSR's feature crossing."""

from __future__ import annotations

from torch import Tensor, nn


class CrossNetwork(nn.Module):
    """DCN-v2 full-rank cross layers: x_{l+1} = x0 * (W_l x_l + b_l) + x_l."""

    def __init__(self, dim: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x
