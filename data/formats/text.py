"""Shared parsing for the text formats: files as lines, lines as typed fields, CSV tables.

Every function here keeps line numbers so that an error can name the file, the 1-based line
and what was expected (STYLE.md "Data"). Files are opened in one place (`read_bytes`): a FIFO,
socket or device is refused from its `stat` without being opened, an unreadable file is a
DataError with the OS's reason. A text file is cut into lines with numpy at its line ends (LF,
CRLF or a lone CR), so any byte may appear inside a line (no byte doubles as a separator); a
line is split into string fields with polars and cast with `strict=False`, and the first row
whose field count or cast fails names the line. CSV files with quoting go through polars' CSV
reader, every column as text, with `_line` beside the data; they must be UTF-8. Text fields
must not hold control bytes. Values quoted in messages are cut short (`shown`).
"""

from __future__ import annotations

import io
import os
import re
import stat
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from cascade.data.dataset import DataError

INT_TYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)
FLOAT_TYPES = (pl.Float32, pl.Float64)
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".parquet", ".pq")


def kind(dtype: pl.DataType) -> str:
    """What a column of `dtype` expects, for error messages."""
    if dtype in INT_TYPES:
        return "an integer"
    if dtype in FLOAT_TYPES:
        return "a number"
    return "text"


def more(n: int, what: str = "line") -> str:
    return f" (and {n} more such {what}{'s' if n > 1 else ''})" if n > 0 else ""


def shown(value: object, limit: int = 60) -> str:
    """`repr` of a value from the file, cut to `limit` characters: an error names the line and
    shows its start, it never dumps a file (a wrong file given as data may hold anything)."""
    if not isinstance(value, str) or len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"... ({len(value)} characters)"


def shown_names(names: Sequence[str], limit: int = 8) -> str:
    """A header's column names, at most `limit` of them, each cut short."""
    cut = [n if len(n) <= 30 else n[:30] + "..." for n in names[:limit]]
    return str(cut)[:-1] + (f", ... ({len(names)} columns)]" if len(names) > limit else "]")


# --------------------------------------------------------------------------------------------
# Opening files: refused before reading when they are not regular, readable files


def read_bytes(path: Path, size: int = -1) -> bytes:
    """The file's bytes (the first `size`; all when -1), or a DataError naming the file. A
    FIFO, socket or device is refused from its `stat`, without opening it (a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a directory; expected a data file")
    if not stat.S_ISREG(mode):
        raise DataError(
            f"{path}: not a regular file (a FIFO, socket or device); expected a data file"
        )
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror or e}") from None


def check_readable(path: Path) -> None:
    """DataError unless `path` is a regular file this process can read (see `read_bytes`);
    for files that a library (polars, pyarrow) opens itself."""
    read_bytes(path, 0)


# --------------------------------------------------------------------------------------------
# Files as lines


# bytes no text field holds: C0 controls but TAB, LF, CR; DEL; U+FFFD (undecodable bytes)
CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]"


def check_utf8(path: Path, raw: bytes) -> None:
    """DataError naming the line of the first byte that is not UTF-8 (binary data, or another
    encoding) in a file that must be UTF-8 text."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = len(re.findall(rb"\r\n|\r|\n", raw[: e.start])) + 1
        raise DataError(
            f"{path}, line {line}: expected UTF-8 text, found the byte 0x{raw[e.start]:02x} "
            "(binary data, or text in another encoding)"
        ) from None


def read_text(path: Path, encoding: str) -> bytes:
    """The file as UTF-8 bytes with `\\n` line ends: no byte-order mark, CRLF and lone CR (old
    Mac) made `\\n`. `encoding`: "utf8" (invalid bytes become U+FFFD), "auto" (UTF-8, else
    latin-1) or any Python codec name."""
    return _normalise(read_bytes(path), encoding)


def _normalise(raw: bytes, encoding: str) -> bytes:
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


def scan_lines(path: Path, encoding: str = "utf8") -> pl.LazyFrame:
    """One row per physical line: `_line` (1-based line number), `_raw` (text, no line end).
    Blank lines come back as rows too, so row numbers are line numbers."""
    return _lines(read_text(path, encoding))


def _lines(raw: bytes) -> pl.LazyFrame:
    """`scan_lines` of UTF-8 bytes with `\\n` line ends."""
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


