"""Replay: run a `Pipeline` over a `Traffic` in batches and record what happened.

For every request and ESR variant it records where each ground-truth item stands after each
stage (its 0-based rank in that stage's output, -1 once dropped) and, per batch, each stage's
latency. The first `warmup` batches run once, untimed, before the timed pass (first calls pay
for lazy initialisation, allocator growth and kernel compilation, which a serving system would
not); the timed pass then covers every batch, those included.
The shared retrieval time is recorded under every variant, so each variant's funnel latency and
throughput include it.

With `oracle=True` the LSR also scores every retrieved candidate: its top `final` over the whole
retrieved set is what the funnel would return without the ESR's cut, which gives the funnel's
loss and the ESR-LSR consistency (overlap of the ESR's top-K with that list, K = final). That
pass costs more than the funnel's own LSR passes, so it can run on a sample of the requests
(`oracle_rows`; `evenly_spaced_rows` picks the same requests the full-catalogue reference
scores).

Progress is a bar on a terminal and a plain line every few seconds elsewhere
(`cascade.util.progress`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import polars as pl
import torch

from cascade.data.traffic import Traffic
from cascade.metrics import final_values
from cascade.pipeline import Pipeline
from cascade.util.progress import Progress
from cascade.util.ranking import overlap_at_k, ranks_from_scores, recall, target_ranks

LATENCY_SCHEMA = {
    "variant": pl.String,
    "stage": pl.String,
    "batch": pl.Int64,
    "batch_size": pl.Int64,
    "ms": pl.Float64,
}


@dataclass(frozen=True)
class ReplayResult:
    """Arrays are in traffic order; ranks are (R, T) with -1 for dropped or padded targets."""

    variants: tuple[str, ...]
    request_id: np.ndarray  # (R,) int64
    user: np.ndarray  # (R,) int64
    hist_len: np.ndarray  # (R,) int64, every earlier event of the user (not truncated)
    targets: np.ndarray  # (R, T) int64, -1 padded
    rank_retrieval: np.ndarray  # (R, T), shared by all variants
    rank_esr: dict[str, np.ndarray]  # variant -> (R, T)
    rank_lsr: dict[str, np.ndarray]  # variant -> (R, T)
    rank_oracle: np.ndarray | None  # (R, T): rank in the LSR's top final over all retrieved
    consistency: dict[str, np.ndarray] | None  # variant -> (R,) overlap@final of ESR and LSR
    oracle_rows: np.ndarray | None  # (R,) bool: the requests the oracle pass scored
    latency: pl.DataFrame  # LATENCY_SCHEMA, one row per (variant, stage, batch)
    final_k: int
    seconds: float  # wall time of the timed pass

    @property
    def valid(self) -> np.ndarray:
        return self.targets >= 0

    def requests_frame(self) -> pl.DataFrame:
        """One row per (variant, request): ranks of the first target after each stage (null once
        dropped), the fraction of targets after each stage, and every registered final metric
        (`cascade.metrics.final_metrics`) of the final list, and of the oracle list as
        `oracle_<key>`."""
        v = self.valid
        frames = []
        for name in self.variants:
            cols = {
                "variant": pl.Series([name] * len(self.user), dtype=pl.String),
                "request_id": self.request_id,
                "user": self.user,
                "target": self.targets[:, 0],
                "n_targets": v.sum(1).astype(np.int64),
                "hist_len": self.hist_len,
            }
            for stage, r in (
                ("retrieval", self.rank_retrieval),
                ("esr", self.rank_esr[name]),
                ("lsr", self.rank_lsr[name]),
            ):
                cols[f"rank_{stage}"] = _nullable(r[:, 0])
                cols[f"recall_{stage}"] = recall(r, v)
            cols.update(final_values(self.rank_lsr[name], v, self.final_k))
            if self.rank_oracle is not None:
                rows = self.oracle_rows
                cols["oracle_sampled"] = rows
                cols["rank_oracle"] = _nullable(np.where(rows, self.rank_oracle[:, 0], -1))
                for key, x in final_values(self.rank_oracle, v, self.final_k, "oracle_").items():
                    cols[key] = np.where(rows, x, np.nan)
                cols["consistency"] = np.where(rows, self.consistency[name], np.nan)
            frames.append(pl.DataFrame(cols))
        return pl.concat(frames)


def _rows(oracle_rows: np.ndarray | None, sl: slice, device) -> torch.Tensor | None:
    """The batch's oracle rows as indices into the batch (None: no oracle pass)."""
    if oracle_rows is None:
        return None
    return torch.as_tensor(np.flatnonzero(oracle_rows[sl]), dtype=torch.int64, device=device)


