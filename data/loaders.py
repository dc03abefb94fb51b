"""Loaders: MovieLens (100k, 1M/10M, latest/25M/32M), per-user sequence text and generic
CSV/Parquet interaction logs, all into the one `cascade.data.dataset.Dataset` form.

`load_dataset(spec)` takes a known name (`ml-100k`, `ml-1m`, ...: read from the cache directory,
downloaded from GroupLens when absent, see `cascade.data.download`), a path (format detected by
`detect_format`) or `synthetic` / `synthetic:<preset>`. Every dataset it returns has a
`category_feature`: the genres when the data has them, else k-means pseudo-categories
(`cascade.data.derive.add_pseudo_categories`).

Formats (`detect_format` names in brackets):
- [ml-100k] `u.data` (user TAB item TAB rating TAB timestamp); `u.item` (latin-1, `|`-separated,
  19 genre flags -> multi-valued item feature "genre" in `u.genre` order; the release date's
  year -> categorical "year", the exact year, not a decade); `u.user` -> categorical "age"
  (the MovieLens 1M buckets: Under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), "gender",
  "occupation". The zip code is not used (too sparse to embed).
- [ml-dat] MovieLens 1M / 10M: `ratings.dat`, `movies.dat` (title with the year in brackets,
  `|`-joined genres), `users.dat` when present (10M has none); `::`-separated.
- [ml-csv] MovieLens latest / 25M / 32M: `ratings.csv` (userId,movieId,rating,timestamp) and
  `movies.csv` (movieId,title,genres; "(no genres listed)" means no genre).
- [sequence] per-user sequence text (SASRec family): either one line per user
  `user item item ...` in time order, or one `user item` pair per line in time order. Ids are
  integers separated by whitespace. The format has no clock, so the timestamp is the item's
  position in its line (per-user lines) or the line number (pairs).
- [log] a generic interaction log, CSV (with a header) or Parquet, with configurable user,
  item and time columns, an optional rating or binary label column and optional item and user
  feature tables (CSV or Parquet, keyed by the same column name as the log). Ids may be
  integers or strings. Feature columns: strings, integers and booleans become categorical
  codes; list columns and string columns holding `|`-joined values become multi-valued;
  float columns are left out (reported). Timestamps may be integers, floats (floored),
  dates/datetimes (-> epoch seconds) or strings holding any of these.

A path names exactly what is read. A MovieLens directory is read with its metadata files; a
named ratings file is read as that file, never swapped for a sibling, and the metadata beside
it (u.item / u.user, movies.dat / users.dat, movies.csv) is used only when the file is the
dataset's own (named u.data, ratings.dat or ratings.csv). A subset or copy under another name
is loaded alone, without item or user features (the report says so).

Raw ids map to contiguous ints in sorted raw-id order (`raw_user_ids` / `raw_item_ids` map
back). Feature codes start at 1 in the order of `vocab[name][1:]`; 0 is unknown / padding.

Bad input policy (STYLE.md "Data": strict, nothing silently dropped):
- errors (`DataError` naming the file, 1-based line number or column, and what was expected):
  a line with the wrong number of fields, a missing or misnamed column / header, a
  non-numeric id, rating or timestamp where the format requires a number, a rating or label
  that is not finite (nan, inf, or too large for its type), a MovieLens rating outside 0.5-5,
  an empty file, a
  path that is neither a known name nor an existing file, a directory with no known format,
  a user listed on two lines of a per-user sequence file, an id listed twice in a feature table.
- filtered and reported (one line each in `dataset.report`, with counts), or errors with
  `strict=True`: exact duplicate events (same user, item and timestamp; the first is kept),
  and users with fewer than `min_user_events` (default 2) events, since a user needs a
  history before any request. Items left without events after that are not part of the
  dataset; metadata rows for items without events and events for items without metadata are
  counted in the report too.
- blank lines are not data and are skipped (they still count for line numbers). A line ends
  at LF, CRLF or a lone CR (old Mac files); a UTF-8 byte-order mark is ignored.

Parsing is vectorised polars: each text file is cut into lines (numpy, at the line ends, so
any byte may appear inside a line), split into string fields,
cast with `strict=False`, and the first row whose field count or cast fails names the line.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from cascade.data.dataset import Dataset, DataError, FeatureTable, finalize_events

__all__ = [
    "load_dataset",
    "detect_format",
    "load_movielens_100k",
    "load_movielens_dat",
    "load_movielens_csv",
    "load_sequences",
    "load_interaction_log",
    "FORMATS",
]

FORMATS = ("ml-100k", "ml-dat", "ml-csv", "sequence", "log")

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
AGE_BUCKETS = ["Under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
]  # fmt: skip
ML_CSV_RATINGS_HEADER = ["userId", "movieId", "rating", "timestamp"]
ML_CSV_MOVIES_HEADER = ["movieId", "title", "genres"]
_NO_GENRES = "(no genres listed)"
_TITLE_YEAR = r"\((\d{4})[^()]*\)\s*$"  # "Toy Story (1995)", "Dekalog (1989-1990)"

_INT_TYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)
_FLOAT_TYPES = (pl.Float32, pl.Float64)


# --------------------------------------------------------------------------------------------
# Text files as lines -> typed fields, with line numbers for every error


def _read_text(path: Path, encoding: str) -> bytes:
    """The file as UTF-8 bytes with `\\n` line ends: no byte-order mark, CRLF and lone CR (old
    Mac) made `\\n`. `encoding`: "utf8" (invalid bytes become U+FFFD), "auto" (UTF-8, else
    latin-1) or any Python codec name."""
    raw = path.read_bytes()
    if encoding in ("utf8", "auto"):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = raw.decode("latin-1" if encoding == "auto" else "utf-8", "replace").encode()
    else:
        raw = raw.decode(encoding).encode("utf-8")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return raw


def _scan_lines(path: Path, encoding: str = "utf8") -> pl.LazyFrame:
    """One row per physical line: `_line` (1-based line number), `_raw` (text, no line end).
    Blank lines come back as rows too, so row numbers are line numbers. Any byte may appear in
    a line: the lines are cut at `\\n` by offsets (numpy), not by a CSV reader."""
    raw = _read_text(path, encoding)
    ends = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8) == 10) + 1
    if raw and not raw.endswith(b"\n"):
        ends = np.append(ends, len(raw))
    offsets = np.concatenate([[0], ends]).astype(np.int64)
    # valid UTF-8 (checked or re-encoded above), so the buffers form a valid string array
    arr = pa.LargeStringArray.from_buffers(len(ends), pa.py_buffer(offsets), pa.py_buffer(raw))
    lines = pl.from_arrow(arr).str.strip_chars_end("\n").alias("_raw")
    return (
        lines.to_frame()
        .with_row_index("_line", offset=1)
        .select(pl.col("_line").cast(pl.Int64), "_raw")
        .lazy()
    )


def _line_text(path: Path, line: int, encoding: str = "utf8") -> str:
    """The text of one line (error messages only)."""
    got = _scan_lines(path, encoding).filter(pl.col("_line") == line).collect()
    return got["_raw"][0] if got.height and got["_raw"][0] is not None else ""


def _head_lines(path: Path, size: int = 1 << 16) -> list[str]:
    """The lines of the file's first `size` bytes (any line end, no byte-order mark)."""
    with open(path, "rb") as fh:
        head = fh.read(size)
    return re.split(r"\r\n?|\n", head.decode("utf-8", "replace").lstrip("\ufeff"))


