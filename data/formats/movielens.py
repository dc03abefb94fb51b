"""MovieLens (GroupLens): 100k, 1M / 10M and latest / 25M / 32M, one loader and three variants.

Each variant is a `Variant` spec: the ratings file (name, separator, header) and readers for the
metadata beside it. The ratings are read and checked the same way for all three (integer ids
and timestamps, stars from 0.5 to 5; actions from the rating, see `ACTION_NOTE`).

- [ml-100k] `u.data` (user TAB item TAB rating TAB timestamp); `u.item` (latin-1, `|`-separated,
  19 genre flags -> multi-valued item feature "genre" in `u.genre` order; the release date's
  year -> categorical "year", the exact year, not a decade); `u.user` -> categorical "age"
  (the MovieLens 1M buckets: Under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), "gender",
  "occupation". The zip code is not used (too sparse to embed). The official splits
  `u1.base` ... `u5.test`, `ua.*`, `ub.*` are u.data files too.
- [ml-dat] MovieLens 1M / 10M: `ratings.dat`, `movies.dat` (title with the year in brackets,
  `|`-joined genres), `users.dat` when present (10M has none); `::`-separated.
- [ml-csv] MovieLens latest / 25M / 32M: `ratings.csv` (userId,movieId,rating,timestamp) and
  `movies.csv` (movieId,title,genres; "(no genres listed)" means no genre).

A folder is read with its metadata files. A named ratings file is read as that file, never
swapped for a sibling; the metadata beside it is used only when the file is the dataset's own
(named u.data or one of its splits, ratings.dat, ratings.csv). A subset or copy under another
name is loaded alone, without item or user features (the report says so).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from cascade.data.dataset import Dataset, DataError
from cascade.data.formats import register_format
from cascade.data.formats.assemble import ACTION_NOTE, RawFeatures, assemble
from cascade.data.formats.text import (
    TABLE_SUFFIXES,
    cast_column,
    check_readable,
    first_data_line,
    read_csv_strings,
    read_fields,
)

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
RATING_RANGE = (0.5, 5.0)  # stars: 1-5, half stars from 0.5 (10M, latest)
_RATING_FIELDS = {"user": pl.Int64, "item": pl.Int64, "rating": pl.Float32, "ts": pl.Int64}
_NO_GENRES = "(no genres listed)"
_TITLE_YEAR = r"\((\d{4})[^()]*\)\s*$"  # "Toy Story (1995)", "Dekalog (1989-1990)"

Reader = Callable[[Path, list[str]], "RawFeatures | None"]  # (folder, report) -> features


@dataclass(frozen=True)
class Variant:
    ratings: str  # the ratings file of a dataset folder
    own: str  # regex: file names that are the dataset's own ratings (metadata applies)
    sep: str
    header: list[str] | None  # the exact first line, when the file has one
    metadata: str  # the metadata files, for the report
    items: Reader
    users: Reader


def _ratings_file(path: str | Path, v: Variant) -> tuple[Path, Path | None]:
    """(the ratings file to read, the folder whose metadata goes with it, or None)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / v.ratings).is_file():
            raise DataError(f"{p}: expected a file {v.ratings!r} in this directory")
        return p / v.ratings, p
    check_readable(p)
    return p, (p.parent if re.fullmatch(v.own, p.name.lower()) else None)


def load_movielens(
    v: Variant,
    path: str | Path,
    *,
    strict: bool = False,
    min_user_events: int = 2,
    name: str | None = None,
) -> Dataset:
    """Any variant, from its folder or a ratings file (see the module docstring)."""
    f, meta = _ratings_file(path, v)
    ratings = read_fields(
        f, v.sep, _RATING_FIELDS, header=v.header, ranges={"rating": RATING_RANGE}
    )
    report = [ACTION_NOTE]
    if meta is None:
        report.append(
            f"{f.name} is not named {v.ratings}: {v.metadata} beside it is not read, items "
            "have no features"
        )
        items = users = None
    else:
        items, users = v.items(meta, report), v.users(meta, report)
    return assemble(
        name=name or (meta.name if meta is not None else f.stem),
        source=str(meta if meta is not None else f),
        file=str(f),
        events=ratings,
        items=items,
        users=users,
        category_feature="genre" if items is not None else None,
        report=report,
        strict=strict,
        min_user_events=min_user_events,
    )