def evenly_spaced_rows(n_total: int, n: int) -> np.ndarray:
    """(n_total,) bool: `n` evenly spaced rows (all when n is 0 or >= n_total). The
    full-catalogue reference and the oracle pass use it, so equal counts pick the same
    requests."""
    out = np.zeros(n_total, bool)
    if n <= 0 or n >= n_total:
        out[:] = True
    else:
        out[np.unique(np.linspace(0, n_total - 1, n).round().astype(np.int64))] = True
    return out


def _nullable(rank: np.ndarray) -> pl.Series:
    """Ranks as an Int64 series with null where the item did not survive (-1)."""
    s = pl.Series(np.asarray(rank, dtype=np.int64))
    return pl.select(pl.when(s >= 0).then(s)).to_series()



def oracle_mask(oracle: bool, oracle_rows: np.ndarray | None, n: int) -> np.ndarray | None:
    """The (n,) bool rows the oracle pass scores (all when `oracle_rows` is None), checked;
    None without an oracle pass."""
    if not oracle:
        return None
    rows = np.ones(n, bool) if oracle_rows is None else np.asarray(oracle_rows, bool)
    if rows.shape != (n,):
        raise ValueError(f"oracle_rows must be ({n},) booleans, got {rows.shape}")
    return rows


def blank_result(traffic: Traffic, names: tuple[str, ...], oracle_rows: np.ndarray | None,
                 final_k: int) -> ReplayResult:
    """A result for `traffic` with every rank -1 (to be filled in place), the oracle's arrays
    only when `oracle_rows` is given, no latency rows and no time yet."""
    R, T = traffic.targets.shape
    oracle = oracle_rows is not None

    def blank() -> np.ndarray:
        return np.full((R, T), -1, np.int64)

    return ReplayResult(
        variants=names, request_id=traffic.request_id.copy(), user=traffic.user.copy(),
        hist_len=traffic.pos.copy(), targets=traffic.targets.copy(), rank_retrieval=blank(),
        rank_esr={n: blank() for n in names}, rank_lsr={n: blank() for n in names},
        rank_oracle=blank() if oracle else None,
        consistency={n: np.zeros(R, np.float64) for n in names} if oracle else None,
        oracle_rows=oracle_rows, latency=pl.DataFrame(schema=LATENCY_SCHEMA), final_k=final_k,
        seconds=0.0,
    )