def _first_line(path: Path) -> str:
    return _head_lines(path)[0]


def _kind(dtype: pl.DataType) -> str:
    if dtype in _INT_TYPES:
        return "an integer"
    if dtype in _FLOAT_TYPES:
        return "a number"
    return "text"


def _more(n: int, what: str = "line") -> str:
    return f" (and {n} more such {what}{'s' if n > 1 else ''})" if n > 0 else ""


def _read_fields(
    path: Path,
    sep: str,
    fields: dict[str, pl.DataType],
    *,
    header: Sequence[str] | None = None,
    encoding: str = "utf8",
    ranges: dict[str, tuple[float, float]] | None = None,
) -> pl.DataFrame:
    """Parse a delimited text file without quoting into typed columns plus `_line`.

    `header`: the exact column names the first line must hold (then it is not data).
    `ranges`: inclusive (low, high) bounds of numeric fields.
    Raises DataError for an empty file, a wrong field count, a failed cast, a float that is not
    finite (nan, inf, or too large for its type) or a value out of its range, naming the line.
    """
    names = list(fields)
    k = len(names)
    layout = sep.join(names) if sep != "\t" else "<TAB>".join(names)
    if header is not None:
        got = _first_line(path).split(sep)
        if [g.strip().strip('"') for g in got] != list(header):
            missing = [h for h in header if h not in [g.strip().strip('"') for g in got]]
            raise DataError(
                f"{path}, line 1: expected the header {sep.join(header)!r}, found "
                f"{sep.join(got)!r}" + (f" (missing column(s) {missing})" if missing else "")
            )
    lines = _scan_lines(path, encoding)
    if header is not None:
        lines = lines.filter(pl.col("_line") > 1)
    lines = lines.filter(pl.col("_raw").str.strip_chars() != "")  # blank lines: no data
    parts = pl.col("_raw").str.split_exact(sep, k - 1).struct.rename_fields(names).alias("_f")
    casts = [
        pl.col(n) if t == pl.String else pl.col(n).str.strip_chars().cast(t, strict=False)
        for n, t in fields.items()
    ]
    df = (
        lines.select(
            "_line",
            (pl.col("_raw").str.count_matches(sep, literal=True) + 1).alias("_nf"),
            parts,
        )
        .unnest("_f")
        .select("_line", "_nf", *casts)
        .collect()
    )
    if df.height == 0:
        raise DataError(f"{path}: the file has no data lines; expected lines of {layout!r}")
    bad = df.filter(pl.col("_nf") != k)
    if bad.height:
        line, nf = bad["_line"][0], bad["_nf"][0]
        raise DataError(
            f"{path}, line {line}: expected {k} fields separated by {sep!r} ({layout}), "
            f"found {nf}: {_line_text(path, line, encoding)!r}" + _more(bad.height - 1)
        )
    for i, (n, t) in enumerate(fields.items()):
        if t == pl.String:
            continue
        bad = df.filter(pl.col(n).is_null())
        if bad.height:
            line = bad["_line"][0]
            value = _line_text(path, line, encoding).split(sep)[i].strip()
            raise DataError(
                f"{path}, line {line}, field {n!r} (field {i + 1} of {layout!r}): expected "
                f"{_kind(t)}, found {value!r}" + _more(bad.height - 1)
            )
        lo, hi = (ranges or {}).get(n, (None, None))
        ok = pl.col(n).is_finite() if t in _FLOAT_TYPES else pl.lit(True)
        if lo is not None:
            ok = ok & pl.col(n).is_between(lo, hi)
        bad = df.filter(~ok)
        if bad.height:
            line = bad["_line"][0]
            value = _line_text(path, line, encoding).split(sep)[i].strip()
            want = "a finite number" + (f" from {lo:g} to {hi:g}" if lo is not None else "")
            raise DataError(
                f"{path}, line {line}, field {n!r} (field {i + 1} of {layout!r}): expected "
                f"{want}, found {value!r}" + _more(bad.height - 1)
            )
    return df.drop("_nf")


