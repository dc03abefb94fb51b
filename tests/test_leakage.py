"""No learned stage trains on a validation or test event.

For every built-in learned stage: train it briefly on a log, then on the same log with held-out
events (each user's test event, or each user's validation event, under leave-one-out) changed to
another item and rating. Training may read only training events, so the trained weights must be
bit-identical; a stage whose training read a held-out event (as an input, a target, a negative
sampler's count or an item statistic) gets other weights. Early stopping reads the validation
requests, as it should, so with validation events changed each phase runs one epoch and keeps
it (the LSR's joint phase would otherwise compare it with its starting weights, epoch -1).
"""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest
import torch

from cascade.config import StageSpec, build_stage
from cascade.data.splits import make_split
from stage_data import fit_context, tiny_dataset

BRIEF = {"epochs": 1, "max_steps_per_epoch": 4, "patience": 1}
STAGES = {
    "retrieval twotower": ("retrieval", "twotower", {"train": BRIEF}),
    "ESR twotower": ("esr", "twotower", {"train": BRIEF}),
    "ESR gesr": ("esr", "gesr", {"train": BRIEF, "pretrain": BRIEF}),
    "LSR lsr": ("lsr", "lsr", {"train": BRIEF, "pretrain": BRIEF}),
    "sasrec": ("lsr", "sasrec", {"train": {"epochs": 1, "patience": 1}}),
}


def _changed(ds, split, which: str):
    held = (split.test if which == "test" else split.valid).select("user", "pos").with_columns(
        pl.lit(True).alias("held"))
    ev = ds.events.join(held, on=["user", "pos"], how="left")
    changed = ev.with_columns(
        pl.when(pl.col("held")).then((pl.col("item") + 7) % ds.n_items).otherwise(pl.col("item"))
        .cast(ds.events["item"].dtype).alias("item"),
        pl.when(pl.col("held")).then(6.0 - pl.col("rating")).otherwise(pl.col("rating"))
        .cast(ds.events["rating"].dtype).alias("rating"),
    ).drop("held").select(ds.events.columns)
    assert (changed["item"] != ds.events["item"]).sum() == held.height  # really changed
    return dataclasses.replace(ds, events=changed, name=f"{ds.name}-{which}-changed")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: bit-identical weights need it


@pytest.fixture(scope="module")
def logs():
    ds = tiny_dataset(n_users=80, n_items=60, length=(6, 12), seed=5)
    split = make_split(ds)
    return ds, {which: _changed(ds, split, which) for which in ("test", "valid")}


def _weights(ds, kind: str, stage: str, config: dict) -> dict[str, torch.Tensor]:
    s = build_stage(kind, StageSpec(stage=stage, config=config))
    s.fit(fit_context(ds, max_len=10))
    return {k: v.detach().clone() for k, v in s.model_.state_dict().items()}


@pytest.mark.parametrize("which", ["test", "valid"])
@pytest.mark.parametrize("name", sorted(STAGES))
def test_training_reads_no_held_out_event(logs, name, which, monkeypatch):
    kind, stage, config = STAGES[name]
    ds, changed = logs
    if which == "valid":  # one epoch per phase, kept: see the module docstring
        import cascade.stages.lsr as lsr

        fit = lsr.fit_model
        monkeypatch.setattr(lsr, "fit_model", lambda *a, **kw: fit(*a, **{**kw, "validate_first": False}))
    a = _weights(ds, kind, stage, config)
    b = _weights(changed[which], kind, stage, config)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{name}: changing {which} events changed the trained weights {differ[:5]}"


def test_the_check_sees_a_stage_that_trains_on_held_out_events(logs):
    """The same comparison fails for training that reads the held-out events (here: the LSR
    trained on the test requests), so the test above can fail."""
    from cascade.data.traffic import Traffic

    ds, changed = logs
    got = []
    for d in (ds, changed["test"]):
        s = build_stage("lsr", StageSpec(stage="lsr", config={"train": BRIEF}))
        ctx = fit_context(d, max_len=10)
        ctx = dataclasses.replace(ctx, train=Traffic(d, ctx.split.test, max_len=10))
        s.fit(ctx)
        got.append(s.model_.state_dict())
    assert any(not torch.equal(got[0][k], got[1][k]) for k in got[0])
