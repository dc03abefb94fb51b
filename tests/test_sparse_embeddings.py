"""Sparse gradients for id embedding tables (`TrainConfig.sparse_embeddings`): SparseAdam on the
item/user id tables must follow dense Adam exactly while every row gets a gradient, leave rows
without one untouched, and serve as before (the tables are dense again after training)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cascade.config import RunConfig
from cascade.session import prepare
from cascade.stages.features import id_embedding_tables
from cascade.stages.training import Optimizer, TrainConfig, fit_model


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    cfg = RunConfig(data="synthetic:tiny", max_len=20, device="cpu",
                    cache_dir=str(tmp_path_factory.mktemp("cache")))
    return prepare(cfg, progress=False).ctx


class Tiny(nn.Module):
    """An item id table (one row per item: found by `id_embedding_tables`), a small feature
    table that stays dense, and a linear head."""

    def __init__(self, n_items: int, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.items = nn.Embedding(n_items, dim)
        self.genre = nn.Embedding(7, dim)
        self.head = nn.Linear(dim, dim)

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        vec = self.head(self.items(ids) + self.genre(ids % 7))  # (n, dim)
        logits = vec @ vec.mean(0)  # (n,)
        # summed, not averaged: gradients well above Adam's eps (SparseAdam adds eps before the
        # bias correction, Adam after it, so they differ by ~eps / sqrt(1 - 0.999^t) / |grad|)
        return 100 * F.cross_entropy(logits[None, :].expand(len(targets), -1), targets)


def _model(sparse: bool, n_items: int) -> tuple[Tiny, Optimizer]:
    model = Tiny(n_items)
    tables = id_embedding_tables(model, n_items, 10_000) if sparse else []
    for t in tables:
        t.sparse = True
    return model, Optimizer(model, TrainConfig(lr=1e-2, sparse_embeddings=sparse), tables)


def _backward(model: Tiny, opt: Optimizer, ids: torch.Tensor) -> None:
    opt.zero_grad()
    model.loss(ids, torch.tensor([0, 3, 5]) % len(ids)).backward()


def _steps(sparse: bool, n_items: int, batches: list[torch.Tensor], clip: float) -> Tiny:
    model, opt = _model(sparse, n_items)
    for ids in batches:
        _backward(model, opt, ids)
        opt.clip(clip)
        opt.step()
    return model


def test_id_tables_are_found_and_small_tables_are_not():
    model = Tiny(50)
    assert id_embedding_tables(model, 50, 9) == [model.items]  # the genre table is not
    assert id_embedding_tables(model, 49, 9) == [model.items]  # a padding row at most
    assert id_embedding_tables(model, 48, 9) == []
    assert id_embedding_tables(model, 48, 50) == [model.items]  # a user table


@pytest.mark.parametrize("clip", [1e6, 5.0, 0.05])  # off, binding, binding hard
def test_sparse_gradients_clip_like_dense_ones(clip):
    ids = torch.tensor([3, 1, 3, 7, 0, 3])  # repeated ids: the sparse gradient must coalesce
    (dm, dopt), (sm, sopt) = _model(False, 12), _model(True, 12)
    _backward(dm, dopt, ids)
    _backward(sm, sopt, ids)
    assert sm.items.weight.grad.is_sparse and not dm.items.weight.grad.is_sparse
    before = dm.items.weight.grad.norm()
    dopt.clip(clip)
    sopt.clip(clip)
    assert (dm.items.weight.grad.norm() < before) == (clip < 1e6)
    torch.testing.assert_close(sm.items.weight.grad.to_dense(), dm.items.weight.grad)
    for name, p in dm.named_parameters():
        torch.testing.assert_close(dict(sm.named_parameters())[name].grad.to_dense(), p.grad)


@pytest.mark.parametrize("steps", [1, 3])
def test_sparse_adam_matches_dense_adam_when_every_row_has_a_gradient(steps):
    n = 40
    everyone = [torch.arange(n), torch.arange(n).flip(0), torch.arange(n)][:steps]
    dense, sparse = _steps(False, n, everyone, 5.0), _steps(True, n, everyone, 5.0)
    moved = (dense.items.weight - Tiny(n).items.weight).abs()
    assert (moved.amax(1) > 5e-3).all()  # every row moved (Adam's first step is ~lr = 1e-2)
    for name, p in dense.named_parameters():
        torch.testing.assert_close(dict(sparse.named_parameters())[name], p, rtol=1e-4,
                                   atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_sparse_adam_leaves_rows_without_a_gradient_alone():
    n = 40
    first, second = torch.arange(0, 20), torch.arange(20, 40)
    after_one = _steps(True, n, [first], 100.0).items.weight.detach()
    sparse = _steps(True, n, [first, second], 100.0).items.weight.detach()
    dense = _steps(False, n, [first, second], 100.0).items.weight.detach()
    assert torch.equal(sparse[:20], after_one[:20])  # step 2 did not touch rows 0..19
    assert not torch.allclose(dense[:20], after_one[:20])  # dense Adam's momentum moved them


def test_fit_model_trains_with_sparse_tables_and_serves_dense(ctx):
    """The whole loop (validation, early stopping, best-state restore) with sparse id tables:
    the loss falls, and the tables are dense again for serving."""
    n = ctx.dataset.n_items
    model = Tiny(n)

    def loss_fn(batch, gen):
        ids = torch.cat([batch.hist_items[:, :5].flatten(), batch.targets[:, 0]]).unique()
        pos = torch.searchsorted(ids, batch.targets[:, 0])
        return model.loss(ids, pos)

    history = []

    def valid_fn():
        with torch.no_grad():
            history.append(float(model.loss(torch.arange(n), torch.arange(8))))
        return -history[-1]

    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-2, max_steps_per_epoch=15, patience=2,
                      sparse_embeddings=True)
    report = fit_model(model, loss_fn, valid_fn, ctx, cfg, desc="tiny")
    assert report["epochs_run"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.items.sparse is False and model.genre.sparse is False
    assert history[-1] < history[0] or report["best_epoch"] == 0
    assert report["sparse_embeddings"] is True
    assert 0 < report["optimizer_s"] < report["train_step_s"] <= report["seconds"]


def test_training_prints_plain_progress_lines_when_stdout_is_not_a_terminal(ctx, capsys,
                                                                          monkeypatch):
    import dataclasses

    monkeypatch.setenv("CASCADE_PROGRESS_SECONDS", "0")
    model = Tiny(ctx.dataset.n_items)

    def loss_fn(batch, gen):
        ids = torch.cat([batch.hist_items[:, :5].flatten(), batch.targets[:, 0]]).unique()
        return model.loss(ids, torch.searchsorted(ids, batch.targets[:, 0]))

    cfg = TrainConfig(epochs=2, batch_size=64, max_steps_per_epoch=3, patience=5)
    fit_model(model, loss_fn, lambda: 0.5, dataclasses.replace(ctx, progress=True), cfg,
              desc="tiny")
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("training tiny:")]
    assert lines[0].startswith("training tiny: 1/6 steps") and "ETA" in lines[0]
    assert lines[-1].startswith("training tiny: 6/6 steps (100%)") and "epoch 1: loss" in lines[-1]
    fit_model(model, loss_fn, lambda: 0.5, ctx, cfg, desc="tiny")  # ctx.progress is False
    assert "training tiny" not in capsys.readouterr().out


def test_sparse_gradients_are_on_by_default_from_100k_items():
    from cascade.stages.training import uses_sparse_embeddings

    assert not uses_sparse_embeddings(TrainConfig(), 99_999)
    assert uses_sparse_embeddings(TrainConfig(), 100_000)
    assert uses_sparse_embeddings(TrainConfig(sparse_embeddings=True), 10)
    assert not uses_sparse_embeddings(TrainConfig(sparse_embeddings=False), 10**6)


@pytest.mark.parametrize("improves", [False, True])
def test_validate_first_keeps_the_starting_weights_unless_an_epoch_beats_them(ctx, improves):
    """`fit_model(validate_first=True)` (the LSR's joint phase after its pretraining): the
    starting weights are epoch -1; when no epoch validates better they are what it returns."""
    model = Tiny(ctx.dataset.n_items)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def loss_fn(batch, gen):
        ids = torch.cat([batch.hist_items[:, :5].flatten(), batch.targets[:, 0]]).unique()
        return model.loss(ids, torch.searchsorted(ids, batch.targets[:, 0]))

    scores = iter([0.5, 0.6, 0.4] if improves else [0.5, 0.4, 0.3])
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-2, max_steps_per_epoch=3, patience=5)
    report = fit_model(model, loss_fn, lambda: next(scores), ctx, cfg, desc="tiny",
                       validate_first=True)
    assert [h["epoch"] for h in report["history"]] == [-1, 0, 1]
    kept = all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert report["best_epoch"] == (0 if improves else -1)
    assert kept is (not improves)