def line_text(path: Path, line: int, encoding: str = "utf8") -> str:
    """The text of one line (error messages only)."""
    got = scan_lines(path, encoding).filter(pl.col("_line") == line).collect()
    return got["_raw"][0] if got.height and got["_raw"][0] is not None else ""


def head_lines(path: Path, size: int = 1 << 16) -> list[str]:
    """The lines of the file's first `size` bytes (any line end, no byte-order mark)."""
    head = read_bytes(path, size)
    return re.split(r"\r\n?|\n", head.decode("utf-8", "replace").lstrip("\ufeff"))


def first_line(path: Path) -> str:
    return head_lines(path)[0]


def first_data_line(path: Path) -> tuple[int, str]:
    """(1-based line number, stripped text) of the first non-blank line; (0, "") if none."""
    for i, text in enumerate(head_lines(path), start=1):
        if text.strip():
            return i, text.strip()
    return 0, ""


# --------------------------------------------------------------------------------------------
# Lines as typed fields (formats without quoting: u.data, *.dat, MovieLens' ratings.csv)


def read_fields(
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
        got = first_line(path).split(sep)
        if [g.strip().strip('"') for g in got] != list(header):
            missing = [h for h in header if h not in [g.strip().strip('"') for g in got]]
            raise DataError(
                f"{path}, line 1: expected the header {sep.join(header)!r}, found "
                f"{shown(sep.join(got))}" + (f" (missing column(s) {missing})" if missing else "")
            )
    lines = scan_lines(path, encoding)
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
            f"found {nf}: {shown(line_text(path, line, encoding))}" + more(bad.height - 1)
        )
    for i, (n, t) in enumerate(fields.items()):
        if t == pl.String:
            continue
        bad = df.filter(pl.col(n).is_null())
        if bad.height:
            line = bad["_line"][0]
            value = line_text(path, line, encoding).split(sep)[i].strip()
            raise DataError(
                f"{path}, line {line}, field {n!r} (field {i + 1} of {layout!r}): expected "
                f"{kind(t)}, found {shown(value)}" + more(bad.height - 1)
            )
        lo, hi = (ranges or {}).get(n, (None, None))
        ok = pl.col(n).is_finite() if t in FLOAT_TYPES else pl.lit(True)
        if lo is not None:
            ok = ok & pl.col(n).is_between(lo, hi)
        bad = df.filter(~ok)
        if bad.height:
            line = bad["_line"][0]
            value = line_text(path, line, encoding).split(sep)[i].strip()
            want = "a finite number" + (f" from {lo:g} to {hi:g}" if lo is not None else "")
            raise DataError(
                f"{path}, line {line}, field {n!r} (field {i + 1} of {layout!r}): expected "
                f"{want}, found {shown(value)}" + more(bad.height - 1)
            )
    _check_control(df, [n for n, t in fields.items() if t == pl.String], str(path), "field")
    return df.drop("_nf")


# --------------------------------------------------------------------------------------------
# CSV tables with a header (quoting allowed): every column as text, plus `_line`


def csv_sep(p: Path, separator: str | None) -> str:
    if separator is not None:
        return separator
    return "\t" if p.suffix.lower() in (".tsv", ".tab") else ","


def read_csv_strings(path: Path, *, required: Sequence[str], separator: str = ",") -> pl.DataFrame:
    """A CSV with a header, every column as text, plus `_line`; checks the required columns."""
    raw = read_bytes(path)
    check_utf8(path, raw)
    # polars ends lines at LF (CRLF too) only: it reads the text with every line end made LF
    raw = _normalise(raw, "utf8")
    raw, skipped = _skip_blank_lines(raw)  # blank lines are not data, before the header too
    if not raw.split(b"\n", 1)[0].strip():
        raise DataError(
            f"{path}: the file is empty; expected a header line with columns {list(required)}"
        )
    try:
        df = pl.read_csv(
            io.BytesIO(raw), infer_schema=False, separator=separator, raise_if_empty=False
        )
    except pl.exceptions.PolarsError as e:
        raise DataError(_locate_csv_error(path, separator, e)) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; the header has {shown_names(df.columns)} "
            f"(separator {separator!r})"
        )
    _check_short_lines(path, raw, separator, skipped)
    df = df.with_row_index("_line", offset=2 + skipped).with_columns(pl.col("_line").cast(pl.Int64))
    # blank lines come back as all-null rows: not data
    df = df.filter(~pl.all_horizontal([pl.col(c).is_null() for c in df.columns if c != "_line"]))
    if df.height == 0:
        raise DataError(f"{path}: the file has a header but no data lines")
    _check_control(df, [c for c in df.columns if c != "_line"], str(path))
    return df


