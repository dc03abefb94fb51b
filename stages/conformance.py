"""The conformance check every stage should pass, in the spirit of scikit-learn's
`check_estimator`: `check_stage(MyRanker, "esr")` fits the stage on a tiny synthetic log it builds
itself (`cascade.data.synthetic`, a few seconds) and checks what the funnel relies on:

- interface: a non-empty `name`, the methods its kind needs (`fit` and `retrieve` or `score`),
  construction with no arguments (or `config=`), `fit` returning self, a JSON-able
  `fit_report_` when there is one, and an error (not a result) when used before `fit`;
- outputs: `retrieve` gives `Candidates` with (B, k) int64 ids inside the catalogue, distinct in
  each row and never from the request's history (the context excludes seen items), and (B, k)
  finite float scores; `score` gives (B, K) finite float scores, for one request or many, that
  do not change between two calls or with the other requests of the batch;
- determinism: two fits with the same seed give the same scores (up to the last bits that
  multi-threaded CPU training may change);
- when the class declares `candidate_independent = True`: a candidate's score does not change
  when other candidates are removed or reordered.

A failure raises `ConformanceError` (an AssertionError) whose message starts with the method or
property that failed (`check` holds it), e.g. "score: returned shape (16, 12), expected (16, 13)".
`config` (a table of overrides of the stage's `config_class` defaults, or a config instance)
keeps the check fast: `check_stage(cls, "esr", config={"train": {"epochs": 1}})`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cascade.data.traffic import RequestBatch
from cascade.stages.base import REQUIRED_METHODS, STAGE_KINDS, Candidates, FitContext

# two fits of the same seed may differ in the last bits (multi-threaded CPU reductions, grown by
# a few optimiser steps); a stage that ignores the seed differs by far more
SEED_TOLERANCE = dict(rtol=1e-3, atol=1e-3)
# the same trained model scoring the same pair in another shape of call: float rounding only
CALL_TOLERANCE = dict(rtol=1e-4, atol=1e-5)
K_RETRIEVE = 10
K_SCORE = 13  # not a power of two


class ConformanceError(AssertionError):
    """A stage failed `check_stage`; `check` names the method or property that failed."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check


