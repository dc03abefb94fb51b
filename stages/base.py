"""The stage interface every funnel stage implements, and the registry that finds stages by name.

Two kinds of stage:
- a `Retriever` turns a batch of requests into candidate ids from the whole catalogue;
- a `Ranker` (ESR, LSR, or a user's own) scores given candidate ids; choosing the top k is the
  pipeline's job, never the stage's.
Both are fitted on the training split via a `FitContext` and return `self` from `fit`; what the
run decides for every stage (device, seed, exclude_seen, the retrieval index) travels in that
context. Learned state is set by `fit` and named with a trailing underscore (`model_`,
`fit_report_`); a stage used before `fit` raises `NotFittedError` (`check_fitted`).
`cascade.stages.learned.LearnedStage` is the base of the built-in learned stages, and
`cascade.stages.check_stage` the conformance check every stage should pass.

Stages are found by name in a registry filled with `@register("esr", "twotower")`, by a
`"package.module:Class"` string, or through the `cascade.stages` entry-point group
(`name = "package.module:Class"`). An unknown name is an error listing the known ones. A
`module:Class` whose module sits in the current directory is loaded from there; nothing else is
ever imported from the current directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from cascade.data.dataset import Dataset
from cascade.data.splits import Split
from cascade.data.traffic import RequestBatch, Traffic

STAGE_KINDS: tuple[str, ...] = ("retrieval", "esr", "lsr")


class StageError(RuntimeError):
    """A stage could not be found, loaded, or returned something the funnel cannot use."""


class NotFittedError(StageError):
    """A stage was used (scored, asked to retrieve) before `fit`."""


def check_fitted(stage: object, kind: str, *attributes: str) -> None:
    """Raise `NotFittedError` unless `fit` has set every one of `attributes` (not None) on
    `stage`: the one "used before fit" error of every stage. `kind` names the stage in the
    message ("retrieval", "esr", "lsr", or "ranker" for a stage serving as both rankers)."""
    if any(getattr(stage, a, None) is None for a in attributes):
        name = getattr(stage, "name", None) or type(stage).__name__
        raise NotFittedError(f"{kind} stage {name!r} used before fit(); call fit(ctx) first")


@dataclass(frozen=True)
class FitContext:
    """Everything a stage may learn from, and the run-level settings every stage must honour.
    Never holds test requests."""

    dataset: Dataset
    split: Split
    train: Traffic  # one request per training event with a non-empty history
    valid: Traffic  # validation requests (early stopping)
    device: torch.device
    seed: int = 0
    # the run hides items already in a request's history: retrieval must not return them, and
    # a stage validating on ranking quality should not count them (as the run's metrics do)
    exclude_seen: bool = True
    index: str | None = None  # FAISS index_factory string the run asks retrieval to use
    cache_dir: Path | None = None  # trained checkpoints are cached here; None disables caching
    retrain: bool = False  # ignore cached checkpoints
    progress: bool = True  # show progress bars


@dataclass(frozen=True)
class Candidates:
    ids: Tensor  # (B, K) int64 item ids, best first
    scores: Tensor  # (B, K) float32


@runtime_checkable
class Retriever(Protocol):
    name: str

    def fit(self, ctx: FitContext) -> "Retriever": ...

    def retrieve(self, batch: RequestBatch, k: int) -> Candidates: ...


@runtime_checkable
class Ranker(Protocol):
    name: str

    def fit(self, ctx: FitContext) -> "Ranker": ...

    def score(self, batch: RequestBatch, candidates: Tensor) -> Tensor:
        """candidates: (B, K) int64 catalogue item ids -> (B, K) float32 scores, higher is
        better. Never -1: the pipeline scores a padded slot as item 0 and masks it itself."""
        ...


@runtime_checkable
class ScoresCatalogue(Protocol):
    """Optional ranker hook: scores for every catalogue item at once, faster than `score` over
    the catalogue in chunks (used for the full-catalogue reference)."""

    def score_all(self, batch: RequestBatch) -> Tensor:
        """(B, n_items) float32 scores, higher is better."""
        ...


@runtime_checkable
class ReportsFit(Protocol):
    """Optional hook: what `fit` did (epochs, validation metric, whether a cached checkpoint
    was loaded: key "cached"), JSON-able; recorded in the run's metrics.json."""

    fit_report_: Mapping[str, Any]