def replay(
    pipeline: Pipeline,
    traffic: Traffic,
    *,
    batch_size: int = 256,
    oracle: bool = False,
    oracle_rows: np.ndarray | None = None,
    warmup: int = 1,
    progress: bool = True,
    description: str = "replay",
) -> ReplayResult:
    """Run `pipeline` over every request of `traffic` (see module docstring). `oracle_rows`:
    (R,) bool, the requests the oracle pass scores (all when None)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(traffic) == 0:
        raise ValueError("replay: the traffic has no requests")
    device = pipeline.device
    n_items = traffic.dataset.n_items
    names = tuple(pipeline.esrs)
    R = len(traffic)
    oracle_rows = oracle_mask(oracle, oracle_rows, R)
    res = blank_result(traffic, names, oracle_rows, pipeline.budgets.final)
    rank_ret, rank_esr, rank_lsr = res.rank_retrieval, res.rank_esr, res.rank_lsr
    rank_orc, cons = res.rank_oracle, res.consistency
    rows: dict[str, list] = {c: [] for c in LATENCY_SCHEMA}

    def add(variant: str, stage: str, b: int, size: int, ns: int) -> None:
        rows["variant"].append(variant)
        rows["stage"].append(stage)
        rows["batch"].append(b)
        rows["batch_size"].append(size)
        rows["ms"].append(ns / 1e6)

    n_batches = traffic.n_batches(batch_size)
    for w in range(min(warmup, n_batches)):  # untimed: lazy init, allocator, compilation
        sl = slice(w * batch_size, (w + 1) * batch_size)
        pipeline.run_batch(traffic.batch(sl).to(device), oracle=oracle, n_items=n_items,
                           oracle_rows=_rows(oracle_rows, sl, device))

    import time

    t0 = time.perf_counter()
    with Progress(description, total=R, unit="requests", enabled=progress) as bar:
        for b in range(n_batches):
            sl = slice(b * batch_size, min((b + 1) * batch_size, R))
            batch = traffic.batch(sl).to(device)
            batch_oracle = _rows(oracle_rows, sl, device)
            out = pipeline.run_batch(batch, oracle=oracle, n_items=n_items,
                                     oracle_rows=batch_oracle)
            tg = traffic.targets[sl]
            size = len(batch)
            rank_ret[sl] = target_ranks(out.retrieved.cpu().numpy(), tg)
            oracle_np, picked = None, None
            if oracle and out.oracle_ids is not None:
                picked = np.arange(sl.start, sl.stop)[oracle_rows[sl]]
                oracle_np = out.oracle_ids.cpu().numpy()
                rank_orc[picked] = target_ranks(oracle_np, traffic.targets[picked])
            for name in names:
                vo = out.variants[name]
                esr_np = vo.esr_ids.cpu().numpy()
                rank_esr[name][sl] = target_ranks(esr_np, tg)
                rank_lsr[name][sl] = target_ranks(vo.final_ids.cpu().numpy(), tg)
                if oracle_np is not None:
                    cons[name][picked] = overlap_at_k(
                        esr_np[picked - sl.start], oracle_np, pipeline.budgets.final
                    )
                add(name, "retrieval", b, size, out.retrieval_ns)
                add(name, "esr", b, size, vo.esr_ns)
                add(name, "lsr", b, size, vo.lsr_ns)
            bar.advance(size)
    return replace(res, latency=pl.DataFrame(rows, schema=LATENCY_SCHEMA),
                   seconds=time.perf_counter() - t0)


@torch.no_grad()
def full_catalogue_ranks(
    score_batch,
    traffic: Traffic,
    *,
    batch_size: int = 256,
    exclude_seen: bool = True,
    device: torch.device | str = "cpu",
    progress: bool = False,
    description: str = "full catalogue",
) -> np.ndarray:
    """(R, T) rank of each target among every catalogue item under `score_batch(batch) ->
    (B, n_items)` scores, items in the request's (max_len-truncated) history excluded when
    `exclude_seen` (as the retrieval stage does). Ties count against the target (see
    `cascade.metrics.ranks_from_scores`); an excluded target gets -1."""
    R, T = traffic.targets.shape
    out = np.full((R, T), -1, np.int64)
    with Progress(description, total=R, unit="requests", enabled=progress) as bar:
        for start in range(0, R, batch_size):
            sl = slice(start, min(start + batch_size, R))
            batch = traffic.batch(sl).to(device)
            scores = score_batch(batch).float()  # (B, n_items)
            if exclude_seen:
                scores = mask_seen(scores, batch)
            out[sl] = ranks_from_scores(scores.cpu().numpy(), traffic.targets[sl])
            bar.advance(len(batch))
    return out


def mask_seen(scores: torch.Tensor, batch) -> torch.Tensor:
    """A copy of `scores` with the items in each request's history at -inf (a copy: a user's
    `score_all` may return a tensor it still holds)."""
    r, c = batch.hist_mask.nonzero(as_tuple=True)
    out = scores.clone()
    out[r, batch.hist_items[r, c]] = float("-inf")
    return out
