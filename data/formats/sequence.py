"""[sequence] Per-user sequence text (the SASRec family: Amazon Beauty, Steam, ...).

Either one line per user, `user item item ...` in time order, or one `user item` pair per line
in time order. Ids are integers separated by whitespace. The format has no clock, so the
timestamp is the item's position in its line (per-user lines) or the line number (pairs).
A user listed on two lines of a per-user file is an error; a line with a user and no item is a
user without events (filtered as too short, and reported).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from cascade.data.dataset import Dataset, DataError
from cascade.data.formats import register_format
from cascade.data.formats.assemble import assemble
from cascade.data.formats.text import (
    TABLE_SUFFIXES,
    check_readable,
    first_data_line,
    line_text,
    more,
    scan_lines,
    shown,
)


def _detect(p: Path) -> bool:
    """Two or more whitespace-separated integers on the first non-blank line."""
    if p.suffix.lower() in TABLE_SUFFIXES:
        return False
    tokens = first_data_line(p)[1].split()
    return len(tokens) >= 2 and all(t.lstrip("-").isdigit() for t in tokens)


@register_format(
    "sequence",
    detect=_detect,
    describe="a sequence text file ('user item item ...' or 'user item' per line)",
    fallback=True,
)
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
    check_readable(p)
    tokens = (
        scan_lines(p)
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
        tok = line_text(p, line).split()[pos]
        raise DataError(
            f"{p}, line {line}, token {pos + 1}: expected an integer id, found {shown(tok)}"
            + more(bad.select(pl.col("_line").n_unique()).item() - 1)
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
                f"{shown(line_text(p, line))}"
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
    return assemble(
        name=name or p.stem,
        source=str(p),
        file=str(p),
        events=events,
        report=report,
        strict=strict,
        min_user_events=min_user_events,
        extra_small_users=extra,
    )
