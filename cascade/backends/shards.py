"""Request shards: how a replay is cut into pieces that run anywhere and merged back into the one
`ReplayResult` an in-process replay would give.

A shard is a contiguous run of whole replay batches (its bounds are multiples of the batch size),
so every batch holds the same requests as in-process replay and the stages compute exactly the
same numbers: per-request ranks do not depend on how the traffic was sharded. A shard travels as
its request table (`request_table`, a few int columns); the worker rebuilds its `Traffic` over
its own copy of the dataset.

`merge_shards` puts the shards' ranks back in traffic order and renumbers their latency rows to
the global batch index. It is keyed by shard index, so a shard replayed twice (a worker that died
and was retried) is counted once: the last result wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from cascade.data.traffic import Traffic
from cascade.replay import LATENCY_SCHEMA, ReplayResult, blank_result


def shard_bounds(n_requests: int, batch_size: int, n_shards: int) -> list[tuple[int, int]]:
    """[start, stop) request bounds of at most `n_shards` shards of whole batches, in traffic
    order, as even in batches as they can be."""
    if n_requests < 1:
        raise ValueError("replay: the traffic has no requests")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_batches = -(-n_requests // batch_size)
    n = max(1, min(int(n_shards), n_batches))
    edges = np.linspace(0, n_batches, n + 1).round().astype(np.int64)
    return [(int(a) * batch_size, min(int(b) * batch_size, n_requests))
            for a, b in zip(edges[:-1], edges[1:]) if b > a]


def request_table(traffic: Traffic, start: int, stop: int) -> pl.DataFrame:
    """Requests [start, stop) of `traffic` as the request table `Traffic` is built from (every
    target kept: several-target traffic gets its `targets` lists)."""
    sl = slice(start, stop)
    cols = {
        "request_id": traffic.request_id[sl],
        "user": traffic.user[sl],
        "ts": traffic.ts[sl],
        "pos": traffic.pos[sl],
        "item": traffic.targets[sl, 0],
    }
    if traffic.targets.shape[1] > 1:
        cols["targets"] = [row[row >= 0].tolist() for row in traffic.targets[sl]]
    return pl.DataFrame(cols)


def shard_traffic(traffic: Traffic, start: int, stop: int) -> Traffic:
    """Requests [start, stop) as a `Traffic` of their own (same dataset and history length)."""
    return Traffic(traffic.dataset, request_table(traffic, start, stop), max_len=traffic.max_len)


def _place(full: np.ndarray, part: np.ndarray, start: int) -> None:
    """Rows of a shard into the traffic-wide array; a shard may hold fewer target columns (its
    requests have fewer targets), the rest stay -1."""
    full[start:start + part.shape[0], : part.shape[1]] = part


def merge_shards(
    parts: Mapping[int, ReplayResult],
    bounds: Sequence[tuple[int, int]],
    traffic: Traffic,
    *,
    batch_size: int,
    oracle_rows: np.ndarray | None,
    seconds: float,
) -> ReplayResult:
    """One `ReplayResult` in traffic order from the shards' results (shard index -> result of
    the requests `bounds[index]`). `oracle_rows`: the traffic-wide rows the oracle pass scored
    (None: no oracle pass); `seconds`: the wall time of the whole distributed pass."""
    missing = [i for i in range(len(bounds)) if i not in parts]
    if missing:
        raise ValueError(f"replay: shard(s) {missing} have no result")
    first = parts[0]
    names = first.variants
    oracle = first.rank_oracle is not None
    res = blank_result(traffic, names, oracle_rows if oracle else None, first.final_k)
    rank_ret, rank_esr, rank_lsr = res.rank_retrieval, res.rank_esr, res.rank_lsr
    rank_orc, cons = res.rank_oracle, res.consistency
    latency = []
    for i, (start, stop) in enumerate(bounds):
        p = parts[i]
        if p.variants != names or len(p.user) != stop - start:
            raise ValueError(f"replay: shard {i} (requests {start}..{stop - 1}) returned "
                             f"{len(p.user)} requests of variants {p.variants}, expected "
                             f"{stop - start} of {names}")
        if not np.array_equal(p.request_id, traffic.request_id[start:stop]):
            raise ValueError(f"replay: shard {i} (requests {start}..{stop - 1}) replayed other "
                             "requests than the driver's traffic")
        _place(rank_ret, p.rank_retrieval, start)
        for n in names:
            _place(rank_esr[n], p.rank_esr[n], start)
            _place(rank_lsr[n], p.rank_lsr[n], start)
            if oracle:
                cons[n][start:stop] = p.consistency[n]
        if oracle:
            _place(rank_orc, p.rank_oracle, start)
        latency.append(p.latency.with_columns(pl.col("batch") + start // batch_size))
    return dataclasses.replace(
        res, latency=pl.concat(latency).cast(LATENCY_SCHEMA), seconds=seconds)
