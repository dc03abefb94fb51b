"""The runner: a `RunConfig` in, a trained, replayed, measured run out.

`run_experiment(cfg)`:
1. checks that `--out` can be written (before any work);
2. builds and fits the funnel (`cascade.session.fit_funnel`: every stage built once, checkpoints
   from the cache);
3. replays the test traffic through it (`cascade.replay`), optionally with the oracle pass, in
   this process or on Ray workers (`cascade.backends`; the backend starts before training);
4. measures each ESR variant, the paired comparison against the baseline and the reference
   points (`cascade.measure`);
5. writes the run folder atomically (`cascade.records`); `extras(folder)` may add files (the
   report, an ablation table) to it before it appears.

An ablation is one run: `esr_variants` lists several ESRs (label, stage, config) that all see
the same retrieved candidates and feed the same LSR.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from cascade.backends import make_backend
from cascade.config import RunConfig
from cascade.data.dataset import Dataset
from cascade.env import capture
from cascade.measure import reference_metrics, variant_metrics
from cascade.metrics import (
    compare_variants,
    final_metrics,
    history_bucket,
    popularity_buckets,
    quality_summary,
)
from cascade.pipeline import Budgets
from cascade.records import check_target, write_run
from cascade.replay import evenly_spaced_rows
from cascade.session import fit_funnel, traffic_key


@dataclass(frozen=True)
class RunResult:
    config: RunConfig  # resolved: budgets and exclude_seen filled in
    path: Path | None  # the run folder
    metrics: dict  # what metrics.json holds
    requests: pl.DataFrame
    latency: pl.DataFrame
    budgets: Budgets
    fits: dict  # stage label -> {"stage", "seconds", "cached", "report"}


def _default_out(name: str) -> Path:
    """runs/<date-time to the millisecond>-<name>; `write_run(unique=True)` adds -2, -3, ...
    when two runs still pick the same name."""
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S-%f')[:-3]}-{name}"


def run_experiment(
    cfg: RunConfig,
    *,
    progress: bool = True,
    dataset: Dataset | None = None,
    log: Callable[[str], None] | None = None,
    write: bool = True,
    extras: Callable[[Path, dict], None] | None = None,
) -> RunResult:
    """Train (or load), replay and measure the funnel of `cfg`; write the run folder unless
    `write` is False. `dataset` skips loading `cfg.data`; `log` receives progress lines;
    `extras(folder, metrics)` writes more files into the run folder before it is published."""
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    out = None
    if write:
        out = Path(cfg.out).expanduser() if cfg.out else None
        if out is not None:
            check_target(out)

    # the backend starts before training (an unreachable Ray address fails here) and stops its
    # workers on the way out, Ctrl-C included
    with make_backend(cfg) as backend:
        funnel = fit_funnel(cfg, dataset=dataset, progress=progress, log=say)
        resolved, budgets = funnel.config, funnel.budgets
        ds, split, ctx, test = funnel.prepared
        specs, primary, baseline = funnel.specs, funnel.primary, funnel.baseline
        if write and out is None:
            out = _default_out(resolved.name)
            check_target(out)

        rep = backend.replay(
            funnel, test, batch_size=cfg.batch_size, oracle=cfg.oracle,
            oracle_rows=evenly_spaced_rows(len(test), cfg.oracle_requests), warmup=cfg.warmup,
            progress=progress, description=f"replay {len(test):,} requests",
        )
        # the reference (the LSR over the whole catalogue) on the same backend's workers
        reference, ids, ref_seconds = None, None, 0.0
        if cfg.reference:
            t_ref = time.perf_counter()
            reference, ids = reference_metrics(
                funnel.lsr, funnel.prepared, exclude_seen=ctx.exclude_seen,
                batch_size=cfg.batch_size, final_k=budgets.final, progress=progress,
                n_requests=funnel.config.reference_requests,
                lsr_ranks=lambda t: backend.reference_ranks(
                    funnel, t, batch_size=cfg.batch_size, progress=progress),
            )
            ref_seconds = time.perf_counter() - t_ref
        execution = backend.describe()
    say(f"replayed {len(test):,} requests in {rep.seconds:.1f}s"
        + (f" on {execution['workers']} Ray workers" if execution["backend"] == "ray" else ""))
    if reference is not None:
        say(f"reference metrics in {ref_seconds:.1f}s")

    pop_label = popularity_buckets(ds.item_popularity(split.train))
    frame = rep.requests_frame().with_columns(
        pl.Series("hist_bucket", np.tile(history_bucket(rep.hist_len), len(specs))),
        pl.Series("pop_bucket", np.tile(pop_label[np.maximum(rep.targets[:, 0], 0)], len(specs))),
    )
    variants = {
        label: variant_metrics(frame, rep.latency, label, spec, funnel.stage_names, budgets)
        for label, spec in specs.items()
    }
    comparisons = {
        label: compare_variants(frame, label, baseline, n_resamples=cfg.bootstrap, seed=cfg.seed)
        for label in specs if baseline is not None and label != baseline
    }
    if reference is not None:
        full = reference["lsr_full_catalogue"]
        keys = [m.key for m in final_metrics()]
        for label, v in variants.items():  # the funnel's share of what the LSR alone achieves,
            # on the same requests the reference scored
            same = v["final"]
            if len(ids) < len(test):
                same = quality_summary(frame.filter(
                    (pl.col("variant") == label) & pl.col("request_id").is_in(pl.Series(ids).implode())
                ))
                v["final_on_reference_requests"] = {k: same.get(k) for k in keys}
            v["vs_lsr_full_catalogue"] = {
                k: (same[k] / full[k] if full[k] and same.get(k) is not None else None) for k in keys
            }

    metrics = {
        "name": resolved.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {
            "name": ds.name,
            "source": ds.source,
            "fingerprint": ds.fingerprint(),
            "split": split.key(),
            "split_kind": split.kind,
            "n_users": ds.n_users,
            "n_items": ds.n_items,
            "n_events": ds.n_events,
            "n_requests": len(test),
            "traffic_key": traffic_key(test),
            "max_len": cfg.max_len,
            "exclude_seen": ctx.exclude_seen,
        },
        "budgets": budgets.as_dict(),
        "seed": cfg.seed,
        "device": str(ctx.device),
        "primary": primary,
        "baseline": baseline,
        "stages": {
            "retrieval": cfg.retrieval.to_dict(),
            "lsr": cfg.lsr.to_dict(),
            "esr": {label: spec.to_dict() for label, spec in specs.items()},
        },
        "variants": variants,
        "comparisons": comparisons or None,
        "reference": reference,
        "training": funnel.fits,
        "execution": execution,  # backend, workers and their nodes
        "seconds": {
            "fit": funnel.fit_seconds,
            "replay": rep.seconds,
            "reference": ref_seconds,
            "total": time.perf_counter() - t_start,
        },
    }

    path = None
    if write:
        path = write_run(
            out,
            config_toml=resolved.to_toml(),
            metrics=metrics,
            requests=frame,
            latency=rep.latency,
            env=capture(execution=execution),
            finish=None if extras is None else (lambda folder: extras(folder, metrics)),
            unique=not cfg.out,
        )
    return RunResult(resolved, path, metrics, frame, rep.latency, budgets, funnel.fits)
