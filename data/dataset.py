"""The one in-memory form every loader and the synthetic generator produce.

A `Dataset` is an interaction log with contiguous integer ids plus integer-coded feature tables
for items and users. Everything downstream (splits, traffic, stages) reads this form only.

Conventions (relied upon across the package):
- users are 0..n_users-1, items are 0..n_items-1; `raw_user_ids[i]` / `raw_item_ids[i]` map back.
- `events` is sorted by (user, ts, original order) and carries `pos`, the 0-based position of the
  event in its user's sequence. "Before" always means "earlier in that order": events sharing a
  timestamp (common in MovieLens) are ordered as the file listed them.
- feature codes start at 1; code 0 means unknown (categorical) or padding (multi-valued), so every
  feature can go straight into an `nn.Embedding(cardinality, d, padding_idx=0)`.
- `action` is +1 positive, 0 neutral, -1 negative (see `cascade.data.derive.action_from_rating`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import polars as pl

EVENT_SCHEMA: dict[str, pl.DataType] = {
    "user": pl.Int64,
    "item": pl.Int64,
    "ts": pl.Int64,  # seconds (or any monotone integer clock)
    "rating": pl.Float32,  # null when the log has none
    "action": pl.Int8,  # +1 positive, 0 neutral, -1 negative
    "pos": pl.Int64,  # position in the user's time-ordered sequence
}


class DataError(ValueError):
    """Bad input data. The message names the file, line or column and what was expected."""


@dataclass(frozen=True)
class FeatureTable:
    """Integer-coded features of one entity kind (users or items), indexed by contiguous id."""

    n: int
    categorical: Mapping[str, np.ndarray] = field(default_factory=dict)  # name -> (n,) int64
    multi: Mapping[str, np.ndarray] = field(default_factory=dict)  # name -> (n, L) int64, 0-padded
    cardinality: Mapping[str, int] = field(default_factory=dict)  # name -> table size incl. 0
    vocab: Mapping[str, list[str]] = field(default_factory=dict)  # name -> raw value per code

    def __post_init__(self) -> None:
        for name, arr in {**self.categorical, **self.multi}.items():
            if arr.shape[0] != self.n:
                raise DataError(f"feature {name!r} has {arr.shape[0]} rows, expected {self.n}")
            if name not in self.cardinality:
                raise DataError(f"feature {name!r} has no cardinality")
            if arr.size and (arr.min() < 0 or arr.max() >= self.cardinality[name]):
                raise DataError(
                    f"feature {name!r} has codes outside [0, {self.cardinality[name]})"
                )

    @property
    def names(self) -> list[str]:
        return [*self.categorical, *self.multi]

    def categorical_matrix(self) -> np.ndarray:
        """(n, F) int64 matrix of the categorical features in `categorical` order (F may be 0)."""
        if not self.categorical:
            return np.zeros((self.n, 0), dtype=np.int64)
        return np.stack([np.asarray(v, dtype=np.int64) for v in self.categorical.values()], 1)

    def with_multi(self, name: str, codes: np.ndarray, cardinality: int) -> "FeatureTable":
        return FeatureTable(
            n=self.n,
            categorical=dict(self.categorical),
            multi={**self.multi, name: codes},
            cardinality={**self.cardinality, name: cardinality},
            vocab=dict(self.vocab),
        )


@dataclass(frozen=True)
class Dataset:
    """An interaction log with contiguous ids and feature tables (see module docstring)."""

    name: str
    events: pl.DataFrame  # EVENT_SCHEMA, sorted by (user, pos)
    n_users: int
    n_items: int
    items: FeatureTable
    users: FeatureTable
    raw_user_ids: np.ndarray  # (n_users,) raw id per contiguous id (str or int)
    raw_item_ids: np.ndarray  # (n_items,)
    report: tuple[str, ...] = ()  # what the loader filtered or derived, one line each
    category_feature: str | None = None  # multi-valued item feature HMA matches on
    source: str = ""  # file or directory it came from, or "synthetic(...)"
    truth: Any = None  # synthetic data only: the ground-truth affinity (cascade.data.synthetic)

    def __post_init__(self) -> None:
        missing = [c for c in EVENT_SCHEMA if c not in self.events.columns]
        if missing:
            raise DataError(f"dataset {self.name!r}: events lack columns {missing}")
        if self.items.n != self.n_items or self.users.n != self.n_users:
            raise DataError(f"dataset {self.name!r}: feature tables do not match id counts")
        if self.category_feature is not None and self.category_feature not in self.items.multi:
            raise DataError(
                f"dataset {self.name!r}: category_feature {self.category_feature!r} is not a "
                f"multi-valued item feature (have {list(self.items.multi)})"
            )

    @property
    def n_events(self) -> int:
        return self.events.height

    def fingerprint(self) -> str:
        """Stable hash of the events and features: the key trained models are cached under."""
        h = hashlib.sha256(self.name.encode())
        for col in ("user", "item", "ts", "action"):
            h.update(self.events[col].to_numpy().tobytes())
        for table in (self.items, self.users):
            for name in sorted(table.names):
                h.update(name.encode())
                arr = table.categorical.get(name)
                arr = table.multi[name] if arr is None else arr
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def user_offsets(self) -> np.ndarray:
        """(n_users + 1,) int64: events of user u are rows offsets[u]:offsets[u+1] of `events`."""
        counts = np.bincount(self.events["user"].to_numpy(), minlength=self.n_users)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def item_popularity(self, events: pl.DataFrame | None = None) -> np.ndarray:
        """(n_items,) int64 event count per item (in `events`, default all)."""
        ev = self.events if events is None else events
        return np.bincount(ev["item"].to_numpy(), minlength=self.n_items).astype(np.int64)


def finalize_events(
    frame: pl.DataFrame, *, n_users: int | None = None
) -> pl.DataFrame:
    """Sort events by (user, ts, file order), add `pos`, and cast to EVENT_SCHEMA.

    `frame` needs user, item, ts (ints, contiguous ids) and optionally rating and action.
    """
    lf = frame.lazy().with_row_index("_order")
    if "rating" not in frame.columns:
        lf = lf.with_columns(pl.lit(None, dtype=pl.Float32).alias("rating"))
    if "action" not in frame.columns:
        from cascade.data.derive import action_expr

        lf = lf.with_columns(action_expr(pl.col("rating")).alias("action"))
    out = lf.sort(["user", "ts", "_order"]).collect()
    # position within the user's run of rows: row index minus the index of the user's first row
    # (numpy: a windowed int_range().over("user") is several times slower on millions of rows)
    users = out["user"].to_numpy()
    row = np.arange(users.shape[0], dtype=np.int64)
    first = np.zeros_like(row)
    if users.shape[0]:
        starts = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]]))
        first = np.repeat(starts, np.diff(np.concatenate([starts, [users.shape[0]]])))
    out = out.with_columns(pl.Series("pos", row - first))
    return out.select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()])
