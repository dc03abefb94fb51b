"""The `sasrec` stage: it learns sequential structure, it is causal, its losses are the
textbook ones, it trains on training events only, and a seed fixes it."""

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from cascade.config import RunConfig
from cascade.session import prepare
from cascade.stages.sasrec import (
    SASRec,
    SASRecConfig,
    SASRecModel,
    full_softmax_loss,
    sampled_softmax_loss,
    training_windows,
)
from cascade.stages.training import TrainConfig
from cascade.util.ranking import hit_rate, ranks_from_scores

sys.path.insert(0, str(Path(__file__).parent))
from funnel_toys import planted_dataset  # noqa: E402

FAST = SASRecConfig(dim=32, n_heads=2, dropout=0.1, dropout_search=(),
                    train=TrainConfig(epochs=15, batch_size=32, lr=5e-3, patience=3))


@pytest.fixture(scope="module")
def prepared():
    torch.set_num_threads(1)
    prep = prepare(RunConfig(device="cpu", max_len=20), dataset=planted_dataset(), progress=False)
    return prep._replace(ctx=dataclasses.replace(prep.ctx, cache_dir=None, progress=False))


@pytest.fixture(scope="module")
def fitted(prepared):
    return SASRec(FAST).fit(prepared.ctx)


def _hr10(score_all, prepared) -> float:
    batch = prepared.test.batch(slice(0, len(prepared.test)))
    scores = score_all(batch)
    r, c = batch.hist_mask.nonzero(as_tuple=True)
    scores[r, batch.hist_items[r, c]] = float("-inf")
    tg = prepared.test.targets[:, :1]
    return float(hit_rate(ranks_from_scores(scores.numpy(), tg), tg >= 0, 10).mean())


def test_sasrec_learns_sequential_structure(fitted, prepared):
    pop = torch.as_tensor(prepared.dataset.item_popularity(prepared.split.train), dtype=torch.float32)
    popular = _hr10(lambda b: pop[None, :].expand(len(b), -1).clone(), prepared)
    learned = _hr10(fitted.score_all, prepared)
    assert learned > popular + 0.3, (learned, popular)
    assert fitted.fit_report_["best_valid"] > 0.2


def test_score_agrees_with_score_all_and_retrieve(fitted, prepared):
    batch = prepared.test.batch(slice(0, 16))
    every = fitted.score_all(batch)
    cand = torch.randint(0, prepared.dataset.n_items, (16, 30))
    torch.testing.assert_close(fitted.score(batch, cand), torch.gather(every, 1, cand))
    assert prepared.ctx.exclude_seen is False  # the planted log repeats items
    got = fitted.retrieve(batch, 20)
    assert got.ids.shape == (16, 20)
    for row in range(16):  # the 20 best items, seen ones included
        assert set(got.ids[row].tolist()) == set(every[row].argsort(descending=True)[:20].tolist())
    hiding = SASRec(dataclasses.replace(FAST, train=TrainConfig(epochs=1))).fit(
        dataclasses.replace(prepared.ctx, exclude_seen=True))
    got, every = hiding.retrieve(batch, 20), hiding.score_all(batch)
    for row in range(16):  # the 20 best unseen items
        seen = set(batch.hist_items[row, : int(batch.hist_len[row])].tolist())
        ids = set(got.ids[row].tolist())
        assert not seen & ids
        expected = [i for i in every[row].argsort(descending=True).tolist() if i not in seen][:20]
        assert ids == set(expected)