def _skip_blank_lines(raw: bytes) -> tuple[bytes, int]:
    """`raw` from its first line with text on, and how many blank lines came before it."""
    skipped, pos = 0, 0
    while True:
        end = raw.find(b"\n", pos)
        if end < 0 or raw[pos:end].strip():
            return raw[pos:], skipped
        skipped, pos = skipped + 1, end + 1


# a quoted field, quotes doubled inside: what a separator inside it does not count for
_QUOTED = r'"(?:[^"]|"")*"'


def _check_short_lines(path: Path, raw: bytes, sep: str, skipped: int) -> None:
    """A line with fewer fields than the header is an error (polars would fill the missing
    fields with nulls, silently). Lines with a quote left open (a field spanning lines) are
    left to polars' parser."""
    counts = (
        _lines(raw)
        .filter(pl.col("_raw").str.strip_chars() != "")
        .with_columns(pl.col("_raw").str.replace_all(_QUOTED, "").alias("_unq"))
        .select(
            "_line",
            (pl.col("_unq").str.count_matches(sep, literal=True) + 1).alias("nf"),
            pl.col("_unq").str.contains('"', literal=True).alias("open"),
        )
        .collect()
    )
    if counts.height < 2 or counts["open"].any():
        return
    k = counts["nf"][0]
    short = counts.filter(pl.col("nf") < k)
    if short.height:
        line = short["_line"][0]
        text = _lines(raw).filter(pl.col("_line") == line).collect()["_raw"][0]
        raise DataError(
            f"{path}, line {line + skipped}: expected {k} fields separated by {sep!r} like the "
            f"header, found {short['nf'][0]}: {shown(text)}" + more(short.height - 1)
        )


def _check_control(df: pl.DataFrame, cols: list[str], file: str, what: str = "column") -> None:
    """Text fields hold text: a control byte (0x1F, NUL, ...) means binary data or a file
    written with a separator this format does not use."""
    for c in cols:
        bad = df[c].str.contains(CONTROL).fill_null(False)
        if bad.any():
            at, n = locate(df, file, bad)
            raise DataError(
                f"{at}, {what} {c!r}: expected text, found a control or undecodable byte in "
                f"{shown(df[c].filter(bad)[0])}" + more(n - 1, "value")
            )


def _locate_csv_error(path: Path, sep: str, err: Exception) -> str:
    """Name the first line whose field count differs from the header's (quotes ignored)."""
    counts = (
        scan_lines(path)
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
                f"found {bad['nf'][0]}: {shown(line_text(path, line))}"
            )
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{path}: could not parse as CSV (separator {sep!r}): {reason[:120]}"


def where(df: pl.DataFrame, file: str, row: int) -> str:
    """`file, line N` when the frame carries `_line` (text files), else `file, row N`."""
    if "_line" in df.columns:
        return f"{file}, line {df['_line'][row]}"
    return f"{file}, row {row + 1}"


def locate(df: pl.DataFrame, file: str, mask: pl.Series) -> tuple[str, int]:
    """Where the first True of `mask` is, and how many there are."""
    idx = int(mask.arg_true()[0])
    n = int(mask.sum())
    return where(df, file, idx), n


def cast_column(df: pl.DataFrame, col: str, dtype: pl.DataType, file: str) -> pl.DataFrame:
    """Cast a column; the first value that fails (or, for floats, is not finite) is named."""
    src = df[col]
    out = (
        src.str.strip_chars().cast(dtype, strict=False)
        if src.dtype == pl.String
        else src.cast(dtype, strict=False)
    )
    bad = out.is_null() & src.is_not_null()
    empty = src.is_null() | ((src.str.strip_chars() == "") if src.dtype == pl.String else False)
    fail = bad | empty
    want = kind(dtype)
    if not fail.any() and dtype in FLOAT_TYPES:
        fail, want = ~out.is_finite(), "a finite number"  # nan, inf, or too large for the type
    if fail.any():
        at, n = locate(df, file, fail)
        value = src.filter(fail)[0]
        raise DataError(
            f"{at}, column {col!r}: expected {want}, found {shown(value)}" + more(n - 1, "value")
        )
    return df.with_columns(out.alias(col))
