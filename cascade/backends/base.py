"""The backend interface (`Backend`: start, replay, replay_points, describe, close) and the
default in-process backend, `cascade.replay.replay` in this process, exactly as before backends
existed. See `cascade.backends` for the whole picture."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cascade.measure import lsr_catalogue_ranks
from cascade.pipeline import Budgets
from cascade.replay import ReplayResult, replay

if TYPE_CHECKING:
    from cascade.data.traffic import Traffic
    from cascade.session import Funnel


class Backend:
    """Where replay runs (see `cascade.backends`)."""

    name = "backend"

    def start(self) -> None:
        """Connect to what the backend runs on; called before any training."""

    def close(self) -> None:
        """Stop the workers and whatever `start` started."""

    def __enter__(self) -> Backend:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def replay(
        self, funnel: Funnel, traffic: Traffic, *, budgets: Budgets | None = None,
        batch_size: int = 256, oracle: bool = False, oracle_rows: np.ndarray | None = None,
        warmup: int = 1, progress: bool = True, description: str = "replay",
    ) -> ReplayResult:
        """`cascade.replay.replay` of `funnel`'s pipeline (at `budgets`, default the funnel's)
        over `traffic`, with the same arguments and the same result."""
        raise NotImplementedError

    def replay_points(
        self, funnel: Funnel, traffic: Traffic, points: Sequence[Budgets], *,
        batch_size: int = 256, warmup: int = 1, progress: bool = True,
    ) -> Iterator[tuple[int, ReplayResult]]:
        """The replay of `traffic` at each budget point (a sweep), without the oracle pass, as
        (point index, result) pairs in the order they finish."""
        raise NotImplementedError

    def reference_ranks(
        self, funnel: Funnel, traffic: Traffic, *, batch_size: int = 256, progress: bool = True,
    ) -> np.ndarray:
        """(R, T) ranks of `traffic`'s targets under `funnel`'s LSR over the whole catalogue (the
        run's reference), seen items excluded as the run excludes them."""
        ctx = funnel.prepared.ctx
        return lsr_catalogue_ranks(funnel.lsr, traffic, exclude_seen=ctx.exclude_seen,
                                   batch_size=batch_size, device=ctx.device, progress=progress)

    def describe(self) -> dict[str, Any]:
        """What ran the replay, for metrics.json and env.json: backend, workers, nodes."""
        raise NotImplementedError


class InProcessBackend(Backend):
    """Replay in this process, batch after batch (the default)."""

    name = "inprocess"

    def replay(self, funnel, traffic, *, budgets=None, batch_size=256, oracle=False,
               oracle_rows=None, warmup=1, progress=True, description="replay"):
        return replay(funnel.pipeline(budgets), traffic, batch_size=batch_size, oracle=oracle,
                      oracle_rows=oracle_rows, warmup=warmup, progress=progress,
                      description=description)

    def replay_points(self, funnel, traffic, points, *, batch_size=256, warmup=1,
                      progress=True):
        for i, b in enumerate(points):
            yield i, self.replay(funnel, traffic, budgets=b, batch_size=batch_size,
                                 warmup=warmup, progress=progress,
                                 description=f"retrieval {b.retrieval} -> esr {b.esr}")

    def describe(self) -> dict[str, Any]:
        import torch

        return {"backend": self.name, "workers": 1, "concurrent_workers": 1,
                "nodes": [{"hostname": socket.gethostname(), "workers": 1}],
                "threads_per_worker": torch.get_num_threads()}