def test_causal_a_position_never_sees_later_events():
    torch.manual_seed(0)
    model = SASRecModel(50, 10, SASRecConfig(dim=16, n_heads=2, dropout=0.0)).eval()
    seq = torch.randint(1, 51, (3, 10))
    lengths = torch.full((3,), 10)
    changed = seq.clone()
    changed[:, 6:] = torch.randint(1, 51, (3, 4))
    a, b = model.encode(seq, lengths), model.encode(changed, lengths)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_full_softmax_loss_is_the_hand_computed_cross_entropy():
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    items = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    targets = torch.tensor([0, 1])
    logits = h @ items.T  # [[1, 0, -1], [2, 2, 0]]
    expected = (-(1 - math.log(math.e + 1 + math.exp(-1)))
                - (2 - math.log(2 * math.exp(2) + 1))) / 2
    assert full_softmax_loss(h, targets, items).item() == pytest.approx(expected, rel=1e-6)
    assert full_softmax_loss(h, targets, items).item() == pytest.approx(
        F.cross_entropy(logits, targets).item())


def test_sampled_softmax_loss_applies_log_q_and_removes_accidental_hits():
    h = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, 0.0]])
    targets = torch.tensor([0])
    negatives = torch.tensor([0, 1, 2])  # item 0 is the target: an accidental hit, removed
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    pos = 1.0 - math.log(0.5)
    negs = [0.5 - math.log(0.25), 0.0 - math.log(0.25)]
    expected = -(pos - math.log(math.exp(pos) + sum(math.exp(x) for x in negs)))
    got = sampled_softmax_loss(h, targets, items, negatives, log_q).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_training_uses_training_events_only(prepared):
    """Every (input, next) pair of the windows is two consecutive training events of one user:
    no validation or test event is ever an input or a target."""
    train = prepared.split.train
    wins = training_windows(train, 7)
    pairs = set()
    for x, y, n in zip(wins.inputs, wins.targets, wins.lengths):
        assert (x[n:] == 0).all() and (y[n:] == -1).all()
        pairs |= {(int(a) - 1, int(b)) for a, b in zip(x[:n], y[:n])}
    ev = train.sort(["user", "pos"])
    users, items = ev["user"].to_numpy(), ev["item"].to_numpy()
    same = users[1:] == users[:-1]
    expected = set(zip(items[:-1][same].tolist(), items[1:][same].tolist()))
    assert pairs == expected
    assert sum(int(n) for n in wins.lengths) == int(same.sum())  # every pair exactly once
    held_out = pl.concat([prepared.split.valid, prepared.split.test])
    assert train.join(held_out, on=["user", "pos"], how="inner").height == 0


def test_dropout_search_keeps_the_best_validating_rate_with_its_weights(prepared):
    """Each rate trains from the same initial weights; the best-validating one is kept, its
    weights and its rate (attention dropout included), so the fit equals a fit at that rate."""
    cfg = dataclasses.replace(FAST, dropout=0.7, dropout_search=(0.0,),
                              train=dataclasses.replace(FAST.train, epochs=3))
    searched = SASRec(cfg).fit(prepared.ctx)
    report = searched.fit_report_
    tried = {t["dropout"]: t["best_valid"] for t in report["search"]}
    assert list(tried) == [0.7, 0.0] and report["dropout"] == max(tried, key=tried.get)
    # the searched rate wins: its run depended on reaching every dropout, attention's included
    assert report["dropout"] == 0.0 and tried[0.0] != tried[0.7]
    assert SASRecConfig(dropout=0.5).dropout_search == ()  # the default search adds nothing then
    model = searched.fitted_model()
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {report["dropout"]}
    alone = SASRec(dataclasses.replace(cfg, dropout=report["dropout"], dropout_search=())).fit(prepared.ctx)
    assert "search" not in alone.fit_report_
    for name, w in model.state_dict().items():
        assert torch.equal(w, alone.fitted_model().state_dict()[name]), name


def test_a_seed_fixes_the_trained_model(prepared, fitted):
    again = SASRec(FAST).fit(prepared.ctx)
    batch = prepared.test.batch(slice(0, 8))
    torch.testing.assert_close(again.score_all(batch), fitted.score_all(batch))
    assert again.fit_report_["best_epoch"] == fitted.fit_report_["best_epoch"]
