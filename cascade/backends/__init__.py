"""Execution backends: where a fitted funnel replays its traffic.

- `InProcessBackend` (the default, `backend = "inprocess"`): `cascade.replay.replay` in this
  process, exactly as before backends existed; needs nothing beyond the base install.
- `RayBackend` (`backend = "ray"`, `pip install -e ".[ray]"`, in `ray_backend.py`): the traffic is
  cut into request shards of whole batches (`shards.py`), Ray actors each holding the fitted
  stages (loaded once per worker from the checkpoint cache, never trained) replay them through
  the same `Pipeline`, and the driver merges their ranks and latency rows into one
  `ReplayResult` in traffic order. Ray is imported only when this backend is chosen.

Results do not depend on the backend: the same requests meet the same stages in the same batches,
so ranks, metrics and paired intervals are identical; only latency differs (measured inside each
worker, so under concurrency it is per worker).

A backend is used as a context manager: `start()` runs on entry, before any training (an
unreachable Ray address fails there), and `close()` on exit stops what it started (the workers,
a local Ray), also on Ctrl-C or an error.

    with make_backend(cfg) as backend:
        funnel = fit_funnel(cfg)
        result = backend.replay(funnel, funnel.prepared.test, batch_size=256)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cascade.backends.base import Backend, InProcessBackend

if TYPE_CHECKING:
    from cascade.config import RunConfig

__all__ = ["Backend", "InProcessBackend", "make_backend"]


def make_backend(cfg: RunConfig) -> Backend:
    """The backend `cfg` asks for (`backend`, `ray_address`, `workers`)."""
    if cfg.backend == "inprocess":
        return InProcessBackend()
    if cfg.backend == "ray":
        try:
            import ray  # noqa: F401 - only to say how to get it
        except ImportError:
            raise ValueError(
                "backend 'ray' needs Ray: pip install -e \".[ray]\" (or pip install 'ray>=2.9')"
            ) from None
        from cascade.backends.ray_backend import RayBackend

        return RayBackend(address=cfg.ray_address, workers=cfg.workers)
    raise ValueError(f"unknown backend {cfg.backend!r}; known: inprocess, ray")
