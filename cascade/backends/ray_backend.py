"""Replay on Ray: request shards replayed by Ray actors, merged into one `ReplayResult`.

- **Connecting** (`start`, before any training): with no address a local Ray is started
  (`ray.init(num_cpus=...)`, quiet logging); `auto` joins the Ray instance running on this
  machine; `ray://host:port` (Ray client) or `host:port` (a head node) joins a cluster. An
  address that cannot be reached fails here, naming it. A Ray this process already runs is
  used as it is, and left running.
- **Workers**: `workers` actors (default: one per CPU of the cluster), each with its share of
  the cluster's CPUs as torch threads. Each holds the fitted funnel, loaded once from the
  checkpoint cache the driver filled (`cascade.backends.worker`); the dataset reaches it through
  the object store. A worker that cannot load without training fails the run, naming why. On
  a cluster, the cache folder must be shared by every node, and a `module:Class` stage must be
  importable there (a local Ray's workers start in the driver's folder, as plugins expect).
- **Shards**: the traffic is cut into shards of whole batches (`cascade.backends.shards`),
  several per worker so a fast worker takes more; each worker replays one shard at a time and
  returns its ranks and latency rows; the driver merges them by shard index in traffic order.
  A sweep's budget points are tasks the same way (each point a task, or a few shards of it when
  there are more workers than points).
- **Failures**: a worker whose process dies is restarted by Ray (`max_restarts`) and the shard it
  was replaying is replayed again (`max_task_retries`); the merge keeps one result per shard, so
  nothing is counted twice. A worker dead for good hands its shard to another worker; a shard
  that cannot finish, or a stage that raises in a worker, fails the run with a `StageError`
  naming the shard and the cause (the run folder is written only after a complete replay).
  `close` kills the workers (also on Ctrl-C) and stops a local Ray this backend started.

Latency is measured inside each worker; with several workers on one machine they share its
cores, so per-stage latency under concurrency is per worker.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from cascade.backends.base import Backend
from cascade.backends.shards import merge_shards, request_table, shard_bounds
from cascade.backends.worker import ReplayWorker, checkpoints_of, worker_config
from cascade.pipeline import Budgets
from cascade.replay import ReplayResult, oracle_mask
from cascade.stages.base import StageError
from cascade.util.progress import Progress

CONNECT_TIMEOUT_S = 5.0
SHARDS_PER_WORKER = 4  # more shards than workers: a faster worker takes more of them
MIN_SHARD_BATCHES = 4  # ... but not so small that per-shard overhead shows


def _local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_address(address: str) -> None:
    """Fail, naming `address`, when nothing listens there (`auto` is left to `ray.init`)."""
    if address == "auto":
        return
    client = address.startswith("ray://")
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep:
        host, port = hostport, "10001" if client else "6379"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ValueError(
            f"Ray address {address!r}: cannot reach {host}:{port} ({why}); start Ray there "
            "(ray start --head) or leave ray_address unset to start a local Ray"
        ) from None


class _RayReplayWorker(ReplayWorker):
    """The worker as a Ray actor. Calls carry the dataset as [ObjectRef] of its pickle, fetched
    only when the funnel loads and unpickled into arrays of the worker's own (the store's
    zero-copy arrays are read-only). Not a constructor argument: Ray would have to keep those
    for restarts itself."""

    def _resolve(self, dataset):
        return pickle.loads(ray.get(dataset[0]))

    def info(self, dataset) -> dict[str, Any]:
        return {**super().info(dataset), "node_id": ray.get_runtime_context().get_node_id()}


@dataclass(frozen=True)
class _Task:
    point: int  # budget point (0 for a run's single replay)
    shard: int  # shard index within the point
    start: int
    stop: int
    budgets: Budgets
    what: str = "replay"  # or "reference": the LSR over the whole catalogue

    def describe(self) -> str:
        return f"{self.what} shard {self.shard} (requests {self.start}..{self.stop - 1})"


class RayBackend(Backend):
    """Replay on Ray actors (see the module docstring). `on_dispatch(worker_pid, task)` is
    called after each shard is sent to a worker (tests kill that process there)."""

    name = "ray"

    def __init__(
        self, *, address: str | None = None, workers: int | None = None, max_restarts: int = 2,
        on_dispatch: Callable[[int, _Task], None] | None = None,
    ) -> None:
        self.address, self.workers, self.max_restarts = address, workers, max_restarts
        self.on_dispatch = on_dispatch
        self._owns_ray = False
        self._funnel = None
        self._actors: list[Any] = []
        self._pids: list[int] = []  # each worker's current process
        self._infos: list[dict] = []
        self._data = None  # the pickled dataset in the object store
        self.last_pass: dict[str, Any] | None = None  # timing of the latest `replay`
        self._restarts = 0
        self._reassigned = 0

    # -- connecting and the workers ----------------------------------------------------------
    def start(self) -> None:
        if self.address is not None:
            check_address(self.address)
        if ray.is_initialized():
            return
        quiet = dict(logging_level=logging.ERROR, include_dashboard=False)
        if self.address is None:
            ray.init(num_cpus=max(_local_cpus(), self.workers or 1), **quiet)
        else:
            try:
                ray.init(address=self.address, **quiet)
            except Exception as e:  # noqa: BLE001 - ray raises several kinds: all "cannot join"
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ValueError(f"Ray address {self.address!r}: cannot connect ({first})"
                                 ) from None
        self._owns_ray = True

    def close(self) -> None:
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()  # the local Ray this backend started goes, its workers with it
            self._actors, self._funnel, self._pids, self._data = [], None, [], None
        else:
            self.close_workers()
        self._owns_ray = False

    def start_workers(self, funnel) -> list[Any]:
        """The actors holding `funnel`, started and loaded on first use (replay calls this; a
        benchmark calls it first to time worker start-up apart)."""
        if self._funnel is funnel:
            return self._actors
        self.close_workers()
        if not ray.is_initialized():
            self.start()
        resources = ray.cluster_resources()
        cpus = float(resources.get("CPU", 1.0))
        n = self.workers or max(1, int(cpus))
        per = cpus / n
        options: dict[str, Any] = dict(num_cpus=per, max_restarts=self.max_restarts,
                                       max_task_retries=self.max_restarts)
        if funnel.prepared.ctx.device.type == "cuda":
            options["num_gpus"] = min(1.0, float(resources.get("GPU", 0.0)) / n)
        actor = ray.remote(_RayReplayWorker).options(**options)
        # kept referenced by this backend, so a restarted worker can load it again
        self._data = ray.put(pickle.dumps(funnel.prepared.dataset, protocol=5))
        cfg, checkpoints = worker_config(funnel), checkpoints_of(funnel)
        self._actors = [actor.remote(cfg, checkpoints, max(1, int(per))) for _ in range(n)]
        self._funnel = funnel
        try:
            self._infos = ray.get([a.info.remote([self._data]) for a in self._actors])
        except RayTaskError as e:
            raise StageError(f"a Ray replay worker could not load the funnel: {_cause(e)}"
                             ) from None
        except RayActorError as e:
            raise StageError(f"a Ray replay worker died while loading the funnel: {_cause(e)}"
                             ) from None
        self._pids = [i["pid"] for i in self._infos]
        return self._actors

    def close_workers(self) -> None:
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors, self._funnel, self._pids, self._data = [], None, [], None  # _infos kept

    def describe(self) -> dict[str, Any]:
        nodes: dict[str, dict] = {}
        for info in self._infos:
            node = nodes.setdefault(info["node_id"], {"node_id": info["node_id"],
                                                      "hostname": info["hostname"], "workers": 0})
            node["workers"] += 1
        return {
            "backend": self.name,
            "ray": ray.__version__,
            "address": self.address or "local",
            "workers": len(self._infos),
            "concurrent_workers": len(self._infos),
            "threads_per_worker": self._infos[0]["threads"] if self._infos else None,
            "nodes": list(nodes.values()),
            "worker_restarts": self._restarts,
            "shards_reassigned": self._reassigned,
        }

    # -- running shards ----------------------------------------------------------------------
    def _run(self, funnel, tasks: Sequence[_Task], submit: Callable[[Any, _Task], Any], *,
             progress: bool, description: str) -> Iterator[tuple[_Task, Any]]:
        """Run every task on the workers, one at a time per worker (`submit(actor, task)` sends
        it and returns the call's ObjectRef); yield each result as it arrives."""
        actors = self.start_workers(funnel)
        queue, idle = deque(tasks), deque(range(len(actors)))
        dead: set[int] = set()
        attempts: Counter[_Task] = Counter()
        in_flight: dict[Any, tuple[_Task, int]] = {}
        total = sum(t.stop - t.start for t in tasks)
        with Progress(description, total=total, unit="requests", enabled=progress) as bar:
            while queue or in_flight:
                while queue and idle:
                    t, w = queue.popleft(), idle.popleft()
                    in_flight[submit(actors[w], t)] = (t, w)
                    if self.on_dispatch is not None:
                        self.on_dispatch(self._pids[w], t)
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    t, w = in_flight.pop(ref)
                    try:
                        rep, pid = ray.get(ref)
                    except RayTaskError as e:  # the replay itself raised: no retry helps
                        raise StageError(f"{t.describe()} failed on Ray worker {w}: "
                                         f"{_cause(e)}") from None
                    except RayActorError as e:  # the worker died and its restarts are spent
                        dead.add(w)
                        attempts[t] += 1
                        if len(dead) == len(actors) or attempts[t] > self.max_restarts:
                            raise StageError(
                                f"{t.describe()} could not finish: Ray worker {w} died and was "
                                f"restarted up to {self.max_restarts} times ({_cause(e)})"
                            ) from None
                        self._reassigned += 1
                        queue.appendleft(t)  # to a worker that is still alive
                        continue
                    if pid != self._pids[w]:  # Ray restarted the worker and retried the shard
                        self._restarts += 1
                        self._pids[w] = pid
                    idle.append(w)
                    bar.advance(t.stop - t.start)
                    yield t, rep

    def _n_shards(self, n_requests: int, batch_size: int) -> int:
        n_batches = -(-n_requests // batch_size)
        n = len(self._actors) or self.workers or 1
        return max(min(n, n_batches), min(n * SHARDS_PER_WORKER, n_batches // MIN_SHARD_BATCHES))

    def replay(self, funnel, traffic, *, budgets=None, batch_size=256, oracle=False,
               oracle_rows=None, warmup=1, progress=True, description="replay"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        R = len(traffic)
        oracle_rows = oracle_mask(oracle, oracle_rows, R)
        self.start_workers(funnel)
        budgets = budgets or funnel.budgets
        bounds = shard_bounds(R, batch_size, self._n_shards(R, batch_size))
        tasks = [_Task(0, i, a, b, budgets) for i, (a, b) in enumerate(bounds)]

        def submit(actor, t: _Task):
            rows = None if oracle_rows is None else oracle_rows[t.start:t.stop]
            return actor.replay_shard.remote(
                [self._data], request_table(traffic, t.start, t.stop), traffic.max_len,
                t.budgets, batch_size, oracle, rows, warmup)

        t0 = time.perf_counter()
        parts = {t.shard: rep for t, rep in self._run(
            funnel, tasks, submit, progress=progress, description=description)}
        wall = time.perf_counter() - t0
        # what the pass cost beyond the workers' own replay loops (shipping shards, rebuilding
        # their traffic, returning and merging results): Ray's overhead, for benchmarks
        self.last_pass = {"wall_s": wall, "shards": len(bounds),
                          "worker_replay_s": sum(p.seconds for p in parts.values())}
        return merge_shards(parts, bounds, traffic, batch_size=batch_size,
                            oracle_rows=oracle_rows, seconds=wall)

    def replay_points(self, funnel, traffic, points, *, batch_size=256, warmup=1,
                      progress=True):
        self.start_workers(funnel)
        R = len(traffic)
        per_point = max(1, math.ceil(len(self._actors) / max(len(points), 1)))
        bounds = shard_bounds(R, batch_size, per_point)
        tasks = [_Task(p, i, a, b, budgets) for p, budgets in enumerate(points)
                 for i, (a, b) in enumerate(bounds)]
        parts: dict[int, dict[int, ReplayResult]] = {p: {} for p in range(len(points))}

        def submit(actor, t: _Task):
            return actor.replay_shard.remote(
                [self._data], request_table(traffic, t.start, t.stop), traffic.max_len,
                t.budgets, batch_size, False, None, warmup)

        t0 = time.perf_counter()
        for t, rep in self._run(funnel, tasks, submit, progress=progress,
                                description=f"sweep over {len(points)} budget points"):
            parts[t.point][t.shard] = rep
            if len(parts[t.point]) == len(bounds):
                yield t.point, merge_shards(parts.pop(t.point), bounds, traffic,
                                            batch_size=batch_size, oracle_rows=None,
                                            seconds=time.perf_counter() - t0)

    def reference_ranks(self, funnel, traffic, *, batch_size=256, progress=True):
        """The LSR's full-catalogue ranks, the reference requests cut into shards the workers
        score as they score replay shards; concatenated in traffic order."""
        self.start_workers(funnel)
        R = len(traffic)
        bounds = shard_bounds(R, batch_size, self._n_shards(R, batch_size))
        tasks = [_Task(0, i, a, b, funnel.budgets, "reference") for i, (a, b) in enumerate(bounds)]

        def submit(actor, t: _Task):
            return actor.reference_shard.remote(
                [self._data], request_table(traffic, t.start, t.stop), traffic.max_len, batch_size)

        parts = dict((t.shard, ranks) for t, ranks in self._run(
            funnel, tasks, submit, progress=progress, description="LSR over the full catalogue"))
        return np.concatenate([parts[i] for i in range(len(bounds))])


def _cause(e: BaseException) -> str:
    """The original error of a Ray exception, in one line."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, (StageError, ValueError)):
        text = str(cause)
    elif isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}"
    else:  # the actor died: Ray's first line says how
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return " ".join(text.split())[:500]
