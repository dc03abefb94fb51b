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


# ---- the serving path vs the per-candidate reference ------------------------------------------

from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cascade.data.splits import make_split, training_requests  # noqa: E402
from cascade.data.traffic import Traffic  # noqa: E402
from cascade.stages.gesr import GESRConfig, GESRStage, MoAConfig  # noqa: E402
from cascade.stages.gesr.cross import NROCrossAttention, ROCrossAttention, softmax_last  # noqa: E402
from test_gesr import multi_dataset, perturbed  # noqa: E402

SERVING = {  # (MoA config, GESR config overrides)
    "full": (MoAConfig(history_len=10), {}),
    "two-layers": (MoAConfig(), {"n_layers": 2}),
    "softmax": (MoAConfig(), {"attn_kind": "softmax"}),
    "ungated": (MoAConfig(mlpg=False), {"cross_heads": 1}),
    "nro-features": (MoAConfig.two_tower(cross_attn=("nro",), mlpg=True), {"nro_queries": "features"}),
    "one-token": (MoAConfig(token_features=False), {}),  # RO over one token: item-only T_ro
}


@pytest.fixture(scope="module")
def multi():
    return multi_dataset(seed=1)


@pytest.fixture(scope="module")
def ragged(multi):
    """Requests with an empty history, a full one and lengths between; padding that holds
    real-looking items."""
    tr = Traffic(multi, training_requests(make_split(multi)), max_len=12)
    rows = np.concatenate([np.flatnonzero(tr.pos >= 1)[::23][:8], np.flatnonzero(tr.pos >= 15)[:2]])
    batch = tr.batch(rows)
    hist_len = batch.hist_len.clone()
    hist_len[0] = 0  # its events become padding
    batch = replace(batch, hist_len=hist_len)
    pad = ~batch.hist_mask
    g = torch.Generator().manual_seed(5)
    fake = torch.randint(1, multi.n_items, (int(pad.sum()),), generator=g)
    assert int(batch.hist_len.min()) == 0 and int(batch.hist_len.max()) == 12
    return replace(batch, hist_items=batch.hist_items.masked_scatter(pad, fake),
                   hist_actions=batch.hist_actions.masked_scatter(pad, torch.full_like(fake, 3)))


@pytest.mark.parametrize("name", list(SERVING))
def test_serving_path_equals_naive_on_ragged_histories(multi, ragged, name):
    moa, extra = SERVING[name]
    model = perturbed(multi, moa, seed=3, **extra)
    g = torch.Generator().manual_seed(4)
    cand = torch.randint(0, multi.n_items, (len(ragged), 17), generator=g)
    cand[:, 0] = ragged.hist_items[:, 0]  # a seen item (or, without a history, a padding id)
    cand[:, 1] = cand[:, 2]  # a repeated candidate
    with torch.no_grad():
        naive = model.score_naive(ragged, cand)
        uncached = model.score(ragged, cand)
        model.cache_items()
        cached = model.score(ragged, cand)
    assert naive.abs().max() > 0.1
    torch.testing.assert_close(uncached, naive, **tol(torch.float32))
    torch.testing.assert_close(cached, naive, **tol(torch.float32))


def test_stage_groups_requests_by_history_length(multi, ragged):
    """GESRStage.score sorts the requests by history length, scores them in groups cut to
    the group's longest history, and puts the scores back in request order."""
    model = perturbed(multi, MoAConfig(history_len=12), seed=6)
    model.cache_items()
    stage = GESRStage(GESRConfig(score_chunk_pairs=2 * 17))  # groups of two requests
    stage.model_ = model
    cand = torch.randint(0, multi.n_items, (len(ragged), 17), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model.score(ragged, cand)
    torch.testing.assert_close(stage.score(ragged, cand), want, **tol(torch.float32))


def test_nro_block_diagonal_attention_equals_sdpa():
    """NRO's block-diagonal logits, pooled weights and values folded through the output
    projection vs plain per-head softmax attention, then pooling, then out."""
    torch.manual_seed(0)
    nro = NROCrossAttention(8, heads=2)
    b, n, f, s_h, r = 3, 5, 2, 6, 2
    hist, user = torch.randn(b, s_h, 8), torch.randn(b, r, 8)
    mask = torch.arange(s_h)[None, :] < torch.tensor([0, 3, 6])[:, None]
    cand_q = nro.item_queries(torch.randn(b, n, f, 8))
    with torch.no_grad():
        got = nro(nro.context(hist, mask, user), cand_q)
        kv = nro.kv(torch.cat([hist, user], 1)).unflatten(-1, (2, 2, 4))  # (B, S, H, k|v, 4)
        k, v = kv[..., 0, :], kv[..., 1, :]  # (B, S, H, 4)
        keep = torch.cat([mask, torch.ones(b, r, dtype=torch.bool)], 1)
        q = cand_q.reshape(b, n * f, 2, 4).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep[:, None, None])
        want = nro.norm(nro.out(att.transpose(1, 2).reshape(b, n, f, 8).mean(2)))
    torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.parametrize("width", [1, 2, 13, 15, 16, 40])
def test_softmax_last_equals_torch_softmax(width):
    """The short-row softmax (max, exp, sum, divide) vs `torch.softmax`, with masked (-inf)
    entries, values and gradients, in place (no grad) and not."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(7, 3, width, generator=g) * 4
    x[:, :, 1:][torch.rand(7, 3, width - 1, generator=g) < 0.3] = float("-inf")  # entry 0 stays finite
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = softmax_last(a), torch.softmax(b, dim=-1)
    torch.testing.assert_close(got, want, **tol(torch.float32))
    w = torch.randn(7, 3, width, generator=g)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **tol(torch.float32, grad=True))
    with torch.no_grad():
        kept = x.clone()
        torch.testing.assert_close(softmax_last(x), want.detach(), **tol(torch.float32))
    assert torch.equal(x, kept)  # the input is never overwritten


@pytest.mark.parametrize("f", [1, 2, 3])
def test_ro_serving_form_equals_reference(f):
    """RO cross attention from the cached item fields (one token: T_ro itself; two: the
    sigmoid of the key difference; more: block-diagonal queries) vs the per-head reference,
    with and without autograd (training runs the serving form)."""
    torch.manual_seed(f)
    ro = ROCrossAttention(8, heads=2)
    b, n, r = 3, 5, 3
    user = torch.randn(b, r, 8) * 2
    kv = ro.item_kv(torch.randn(b * n, f, 8) * 2)  # (m, F, 2D)
    want = ro(ro.queries(user), kv.view(b, n, f, -1))
    fields = {k: v.view(b, n, -1) for k, v in ro.item_fields(kv).items()}
    got = ro.score_items(ro.context(user), fields)
    assert want.std() > 0.5
    torch.testing.assert_close(got, want, **tol(torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(ro.score_items(ro.context(user), fields), want, **tol(torch.float32))
