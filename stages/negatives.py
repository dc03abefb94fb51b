"""Negatives for the learned stages' training, shared by retrieval, the two-tower ESR, GESR and
the LSR: `NegativeSampler` (uniform + popularity negatives with the sampled-softmax logQ
correction), `shared_negative_softmax` (in-batch + uniform negatives with the logQ
correction) and `softmax_kind` (full or sampled, by catalogue size)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class NegativeSampler:
    """Mixed negative sampling: a share `pop_frac` of the negatives is drawn in proportion to
    item popularity ** `power` (hard negatives: items the user plausibly saw but did not pick),
    the rest uniformly. `log_q` is the log of the expected number of times an item is drawn, the
    correction sampled softmax subtracts from each sampled logit (Bengio & Senecal 2008)."""

    def __init__(
        self, counts: np.ndarray, *, pop_frac: float = 0.0, power: float = 0.75,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0.0 <= pop_frac <= 1.0:
            raise ValueError(f"pop_frac must be in [0, 1], got {pop_frac}")
        self.n_items = int(len(counts))
        self.pop_frac = pop_frac
        w = np.asarray(counts, dtype=np.float64) ** power
        if w.sum() <= 0:  # no popularity information: fall back to uniform
            w = np.ones(self.n_items)
        self.probs = torch.as_tensor(w / w.sum(), dtype=torch.float32)  # on CPU for multinomial
        self.device = torch.device(device)
        self._probs_dev = self.probs.to(self.device)

    def split(self, n_neg: int) -> tuple[int, int]:
        n_pop = int(round(n_neg * self.pop_frac))
        return n_pop, n_neg - n_pop

    def sample(self, n_rows: int, n_neg: int, gen: torch.Generator) -> Tensor:
        """(n_rows, n_neg) int64 item ids on the device (may hit the positive: mask it)."""
        n_pop, n_uni = self.split(n_neg)
        parts = []
        if n_pop:
            parts.append(
                torch.multinomial(self.probs, n_rows * n_pop, replacement=True, generator=gen)
                .view(n_rows, n_pop)
            )
        if n_uni:
            parts.append(torch.randint(0, self.n_items, (n_rows, n_uni), generator=gen))
        return torch.cat(parts, 1).to(self.device)

    def log_q(self, ids: Tensor, n_neg: int) -> Tensor:
        """log(expected draws of each id among n_neg negatives), same shape as ids."""
        n_pop, n_uni = self.split(n_neg)
        return torch.log(n_pop * self._probs_dev[ids] + n_uni / self.n_items)


def shared_negative_softmax(
    query: Tensor,
    pos: Tensor,
    key: Callable[[Tensor], Tensor],
    freq: Tensor,
    gen: torch.Generator,
    *,
    n_in_batch: int,
    n_uniform: int,
    inv_temp: float,
) -> Tensor:
    """Sampled softmax of each query's positive against one set of negatives shared by all rows:
    `n_in_batch` drawn from the rows' own positives (in-batch negatives, i.e. by training
    frequency) plus `n_uniform` uniform items. Each logit is corrected by log Q(j) = log of the
    expected number of draws of j, S*f_j + M/n_items (Yi et al., RecSys 2019, made exact for the
    mixture). query (P, D) and key(ids) -> (*, D) are compared by inner product * inv_temp;
    freq (n_items,) is the empirical target frequency. A negative equal to a row's positive is
    masked. Returns the mean cross-entropy."""
    n_items = freq.shape[0]
    dev = query.device
    s_in = min(n_in_batch, pos.shape[0])
    inb = pos[torch.randint(0, pos.shape[0], (s_in,), generator=gen).to(dev)]
    uni = torch.randint(0, n_items, (n_uniform,), generator=gen).to(dev)
    cols = torch.cat([inb, uni])  # (S + M,)

    def log_q(ids: Tensor) -> Tensor:
        return torch.log(s_in * freq[ids] + n_uniform / n_items)

    pos_logit = inv_temp * (query * key(pos)).sum(-1) - log_q(pos)  # (P,)
    neg_logit = inv_temp * query @ key(cols).T - log_q(cols)[None, :]  # (P, S + M)
    neg_logit = neg_logit.masked_fill(pos[:, None] == cols[None, :], -math.inf)
    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(pos))


def softmax_kind(n_items: int, full_softmax_items: int, n_sampled: int) -> tuple[bool, str]:
    """Whether a softmax loss scores the whole catalogue (at most `full_softmax_items` items, or
    no more than the `n_sampled` negatives a sampled one would draw), and its name for the fit
    report."""
    full = n_items <= max(full_softmax_items, n_sampled)
    return full, "full softmax" if full else f"sampled softmax ({n_sampled} negatives, logQ)"
