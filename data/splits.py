"""Train / validation / test splits of a Dataset into training events and request tables.

- leave-one-out (`loo`), the academic standard: per user, the last event is the test request,
  the second to last the validation request, the rest is training data. Users with fewer than
  3 events cannot give all three and are kept for training only (reported).
- temporal: two global cut times from the time quantiles; training events are those before the
  validation cut, every event in [valid cut, test cut) is a validation request and every event
  at or after the test cut a test request, as a production log replay would see them.

A request is one logged event: (request_id, user, ts, pos, item) where `item` is the ground truth.
Its history is every event of the same user at an earlier `pos` (see `cascade.data.dataset`), so
no split can show a model the future: training events are a per-user prefix of the sequence,
and every request comes strictly after its history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl

from cascade.data.dataset import Dataset, DataError

REQUEST_COLUMNS = ["request_id", "user", "ts", "pos", "item"]


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    kind: Literal["loo", "temporal"] = "loo"
    valid_frac: float = 0.05  # temporal: share of events (by time) in the validation window
    test_frac: float = 0.10  # temporal: share of events (by time) in the test window
    max_requests: int | None = None  # cap on valid and test requests each (seeded sample)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("loo", "temporal"):
            raise ValueError(f"SplitConfig.kind must be 'loo' or 'temporal', got {self.kind!r}")
        for name in ("valid_frac", "test_frac"):
            v = getattr(self, name)
            if not 0.0 < v < 0.5:
                raise ValueError(f"SplitConfig.{name} must be in (0, 0.5), got {v}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"SplitConfig.max_requests must be >= 1, got {self.max_requests}")


@dataclass(frozen=True)
class Split:
    config: SplitConfig
    train: pl.DataFrame  # events (dataset.events rows) models may learn from
    valid: pl.DataFrame  # requests, REQUEST_COLUMNS
    test: pl.DataFrame  # requests, REQUEST_COLUMNS
    report: tuple[str, ...] = field(default=())

    @property
    def kind(self) -> str:
        return self.config.kind

    def key(self) -> str:
        """Identifies the split for caching trained models."""
        c = self.config
        return f"{c.kind}-v{c.valid_frac}-t{c.test_frac}-m{c.max_requests}-s{c.seed}"


def _requests(frame: pl.DataFrame, offset: int) -> pl.DataFrame:
    return frame.select(
        (pl.int_range(pl.len()) + offset).cast(pl.Int64).alias("request_id"),
        "user",
        "ts",
        "pos",
        "item",
    )


def _cap(frame: pl.DataFrame, cfg: SplitConfig, what: str, report: list[str]) -> pl.DataFrame:
    if cfg.max_requests is None or frame.height <= cfg.max_requests:
        return frame
    report.append(f"{what}: sampled {cfg.max_requests} of {frame.height} requests (seed {cfg.seed})")
    return frame.sample(n=cfg.max_requests, seed=cfg.seed).sort(["user", "pos"])


def make_split(dataset: Dataset, config: SplitConfig | None = None) -> Split:
    cfg = config or SplitConfig()
    ev = dataset.events
    if ev.height == 0:
        raise DataError(f"dataset {dataset.name!r} has no events to split")
    report: list[str] = []
    if cfg.kind == "loo":
        ev = ev.with_columns(pl.len().over("user").alias("_n"))
        short = ev.filter(pl.col("_n") < 3)["user"].n_unique()
        if short:
            report.append(
                f"loo: {short} users with fewer than 3 events are used for training only"
            )
        train = ev.filter((pl.col("_n") < 3) | (pl.col("pos") < pl.col("_n") - 2)).drop("_n")
        valid = ev.filter((pl.col("_n") >= 3) & (pl.col("pos") == pl.col("_n") - 2)).drop("_n")
        test = ev.filter((pl.col("_n") >= 3) & (pl.col("pos") == pl.col("_n") - 1)).drop("_n")
    else:
        ts = ev["ts"].to_numpy()
        t_valid = np.quantile(ts, 1.0 - cfg.test_frac - cfg.valid_frac, method="lower")
        t_test = np.quantile(ts, 1.0 - cfg.test_frac, method="lower")
        if not t_valid < t_test:
            raise DataError(
                f"dataset {dataset.name!r}: timestamps too coarse for a temporal split "
                f"(validation and test cuts are both {t_test}); use --split loo"
            )
        # an event at the cut belongs to the later window; histories may span the cut
        train = ev.filter(pl.col("ts") < t_valid)
        if train.height == 0:
            raise DataError(
                f"dataset {dataset.name!r}: the temporal split left no training events (the "
                f"validation cut {t_valid} is the earliest timestamp); lower valid_frac/test_frac "
                f"or use --split loo"
            )
        valid = ev.filter((pl.col("ts") >= t_valid) & (pl.col("ts") < t_test))
        test = ev.filter(pl.col("ts") >= t_test)
        cold = test.filter(pl.col("pos") == 0).height
        report.append(
            f"temporal: train ts < {t_valid}, valid [{t_valid}, {t_test}), test ts >= {t_test}; "
            f"{cold} test requests come from users with no earlier event (cold start)"
        )
    valid = _cap(valid, cfg, "valid", report)
    test = _cap(test, cfg, "test", report)
    if test.height == 0:
        raise DataError(f"dataset {dataset.name!r}: the {cfg.kind} split left no test requests")
    return Split(
        config=cfg,
        train=train,
        valid=_requests(valid, 0),
        test=_requests(test, valid.height),
        report=tuple(report),
    )


def training_requests(split: Split, *, min_pos: int = 1) -> pl.DataFrame:
    """Every training event with at least `min_pos` earlier events, as a request table: the
    examples next-item models learn from."""
    return _requests(split.train.filter(pl.col("pos") >= min_pos), 0)
