"""A replay worker: the fitted funnel in a process of its own, replaying request shards.

The driver fits the funnel first (`cascade.session.fit_funnel`), which fills the checkpoint
cache. A worker calls `fit_funnel` on the same resolved configuration and the same dataset, so
every learned stage loads its checkpoint; a worker never trains. Before fitting it checks that
each checkpoint the driver wrote is there (a Ray node that cannot see the cache folder fails
naming it, before any training could start), and after fitting that every one of those stages
came from the cache. Stages without a checkpoint (most-popular, the oracle ranker, plugins that
keep no cache) are fitted again; a stage's fit is deterministic under the seed (`check_stage`
checks it), so the worker holds the same funnel as the driver.

The class is plain Python; `cascade.backends.ray_backend` runs it as a Ray actor.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from cascade.config import RunConfig
from cascade.data.dataset import Dataset
from cascade.data.traffic import Traffic
from cascade.measure import lsr_catalogue_ranks
from cascade.pipeline import Budgets
from cascade.replay import ReplayResult, replay
from cascade.session import Funnel, fit_funnel
from cascade.stages.base import StageError
from cascade.util.memory import keep_freed_memory


def worker_config(funnel: Funnel) -> RunConfig:
    """The configuration a worker fits its funnel with: the driver's resolved one (budgets,
    exclude_seen), loading from the driver's cache folder (absolute), on the driver's device,
    never retraining."""
    ctx = funnel.prepared.ctx
    return funnel.config.replace(
        retrain=False, cache_dir=str(Path(ctx.cache_dir).resolve()), device=str(ctx.device),
        out=None, backend="inprocess", ray_address=None, workers=None,
    )


def checkpoints_of(funnel: Funnel) -> dict[str, str]:
    """Stage label -> checkpoint folder, for every stage the driver fitted through the cache."""
    out = {}
    for label, fit in funnel.fits.items():
        path = (fit.get("report") or {}).get("checkpoint")
        if isinstance(path, str):
            out[label] = path
    return out


def load_funnel(cfg: RunConfig, dataset: Dataset, checkpoints: dict[str, str]) -> Funnel:
    """`fit_funnel(cfg)` from the checkpoint cache, or `StageError` when a stage would be (or
    was) trained instead of loaded."""
    host = socket.gethostname()
    for label, path in checkpoints.items():
        if not (Path(path) / "model.pt").is_file():
            raise StageError(
                f"replay worker on {host}: the checkpoint of {label} ({path}) is not there, and "
                "a worker never trains; the cache folder must be visible to every Ray node (a "
                "shared folder as cache_dir)"
            )
    funnel = fit_funnel(cfg, dataset=dataset, progress=False)
    trained = [label for label in checkpoints if not funnel.fits[label]["cached"]]
    if trained:
        raise StageError(
            f"replay worker on {host} trained {', '.join(trained)} instead of loading the "
            "checkpoint the driver wrote (a damaged or changed checkpoint?); a worker never trains"
        )
    return funnel


class ReplayWorker:
    """Holds one funnel, loaded on first use (so a restarted worker loads it again), and replays
    request shards through its pipeline. Every call carries the dataset (`_resolve` turns what
    it receives into a `Dataset`), used only when the funnel is not loaded yet."""

    def __init__(self, cfg: RunConfig, checkpoints: dict[str, str], threads: int) -> None:
        self._cfg, self._checkpoints = cfg, checkpoints
        self._threads = max(1, int(threads))
        self._funnel: Funnel | None = None
        self._warm: set[Budgets] = set()  # budget points whose warm-up batches already ran

    def _resolve(self, dataset: Any) -> Dataset:
        return dataset

    def funnel(self, dataset: Any) -> Funnel:
        if self._funnel is None:
            torch.set_num_threads(self._threads)
            keep_freed_memory()
            self._funnel = load_funnel(self._cfg, self._resolve(dataset), self._checkpoints)
        return self._funnel

    def info(self, dataset: Any) -> dict[str, Any]:
        """Load the funnel; where this worker runs."""
        self.funnel(dataset)
        return {"pid": os.getpid(), "hostname": socket.gethostname(),
                "threads": torch.get_num_threads()}

    def replay_shard(
        self, dataset: Any, table: pl.DataFrame, max_len: int, budgets: Budgets,
        batch_size: int, oracle: bool, oracle_rows: np.ndarray | None, warmup: int,
    ) -> tuple[ReplayResult, int]:
        """Replay the requests of `table` (a shard of whole batches) at `budgets`; the warm-up
        batches run once per worker and budget point, as in-process replay runs them once per
        pass. Returns the result and this process's id."""
        funnel = self.funnel(dataset)
        traffic = Traffic(funnel.prepared.dataset, table, max_len=max_len)
        first = budgets not in self._warm
        self._warm.add(budgets)
        rep = replay(funnel.pipeline(budgets), traffic, batch_size=batch_size, oracle=oracle,
                     oracle_rows=oracle_rows, warmup=warmup if first else 0, progress=False)
        return rep, os.getpid()

    def reference_shard(
        self, dataset: Any, table: pl.DataFrame, max_len: int, batch_size: int,
    ) -> tuple[np.ndarray, int]:
        """The LSR's full-catalogue ranks of the requests of `table` (a shard of the run's
        reference requests), and this process's id."""
        funnel = self.funnel(dataset)
        traffic = Traffic(funnel.prepared.dataset, table, max_len=max_len)
        ctx = funnel.prepared.ctx
        ranks = lsr_catalogue_ranks(funnel.lsr, traffic, exclude_seen=ctx.exclude_seen,
                                    batch_size=batch_size, device=ctx.device)
        return ranks, os.getpid()