def _check_flags(df: pl.DataFrame, cols: list[str], path: Path) -> None:
    """Genre flags must be 0 or 1."""
    for c in cols:
        bad = df.filter(~pl.col(c).is_in([0, 1]))
        if bad.height:
            raise DataError(
                f"{path}, line {bad['_line'][0]}, genre flag {c!r}: expected 0 or 1, "
                f"found {bad[c][0]}"
            )


# --------------------------------------------------------------------------------------------
# Assembly: filtering, contiguous ids, feature tables


@dataclass
class _RawFeatures:
    """Features of one entity kind before encoding: `frame` has `id` (raw id), optionally
    `_line`, and one column per feature (categorical: any scalar; multi: List(String))."""

    frame: pl.DataFrame
    file: str
    categorical: list[str] = field(default_factory=list)
    multi: list[str] = field(default_factory=list)
    vocab: dict[str, list[str]] = field(default_factory=dict)  # fixed code order, if any


def _id_map(col: pl.Series) -> pl.DataFrame:
    """Sorted unique raw ids -> contiguous `idx`."""
    return (
        col.unique()
        .sort()
        .to_frame("id")
        .with_row_index("idx")
        .with_columns(pl.col("idx").cast(pl.Int64))
    )


def _where(df: pl.DataFrame, file: str, row: int) -> str:
    if "_line" in df.columns:
        return f"{file}, line {df['_line'][row]}"
    return f"{file}, row {row + 1}"


