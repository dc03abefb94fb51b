"""The ground-truth affinity of a synthetic log, for any batch of requests.

`GroundTruth.affinity(batch, candidates, parts=...)` recomputes the same affinity from a
`RequestBatch` (its history, masked with hist_len, and action codes). It equals the generator's
logits whenever the batch history is at least `max(history_window, repeat_window)` long
(Traffic's default max_len 50 is, for every preset).

The affinity itself is defined in the package docstring (`cascade.data.synthetic`);
`category_term` is its category part, shared with the simulation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cascade.data.synthetic.config import SyntheticConfig

TRUTH_PARTS = ("dot", "cross", "category", "repeat")


def category_term(n_long: Tensor, n_short: Tensor, cfg: SyntheticConfig) -> Tensor:
    """The category part of the affinity from the two window counts (package docstring)."""
    f = torch.log1p(n_long.clamp(0.0, cfg.cross_cap)) / math.log1p(cfg.cross_cap)
    short = n_short.clamp(0.0, cfg.recent_window) / cfg.recent_window
    return cfg.cross_strength * (f + cfg.recency_weight * short) / (1.0 + cfg.recency_weight)


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """The affinity the synthetic log was generated from (see the package docstring)."""

    config: SyntheticConfig
    user_latent: Tensor  # (n_users, d) float32, already scaled by dot_strength
    item_latent: Tensor  # (n_items, d) float32
    item_bias: Tensor  # (n_items,) float32: log(n_items * popularity weight)
    item_category: Tensor  # (n_items,) int64 in 0..n_categories-1 (feature code = this + 1)
    user_interests: Tensor  # (n_users, interests_per_user) int64 category indices
    _device_cache: dict = field(default_factory=dict, repr=False)

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = tuple(
                t.to(device) for t in
                (self.user_latent, self.item_latent, self.item_bias, self.item_category)
            )
        return self._device_cache[key]

    def affinity(
        self, batch, candidates: Tensor, *, parts: Sequence[str] = ("dot", "cross")
    ) -> Tensor:
        """(B, K) float32 ground-truth affinity of each request of `batch` (a RequestBatch) for
        the candidate item ids (B, K). parts: any of "dot" (latent dot product + popularity
        bias), "cross" (= "category" + "repeat"), "category", "repeat"; summed."""
        parts = tuple(parts)
        unknown = [p for p in parts if p not in TRUTH_PARTS]
        if unknown or not parts or len(set(parts)) != len(parts):
            raise ValueError(
                f"GroundTruth.affinity parts must be distinct names from {list(TRUTH_PARTS)}, "
                f"got {list(parts)}"
            )
        if "cross" in parts and ("category" in parts or "repeat" in parts):
            raise ValueError("GroundTruth.affinity parts: 'cross' already includes 'category' "
                             "and 'repeat'; give one or the other")
        cfg = self.config
        dev = candidates.device
        user_lat, item_lat, item_bias, item_cat = self._on(dev)
        cand = candidates.long()
        if cand.dim() != 2 or cand.shape[0] != len(batch):
            raise ValueError(f"candidates must be (B={len(batch)}, K), got {tuple(cand.shape)}")
        if cand.numel() and (int(cand.min()) < 0 or int(cand.max()) >= cfg.n_items):
            raise ValueError(f"candidate ids must be in [0, {cfg.n_items}), got "
                             f"[{int(cand.min())}, {int(cand.max())}]")
        out = torch.zeros(cand.shape, dtype=torch.float32, device=dev)
        if "dot" in parts:
            users = batch.user.to(dev).long()
            out += torch.bmm(item_lat[cand], user_lat[users].unsqueeze(-1)).squeeze(-1)
            out += item_bias[cand]
        want_cat = "cross" in parts or "category" in parts
        want_rep = "cross" in parts or "repeat" in parts
        if want_cat or want_rep:
            hist = batch.hist_items.to(dev).long()  # (B, N)
            hist_len = batch.hist_len.to(dev).long()  # (B,)
            n = hist.shape[1]
            ar = torch.arange(n, device=dev)
            valid = ar[None, :] < hist_len[:, None]  # (B, N)
            age = hist_len[:, None] - 1 - ar[None, :]  # 0 = most recent
            hist = torch.where(valid, hist, torch.zeros_like(hist))
        if want_cat and cfg.cross_strength != 0.0:
            counted = valid & (batch.hist_actions.to(dev) != 1)  # code 1 = negative action
            hist_cat = item_cat[hist]  # (B, N)
            cand_cat = item_cat[cand]  # (B, K)
            n = []
            for window in (cfg.history_window, cfg.recent_window):
                w = (counted & (age < window)).float()
                counts = torch.zeros(len(batch), cfg.n_categories, device=dev)
                n.append(counts.scatter_add_(1, hist_cat, w).gather(1, cand_cat))  # (B, K)
            out += category_term(n[0], n[1], cfg)
        if want_rep and cfg.repeat_strength != 0.0:
            recent = valid & (age < cfg.repeat_window)
            hit = ((cand[:, :, None] == hist[:, None, :]) & recent[:, None, :]).any(-1)
            out += cfg.repeat_strength * hit.float()
        return out