# --------------------------------------------------------------------------------------------
# shared pieces of the metadata


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


def _movies(frame: pl.DataFrame, file: Path, report: list[str], genres_note: str) -> RawFeatures:
    """id, title, genres (`|`-joined) -> id, genre list, year (movies.dat, movies.csv)."""
    out = frame.select(
        *[c for c in ("_line",) if c in frame.columns],
        "id",
        pl.when(pl.col("genres").str.strip_chars() == _NO_GENRES)
        .then(pl.lit(None, dtype=pl.String))
        .otherwise(pl.col("genres").str.strip_chars())
        .str.split("|")
        .alias("genre"),
        pl.col("title").str.extract(_TITLE_YEAR, 1).alias("year"),
    )
    report.append(f"genre: the |-joined genres of {file.name} ({genres_note})")
    report.append(
        f"year: release year from the title in {file.name} (categorical, exact year"
        + _n_unknown(out, "year")
        + ")"
    )
    return RawFeatures(out, str(file), categorical=["year"], multi=["genre"])


# --------------------------------------------------------------------------------------------
# [ml-100k]


def _items_100k(d: Path, report: list[str]) -> RawFeatures | None:
    if not (d / "u.item").is_file():
        report.append(f"no u.item in {d}: items have no features")
        return None
    genres = ML100K_GENRES
    if (d / "u.genre").is_file():
        g = read_fields(
            d / "u.genre", "|", {"genre": pl.String, "flag": pl.Int64}, encoding="latin-1"
        )
        genres = g.sort("flag")["genre"].to_list()
    flags = [f"g{j}" for j in range(len(genres))]
    meta = read_fields(
        d / "u.item",
        "|",
        {"id": pl.Int64, "title": pl.String, "release": pl.String, "video": pl.String,
         "url": pl.String, **{f: pl.Int8 for f in flags}},
        encoding="latin-1",
    )  # fmt: skip
    for c in flags:
        bad = meta.filter(~pl.col(c).is_in([0, 1]))
        if bad.height:
            raise DataError(
                f"{d / 'u.item'}, line {bad['_line'][0]}, genre flag {c!r}: expected 0 or 1, "
                f"found {bad[c][0]}"
            )
    frame = meta.select(
        "_line",
        "id",
        pl.concat_list([pl.when(pl.col(f) == 1).then(pl.lit(g)) for f, g in zip(flags, genres)])
        .list.drop_nulls()
        .alias("genre"),
        pl.col("release").str.extract(r"(\d{4})\s*$", 1).alias("year"),
    )
    report.append(f"genre: the {len(genres)} genre flags of u.item (multi-valued)")
    report.append(
        "year: release year from u.item's release date (categorical, exact year"
        + _n_unknown(frame, "year")
        + ")"
    )
    return RawFeatures(
        frame, str(d / "u.item"), categorical=["year"], multi=["genre"], vocab={"genre": genres}
    )


def _users_100k(d: Path, report: list[str]) -> RawFeatures | None:
    if not (d / "u.user").is_file():
        return None
    u = read_fields(
        d / "u.user",
        "|",
        {"id": pl.Int64, "age": pl.Int64, "gender": pl.String, "occupation": pl.String,
         "zip": pl.String},
        encoding="latin-1",
    )  # fmt: skip
    report.append("age: u.user ages in the MovieLens 1M buckets " + ", ".join(AGE_BUCKETS))
    return RawFeatures(
        u.select("_line", "id", _age_bucket(pl.col("age")).alias("age"), "gender", "occupation"),
        str(d / "u.user"),
        categorical=["age", "gender", "occupation"],
        vocab={"age": AGE_BUCKETS},
    )


ML_100K = Variant(
    ratings="u.data",
    own=r"u\.data|u[1-5ab]\.(base|test)",
    sep="\t",
    header=None,
    metadata="u.item / u.user",
    items=_items_100k,
    users=_users_100k,
)