def _encode_features(
    raw: _RawFeatures | None, ids: pl.DataFrame, what: str, report: list[str]
) -> FeatureTable:
    n = ids.height
    if raw is None:
        return FeatureTable(n=n)
    f = raw.frame.with_columns(pl.col("id").cast(pl.String))
    dup = f.with_row_index("_r").filter(pl.col("id").is_duplicated())
    if dup.height:
        first = dup.filter(pl.col("id") == dup["id"][0])
        rows = [int(r) for r in first["_r"]]
        again, first_at = _where(f, raw.file, rows[1]), _where(f, raw.file, rows[0])
        raise DataError(
            f"{again}: {what} id {dup['id'][0]!r} is listed again (first at "
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


def _assemble(
    *,
    name: str,
    source: str,
    file: str,
    events: pl.DataFrame,
    items: _RawFeatures | None = None,
    users: _RawFeatures | None = None,
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
                f"{file}, {where} {d[loc]}: duplicate event (user {d['user']!r}, item "
                f"{d['item']!r}, timestamp {d['ts']}) already on {where} {orig}"
                + _more(n_dup - 1, "duplicate")
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
                first_user = f"user {u!r} has {c} event(s)"
            else:
                first_user = f"{extra_small_users} user(s) have no events"
            raise DataError(
                f"{file}: {first_user}; expected at least {min_user_events} per user"
                + _more(n_short - 1, "user")
            )
        n_ev = int(short["len"].sum() or 0)
        events = events.filter(~pl.col("user").is_in(short["user"].implode()))
        report.append(
            f"removed {n_short} users with fewer than {min_user_events} events ({n_ev} events): "
            "a user needs a history before a request"
        )
    if events.height == 0:
        raise DataError(f"{file}: no user has at least {min_user_events} events; nothing to load")

    user_ids = _id_map(events["user"])
    item_ids = _id_map(events["item"])
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
    item_table = _encode_features(items, item_ids, "item", report)
    user_table = _encode_features(users, user_ids, "user", report)
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


def _age_bucket(age: pl.Expr) -> pl.Expr:
    """Ages (or the MovieLens 1M age codes 1/18/25/35/45/50/56) -> AGE_BUCKETS labels."""
    return (
        pl.when(age >= 56).then(pl.lit("56+"))
        .when(age >= 50).then(pl.lit("50-55"))
        .when(age >= 45).then(pl.lit("45-49"))
        .when(age >= 35).then(pl.lit("35-44"))
        .when(age >= 25).then(pl.lit("25-34"))
        .when(age >= 18).then(pl.lit("18-24"))
        .otherwise(pl.lit("Under 18"))
    )  # fmt: skip


def _n_unknown(frame: pl.DataFrame, col: str) -> str:
    n = frame[col].null_count()
    return f"; {n} item{'s' if n > 1 else ''} without one: unknown" if n else ""


def _ratings_file(path: str | Path, own: str) -> tuple[Path, Path | None]:
    """(the ratings file to read, the folder whose metadata goes with it, or None).

    A directory: its file `own`, with the metadata beside it. A file: exactly that file; the
    metadata beside it only when the file is the dataset's own (named `own`): a subset or copy
    under another name is read alone, never swapped for its sibling.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / own).is_file():
            raise DataError(f"{p}: expected a file {own!r} in this directory")
        return p / own, p
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    return p, (p.parent if p.name.lower() == own else None)


def _no_meta(ratings: Path, own: str, meta: str) -> str:
    return f"{ratings.name} is not named {own}: {meta} beside it is not read, items have no features"


_ML_RATING = {"rating": (0.5, 5.0)}  # MovieLens stars: 1-5, half stars from 0.5 (10M, latest)


_ACTION_NOTE = "action from rating: >= 4 positive, <= 2 negative, otherwise neutral"


# --------------------------------------------------------------------------------------------
# MovieLens


def load_movielens_100k(
    path: str | Path, *, strict: bool = False, min_user_events: int = 2, name: str | None = None
) -> Dataset:
    """MovieLens 100k from its directory (or its `u.data`): ratings, genres, year, user info."""
    f, meta = _ratings_file(path, "u.data")
    d = meta if meta is not None else f.parent
    ratings = _read_fields(
        f,
        "\t",
        {"user": pl.Int64, "item": pl.Int64, "rating": pl.Float32, "ts": pl.Int64},
        ranges=_ML_RATING,
    )
    report = [_ACTION_NOTE]
    items = None
    if meta is None:
        report.append(_no_meta(f, "u.data", "u.item / u.user"))
    elif (d / "u.item").is_file():
        genres = ML100K_GENRES
        if (d / "u.genre").is_file():
            g = _read_fields(
                d / "u.genre", "|", {"genre": pl.String, "flag": pl.Int64}, encoding="latin-1"
            )
            genres = g.sort("flag")["genre"].to_list()
        flags = [f"g{j}" for j in range(len(genres))]
        meta = _read_fields(
            d / "u.item",
            "|",
            {
                "id": pl.Int64,
                "title": pl.String,
                "release": pl.String,
                "video": pl.String,
                "url": pl.String,
                **{f: pl.Int8 for f in flags},
            },  # fmt: skip
            encoding="latin-1",
        )
        _check_flags(meta, flags, d / "u.item")
        frame = meta.select(
            "_line",
            "id",
            pl.concat_list([pl.when(pl.col(f) == 1).then(pl.lit(g)) for f, g in zip(flags, genres)])
            .list.drop_nulls()
            .alias("genre"),
            pl.col("release").str.extract(r"(\d{4})\s*$", 1).alias("year"),
        )
        items = _RawFeatures(
            frame, str(d / "u.item"), categorical=["year"], multi=["genre"], vocab={"genre": genres}
        )
        report.append(f"genre: the {len(genres)} genre flags of u.item (multi-valued)")
        report.append(
            "year: release year from u.item's release date (categorical, exact year"
            + _n_unknown(frame, "year")
            + ")"
        )
    else:
        report.append(f"no u.item in {d}: items have no features")
    users = None
    if meta is not None and (d / "u.user").is_file():
        u = _read_fields(
            d / "u.user",
            "|",
            {
                "id": pl.Int64,
                "age": pl.Int64,
                "gender": pl.String,
                "occupation": pl.String,
                "zip": pl.String,
            },
            encoding="latin-1",
        )
        users = _RawFeatures(
            u.select(
                "_line", "id", _age_bucket(pl.col("age")).alias("age"), "gender", "occupation"
            ),
            str(d / "u.user"),
            categorical=["age", "gender", "occupation"],
            vocab={"age": AGE_BUCKETS},
        )
        report.append("age: u.user ages in the MovieLens 1M buckets " + ", ".join(AGE_BUCKETS))
    return _assemble(
        name=name or (d.name if meta is not None else f.stem),
        source=str(d if meta is not None else f),
        file=str(f),
        events=ratings,
        items=items,
        users=users,
        category_feature="genre" if items is not None else None,
        report=report,
        strict=strict,
        min_user_events=min_user_events,
    )


def _movies_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """id, title, genres (`|`-joined) -> id, genre list, year."""
    return frame.select(
        *[c for c in ("_line",) if c in frame.columns],
        "id",
        pl.when(pl.col("genres").str.strip_chars() == _NO_GENRES)
        .then(pl.lit(None, dtype=pl.String))
        .otherwise(pl.col("genres").str.strip_chars())
        .str.split("|")
        .alias("genre"),
        pl.col("title").str.extract(_TITLE_YEAR, 1).alias("year"),
    )


def load_movielens_dat(
    path: str | Path, *, strict: bool = False, min_user_events: int = 2, name: str | None = None
) -> Dataset:
    """MovieLens 1M / 10M from its directory (or its `ratings.dat`), `::`-separated."""
    f, meta = _ratings_file(path, "ratings.dat")
    d = meta if meta is not None else f.parent
    ratings = _read_fields(
        f,
        "::",
        {"user": pl.Int64, "item": pl.Int64, "rating": pl.Float32, "ts": pl.Int64},
        ranges=_ML_RATING,
    )
    report = [_ACTION_NOTE]
    items = None
    if meta is None:
        report.append(_no_meta(f, "ratings.dat", "movies.dat / users.dat"))
    elif (d / "movies.dat").is_file():
        m = _read_fields(
            d / "movies.dat",
            "::",
            {"id": pl.Int64, "title": pl.String, "genres": pl.String},
            encoding="auto",
        )
        items = _RawFeatures(
            _movies_frame(m), str(d / "movies.dat"), categorical=["year"], multi=["genre"]
        )
        report.append("genre: the |-joined genres of movies.dat (multi-valued)")
        report.append(
            "year: release year from the title in movies.dat (categorical, exact year"
            + _n_unknown(items.frame, "year")
            + ")"
        )
    else:
        report.append(f"no movies.dat in {d}: items have no features")
    users = None
    if meta is None:
        pass
    elif (d / "users.dat").is_file():
        u = _read_fields(
            d / "users.dat",
            "::",
            {
                "id": pl.Int64,
                "gender": pl.String,
                "age": pl.Int64,
                "occupation": pl.Int64,
                "zip": pl.String,
            },
        )
        occ = {i: v for i, v in enumerate(ML1M_OCCUPATIONS)}
        users = _RawFeatures(
            u.select(
                "_line",
                "id",
                _age_bucket(pl.col("age")).alias("age"),
                "gender",
                pl.col("occupation").replace_strict(occ, default=None, return_dtype=pl.String),
            ),
            str(d / "users.dat"),
            categorical=["age", "gender", "occupation"],
            vocab={"age": AGE_BUCKETS},
        )
    else:
        report.append(f"no users.dat in {d}: users have no features")
    return _assemble(
        name=name or (d.name if meta is not None else f.stem),
        source=str(d if meta is not None else f),
        file=str(f),
        events=ratings,
        items=items,
        users=users,
        category_feature="genre" if items is not None else None,
        report=report,
        strict=strict,
        min_user_events=min_user_events,
    )


def load_movielens_csv(
    path: str | Path, *, strict: bool = False, min_user_events: int = 2, name: str | None = None
) -> Dataset:
    """MovieLens latest / 25M / 32M from its directory (or its `ratings.csv`)."""
    p = Path(path).expanduser()
    ratings_file, meta = _ratings_file(p, "ratings.csv")
    d = ratings_file.parent
    ratings = _read_fields(
        ratings_file,
        ",",
        {"user": pl.Int64, "item": pl.Int64, "rating": pl.Float32, "ts": pl.Int64},
        header=ML_CSV_RATINGS_HEADER,
        ranges=_ML_RATING,
    )
    report = [_ACTION_NOTE]
    items = None
    movies_file = d / "movies.csv"
    if meta is None:
        report.append(_no_meta(ratings_file, "ratings.csv", "movies.csv"))
    elif movies_file.is_file():
        m = _read_csv_strings(movies_file, required=ML_CSV_MOVIES_HEADER)
        m = _cast_column(m, "movieId", pl.Int64, str(movies_file)).rename({"movieId": "id"})
        items = _RawFeatures(
            _movies_frame(m), str(movies_file), categorical=["year"], multi=["genre"]
        )
        report.append(
            f"genre: the |-joined genres of movies.csv (multi-valued; {_NO_GENRES!r} = none)"
        )
        report.append(
            "year: release year from the title in movies.csv (categorical, exact year"
            + _n_unknown(items.frame, "year")
            + ")"
        )
    else:
        report.append(f"no movies.csv in {d}: items have no features")
    return _assemble(
        name=name or (d.name if meta is not None else ratings_file.stem),
        source=str(ratings_file if p.is_file() else d),
        file=str(ratings_file),
        events=ratings,
        items=items,
        category_feature="genre" if items is not None else None,
        report=report,
        strict=strict,
        min_user_events=min_user_events,
    )


# --------------------------------------------------------------------------------------------
# Per-user sequence text (SASRec family)


def load_sequences(
    path: str | Path,
    *,
    layout: str = "auto",
    strict: bool = False,
    min_user_events: int = 2,
    name: str | None = None,
) -> Dataset:
    """Per-user sequences: `user item item ...` per line, or `user item` pairs in time order.

    `layout`: "lines" (one line per user), "pairs" (one event per line) or "auto" (pairs when
    every line holds exactly two ids). Timestamps are positions (see the module docstring).
    """
    if layout not in ("auto", "lines", "pairs"):
        raise ValueError(f"layout must be 'auto', 'lines' or 'pairs', got {layout!r}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: expected a sequence text file")
    tokens = (
        _scan_lines(p)
        .filter(pl.col("_raw").str.strip_chars() != "")
        .select("_line", pl.col("_raw").str.extract_all(r"\S+").alias("tok"))
        .with_columns(pl.col("tok").list.len().alias("_nt"))
        .explode("tok")
        .select(
            "_line",
            "_nt",
            pl.int_range(pl.len()).over("_line").alias("pos"),
            pl.col("tok").cast(pl.Int64, strict=False).alias("val"),
        )
        .collect()
    )
    if tokens.height == 0:
        raise DataError(f"{p}: the file has no data lines; expected 'user item item ...' per line")
    bad = tokens.filter(pl.col("val").is_null())
    if bad.height:
        line, pos = bad["_line"][0], bad["pos"][0]
        tok = _line_text(p, line).split()[pos]
        raise DataError(
            f"{p}, line {line}, token {pos + 1}: expected an integer id, found {tok!r}"
            + _more(bad.select(pl.col("_line").n_unique()).item() - 1)
        )
    if layout == "auto":
        layout = "pairs" if tokens["_nt"].max() == 2 and tokens["_nt"].min() == 2 else "lines"
    report: list[str] = []
    extra = 0
    if layout == "pairs":
        bad = tokens.filter(pl.col("_nt") != 2)
        if bad.height:
            line = bad["_line"][0]
            raise DataError(
                f"{p}, line {line}: expected 2 ids ('user item'), found {bad['_nt'][0]}: "
                f"{_line_text(p, line)!r}"
            )
        events = tokens.pivot(on="pos", index="_line", values="val").select(
            "_line",
            pl.col("0").alias("user"),
            pl.col("1").alias("item"),
            pl.col("_line").alias("ts"),
        )
        report.append("timestamps: line numbers (the pairs format has no clock)")
    else:
        heads = tokens.filter(pl.col("pos") == 0).select(
            "_line", pl.col("val").alias("user"), "_nt"
        )
        again = heads.filter(pl.col("user").is_duplicated())
        if again.height:
            u = again["user"][0]
            lines = again.filter(pl.col("user") == u)["_line"].to_list()
            raise DataError(
                f"{p}, line {lines[1]}: user {u} already has a line ({lines[0]}); expected one "
                "line per user ('user item item ...'), or one 'user item' pair on every line"
            )
        extra = int((heads["_nt"] == 1).sum())
        events = (
            tokens.filter(pl.col("pos") > 0)
            .join(heads.select("_line", "user"), on="_line", how="left", maintain_order="left")
            .select("_line", "user", pl.col("val").alias("item"), (pl.col("pos") - 1).alias("ts"))
        )
        report.append("timestamps: position in the user's line (the format has no clock)")
    report.append("no ratings: every event is a positive action (implicit feedback)")
    return _assemble(
        name=name or p.stem,
        source=str(p),
        file=str(p),
        events=events,
        report=report,
        strict=strict,
        min_user_events=min_user_events,
        extra_small_users=extra,
    )


# --------------------------------------------------------------------------------------------
# Generic CSV / Parquet logs


def _is_parquet(p: Path) -> bool:
    return p.suffix.lower() in (".parquet", ".pq")


def _csv_sep(p: Path, separator: str | None) -> str:
    if separator is not None:
        return separator
    return "\t" if p.suffix.lower() in (".tsv", ".tab") else ","


def _read_csv_strings(path: Path, *, required: Sequence[str], separator: str = ",") -> pl.DataFrame:
    """A CSV with a header, every column as text, plus `_line`; checks the required columns."""
    header = _first_line(path)
    if not header.strip():
        raise DataError(
            f"{path}: the file is empty; expected a header line with columns {list(required)}"
        )
    try:
        df = pl.read_csv(path, infer_schema=False, separator=separator, raise_if_empty=False)
    except pl.exceptions.PolarsError as e:
        raise DataError(_locate_csv_error(path, separator, e)) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; the header has {df.columns} "
            f"(separator {separator!r})"
        )
    df = df.with_row_index("_line", offset=2).with_columns(pl.col("_line").cast(pl.Int64))
    # blank lines come back as all-null rows: not data
    df = df.filter(~pl.all_horizontal([pl.col(c).is_null() for c in df.columns if c != "_line"]))
    if df.height == 0:
        raise DataError(f"{path}: the file has a header but no data lines")
    return df


def _locate_csv_error(path: Path, sep: str, err: Exception) -> str:
    """Name the first line whose field count differs from the header's (quotes ignored)."""
    counts = (
        _scan_lines(path)
        .filter(pl.col("_raw").str.strip_chars() != "")
        .select("_line", (pl.col("_raw").str.count_matches(sep, literal=True) + 1).alias("nf"))
        .collect()
    )
    if counts.height:
        k = counts["nf"][0]
        bad = counts.filter(pl.col("nf") != k)
        if bad.height:
            line = bad["_line"][0]
            return (
                f"{path}, line {line}: expected {k} fields separated by {sep!r} like the header, "
                f"found {bad['nf'][0]}: {_line_text(path, line)!r}"
            )
    return f"{path}: could not parse as CSV (separator {sep!r}): {str(err).splitlines()[0]}"


def _loc(df: pl.DataFrame, file: str, mask: pl.Series) -> tuple[str, int]:
    """Where the first True of `mask` is, and how many there are."""
    idx = int(mask.arg_true()[0])
    n = int(mask.sum())
    return _where(df, file, idx), n


def _cast_column(df: pl.DataFrame, col: str, dtype: pl.DataType, file: str) -> pl.DataFrame:
    """Cast a text column; the first value that fails names its line."""
    src = df[col]
    out = (
        src.str.strip_chars().cast(dtype, strict=False)
        if src.dtype == pl.String
        else src.cast(dtype, strict=False)
    )
    bad = out.is_null() & src.is_not_null()
    empty = src.is_null() | ((src.str.strip_chars() == "") if src.dtype == pl.String else False)
    fail = bad | empty
    want = _kind(dtype)
    if not fail.any() and dtype in _FLOAT_TYPES:
        fail, want = ~out.is_finite(), "a finite number"  # nan, inf, or too large for the type
    if fail.any():
        where, n = _loc(df, file, fail)
        value = src.filter(fail)[0]
        raise DataError(
            f"{where}, column {col!r}: expected {want}, found {value!r}" + _more(n - 1, "value")
        )
    return df.with_columns(out.alias(col))


def _ids(df: pl.DataFrame, col: str, file: str) -> pl.Series:
    """Id column: integers stay integers, text ids that all parse as integers become integers,
    other text stays text. Nulls / empty values are errors."""
    s = df[col]
    if s.dtype in _INT_TYPES:
        if s.null_count():
            where, n = _loc(df, file, s.is_null())
            raise DataError(
                f"{where}, column {col!r}: expected an id, found an empty value"
                + _more(n - 1, "value")
            )
        return s.cast(pl.Int64)
    if s.dtype in (pl.String, pl.Categorical, pl.Enum):
        s = s.cast(pl.String).str.strip_chars()
        empty = s.is_null() | (s == "")
        if empty.any():
            where, n = _loc(df, file, empty)
            raise DataError(
                f"{where}, column {col!r}: expected an id, found an empty value"
                + _more(n - 1, "value")
            )
        as_int = s.cast(pl.Int64, strict=False)
        return as_int if as_int.null_count() == 0 else s
    raise DataError(f"{file}, column {col!r}: expected integer or text ids, found type {s.dtype}")


def _timestamps(df: pl.DataFrame, col: str, file: str, report: list[str]) -> pl.Series:
    """Timestamps -> Int64: integers; floats (floored); dates/datetimes (epoch seconds); or text
    holding one of these (the kind is taken from the first value, the first failure is named)."""
    s = df[col]
    kind = None
    if s.dtype in _INT_TYPES:
        out = s.cast(pl.Int64)
    elif s.dtype in _FLOAT_TYPES:
        out, kind = s, "float"
    elif s.dtype in (pl.Date,) or isinstance(s.dtype, pl.Datetime):
        out = s.dt.epoch("s")
    elif s.dtype == pl.String:
        s = s.str.strip_chars()
        first = s.drop_nulls()
        first = first[0] if first.len() else ""
        if pl.Series([first]).cast(pl.Int64, strict=False)[0] is not None:
            out = s.cast(pl.Int64, strict=False)
        elif pl.Series([first]).cast(pl.Float64, strict=False)[0] is not None:
            out, kind = s.cast(pl.Float64, strict=False), "float"
        else:
            out = s.str.to_datetime(strict=False).dt.epoch("s")
    else:
        raise DataError(
            f"{file}, column {col!r}: expected timestamps (integers, numbers, dates or datetimes), "
            f"found type {s.dtype}"
        )
    fail = out.is_null()
    if fail.any():
        where, n = _loc(df, file, fail)
        given = df[col].drop_nulls()
        like = str(given[0]) if given.len() else ""
        raise DataError(
            f"{where}, column {col!r}: expected a timestamp (integer, number or date/time like "
            f"the first value {like!r}), found {df[col].filter(fail)[0]!r}" + _more(n - 1, "value")
        )
    if kind == "float":
        if (out != out.floor()).any():
            report.append(f"timestamps in column {col!r} have fractions: floored to whole units")
        out = out.floor().cast(pl.Int64)
    return out.cast(pl.Int64)


def _read_table(
    path: Path, *, required: Sequence[str], separator: str | None
) -> tuple[pl.DataFrame, bool]:
    """A CSV (all text, with `_line`) or Parquet table (its own types). Returns (frame, is_csv)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
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
            raise DataError(f"{path}: missing column(s) {missing}; the file has {df.columns}")
        if df.height == 0:
            raise DataError(f"{path}: the file has no rows")
        return df, False
    return _read_csv_strings(path, required=required, separator=_csv_sep(path, separator)), True


def _feature_table(
    source: str | Path | pl.DataFrame,
    id_col: str,
    what: str,
    separator: str | None,
    report: list[str],
) -> _RawFeatures:
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
        elif s.dtype in _FLOAT_TYPES:
            report.append(
                f"left out the numeric column {c!r} of {file}: feature tables hold categorical "
                "codes (bucket it into integers or text to use it)"
            )
        elif (
            s.dtype in (pl.String, pl.Boolean, pl.Categorical, pl.Enum, pl.Date)
            or s.dtype in _INT_TYPES
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
    return _RawFeatures(frame.with_columns(cols), file, categorical=cats, multi=multi)


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
        cols.append(_cast_column(df, rating_col, pl.Float32, file)[rating_col].alias("rating"))
        report.append(_ACTION_NOTE)
    elif label_col is not None:
        lab = _cast_column(df, label_col, pl.Float64, file)[label_col]
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
    return _assemble(
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


# --------------------------------------------------------------------------------------------
# Detection and the one entry point

_DIR_MARKERS = (("u.data", "ml-100k"), ("ratings.dat", "ml-dat"), ("ratings.csv", "ml-csv"))
_LOADERS: dict[str, Callable[..., Dataset]] = {
    "ml-100k": load_movielens_100k,
    "ml-dat": load_movielens_dat,
    "ml-csv": load_movielens_csv,
    "sequence": load_sequences,
    "log": load_interaction_log,
}


def _resolve(path: str | Path) -> tuple[str, Path]:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        for marker, fmt in _DIR_MARKERS:
            if (p / marker).is_file():
                return fmt, p
        # an unzipped archive: the data sits one folder down
        subs = sorted(
            s for s in p.iterdir() if s.is_dir() and any((s / m).is_file() for m, _ in _DIR_MARKERS)
        )
        if len(subs) == 1:
            return _resolve(subs[0])
        found = sorted(x.name for x in p.iterdir())
        raise DataError(
            f"{p}: no known dataset format in this directory: expected u.data (MovieLens 100k), "
            "ratings.dat (MovieLens 1M/10M) or ratings.csv (MovieLens latest/25M/32M); for a "
            "sequence text file or a CSV/Parquet log pass the file itself. Found: "
            + (", ".join(found[:12]) + (" ..." if len(found) > 12 else "") if found else "nothing")
        )
    name = p.name.lower()
    if name == "u.data":
        return "ml-100k", p.parent
    if name == "ratings.dat":
        return "ml-dat", p.parent
    if _is_parquet(p):
        return "log", p
    first = next((ln.strip() for ln in _head_lines(p) if ln.strip()), "")
    if not first:
        raise DataError(f"{p}: the file is empty")
    if p.suffix.lower() in (".csv", ".tsv", ".tab"):
        if [c.strip().strip('"') for c in first.split(",")] == ML_CSV_RATINGS_HEADER:
            return "ml-csv", p
        return "log", p
    tokens = first.split()
    if len(tokens) >= 2 and all(t.lstrip("-").isdigit() for t in tokens):
        return "sequence", p
    if "::" in first:
        return "ml-dat", p  # exactly this file, even when a ratings.dat sits beside it
    raise DataError(
        f"{p}, line 1: cannot tell the format: expected whitespace-separated integer ids "
        f"('user item item ...', a sequence file), a .csv/.tsv/.parquet log, or a MovieLens "
        f"u.data / ratings.dat / ratings.csv; found {first[:80]!r}"
    )


def detect_format(path: str | Path) -> str:
    """The format of a file or directory: one of FORMATS (see the module docstring)."""
    return _resolve(path)[0]


def _load_synthetic(spec: str, opts: dict[str, Any]) -> Dataset:
    from cascade.data.synthetic import generate, preset  # written alongside; import when used

    name = spec.split(":", 1)[1] if ":" in spec else "small"
    return generate(preset(name, **opts))


def load_dataset(spec: str | Path, *, cache_dir: Path | None = None, **opts: Any) -> Dataset:
    """Load a dataset by known name, path or `synthetic[:preset]` (see the module docstring).

    Options: `format` (one of FORMATS, overrides detection), `download` (known names: fetch
    when absent, default True), `pseudo_categories` (k-means clusters when the data has no
    categories, default 32), `seed`, and the chosen loader's own keyword arguments (`strict`,
    `min_user_events`, `name`, and for logs `user_col`, `item_col`, ...). For `synthetic`,
    options are overrides of the preset's SyntheticConfig.
    """
    from cascade.data.derive import add_pseudo_categories
    from cascade.data.download import KNOWN_DATASETS, dataset_dir

    spec_s = str(spec)
    if spec_s == "synthetic" or spec_s.startswith("synthetic:"):
        ds = _load_synthetic(spec_s, opts)
        return ds if ds.category_feature is not None else add_pseudo_categories(ds)
    fmt = opts.pop("format", None)
    download = opts.pop("download", True)
    n_pseudo = opts.pop("pseudo_categories", 32)
    seed = opts.pop("seed", 0)
    if spec_s in KNOWN_DATASETS:
        path = dataset_dir(spec_s, cache_dir, download=download)
        opts.setdefault("name", spec_s)
    else:
        path = Path(spec_s).expanduser()
        if not path.exists():
            raise DataError(
                f"{spec_s!r} is not a known dataset ({', '.join(KNOWN_DATASETS)}), nor "
                "'synthetic[:tiny|small|medium|large]', nor an existing file or directory"
            )
    if fmt is None:
        fmt, path = _resolve(path)
    elif fmt not in _LOADERS:
        raise ValueError(f"format must be one of {list(_LOADERS)}, got {fmt!r}")
    loader = _LOADERS[fmt]
    accepted = [k for k in inspect.signature(loader).parameters if k != "path"]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise ValueError(
            f"option(s) {unknown} do not apply to the {fmt!r} format; it accepts {accepted} "
            "plus format, download, pseudo_categories, seed"
        )
    if opts.get("min_user_events", 2) < 1:
        raise ValueError(f"min_user_events must be >= 1, got {opts['min_user_events']}")
    ds = loader(path, **opts)
    if ds.category_feature is None:
        ds = add_pseudo_categories(ds, n_clusters=int(n_pseudo), seed=int(seed))
    return ds
