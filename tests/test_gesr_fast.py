"""GESR's serving fast paths against their plain references, on random batches with empty and
full histories, padding that looks like real events, repeated ids and repeated candidates.

- HMA: counts from the per-request lookup tables (`HardMatchingAttention.counts`) and T_match
  from the per-request hidden tables (`forward`) vs `naive_counts` through the unfolded MLP, for
  one category per item, several per item (per-request set tables) and several per item above
  `SET_TABLE_LIMIT` (per-candidate counting).
"""

from __future__ import annotations

import pytest
import torch

from cascade.stages.gesr import hma as hma_module
from cascade.stages.gesr.config import HMA_PAIRS
from cascade.stages.gesr.hma import HardMatchingAttention, naive_counts

from tolerances import tol

N_ITEMS, N_CAT = 40, 7


def random_history(seed: int, b: int = 9, n: int = 11, n_items: int = N_ITEMS) -> dict:
    """Histories with lengths 0, n and in between; padding holds real-looking ids and actions
    (it must be ignored); few distinct ids, so runs of equal ids are common."""
    g = torch.Generator().manual_seed(seed)
    hist_len = torch.randint(0, n + 1, (b,), generator=g)
    hist_len[0], hist_len[1] = 0, n
    return dict(
        hist_items=torch.randint(0, n_items // 3, (b, n), generator=g),
        hist_actions=torch.randint(1, 4, (b, n), generator=g),
        hist_len=hist_len,
    )


def random_candidates(hist: dict, seed: int, n: int = 13, n_items: int = N_ITEMS) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    cand = torch.randint(0, n_items, (hist["hist_items"].shape[0], n), generator=g)
    cand[:, :4] = hist["hist_items"][:, :4]  # seen ids (and, past hist_len, padding ids)
    cand[:, 4] = cand[:, 0]  # a repeated candidate
    return cand


def random_categories(seed: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 200)
    cats = torch.randint(0, N_CAT, (N_ITEMS, width), generator=g)  # code 0: none
    cats[:2] = 0  # items without a category
    return cats


def make_hma(cats: torch.Tensor, pairs=HMA_PAIRS, cap: int = 2, seed: int = 0) -> HardMatchingAttention:
    torch.manual_seed(seed)
    hma = HardMatchingAttention(pairs=pairs, cap=cap, recent=4, item_categories=cats,
                                n_categories=N_CAT, emb_dim=3, hidden=5, out_dim=4)
    with torch.no_grad():
        for p in hma.parameters():
            p.normal_()
    return hma


@pytest.mark.parametrize("width,per_candidate", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hma_tables_equal_direct_comparison(width, per_candidate, seed, monkeypatch):
    if per_candidate:
        monkeypatch.setattr(hma_module, "SET_TABLE_LIMIT", 0)
    hma = make_hma(random_categories(seed, width), seed=seed)
    assert (hma.set_id is None) == per_candidate
    hist = random_history(seed)
    cand = random_candidates(hist, seed)
    state = hma.history(**hist)
    want = naive_counts(hma, **hist, cand=cand)
    assert int(want.max()) > hma.cap and int((want == 0).sum()) > 0  # capped and empty counts occur
    assert torch.equal(hma.counts(state, cand), want)
    with torch.no_grad():
        torch.testing.assert_close(hma(state, cand), hma.embed_counts_unfolded(want), **tol(torch.float32))


@pytest.mark.parametrize("pairs", [("item_pos",), ("category_recent",), ("category", "item")])
def test_hma_tables_with_one_kind_of_pair(pairs):
    hma = make_hma(random_categories(3, 2), pairs=pairs)
    hist = random_history(3)
    cand = random_candidates(hist, 3)
    want = naive_counts(hma, **hist, cand=cand)
    state = hma.history(**hist)
    assert torch.equal(hma.counts(state, cand), want)
    with torch.no_grad():
        torch.testing.assert_close(hma(state, cand), hma.embed_counts_unfolded(want), **tol(torch.float32))
