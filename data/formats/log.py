"""[log] A generic interaction log: CSV (with a header) or Parquet, with feature tables.

Configurable user, item and time columns, an optional rating or binary label column and
optional item and user feature tables (CSV or Parquet, keyed by the same column name as the
log). Ids may be integers or strings. Feature columns: strings, integers and booleans become
categorical codes; list columns and string columns holding `|`-joined values become
multi-valued; float columns are left out (reported). Timestamps may be integers, floats
(floored; finite and below 2^63 in magnitude), dates/datetimes (-> epoch seconds) or strings
holding any of these (a float among integers is floored too). A rating or label must be a
finite number; integer ids and timestamps must fit a signed 64-bit integer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from cascade.data.dataset import Dataset, DataError
from cascade.data.formats import register_format
from cascade.data.formats.assemble import ACTION_NOTE, RawFeatures, assemble
from cascade.data.formats.text import (
    FLOAT_TYPES,
    INT_TYPES,
    cast_column,
    check_readable,
    csv_sep,
    locate,
    more,
    read_csv_strings,
    shown,
    shown_names,
)


def _is_parquet(p: Path) -> bool:
    return p.suffix.lower() in (".parquet", ".pq")


def _ids(df: pl.DataFrame, col: str, file: str) -> pl.Series:
    """Id column: integers stay integers, text ids that all parse as integers become integers,
    other text stays text. Nulls / empty values are errors."""
    s = df[col]
    if s.dtype in INT_TYPES:
        if s.null_count():
            where, n = locate(df, file, s.is_null())
            raise DataError(
                f"{where}, column {col!r}: expected an id, found an empty value"
                + more(n - 1, "value")
            )
        _below_2_63(df, col, file, "an id")
        return s.cast(pl.Int64)
    if s.dtype in (pl.String, pl.Categorical, pl.Enum):
        s = s.cast(pl.String).str.strip_chars()
        empty = s.is_null() | (s == "")
        if empty.any():
            where, n = locate(df, file, empty)
            raise DataError(
                f"{where}, column {col!r}: expected an id, found an empty value"
                + more(n - 1, "value")
            )
        as_int = s.cast(pl.Int64, strict=False)
        return as_int if as_int.null_count() == 0 else s
    raise DataError(f"{file}, column {col!r}: expected integer or text ids, found type {s.dtype}")


def _below_2_63(df: pl.DataFrame, col: str, file: str, what: str) -> None:
    """Unsigned 64-bit values from 2^63 up do not fit the Int64 every id and clock is kept in."""
    if df[col].dtype == pl.UInt64:
        big = (df[col] >= 2**63).fill_null(False)
        if big.any():
            at, n = locate(df, file, big)
            raise DataError(
                f"{at}, column {col!r}: expected {what} below 2^63 (a signed 64-bit integer), "
                f"found {df[col].filter(big)[0]}" + more(n - 1, "value")
                + "; store larger ids as text"
            )


def _timestamps(df: pl.DataFrame, col: str, file: str, report: list[str]) -> pl.Series:
    """Timestamps -> Int64: integers; floats (floored); dates/datetimes (epoch seconds); or text
    holding one of these: integers, else numbers (integers among them are numbers too) when the
    first value is one, else dates/times. The first value that fails is named; a float must be
    finite and below 2^63 in magnitude."""
    s = df[col]
    kind = None
    if s.dtype in INT_TYPES:
        _below_2_63(df, col, file, "a timestamp")
        out = s.cast(pl.Int64)
    elif s.dtype in FLOAT_TYPES:
        out, kind = s.cast(pl.Float64), "float"
    elif s.dtype in (pl.Date,) or isinstance(s.dtype, pl.Datetime):
        out = s.dt.epoch("s")
    elif s.dtype == pl.String:
        s = s.str.strip_chars()
        first = s.drop_nulls()
        first = first[0] if first.len() else ""
        as_int = s.cast(pl.Int64, strict=False)
        if as_int.null_count() == s.null_count():
            out = as_int
        elif pl.Series([first]).cast(pl.Float64, strict=False)[0] is not None:
            out, kind = s.cast(pl.Float64, strict=False), "float"
        else:
            try:
                out = s.str.to_datetime(strict=False).dt.epoch("s")
            except pl.exceptions.PolarsError:  # no date/time format fits the first value
                where, _ = locate(df, file, s.is_not_null() & (s == first))
                raise DataError(
                    f"{where}, column {col!r}: expected a timestamp (integer, number or "
                    f"date/time), found {shown(first)}"
                ) from None
    else:
        raise DataError(
            f"{file}, column {col!r}: expected timestamps (integers, numbers, dates or datetimes), "
            f"found type {s.dtype}"
        )
    fail = out.is_null()
    if fail.any():
        where, n = locate(df, file, fail)
        given = df[col].drop_nulls()
        like = str(given[0]) if given.len() else ""
        raise DataError(
            f"{where}, column {col!r}: expected a timestamp (integer, number or date/time like "
            f"the first value {shown(like)}), found {shown(df[col].filter(fail)[0])}"
            + more(n - 1, "value")
        )
    if kind == "float":
        fail = (~out.is_finite() | (out.abs() >= 2.0**63)).fill_null(False)
        if fail.any():
            where, n = locate(df, file, fail)
            raise DataError(
                f"{where}, column {col!r}: expected a finite timestamp below 2^63 in magnitude, "
                f"found {shown(df[col].filter(fail)[0])}" + more(n - 1, "value")
            )
        if (out != out.floor()).any():
            report.append(f"timestamps in column {col!r} have fractions: floored to whole units")
        out = out.floor().cast(pl.Int64)
    return out.cast(pl.Int64)


def _read_table(
    path: Path, *, required: Sequence[str], separator: str | None
) -> tuple[pl.DataFrame, bool]:
    """A CSV (all text, with `_line`) or Parquet table (its own types). Returns (frame, is_csv)."""
    check_readable(path)
    if _is_parquet(path):
        try:
            df = pl.read_parquet(path)
        except pl.exceptions.PolarsError as e:
            raise DataError(
                f"{path}: could not read as Parquet: {str(e).splitlines()[0]}"
            ) from None
        except OSError as e:
            raise DataError(f"{path}: could not read as Parquet: {e}") from None
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing}; the file has {shown_names(df.columns)}"
            )
        if df.height == 0:
            raise DataError(f"{path}: the file has no rows")
        return df, False
    return read_csv_strings(path, required=required, separator=csv_sep(path, separator)), True


def _feature_table(
    source: str | Path | pl.DataFrame,
    id_col: str,
    what: str,
    separator: str | None,
    report: list[str],
) -> RawFeatures:
    """Item or user features keyed by `id_col` (see the module docstring for column kinds)."""
    if isinstance(source, pl.DataFrame):
        df, is_csv, file = source, False, f"the {what} feature table"
        if id_col not in df.columns:
            raise DataError(f"{file}: missing column {id_col!r}; it has {df.columns}")
    else:
        p = Path(source).expanduser()
        df, is_csv = _read_table(p, required=[id_col], separator=separator)
        file = str(p)
    frame = df.select(
        *[c for c in ("_line",) if c in df.columns], _ids(df, id_col, file).alias("id")
    )
    cats: list[str] = []
    multi: list[str] = []
    cols: list[pl.Series] = []
    for c in df.columns:
        if c in (id_col, "_line"):
            continue
        s = df[c]
        if isinstance(s.dtype, pl.List):
            cols.append(s.cast(pl.List(pl.String)).alias(c))
            multi.append(c)
        elif s.dtype == pl.String and s.str.contains("|", literal=True).any():
            cols.append(s.str.split("|").list.eval(pl.element().str.strip_chars()).alias(c))
            multi.append(c)
        elif s.dtype in FLOAT_TYPES:
            report.append(
                f"left out the numeric column {c!r} of {file}: feature tables hold categorical "
                "codes (bucket it into integers or text to use it)"
            )
        elif (
            s.dtype in (pl.String, pl.Boolean, pl.Categorical, pl.Enum, pl.Date)
            or s.dtype in INT_TYPES
        ):
            if is_csv and s.dtype == pl.String:
                as_int = s.str.strip_chars().cast(pl.Int64, strict=False)
                as_float = s.str.strip_chars().cast(pl.Float64, strict=False)
                if as_int.null_count() == s.null_count():
                    s = as_int  # integer codes sort as numbers in the vocabulary
                elif as_float.null_count() == s.null_count():
                    report.append(
                        f"left out the numeric column {c!r} of {file}: feature tables hold "
                        "categorical codes (bucket it into integers or text to use it)"
                    )
                    continue
            cols.append(s.alias(c))
            cats.append(c)
        else:
            raise DataError(
                f"{file}, column {c!r}: expected text, integer, boolean or list values, found "
                f"type {s.dtype}"
            )
    return RawFeatures(frame.with_columns(cols), file, categorical=cats, multi=multi)


@register_format(
    "log",
    detect=lambda p: p.suffix.lower() in (".csv", ".tsv", ".tab", ".parquet", ".pq"),
    describe="a CSV/TSV/Parquet log",
    fallback=True,
)
def load_interaction_log(
    path: str | Path,
    *,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str | None = "timestamp",
    rating_col: str | None = None,
    label_col: str | None = None,
    item_features: str | Path | pl.DataFrame | None = None,
    user_features: str | Path | pl.DataFrame | None = None,
    category_feature: str | None = None,
    separator: str | None = None,
    strict: bool = False,
    min_user_events: int = 2,
    name: str | None = None,
) -> Dataset:
    """A generic CSV / Parquet interaction log (see the module docstring).

    `time_col=None`: the file order is the time order. `label_col`: binary feedback (> 0 is a
    positive action, otherwise negative). `category_feature`: the item feature HMA matches on
    (default: the first multi-valued item feature, else none and `load_dataset` derives
    pseudo-categories). Feature tables are keyed by `item_col` / `user_col`.
    """
    if rating_col is not None and label_col is not None:
        raise ValueError("give rating_col or label_col, not both")
    p = Path(path).expanduser()
    required = [c for c in (user_col, item_col, time_col, rating_col, label_col) if c is not None]
    df, _ = _read_table(p, required=required, separator=separator)
    file = str(p)
    report: list[str] = []
    cols = [_ids(df, user_col, file).alias("user"), _ids(df, item_col, file).alias("item")]
    if time_col is None:
        cols.append(pl.int_range(df.height, eager=True).cast(pl.Int64).alias("ts"))
        report.append("timestamps: row order (no time column)")
    else:
        cols.append(_timestamps(df, time_col, file, report).alias("ts"))
    if rating_col is not None:
        cols.append(cast_column(df, rating_col, pl.Float32, file)[rating_col].alias("rating"))
        report.append(ACTION_NOTE)
    elif label_col is not None:
        lab = cast_column(df, label_col, pl.Float64, file)[label_col]
        cols.append(pl.Series("action", np.where(lab.to_numpy() > 0, 1, -1), dtype=pl.Int8))
        report.append(f"action from {label_col!r}: > 0 positive, otherwise negative")
    else:
        report.append("no ratings: every event is a positive action (implicit feedback)")
    if "_line" in df.columns:
        cols.append(df["_line"])
    events = pl.DataFrame(cols)
    items = (
        _feature_table(item_features, item_col, "item", separator, report)
        if item_features is not None
        else None
    )
    users = (
        _feature_table(user_features, user_col, "user", separator, report)
        if user_features is not None
        else None
    )
    if category_feature is None and items is not None and items.multi:
        category_feature = items.multi[0]
    if category_feature is not None and items is None:
        raise ValueError(f"category_feature={category_feature!r} needs item_features")
    return assemble(
        name=name or p.stem,
        source=file,
        file=file,
        events=events,
        items=items,
        users=users,
        category_feature=category_feature,
        report=report,
        strict=strict,
        min_user_events=min_user_events,
    )
