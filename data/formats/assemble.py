"""Shared assembly: raw events and raw feature rows -> the one `Dataset` form.

`assemble` is the last step of every loader: it filters exact duplicate events and users too
short to give a request (reported with counts, or errors with `strict=True`), maps raw ids to
contiguous ints in sorted raw-id order, and encodes feature tables (codes start at 1 in the
order of `vocab[name][1:]`; 0 is unknown / padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl

from cascade.data.dataset import Dataset, DataError, FeatureTable, finalize_events
from cascade.data.formats.text import more, shown, where

ACTION_NOTE = "action from rating: >= 4 positive, <= 2 negative, otherwise neutral"


@dataclass
class RawFeatures:
    """Features of one entity kind before encoding: `frame` has `id` (raw id), optionally
    `_line`, and one column per feature (categorical: any scalar; multi: List(String))."""

    frame: pl.DataFrame
    file: str
    categorical: list[str] = field(default_factory=list)
    multi: list[str] = field(default_factory=list)
    vocab: dict[str, list[str]] = field(default_factory=dict)  # fixed code order, if any


def id_map(col: pl.Series) -> pl.DataFrame:
    """Sorted unique raw ids -> contiguous `idx`."""
    return (
        col.unique()
        .sort()
        .to_frame("id")
        .with_row_index("idx")
        .with_columns(pl.col("idx").cast(pl.Int64))
    )


def encode_features(
    raw: RawFeatures | None, ids: pl.DataFrame, what: str, report: list[str]
) -> FeatureTable:
    n = ids.height
    if raw is None:
        return FeatureTable(n=n)
    f = raw.frame.with_columns(pl.col("id").cast(pl.String))
    dup = f.with_row_index("_r").filter(pl.col("id").is_duplicated())
    if dup.height:
        first = dup.filter(pl.col("id") == dup["id"][0])
        rows = [int(r) for r in first["_r"]]
        again, first_at = where(f, raw.file, rows[1]), where(f, raw.file, rows[0])
        raise DataError(
            f"{again}: {what} id {shown(dup['id'][0])} is listed again (first at "
            f"{first_at.split(', ')[-1]}); expected one row per {what}"
        )
    joined = (
        ids.with_columns(pl.col("id").cast(pl.String))
        .join(
            f.with_columns(pl.lit(True).alias("_has")), on="id", how="left", maintain_order="left"
        )
        .sort("idx")
    )
    matched = int(joined["_has"].sum() or 0)
    if matched < n:
        report.append(
            f"{n - matched} of {n} {what}s have no row in {raw.file}: their features are "
            "unknown (code 0)"
        )
    if f.height > matched:
        report.append(
            f"{f.height - matched} {what}s listed in {raw.file} have no events and are left out"
        )
    categorical: dict[str, np.ndarray] = {}
    multi: dict[str, np.ndarray] = {}
    cardinality: dict[str, int] = {}
    vocab: dict[str, list[str]] = {}
    for c in raw.categorical:
        values = raw.vocab.get(c)
        if values is None:
            values = joined[c].drop_nulls().unique().sort().cast(pl.String).to_list()
        lookup = {v: i + 1 for i, v in enumerate(values)}
        codes = joined[c].cast(pl.String).replace_strict(lookup, default=0, return_dtype=pl.Int64)
        categorical[c] = codes.to_numpy().astype(np.int64)
        cardinality[c] = len(values) + 1
        vocab[c] = ["<unknown>", *values]
    for c in raw.multi:
        long = (
            joined.select("idx", pl.col(c).alias("v"))
            .explode("v")
            .filter(pl.col("v").is_not_null() & (pl.col("v") != ""))
            .unique(["idx", "v"], maintain_order=True)
        )
        values = raw.vocab.get(c)
        if values is None:
            values = long["v"].unique().sort().to_list()
        lookup = {v: i + 1 for i, v in enumerate(values)}
        long = long.with_columns(
            pl.col("v").replace_strict(lookup, default=0, return_dtype=pl.Int64).alias("code"),
            pl.int_range(pl.len()).over("idx").alias("slot"),
        )
        width = max(1, int(long["slot"].max() + 1) if long.height else 1)
        codes = np.zeros((n, width), dtype=np.int64)
        codes[long["idx"].to_numpy(), long["slot"].to_numpy()] = long["code"].to_numpy()
        multi[c] = codes
        cardinality[c] = len(values) + 1
        vocab[c] = ["<pad>", *values]
    return FeatureTable(
        n=n, categorical=categorical, multi=multi, cardinality=cardinality, vocab=vocab
    )


def assemble(
    *,
    name: str,
    source: str,
    file: str,
    events: pl.DataFrame,
    items: RawFeatures | None = None,
    users: RawFeatures | None = None,
    category_feature: str | None = None,
    report: list[str] | None = None,
    strict: bool = False,
    min_user_events: int = 2,
    extra_small_users: int = 0,
) -> Dataset:
    """Filter (duplicates, short users), map ids, encode features, build the Dataset.

    `events`: columns user, item, ts (raw ids), optional rating / action, and `_line` (or
    rows are numbered). `extra_small_users`: users the format listed without any event.
    """
    if min_user_events < 1:
        raise ValueError(f"min_user_events must be >= 1, got {min_user_events}")
    report = list(report or [])
    if "_line" not in events.columns:
        events = events.with_row_index("_row", offset=1)
    where = "line" if "_line" in events.columns else "row"
    loc = "_line" if where == "line" else "_row"

    # exact duplicates: same user, item and timestamp; the first one in the file is kept
    first = pl.struct("user", "item", "ts").is_first_distinct()
    n_dup = events.height - int(events.select(first.sum()).item())
    if n_dup:
        if strict:
            d = events.filter(~first).row(0, named=True)
            orig = events.filter(
                (pl.col("user") == d["user"])
                & (pl.col("item") == d["item"])
                & (pl.col("ts") == d["ts"])
            )[loc][0]
            raise DataError(
                f"{file}, {where} {d[loc]}: duplicate event (user {shown(d['user'])}, item "
                f"{shown(d['item'])}, timestamp {d['ts']}) already on {where} {orig}"
                + more(n_dup - 1, "duplicate")
                + "; expected one event per (user, item, timestamp)"
            )
        events = events.filter(first)
        report.append(
            f"removed {n_dup} duplicate events (same user, item and timestamp as an earlier "
            f"{where} of {file}; the first was kept)"
        )

    # users too short to give a request with a history
    counts = events.group_by("user").len()
    short = counts.filter(pl.col("len") < min_user_events)
    n_short = short.height + extra_small_users
    if n_short:
        if strict:
            if short.height:
                u, c = short.sort("user").row(0)
                first_user = f"user {shown(u)} has {c} event(s)"
            else:
                first_user = f"{extra_small_users} user(s) have no events"
            raise DataError(
                f"{file}: {first_user}; expected at least {min_user_events} per user"
                + more(n_short - 1, "user")
            )
        n_ev = int(short["len"].sum() or 0)
        events = events.filter(~pl.col("user").is_in(short["user"].implode()))
        report.append(
            f"removed {n_short} users with fewer than {min_user_events} events ({n_ev} events): "
            "a user needs a history before a request"
        )
    if events.height == 0:
        raise DataError(f"{file}: no user has at least {min_user_events} events; nothing to load")

    user_ids = id_map(events["user"])
    item_ids = id_map(events["item"])
    mapped = (
        events.join(
            user_ids.rename({"id": "user", "idx": "_u"}),
            on="user",
            how="left",
            maintain_order="left",
        )
        .join(
            item_ids.rename({"id": "item", "idx": "_i"}),
            on="item",
            how="left",
            maintain_order="left",
        )
        .select(
            pl.col("_u").alias("user"),
            pl.col("_i").alias("item"),
            "ts",
            *[c for c in ("rating", "action") if c in events.columns],
        )
    )
    ev = finalize_events(mapped, n_users=user_ids.height)
    item_table = encode_features(items, item_ids, "item", report)
    user_table = encode_features(users, user_ids, "user", report)
    if category_feature is not None and category_feature in item_table.categorical:
        # HMA matches on a multi-valued feature: a single-valued category becomes width 1
        cat = dict(item_table.categorical)
        codes = cat.pop(category_feature)
        item_table = replace(item_table, categorical=cat).with_multi(
            category_feature, codes[:, None], item_table.cardinality[category_feature]
        )
    if category_feature is not None and category_feature not in item_table.multi:
        raise DataError(
            f"category_feature {category_feature!r} is not an item feature of {file} "
            f"(item features: {item_table.names or 'none'})"
        )
    return Dataset(
        name=name,
        events=ev,
        n_users=user_ids.height,
        n_items=item_ids.height,
        items=item_table,
        users=user_table,
        raw_user_ids=user_ids["id"].to_numpy(),
        raw_item_ids=item_ids["id"].to_numpy(),
        report=tuple(report),
        category_feature=category_feature,
        source=source,
    )
