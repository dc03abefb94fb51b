"""GESR's serving state: what `GESRModel.encode_request` computes once per request
(`RequestState`, with the self-attention history in block-diagonal form, `SelfContext`) and the
item-only quantities gathered per candidate (`ItemCache`). See `model.py`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cascade.stages.gesr.cross import CrossContext, ROContext
from cascade.stages.gesr.hma import HMAHistory


@dataclass(frozen=True)
class SelfContext:
    """The history side of target-aware self attention for the serving path (silu kind)."""

    hist: object  # TargetAwareEncoder HistoryState
    k: tuple[Tensor, ...]  # per layer (B, d, H N) block-diagonal history keys
    v: tuple[Tensor, ...]  # per layer (B, H N, d) block-diagonal values, 0 at padding, / (len+1)
    r: Tensor  # (B, 1, 1) 1 / (hist_len + 1): the silu attention's normaliser


@dataclass(frozen=True)
class RequestState:
    """Everything GESR computes once per request (B requests)."""

    u: Tensor  # (B, D) user tower output
    gates: Tensor | None  # (B, K, d) user part of the MLPG gates (MLPG on)
    enc: object | None  # TargetAwareEncoder HistoryState (self attention on)
    self_ctx: SelfContext | None  # its block-diagonal form (self attention on, silu kind)
    nro: CrossContext | None  # NRO keys/values (nro on)
    ro: ROContext | None  # RO queries (ro on)
    hma: HMAHistory | None  # HMA history structures (hma on)


# the item-only fields that depend on the item's feature tokens (the cross-attention projections)
TOKEN_FIELDS = ("nro_q", "ro_out", "ro_dk", "ro_k")


@dataclass
class ItemCache:
    """Item-only quantities of m items (the catalogue, or a batch's distinct items), packed as
    the columns of one (m, W) matrix so that a candidate's are one row gather (`take`).
    Fields: tower (D) and bias (1) of l0 (the catalogue keeps these two apart, in
    `GESRModel.primary_cache`); gates (K d) the item part of the MLPG gates; the
    self-attention candidate token x (d) and, for the silu kind, its first layer's scaled query
    q, self term sv (the candidate attending to itself) and gate su = SiLU(u) (d each); nro_q
    (F d) NRO queries; the RO fields of `ROCrossAttention.item_fields`: ro_out (d) T_ro of
    one-token items, for two tokens ro_dk, ro_v, ro_dv (d each), else ro_k, ro_v (F d each)."""

    rows: Tensor  # (m, W)
    cols: dict[str, tuple[int, int]]  # field -> (first column, width)

    @classmethod
    def pack(cls, fields: dict[str, Tensor]) -> "ItemCache":
        """fields name -> (m, width) -> one (m, W) matrix."""
        cols, at = {}, 0
        for name, t in fields.items():
            cols[name] = (at, t.shape[-1])
            at += t.shape[-1]
        return cls(rows=torch.cat(list(fields.values()), dim=-1), cols=cols)

    def take(self, idx: Tensor) -> dict[str, Tensor]:
        """idx (*shape) -> field -> (*shape, width) views of one gather."""
        g = F.embedding(idx, self.rows)
        return {name: g[..., a : a + w] for name, (a, w) in self.cols.items()}
