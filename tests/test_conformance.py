"""`cascade.stages.check_stage`: every built-in stage passes it, and plugins that break the stage
contract fail it with the method or property that broke it named."""

from __future__ import annotations

import time

import pytest
import torch

from cascade.stages import check_stage
from cascade.stages.base import Candidates, resolve_stage_class
from cascade.stages.conformance import ConformanceError

from funnel_toys import CoocRetriever, MFRanker, NaNRanker, NoScore, PopRanker, WrongShapeRanker

BRIEF = {"train": {"epochs": 1, "max_steps_per_epoch": 3}}
SMALL = {
    "twotower": {"dim": 16, **BRIEF},
    "lsr": {"dim": 16, "hidden": 32, "valid_requests": 50, "pretrain": BRIEF["train"], **BRIEF},
    "gesr": {"dim": 16, "hidden": 16, "moa_dim": 8, "logit_hidden": 8, "hma_dim": 4,
             "valid_requests": 50, "pretrain": BRIEF["train"], **BRIEF},
}


@pytest.mark.parametrize("kind,name", [
    ("retrieval", "twotower"),
    ("retrieval", "popular"),
    ("esr", "twotower"),
    ("esr", "gesr"),
    ("esr", "popular"),
    ("esr", "oracle"),
    ("lsr", "lsr"),
    ("lsr", "popular"),
    ("lsr", "oracle-dot"),
])
def test_builtin_stages_conform(kind, name):
    cls = resolve_stage_class(kind, name)
    check_stage(cls, kind, config=SMALL.get(name))


@pytest.mark.parametrize("cls,kind,config", [
    (MFRanker, "esr", {"train": {"epochs": 1}}),
    (CoocRetriever, "retrieval", None),
    (PopRanker, "lsr", None),
])
def test_the_example_plugins_conform(cls, kind, config):
    check_stage(cls, kind, config=config)


def test_an_instance_is_checked_by_fitting_it_twice():
    stage = resolve_stage_class("esr", "popular")()
    check_stage(stage, "esr")
    assert stage.fit_report_["n_train_events"] > 0  # it was fitted
    with pytest.raises(ValueError, match="config= applies to a stage class"):
        check_stage(stage, "esr", config={"x": 1})


# -- plugins that break the contract ------------------------------------------------------------


class Unseeded(PopRanker):
    name = "unseeded"

    def fit(self, ctx):
        gen = torch.Generator().manual_seed(time.perf_counter_ns())
        self.pop = torch.rand(ctx.dataset.n_items, generator=gen)
        return self


class Softmax(PopRanker):
    """Normalises over the candidates of a request, so each score depends on the others."""

    name = "softmax"
    candidate_independent = True

    def score(self, batch, candidates):
        return torch.softmax(self.pop[candidates], dim=1)


class Honest(Softmax):
    candidate_independent = False  # the same scores, no claim: conforms


class BatchNormalised(PopRanker):
    name = "batchnorm"

    def score(self, batch, candidates):
        s = self.pop[candidates]
        return s - s.mean()  # over the whole batch: depends on the other requests


class NotSelf(PopRanker):
    name = "notself"

    def fit(self, ctx):
        super().fit(ctx)
        return None


class EagerBeforeFit(PopRanker):
    name = "eager"

    def score(self, batch, candidates):
        return torch.zeros(candidates.shape) if not hasattr(self, "pop") else self.pop[candidates]


class Noisy(PopRanker):
    name = "noisy"

    def score(self, batch, candidates):
        return self.pop[candidates] + 0.1 * torch.rand(candidates.shape)  # dropout-like


class KeepsSeen(CoocRetriever):
    def fit(self, ctx):
        super().fit(ctx)
        self.exclude_seen_ = False  # ignores the run's exclude_seen
        return self


class Repeats(CoocRetriever):
    def retrieve(self, batch, k):
        out = super().retrieve(batch, k)
        ids = out.ids.clone()
        ids[:, -1] = ids[:, 0]
        return Candidates(ids=ids, scores=out.scores)


class Int32Ids(CoocRetriever):
    def retrieve(self, batch, k):
        out = super().retrieve(batch, k)
        return Candidates(ids=out.ids.int(), scores=out.scores)


class NoName(PopRanker):
    name = ""


@pytest.mark.parametrize("cls,kind,check,message", [
    (NoScore, "esr", "score", "must define score()"),
    (WrongShapeRanker, "lsr", "score", r"shape \(16, 12\), expected \(16, 13\)"),
    (NaNRanker, "esr", "score", "1 NaN/inf scores"),
    (Unseeded, "esr", "determinism", "two fits with the same seed gave different scores"),
    (Softmax, "esr", "candidate_independent", "changed when the other candidates were"),
    (BatchNormalised, "esr", "score", "changed with the other requests in its batch"),
    (NotSelf, "esr", "fit", "must return self, got NoneType"),
    (EagerBeforeFit, "esr", "score", "returned a result before fit"),
    (Noisy, "lsr", "score", "two calls with the same input gave different scores"),
    (KeepsSeen, "retrieval", "retrieve", "from its own history although FitContext.exclude_seen"),
    (Repeats, "retrieval", "retrieve", "got an id twice"),
    (Int32Ids, "retrieval", "retrieve", "ids must be int64, got torch.int32"),
    (NoName, "esr", "name", "non-empty string"),
    (PopRanker, "retrieval", "retrieve", "must define retrieve()"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_broken_plugins_fail_naming_what_broke(cls, kind, check, message):
    with pytest.raises(ConformanceError, match=message) as err:
        check_stage(cls, kind)
    assert err.value.check == check
    assert str(err.value).startswith(f"{check}: ")
    assert isinstance(err.value, AssertionError)


def test_the_same_scores_without_the_claim_conform():
    check_stage(Honest, "esr")  # Softmax fails only for claiming candidate_independent


def test_a_stage_failing_inside_fit_is_named():
    class Crashes(PopRanker):
        def fit(self, ctx):
            raise KeyError("no such column")

    with pytest.raises(ConformanceError, match=r"^fit: raised KeyError: 'no such column'"):
        check_stage(Crashes, "esr")