@register_format(
    "ml-100k",
    detect=lambda p: re.fullmatch(ML_100K.own, p.name.lower()) is not None,
    describe="u.data (MovieLens 100k)",
    folder="u.data",
)
def load_movielens_100k(
    path: str | Path, *, strict: bool = False, min_user_events: int = 2, name: str | None = None
) -> Dataset:
    """MovieLens 100k from its directory (or its `u.data`): ratings, genres, year, user info."""
    return load_movielens(ML_100K, path, strict=strict, min_user_events=min_user_events, name=name)


# --------------------------------------------------------------------------------------------
# [ml-dat]


def _items_dat(d: Path, report: list[str]) -> RawFeatures | None:
    if not (d / "movies.dat").is_file():
        report.append(f"no movies.dat in {d}: items have no features")
        return None
    m = read_fields(
        d / "movies.dat",
        "::",
        {"id": pl.Int64, "title": pl.String, "genres": pl.String},
        encoding="auto",
    )
    return _movies(m, d / "movies.dat", report, "multi-valued")


def _users_dat(d: Path, report: list[str]) -> RawFeatures | None:
    if not (d / "users.dat").is_file():
        report.append(f"no users.dat in {d}: users have no features")
        return None
    u = read_fields(
        d / "users.dat",
        "::",
        {"id": pl.Int64, "gender": pl.String, "age": pl.Int64, "occupation": pl.Int64,
         "zip": pl.String},
    )  # fmt: skip
    occ = dict(enumerate(ML1M_OCCUPATIONS))
    return RawFeatures(
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


ML_DAT = Variant(
    ratings="ratings.dat",
    own=r"ratings\.dat",
    sep="::",
    header=None,
    metadata="movies.dat / users.dat",
    items=_items_dat,
    users=_users_dat,
)


def _detect_dat(p: Path) -> bool:
    if p.name.lower() == "ratings.dat":
        return True
    return p.suffix.lower() not in TABLE_SUFFIXES and "::" in first_data_line(p)[1]


@register_format(
    "ml-dat", detect=_detect_dat, describe="ratings.dat (MovieLens 1M/10M)", folder="ratings.dat"
)
def load_movielens_dat(
    path: str | Path, *, strict: bool = False, min_user_events: int = 2, name: str | None = None
) -> Dataset:
    """MovieLens 1M / 10M from its directory (or a `::`-separated ratings file)."""
    return load_movielens(ML_DAT, path, strict=strict, min_user_events=min_user_events, name=name)


# --------------------------------------------------------------------------------------------
# [ml-csv]


def _items_csv(d: Path, report: list[str]) -> RawFeatures | None:
    f = d / "movies.csv"
    if not f.is_file():
        report.append(f"no movies.csv in {d}: items have no features")
        return None
    m = read_csv_strings(f, required=ML_CSV_MOVIES_HEADER)
    m = cast_column(m, "movieId", pl.Int64, str(f)).rename({"movieId": "id"})
    return _movies(m, f, report, f"multi-valued; {_NO_GENRES!r} = none")


ML_CSV = Variant(
    ratings="ratings.csv",
    own=r"ratings\.csv",
    sep=",",
    header=ML_CSV_RATINGS_HEADER,
    metadata="movies.csv",
    items=_items_csv,
    users=lambda d, report: None,
)


def _detect_csv(p: Path) -> bool:
    if p.suffix.lower() not in (".csv", ".tsv", ".tab"):
        return False
    first = first_data_line(p)[1]
    return [c.strip().strip('"') for c in first.split(",")] == ML_CSV_RATINGS_HEADER


@register_format(
    "ml-csv",
    detect=_detect_csv,
    describe="ratings.csv (MovieLens latest/25M/32M)",
    folder="ratings.csv",
)
def load_movielens_csv(
    path: str | Path, *, strict: bool = False, min_user_events: int = 2, name: str | None = None
) -> Dataset:
    """MovieLens latest / 25M / 32M from its directory (or a file with its ratings header)."""
    return load_movielens(ML_CSV, path, strict=strict, min_user_events=min_user_events, name=name)
