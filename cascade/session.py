"""The one place that builds and fits a funnel: `prepare(cfg)` (data, split, traffic, the
`FitContext`) and `fit_funnel(cfg)` (every stage built once, then fitted on that context).

`cascade run`, `cascade sweep`, `cascade ablation`, the benchmarks and the test fixtures all call
these, so a stage is constructed, configured and fitted the same way everywhere. In order:
1. every stage resolves and its config builds (unknown names, plugins that do not import or lack
   a method, bad config keys or types all fail here, before any data is read);
2. the data loads and splits; the budgets resolve against the catalogue and `max_len` against the
   longest history (bad values fail here, before any training);
3. the run-level settings every stage must honour (`exclude_seen`, the retrieval index, the
   device, the seed) go into the `FitContext`;
4. retrieval, each ESR variant and the LSR are fitted (learned stages load their checkpoint from
   the cache when it is there). An exception a stage raises is reported with the stage's kind,
   name and method (`cascade.pipeline.call_stage`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch

from cascade.config import REPEAT_SHARE_FOR_EXCLUDE, RunConfig, StageSpec, build_stage, default_cache_dir
from cascade.data.dataset import Dataset
from cascade.data.splits import Split, make_split, training_requests
from cascade.data.traffic import Traffic
from cascade.pipeline import (
    DEFAULT_ESR_SHARE, Budgets, Pipeline, call_stage, resolve_budgets, stage_label, stage_who,
)
from cascade.stages.base import FitContext, ReportsFit, StageError
from cascade.util.fsio import clean_stale_temporaries
from cascade.util.memory import keep_freed_memory

MAX_LEN_FLOOR = 50  # max_len may always be this long, even on logs with shorter histories


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use cpu or auto)")
    return torch.device(device)


class Prepared(NamedTuple):
    dataset: Dataset
    split: Split
    ctx: FitContext
    test: Traffic


def load_data(cfg: RunConfig) -> Dataset:
    from cascade.data.loaders import load_dataset

    return load_dataset(cfg.data, **dict(cfg.data_options))


def repeat_share(split: Split) -> float:
    """Share of training events whose item the same user already had (repeat consumption)."""
    if split.train.height == 0:
        return 0.0
    return float(
        split.train.select((~pl.col("item").is_first_distinct().over("user")).mean()).item()
    )


def check_max_len(max_len: int, dataset: Dataset) -> None:
    """`max_len` past the longest history only costs memory and time (a (batch, max_len) tensor
    per request batch); refuse it beyond max(longest history, MAX_LEN_FLOOR)."""
    longest = int(dataset.events.group_by("user").len()["len"].max() or 0)
    bound = max(longest, MAX_LEN_FLOOR)
    if max_len > bound:
        raise ValueError(
            f"max_len {max_len} is longer than any history in {dataset.name} (the longest user "
            f"has {longest} events); use at most {bound}"
        )


def check_cache_dir(path: Path) -> Path:
    """Create the checkpoint cache folder, or fail before training with the reason."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cache folder {path}: cannot create it ({e.strerror or e})") from None
    if not path.is_dir():
        raise ValueError(f"cache folder {path}: not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"cache folder {path}: cannot write in it (permission denied)")
    return path


def prepare(
    cfg: RunConfig, *, dataset: Dataset | None = None, progress: bool = True,
    exclude_seen: bool | None = None,
) -> Prepared:
    """(dataset, split, FitContext, test traffic) for `cfg`; `dataset` skips loading. The
    context's `exclude_seen` is `exclude_seen`, else the config's, else decided from the
    training log (see `decide_exclude_seen`). Also makes this process keep the memory it frees
    (`keep_freed_memory`): training and scoring reallocate large score matrices every step."""
    keep_freed_memory()
    ds = load_data(cfg) if dataset is None else dataset
    check_max_len(cfg.max_len, ds)
    split = make_split(ds, cfg.split)
    if exclude_seen is None:
        exclude_seen = cfg.exclude_seen
    if exclude_seen is None:
        exclude_seen = repeat_share(split) < REPEAT_SHARE_FOR_EXCLUDE
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    ctx = FitContext(
        dataset=ds,
        split=split,
        train=Traffic(ds, training_requests(split), max_len=cfg.max_len),
        valid=Traffic(ds, split.valid, max_len=cfg.max_len),
        device=resolve_device(cfg.device),
        seed=cfg.seed,
        exclude_seen=exclude_seen,
        index=cfg.index,
        cache_dir=cache,
        retrain=cfg.retrain,
        progress=progress,
    )
    return Prepared(ds, split, ctx, Traffic(ds, split.test, max_len=cfg.max_len))


def traffic_key(traffic: Traffic) -> str:
    """Hash of the replayed request ids, users and targets: equal keys = same traffic."""
    h = hashlib.sha256()
    for arr in (traffic.request_id, traffic.user, traffic.targets):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


REFERENCE_REQUESTS = 500  # test requests the full-catalogue reference scores by default ...
REFERENCE_PAIRS = 10_000_000  # ... unless that is more (request, item) pairs than this


def reference_request_count(asked: int | None, n_items: int) -> int:
    """The reference's request count: `asked` when given, else 500 capped so that the LSR scores
    at most `REFERENCE_PAIRS` request-item pairs (never under 10 requests): 500 up to 20,000
    items, 10 at a million (the LSR over a million items took 15 s per request on 2 cores)."""
    if asked is not None:
        return asked
    return max(10, min(REFERENCE_REQUESTS, REFERENCE_PAIRS // max(n_items, 1)))


def fit_stage(
    stage: Any, kind: str, ctx: FitContext, log: Callable[[str], None], label: str | None = None
) -> dict:
    """Fit `stage` on `ctx`; returns {"stage", "seconds", "cached", "report"}."""
    t0 = time.perf_counter()
    call_stage(stage, stage_who(kind, stage, label), "fit", ctx)
    seconds = time.perf_counter() - t0
    report = stage.fit_report_ if isinstance(stage, ReportsFit) else {}
    report = report if isinstance(report, Mapping) else {}
    cached = bool(report.get("cached", False))
    log(f"fitted {kind} {stage_label(stage)} in {seconds:.1f}s" + (" (cached checkpoint)" if cached else ""))
    keep = {k: v for k, v in report.items() if k != "history"}
    return {"stage": stage_label(stage), "seconds": seconds, "cached": cached, "report": keep}


@dataclass(frozen=True)
class Funnel:
    """Fitted stages and what they were fitted on."""

    config: RunConfig  # resolved: name, budgets and exclude_seen filled in, no `out`
    prepared: Prepared
    budgets: Budgets
    retriever: Any
    esrs: dict[str, Any]  # variant label -> fitted ESR, display order
    lsr: Any
    specs: dict[str, StageSpec]  # variant label -> its spec
    primary: str
    baseline: str | None
    fits: dict  # stage label -> fit_stage's record
    fit_seconds: float

    @property
    def name(self) -> str:
        return self.config.name  # type: ignore[return-value]

    def pipeline(self, budgets: Budgets | None = None, esrs: Mapping[str, Any] | None = None) -> Pipeline:
        return Pipeline(self.retriever, self.esrs if esrs is None else esrs, self.lsr,
                        budgets or self.budgets, device=self.prepared.ctx.device)

    @property
    def stage_names(self) -> dict[str, str]:
        return {"retrieval": stage_label(self.retriever), "lsr": stage_label(self.lsr)}


def build_funnel_stages(cfg: RunConfig) -> tuple[Any, dict[str, Any], Any]:
    """(retriever, label -> ESR, LSR), unfitted: every stage built once from `cfg`."""
    specs, _, _ = cfg.variant_specs()
    retriever = build_stage("retrieval", cfg.retrieval)
    esrs = {label: build_stage("esr", spec) for label, spec in specs.items()}
    return retriever, esrs, build_stage("lsr", cfg.lsr)


def fit_funnel(
    cfg: RunConfig,
    *,
    dataset: Dataset | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Funnel:
    """Build every stage of `cfg` once, prepare the data, resolve the budgets and fit the
    stages (see the module docstring)."""
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    specs, primary, baseline = cfg.variant_specs()
    retriever, esrs, lsr = build_funnel_stages(cfg)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    check_cache_dir(cache)
    for folder in (cache, *(p for p in cache.iterdir() if p.is_dir())):
        clean_stale_temporaries(folder)  # checkpoints half-written by a killed run

    prepared = prepare(cfg, dataset=dataset, progress=progress)
    ds, split, ctx, test = prepared
    say(
        f"data {ds.name}: {ds.n_users:,} users, {ds.n_items:,} items, {ds.n_events:,} events; "
        f"{split.kind} split, {len(ctx.train):,} training / {len(ctx.valid):,} validation / "
        f"{len(test):,} test requests; device {ctx.device}"
    )
    budgets = resolve_budgets(ds.n_items, retrieval=cfg.retrieval_k, esr=cfg.esr_k,
                              final=cfg.final_k, esr_share=cfg.esr_share)
    defaults = "" if cfg.retrieval_k and cfg.esr_k else f" (defaults for {ds.n_items:,} items)"
    if cfg.esr_k is None and cfg.esr_share != DEFAULT_ESR_SHARE:
        defaults += f" (the ESR keeps {cfg.esr_share:.0%} of the retrieved candidates)"
    say(f"budgets: {budgets.describe()}{defaults}")
    if cfg.exclude_seen is None:
        say(f"exclude_seen: {ctx.exclude_seen} ({repeat_share(split):.1%} of training events "
            "are repeats)")
    name = cfg.resolved_name(dataset.name if dataset is not None else None)
    n_ref = reference_request_count(cfg.reference_requests, ds.n_items)
    if cfg.reference and cfg.reference_requests is None and n_ref < REFERENCE_REQUESTS:
        say(f"reference: the LSR over all {ds.n_items:,} items on {n_ref} test requests (at most "
            f"{REFERENCE_PAIRS:,} request-item pairs by default; set reference_requests for more)")
    resolved = cfg.replace(
        name=name, retrieval_k=budgets.retrieval, esr_k=budgets.esr, final_k=budgets.final,
        exclude_seen=ctx.exclude_seen, out=None, reference_requests=n_ref,
    )

    fits = {"retrieval": fit_stage(retriever, "retrieval", ctx, say)}
    for label, esr in esrs.items():
        fits[f"esr:{label}"] = fit_stage(esr, "esr", ctx, say, label)
    fits["lsr"] = fit_stage(lsr, "lsr", ctx, say)
    return Funnel(
        config=resolved, prepared=prepared, budgets=budgets, retriever=retriever, esrs=esrs,
        lsr=lsr, specs=specs, primary=primary, baseline=baseline, fits=fits,
        fit_seconds=time.perf_counter() - t_start,
    )