def check_stage(
    stage: Any,
    kind: str,
    *,
    config: Mapping[str, Any] | Any = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> None:
    """Check that `stage` (a class, or an instance, which is then fitted twice) works as a
    `kind` stage ("retrieval", "esr" or "lsr"); raise `ConformanceError` at the first failure.
    `config`: overrides of the class's config defaults (a class only)."""
    if kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {kind!r}; expected one of {list(STAGE_KINDS)}")
    if isinstance(stage, type):
        cls = stage
        make = functools.partial(_construct, cls, config)
        first = make()
    else:
        if config is not None:
            raise ValueError("check_stage: config= applies to a stage class, not an instance")
        cls, first = type(stage), stage
        make = lambda: stage  # noqa: E731 - an instance is fitted again
    _check_interface(cls, first, kind)
    ctx, batch = _context(seed, str(torch.device(device)))
    rng = torch.Generator().manual_seed(seed)
    cand = torch.randint(0, ctx.dataset.n_items, (len(batch), K_SCORE), generator=rng)
    ranker = kind != "retrieval"
    if isinstance(stage, type):
        _check_unfitted(first, batch, cand if ranker else None)

    out = _call(first, "fit", ctx)
    if out is not first:
        raise ConformanceError("fit", f"must return self, got {_what(out)}")
    _check_fit_report(first)
    has_score = callable(getattr(first, "score", None))
    scores = _check_score(first, batch, cand) if ranker or has_score else None
    found = _check_retrieve(first, batch, ctx) if not ranker else None
    if getattr(cls, "candidate_independent", False) is True and has_score:
        _check_independence(first, batch, cand, scores)

    second = make()
    if _call(second, "fit", ctx) is not second:
        raise ConformanceError("fit", "must return self")
    if scores is not None:
        again = _call(second, "score", batch, cand)
        _close(again, scores, SEED_TOLERANCE, "determinism",
               "two fits with the same seed gave different scores from score(); draw every "
               "random number from ctx.seed (torch.manual_seed / a torch.Generator)")
    if found is not None:
        again = _call(second, "retrieve", batch, K_RETRIEVE)
        _close(again.scores, found.scores, SEED_TOLERANCE, "determinism",
               "two fits with the same seed gave different retrieve() scores; draw every "
               "random number from ctx.seed")
        same = float((again.ids == found.ids).float().mean())
        if same < 0.9:
            raise ConformanceError(
                "determinism", f"two fits with the same seed retrieved different ids "
                f"({same:.0%} of positions equal)")


# -- the pieces ---------------------------------------------------------------------------------


def _construct(cls: type, config: Any) -> Any:
    if config is None:
        return _call(cls, "__init__")
    cc = getattr(cls, "config_class", None)
    if cc is None:
        raise ValueError(f"check_stage: {cls.__name__} has no config_class, so it takes no config")
    if isinstance(config, Mapping):
        from cascade.util.tables import from_table

        config = from_table(cc, config, f"check_stage({cls.__name__}) config")
    return _call(cls, "__init__", config=config)


def _call(obj: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """`obj.method(*args)` (or `obj(...)` for "__init__" of a class), with an exception named
    by the method that raised it."""
    try:
        if method == "__init__":
            return obj(*args, **kwargs)
        return getattr(obj, method)(*args, **kwargs)
    except ConformanceError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the stage is reported as such
        raise ConformanceError(method, f"raised {type(e).__name__}: {e}") from e


def _what(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _check_interface(cls: type, stage: Any, kind: str) -> None:
    name = getattr(stage, "name", None)
    if not isinstance(name, str) or not name:
        raise ConformanceError("name", f"a stage needs a `name` attribute (a non-empty string), "
                                       f"got {name!r}")
    for method in REQUIRED_METHODS[kind]:
        if not callable(getattr(stage, method, None)):
            raise ConformanceError(method, f"a stage of kind {kind!r} must define {method}()")
    independent = getattr(cls, "candidate_independent", False)
    if not isinstance(independent, bool):
        raise ConformanceError("candidate_independent", f"must be True or False, got {independent!r}")


def _check_unfitted(stage: Any, batch: RequestBatch, cand: Tensor | None) -> None:
    method = "retrieve" if cand is None else "score"
    args = (batch, K_RETRIEVE) if cand is None else (batch, cand)
    try:
        getattr(stage, method)(*args)
    except Exception:  # noqa: BLE001 - any error will do (NotFittedError is the clear one)
        return
    raise ConformanceError(
        method, "returned a result before fit(); a stage used before fit must raise "
                "(cascade.stages.base.NotFittedError via check_fitted)")


def _check_fit_report(stage: Any) -> None:
    if not hasattr(stage, "fit_report_"):
        return
    report = stage.fit_report_
    if not isinstance(report, Mapping):
        raise ConformanceError("fit_report_", f"must be a Mapping after fit(), got {_what(report)}")
    try:
        json.dumps(report)
    except (TypeError, ValueError) as e:
        raise ConformanceError("fit_report_", f"must be JSON-able (it goes to metrics.json): {e}") from None


def _check_tensor(x: Any, shape: tuple[int, ...], method: str, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ConformanceError(method, f"{what} must be a torch.Tensor, got {_what(x)}")
    if tuple(x.shape) != shape:
        raise ConformanceError(method, f"{what} has shape {tuple(x.shape)}, expected {shape}")
    return x


def _check_score(stage: Any, batch: RequestBatch, cand: Tensor) -> Tensor:
    b, k = cand.shape
    s = _check_tensor(_call(stage, "score", batch, cand), (b, k), "score", "the scores")
    if not s.is_floating_point():
        raise ConformanceError("score", f"scores must be floating point, got {s.dtype}")
    if not torch.isfinite(s).all():
        raise ConformanceError("score", f"{int((~torch.isfinite(s)).sum())} NaN/inf scores")
    s = s.detach().float().cpu()
    _close(_call(stage, "score", batch, cand), s, CALL_TOLERANCE, "score",
           "two calls with the same input gave different scores (dropout left on at serving?)")
    one = _check_tensor(_call(stage, "score", batch.select(torch.tensor([0])), cand[:1]),
                        (1, k), "score", "the scores of a one-request batch")
    _close(one, s[:1], CALL_TOLERANCE, "score",
           "a request's scores changed with the other requests in its batch")
    rows = torch.arange(1, min(b, 6))
    part = _call(stage, "score", batch.select(rows), cand[rows])
    _close(part, s[rows], CALL_TOLERANCE, "score",
           "a request's scores changed with the other requests in its batch")
    single = _check_tensor(_call(stage, "score", batch, cand[:, :1]), (b, 1), "score",
                           "the scores of one candidate per request")
    if not torch.isfinite(single).all():
        raise ConformanceError("score", "NaN/inf scores for one candidate per request")
    return s


def _check_retrieve(stage: Any, batch: RequestBatch, ctx: FitContext) -> Candidates:
    b, n_items = len(batch), ctx.dataset.n_items
    for k in (1, K_RETRIEVE):
        out = _call(stage, "retrieve", batch, k)
        if not isinstance(out, Candidates):
            raise ConformanceError("retrieve", f"must return cascade.stages.base.Candidates, "
                                               f"got {_what(out)}")
        ids = _check_tensor(out.ids, (b, k), "retrieve", "Candidates.ids")
        scores = _check_tensor(out.scores, (b, k), "retrieve", "Candidates.scores")
        if ids.dtype != torch.int64:
            raise ConformanceError("retrieve", f"Candidates.ids must be int64, got {ids.dtype}")
        if not scores.is_floating_point() or not torch.isfinite(scores).all():
            raise ConformanceError("retrieve", "Candidates.scores must be finite floats "
                                               f"(got {scores.dtype})")
        ids = ids.detach().cpu().clone()
        # every request here has far more than k unseen items, so no -1 padding either
        bad = (ids < 0) | (ids >= n_items)
        if bad.any():
            raise ConformanceError("retrieve", f"id {int(ids[bad][0])} is not a catalogue item "
                                               f"(0 .. {n_items - 1})")
        for r, (row, hist, n) in enumerate(zip(ids.tolist(), batch.hist_items.tolist(),
                                               batch.hist_len.tolist())):
            if len(set(row)) != k:
                raise ConformanceError("retrieve", f"request {r} got an id twice: {row}")
            seen = set(row) & set(hist[:n])
            if ctx.exclude_seen and seen:
                raise ConformanceError(
                    "retrieve", f"request {r} got item(s) {sorted(seen)} from its own history "
                                "although FitContext.exclude_seen is True")
    return Candidates(ids=ids, scores=scores.detach().float().cpu())


def _check_independence(stage: Any, batch: RequestBatch, cand: Tensor, full: Tensor | None) -> None:
    if full is None:
        full = _call(stage, "score", batch, cand).detach().float().cpu()
    perm = torch.randperm(cand.shape[1], generator=torch.Generator().manual_seed(1))
    subsets = {"reordered": perm, "kept 3": torch.tensor([7, 3, 0]), "alone": torch.tensor([5])}
    for label, cols in subsets.items():
        got = _call(stage, "score", batch, cand[:, cols])
        _close(got, full[:, cols], CALL_TOLERANCE, "candidate_independent",
               f"the class declares candidate_independent = True, but a candidate's score "
               f"changed when the other candidates were {label}")


def _close(got: Any, want: Tensor, tol: dict, check: str, message: str) -> None:
    if not isinstance(got, Tensor) or tuple(got.shape) != tuple(want.shape):
        raise ConformanceError(check, f"{message} (got {_what(got)}, expected shape "
                                      f"{tuple(want.shape)})")
    got = got.detach().float().cpu()
    if not torch.allclose(got, want, **tol):
        diff = float((got - want).abs().max())
        raise ConformanceError(check, f"{message} (largest difference {diff:.3g})")


@functools.lru_cache(maxsize=2)
def _context(seed: int, device: str) -> tuple[FitContext, RequestBatch]:
    """A tiny synthetic log (80 users, 100 items, 2,400 events), split leave-one-out, as the
    FitContext every check fits on, and a batch of test requests."""
    from cascade.data.splits import make_split, training_requests
    from cascade.data.synthetic import generate, preset
    from cascade.data.traffic import Traffic

    ds = generate(preset("tiny", n_users=80, n_items=100, n_events=2400))
    split = make_split(ds)
    max_len = 20
    ctx = FitContext(
        dataset=ds,
        split=split,
        train=Traffic(ds, training_requests(split), max_len=max_len),
        valid=Traffic(ds, split.valid, max_len=max_len),
        device=torch.device(device),
        seed=seed,
        exclude_seen=True,
        cache_dir=None,
        progress=False,
    )
    test = Traffic(ds, split.test, max_len=max_len)
    batch = test.batch(np.arange(0, len(test), 5))  # 16 requests
    return ctx, batch