REQUIRED_METHODS: dict[str, tuple[str, ...]] = {
    "retrieval": ("fit", "retrieve"),
    "esr": ("fit", "score"),
    "lsr": ("fit", "score"),
}

_REGISTRY: dict[str, dict[str, Callable[..., object]]] = {k: {} for k in STAGE_KINDS}
_BUILTIN_MODULES = ("retrieval", "twotower", "lsr", "popular", "oracle", "gesr", "sasrec")
_BUILTINS_LOADED = False


def register(kind: str, name: str) -> Callable[[type], type]:
    """Class decorator: make a stage available as `--<kind> <name>`."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown stage kind {kind!r}; expected one of {list(STAGE_KINDS)}")

    def deco(cls: type) -> type:
        _REGISTRY[kind][name] = cls
        return cls

    return deco


def _load_builtins() -> None:
    # importing the built-in stage modules runs their @register decorators
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"cascade.stages.{mod}")
    _BUILTINS_LOADED = True


def known_stages(kind: str) -> list[str]:
    _load_builtins()
    names = set(_REGISTRY[kind])
    for ep in metadata.entry_points(group="cascade.stages"):
        names.add(ep.name)
    return sorted(names)


def _import_module(mod_name: str):
    """Import `mod_name`. When its top-level name is a module or package in the current
    directory (and not imported yet), that file is loaded, as `python -m` would find it, but the
    current directory is never put on `sys.path`: nothing else is imported from it."""
    top = mod_name.split(".")[0]
    if top.isidentifier() and top not in sys.modules:
        here = Path.cwd()
        package, module = here / top / "__init__.py", here / f"{top}.py"
        location = package if package.is_file() else module if module.is_file() else None
        if location is not None:
            spec = importlib.util.spec_from_file_location(
                top, location,
                submodule_search_locations=[str(here / top)] if location == package else None,
            )
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[top] = loaded
            try:
                spec.loader.exec_module(loaded)
            except BaseException:
                sys.modules.pop(top, None)
                raise
    return importlib.import_module(mod_name)


def _import_path(spec: str) -> type:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise StageError(f"stage plugin {spec!r} must look like 'package.module:Class'")
    try:
        mod = _import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's plugin's
        raise StageError(f"stage plugin {spec!r}: cannot import module {mod_name!r}: {e}") from e
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise StageError(f"stage plugin {spec!r}: module {mod_name!r} has no {attr!r}") from None


def resolve_stage_class(kind: str, spec: str) -> type:
    """The class for `spec` (a registered name, an entry-point name or 'module:Class'),
    checked to have the methods a `kind` stage needs."""
    if kind not in _REGISTRY:
        raise StageError(f"unknown stage kind {kind!r}; expected one of {list(STAGE_KINDS)}")
    _load_builtins()
    if ":" in spec:
        cls = _import_path(spec)
    elif spec in _REGISTRY[kind]:
        cls = _REGISTRY[kind][spec]
    else:
        eps = {ep.name: ep for ep in metadata.entry_points(group="cascade.stages")}
        if spec not in eps:
            raise StageError(
                f"unknown {kind} stage {spec!r}; known: {', '.join(known_stages(kind))} "
                f"(or give 'package.module:Class')"
            )
        cls = eps[spec].load()
    missing = [m for m in REQUIRED_METHODS[kind] if not callable(getattr(cls, m, None))]
    if missing:
        raise StageError(
            f"{kind} stage {spec!r} ({getattr(cls, '__name__', cls)}) does not implement the "
            f"stage interface: missing method(s) {', '.join(missing)}"
        )
    return cls


def check_scores(stage_name: str, scores: object, shape: tuple[int, int]) -> Tensor:
    """Validate a ranker's output at the funnel boundary."""
    if not isinstance(scores, Tensor):
        raise StageError(f"stage {stage_name!r} returned {type(scores).__name__}, expected a Tensor")
    if tuple(scores.shape) != shape:
        raise StageError(
            f"stage {stage_name!r} returned scores of shape {tuple(scores.shape)}, expected {shape}"
        )
    if scores.is_complex() or scores.dtype == torch.bool:
        raise StageError(f"stage {stage_name!r} returned {scores.dtype} scores, expected real numbers")
    if scores.device.type == "meta":  # shapes only, no values to rank
        raise StageError(f"stage {stage_name!r} returned scores on the 'meta' device (no values), "
                         f"expected a tensor holding numbers")
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise StageError(f"stage {stage_name!r} returned {bad} NaN/inf scores")
    return scores.float()
