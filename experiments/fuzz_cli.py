"""Fuzz the `cascade` command line with bad and unusual input (issue 15: every bad input a clear
error, never a traceback, never a silent accept; unusual but valid input accepted).

The corpus (well over 1,000 cases, generated deterministically) covers:
- data: every format (ml-100k folders, ml-dat `::` files, ml-csv, sequence text, CSV and
  Parquet logs, item/user feature tables) with malformed fields, lines, encodings and files,
  and paths that are not data (FIFOs, folders, links, the empty string);
- config: TOML files with wrong types, unknown keys, out-of-range values, huge numbers, binary
  bytes, other encodings;
- cli: bad values for every option of `run`, `compare`, `report`, `sweep`, `ablation` and
  `data describe`;
- plugin: `module:Class` stages that fail to import, raise in fit/score/retrieve, return wrong
  shapes, NaN or duplicate ids, call sys.exit or raise KeyboardInterrupt;
- runs: damaged run folders for `compare` and `report` (missing files, corrupt JSON/Parquet,
  wrong types, read-only folders);
- and, in every category, VALID unusual input that must be accepted: CRLF and BOM files,
  unicode and string ids, date timestamps, paths with spaces, float timestamps among integers.

Every case runs the installed `cascade` console script in its own temporary folder (its own
HOME, cache, data cache and no network mirror), with a timeout, and is classified:

    ok            a valid case exited 0, or an invalid one exited 2 with no traceback and a
                  message naming the offending file / key / value
    unnamed       exit 2, but the message does not name what was wrong
    traceback     "Traceback" in the output
    hang          the timeout passed
    internal      exit 1 (cascade's "internal error")
    silent-accept an invalid case exited 0
    wrong-refusal a valid case exited non-zero
    other         any other exit status (a signal, 130, ...)
    leftover      the case passed but left temporary files (`.*.tmp`) or changed a user file

Two runners, same classification: `--runner subprocess` starts the console script for every
case (the faithful one, ~6 s of imports per case on 2 cores); `--runner fork` (the default)
keeps one pre-imported "zygote" process per worker that forks a child per case, which then
runs exactly what the console script runs (`cascade.cli.app()` with the case's argv, cwd, env
and file descriptors) in a new session. Both run at most `--jobs` (default 2) cases at once.
Torch runs single-threaded in every case (OMP_NUM_THREADS=1), so two jobs use two cores.

    python experiments/fuzz_cli.py                        # the whole corpus, fork runner
    python experiments/fuzz_cli.py --runner subprocess    # the same through the script
    python experiments/fuzz_cli.py --only plugin --list   # list the plugin cases
    python experiments/fuzz_cli.py --only data:log-csv --show-failures

Prints a table by category and outcome, and writes experiments/results/fuzz_cli.json (machine,
versions, counts, the failing cases' commands and outputs) and fuzz_cli.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gzip
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
OUTCOMES = ("ok", "unnamed", "traceback", "hang", "internal", "silent-accept", "wrong-refusal",
            "other", "leftover")
FAILING = OUTCOMES[1:]

# ---- cases -----------------------------------------------------------------------------------


@dataclass
class Case:
    """One command line, the files it needs, and what must happen.

    `valid`: True (must exit 0), False (must be refused) or None (damaged but harmless input:
    exit 0 or a clean refusal both pass). `args` and `needles` may hold `{d}`, the case's
    folder. A needle is a string, or a tuple of alternatives; a refusal
    passes when it exits 2 without a traceback and every needle is in its output. `check(d, output)` may add a failure reason (a valid run's folder, user
    files intact)."""

    category: str
    name: str
    args: list[str]
    valid: bool | None
    needles: tuple = ()
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, str], str | None] | None = None
    timeout: float = 90.0
    env: dict[str, str] = field(default_factory=dict)
    cleanup: Callable[[Path], None] | None = None

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}"


def _fmt(s: str, d: Path) -> str:
    return s.replace("{d}", str(d))


def _w(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


# the cheapest complete run: most-popular at every stage, small budgets
CHEAP = ["--retrieval", "popular", "--esr", "popular", "--lsr", "popular"]
SMALL_K = ["--retrieval-k", "20", "--esr-k", "10", "--final-k", "5"]
RUN = ["run", "--no-progress", "--out", "{d}/out"]
TINY = ["--data", "synthetic:tiny"]
# learned stages on a schedule of a few steps (retrieval and LSR), for cases that must train
SHORT_TRAIN = "{train = {epochs = 1, max_steps_per_epoch = 3}}"


def describe(path: str) -> list[str]:
    return ["data", "describe", "--data", path]


def run_cheap(*extra: str) -> list[str]:
    return [*RUN, *CHEAP, *SMALL_K, *extra]


def _run_folder_written(d: Path, _output: str = "", out: str = "out") -> str | None:
    p = d / out
    if not (p / "metrics.json").is_file() or not (p / ".cascade-run").is_file():
        return f"exit 0 but no complete run folder at {p}"
    return None


# ---- base data: 30 users x 8 events over 60 items, deterministic -------------------------------

def base_events(n_users: int = 30, n_items: int = 60, per_user: int = 8, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for u in range(1, n_users + 1):
        items = rng.sample(range(1, n_items + 1), per_user)
        for j, i in enumerate(items):
            rows.append((u, i, float(rng.choice([1, 2, 3, 4, 5])), 880000000 + 1000 * u + j))
    return rows


EVENTS = base_events()
ITEMS = sorted({i for _, i, _, _ in EVENTS})
USERS = sorted({u for u, _, _, _ in EVENTS})
GENRES = ["Action", "Comedy", "Drama", "Sci-Fi", "Horror"]


def udata_lines() -> list[str]:
    return [f"{u}\t{i}\t{int(r)}\t{t}" for u, i, r, t in EVENTS]


def dat_lines() -> list[str]:
    return [f"{u}::{i}::{int(r)}::{t}" for u, i, r, t in EVENTS]


def mlcsv_lines() -> list[str]:
    return ["userId,movieId,rating,timestamp"] + [f"{u},{i},{r:g},{t}" for u, i, r, t in EVENTS]


def log_lines(sep: str = ",") -> list[str]:
    return [sep.join(("user", "item", "timestamp", "rating"))] + [
        sep.join((str(u), str(i), str(t), f"{r:g}")) for u, i, r, t in EVENTS
    ]


def seq_lines() -> list[str]:
    by_user: dict[int, list[int]] = defaultdict(list)
    for u, i, _, _ in EVENTS:
        by_user[u].append(i)
    return [" ".join(map(str, [u, *its])) for u, its in by_user.items()]


def uitem_lines() -> list[str]:
    out = []
    for i in ITEMS:
        flags = ["0"] * 19
        flags[1 + i % 5] = "1"
        out.append(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x/{i}|" + "|".join(flags))
    return out


def uuser_lines() -> list[str]:
    return [f"{u}|{20 + u}|{'MF'[u % 2]}|student|0{u:04d}" for u in USERS]


def movies_dat_lines() -> list[str]:
    return [f"{i}::Movie {i} (1995)::{GENRES[i % 5]}|{GENRES[(i + 1) % 5]}" for i in ITEMS]


def users_dat_lines() -> list[str]:
    return [f"{u}::{'MF'[u % 2]}::25::{u % 20}::0{u:04d}" for u in USERS]


def movies_csv_lines() -> list[str]:
    return ["movieId,title,genres"] + [
        f'{i},"Movie {i}, The (1995)",{GENRES[i % 5]}|{GENRES[(i + 1) % 5]}' for i in ITEMS
    ]


def items_csv_lines() -> list[str]:
    return ["item,genre,studio"] + [f"{i},{GENRES[i % 5]}|{GENRES[(i + 2) % 5]},s{i % 3}"
                                     for i in ITEMS]


def users_csv_lines() -> list[str]:
    return ["user,country"] + [f"{u},c{u % 4}" for u in USERS]


def text(lines: Sequence[str], end: str = "\n") -> str:
    return end.join(lines) + end


# ---- data: line and field mutations over every text format -------------------------------------

# (token, valid, needle beyond file and line) by the kind of field it replaces
INT_TOKENS = [
    ("abc", False), ("", False), ("1.5", False), ("1e3", False), ("0x10", False), ("nan", False),
    ("inf", False), ("99999999999999999999", False), ("-", False), ("1 2", False),
    ("\u0661\u0662", False), ("1_000", False), ("½", False), ("\x00", False), ("7\x1f", False),
    (" 7 ", True), ("007", True), ("-3", True),
]
RATING_TOKENS = [
    ("abc", False), ("", False), ("nan", False), ("NaN", False), ("inf", False), ("-inf", False),
    ("0", False), ("6", False), ("-1", False), ("5.5", False), ("1e300", False), ("0.4", False),
    ("4,5", False), ("4.5", True), ("0.5", True), ("5", True), (" 3 ", True), ("3.0", True),
]
TS_TOKENS = [
    ("yesterday", False), ("", False), ("1.5", False), ("nan", False), ("1e400", False),
    ("99999999999999999999", False), ("2020-01-01", False), ("-1", True), ("0", True),
    (" 881250949 ", True),
]


@dataclass(frozen=True)
class TextFormat:
    """A delimited text format of a MovieLens ratings file: how to write the base, its fields."""

    key: str  # category suffix
    file: str  # file name inside the case's dataset folder
    lines: Callable[[], list[str]]
    sep: str
    fields: tuple[str, ...]  # names the loader gives the fields
    header: bool = False
    folder: bool = True  # pass the folder (else the file)


ML100K = TextFormat("ml-100k", "u.data", udata_lines, "\t", ("user", "item", "rating", "ts"))
MLDAT = TextFormat("ml-dat", "ratings.dat", dat_lines, "::", ("user", "item", "rating", "ts"))
MLCSV = TextFormat("ml-csv", "ratings.csv", mlcsv_lines, ",", ("user", "item", "rating", "ts"),
                   header=True)


def _tokens(field_name: str):
    return {"rating": RATING_TOKENS, "ts": TS_TOKENS}.get(field_name, INT_TOKENS)


def _ml_cases(fmt: TextFormat) -> list[Case]:
    """Field tokens at two lines, structural damage, encodings, and valid unusual files."""
    cat = f"data:{fmt.key}"
    base = fmt.lines()
    first = 1 if fmt.header else 0  # index of the first data line
    out: list[Case] = []

    def add(name: str, body: str | bytes, valid: bool, needles: tuple = (), *, extra=None,
            use_run: bool = False, file: str | None = None):
        fname = file or fmt.file

        def setup(d: Path, body=body, fname=fname, extra=extra):
            _w(d / "ds" / fname, body)
            for k, v in (extra or {}).items():
                _w(d / "ds" / k, v)

        target = "{d}/ds" if fmt.folder else "{d}/ds/" + fname
        args = [*RUN, "--data", target, *CHEAP, *SMALL_K] if use_run else describe(target)
        out.append(Case(cat, name, args, valid, (fname, *needles) if not valid else (),
                        setup, _run_folder_written if (valid and use_run) else None))

    for li in (first + 2, len(base) - 1):  # a middle line and the last one
        for fi, fname in enumerate(fmt.fields):
            for tok, ok in _tokens(fname):
                lines = list(base)
                parts = lines[li].split(fmt.sep)
                parts[fi] = tok
                lines[li] = fmt.sep.join(parts)
                if fmt.sep in tok or (fmt.sep == "\t" and "\t" in tok):
                    continue
                # the header is line 1 for ml-csv; data line li is line li + 1
                add(f"line{li + 1}-{fname}={tok!r}", text(lines), ok, (f"line {li + 1}",))
    # structure
    ln = first + 3
    structural = {
        "missing-field": lambda ls: ls.__setitem__(ln, fmt.sep.join(ls[ln].split(fmt.sep)[:-1])),
        "extra-field": lambda ls: ls.__setitem__(ln, ls[ln] + fmt.sep + "9"),
        "one-field": lambda ls: ls.__setitem__(ln, ls[ln].split(fmt.sep)[0]),
        "wrong-separator": lambda ls: ls.__setitem__(ln, ls[ln].replace(fmt.sep, ";")),
        "spaces-for-separator": lambda ls: ls.__setitem__(ln, ls[ln].replace(fmt.sep, " ")),
        "binary-line": lambda ls: ls.__setitem__(ln, "\x89PNG\x1a\x00\x00\x07"),
        "nul-in-line": lambda ls: ls.__setitem__(ln, ls[ln][:2] + "\x00" + ls[ln][2:]),
        "html-line": lambda ls: ls.__setitem__(ln, "<html><body>404 Not Found</body></html>"),
        "long-garbage-line": lambda ls: ls.__setitem__(ln, "x" * 200_000),
        "many-fields": lambda ls: ls.__setitem__(ln, fmt.sep.join(["1"] * 5000)),
        "doubled-separator": lambda ls: ls.__setitem__(ln, ls[ln].replace(fmt.sep, fmt.sep * 2, 1)),
        "trailing-separator": lambda ls: ls.__setitem__(ln, ls[ln] + fmt.sep),
    }
    for name, mutate in structural.items():
        lines = list(base)
        mutate(lines)
        add(name, text(lines), False, (f"line {ln + 1}",))
    # truncated in the middle of the last line (a download cut short)
    cut = "\n".join(base[:-1]) + "\n" + base[-1][: base[-1].index(fmt.sep) + len(fmt.sep) + 1]
    add("truncated-last-line", cut, False, (f"line {len(base)}",))
    add("empty-file", "", False)
    add("only-blank-lines", "\n\n  \n\t\n", False)
    add("only-newline", "\n", False)
    add("gzip-bytes", gzip.compress(text(base).encode()), False)
    add("utf16", text(base).encode("utf-16"), False)
    add("random-bytes", random.Random(7).randbytes(4096), False)
    add("latin1-byte-in-id", text(base).replace(base[ln], base[ln].replace("1", "\xe91", 1))
        .encode("latin-1"), False, (f"line {ln + 1}",))
    if fmt.header:
        add("no-header", text(base[1:]), False, ("line 1",))
        add("wrong-header", text(["user,item,rating,time", *base[1:]]), False, ("line 1",))
        add("header-only", text(base[:1]), False)
        add("header-twice", text([base[0], *base]), False, ("line 2",))
        add("quoted-header", text(['"userId","movieId","rating","timestamp"', *base[1:]]), True)
    else:
        header = fmt.sep.join(("user", "item", "rating", "timestamp"))
        add("has-header", text([header, *base]), False, ("line 1",))
    # valid unusual files
    add("crlf", text(base, "\r\n"), True)
    add("cr-only", text(base, "\r"), True)
    add("bom", b"\xef\xbb\xbf" + text(base).encode(), True)
    add("bom-crlf", b"\xef\xbb\xbf" + text(base, "\r\n").encode(), True)
    add("no-final-newline", text(base)[:-1], True)
    add("blank-lines-between", "\n".join(x + ("\n" if k % 7 == 0 else "") for k, x in
                                          enumerate(base)) + "\n", True)
    add("trailing-blank-lines", text(base) + "\n\n\n", True)
    add("duplicate-events", text(base + base[first:first + 5]), True)
    add("short-users", text(base + [fmt.sep.join(("999", "1", "3", "1"))]), True)
    add("run-crlf", text(base, "\r\n"), True, use_run=True)
    add("run-bom", b"\xef\xbb\xbf" + text(base).encode(), True, use_run=True)
    return out


def _metadata_cases() -> list[Case]:
    """u.item / u.user / u.genre, movies.dat / users.dat, movies.csv beside good ratings."""
    out: list[Case] = []
    specs = [  # (category, ratings file, its body, metadata file, good lines, bad lines)
        ("data:ml-100k", "u.data", text(udata_lines()), "u.item", uitem_lines()),
        ("data:ml-100k", "u.data", text(udata_lines()), "u.user", uuser_lines()),
        ("data:ml-dat", "ratings.dat", text(dat_lines()), "movies.dat", movies_dat_lines()),
        ("data:ml-dat", "ratings.dat", text(dat_lines()), "users.dat", users_dat_lines()),
        ("data:ml-csv", "ratings.csv", text(mlcsv_lines()), "movies.csv", movies_csv_lines()),
    ]
    for cat, rfile, rbody, mfile, good in specs:
        sep = "|" if mfile.startswith("u.") else ("::" if mfile.endswith(".dat") else ",")
        k = 3
        bad_versions = {
            "missing-field": good[:k] + [sep.join(good[k].split(sep)[:-1])] + good[k + 1:],
            "non-numeric-id": good[:k] + [good[k].replace(good[k].split(sep)[0], "x", 1)] + good[k + 1:],
            "binary": good[:k] + ["\x00\x01\x02garbage"] + good[k + 1:],
            "empty": [],
        }
        if mfile == "u.item":
            bad_versions["genre-flag-2"] = good[:k] + [good[k].rsplit("|", 1)[0] + "|2"] + good[k + 1:]
        if mfile == "u.user":
            bad_versions["age-text"] = good[:k] + [good[k].replace("|2", "|old", 1)] + good[k + 1:]
        if mfile == "users.dat":
            bad_versions["occupation-text"] = good[:k] + ["5::M::25::teacher::01234"] + good[k + 1:]
        if mfile == "movies.csv":
            bad_versions["missing-column"] = ["movieId,title"] + [",".join(x.split(",")[:2])
                                                                 for x in good[1:]]
            k += 1  # the header is line 1
        if mfile.endswith(".csv"):
            bad_versions["non-numeric-id"] = good[:k] + ["x,Movie,Drama"] + good[k + 1:]
        for name, lines in bad_versions.items():
            body = text(lines) if lines else ""

            def setup(d: Path, rfile=rfile, rbody=rbody, mfile=mfile, body=body):
                _w(d / "ds" / rfile, rbody)
                _w(d / "ds" / mfile, body)

            out.append(Case(cat, f"{mfile}-{name}", describe("{d}/ds"), False, (mfile,), setup))
        # valid: latin-1 title (u.item is latin-1; movies.dat "auto"), CRLF metadata
        good2 = list(good)
        good2[k] = good2[k].replace("Movie", "Mov\u00e9e")
        for name, body in (("latin1-title", text(good2).encode("latin-1")),
                           ("crlf", text(good, "\r\n").encode()),
                           ("unknown-ids", text(good + [sep.join(["9999", *good[-1].split(sep)[1:]])]))):
            if name == "latin1-title" and mfile.endswith(".csv"):
                body = text(good2).encode()  # ml-csv is UTF-8: a UTF-8 accent is fine

            def setup(d: Path, rfile=rfile, rbody=rbody, mfile=mfile, body=body):
                _w(d / "ds" / rfile, rbody)
                _w(d / "ds" / mfile, body)

            out.append(Case(cat, f"{mfile}-{name}", describe("{d}/ds"), True, (), setup))
    return out


# ---- data: sequence text -------------------------------------------------------------------------

def _sequence_cases() -> list[Case]:
    cat = "data:sequence"
    base = seq_lines()
    pairs = [f"{u} {i}" for u, i, _, _ in EVENTS]
    out: list[Case] = []

    def add(name, body, valid, needles=(), file="seq.txt", use_run=False):
        def setup(d: Path, body=body, file=file):
            _w(d / file, body)

        args = [*RUN, "--data", "{d}/" + file, *CHEAP, *SMALL_K] if use_run else describe("{d}/" + file)
        out.append(Case(cat, name, args, valid, (file.split("/")[-1], *needles) if not valid else (),
                        setup, _run_folder_written if (valid and use_run) else None))

    for li in (2, len(base) - 1):
        for pos in (0, 1, 4):
            for tok, ok in INT_TOKENS:
                if tok != tok.strip() or not tok or " " in tok:
                    continue  # whitespace separates tokens: a blank token is no token
                lines = list(base)
                parts = lines[li].split(" ")
                parts[pos] = tok
                lines[li] = " ".join(parts)
                if pos == 0 and ok:
                    continue  # "-3 ..." or "007": another user, still valid, not interesting
                add(f"line{li + 1}-token{pos + 1}={tok!r}", text(lines), ok,
                    (f"line {li + 1}",))
    add("user-twice", text(base + [base[0]]), False, (f"line {len(base) + 1}",))
    add("empty", "", False)
    add("blank-only", "\n \n", False)
    add("binary", random.Random(3).randbytes(2048), False)
    add("utf16", text(base).encode("utf-16"), False)
    add("gzip", gzip.compress(text(base).encode()), False)
    add("nul-line", text(base[:3] + ["1\x002 3"] + base[3:]), False, ("line 4",))
    add("comma-separated", text([x.replace(" ", ",") for x in base]), False)
    add("pairs-then-triple", text(pairs + ["1 2 3"]), True)  # a per-user file: user 1 twice...
    out[-1].valid = False
    out[-1].needles = ("seq.txt", "line")
    add("float-token", text(base[:2] + [base[2] + " 1.5"] + base[3:]), False, ("line 3",))
    # valid unusual
    add("pairs", text(pairs), True)
    add("pairs-crlf", text(pairs, "\r\n"), True)
    add("tabs", text([x.replace(" ", "\t") for x in base]), True)
    add("crlf", text(base, "\r\n"), True)
    add("bom", b"\xef\xbb\xbf" + text(base).encode(), True)
    add("cr-only", text(base, "\r"), True)
    add("multiple-spaces", text([x.replace(" ", "   ") for x in base]), True)
    add("user-without-items", text(base + ["777"]), True)
    add("dat-extension", text(base), True, file="data.dat")
    add("no-extension", text(base), True, file="sequences")
    add("space in path", text(base), True, file="my data/s\u00e9q uences.txt")
    add("run-pairs", text(pairs), True, use_run=True)
    add("run-space-path", text(base), True, file="dir with spaces/\u00fcnic\u00f8de.txt",
        use_run=True)
    return out


# ---- data: CSV and Parquet logs ----------------------------------------------------------------

LOG_ID_TOKENS = [("", False), ("  ", False), ("abc", True), ("\u00fcser-\u4e2d", True),
                 ("1.5", True), ("-7", True), ("\x07x", False), ("00012", True)]
LOG_TS_TOKENS = [("", False), ("yesterday", False), ("nan", False), ("inf", False),
                 ("-inf", False), ("1e300", False), ("99999999999999999999", False),
                 ("2020-13-45", False), ("881250949.5", True), ("-5", True),
                 ("\x00", False)]
LOG_RATING_TOKENS = [("", False), ("nan", False), ("inf", False), ("x", False), ("1e39", False),
                     ("4.5", True), ("-1", True)]


def _log_csv_cases() -> list[Case]:
    cat = "data:log-csv"
    base = log_lines()
    out: list[Case] = []

    def add(name, body, valid, needles=(), *, file="log.csv", opts: str = "", use_run=False,
            file_named=True):
        def setup(d: Path, body=body, file=file, opts=opts):
            _w(d / file, body)
            if opts:
                _w(d / "c.toml", f'data = "{file}"\ndata_options = {{{opts}}}\n')

        if opts:
            args = [*RUN, "--config", "{d}/c.toml", *CHEAP, *SMALL_K]
            use_run = True
        elif use_run:
            args = [*RUN, "--data", "{d}/" + file, *CHEAP, *SMALL_K]
        else:
            args = describe("{d}/" + file)
        named = (Path(file).name,) if file_named else ()
        out.append(Case(cat, name, args, valid, (*named, *needles) if not valid else (),
                        setup, _run_folder_written if (valid and use_run) else None))

    for li in (3, len(base) - 1):
        for col, toks in ((0, LOG_ID_TOKENS), (1, LOG_ID_TOKENS), (2, LOG_TS_TOKENS)):
            for tok, ok in toks:
                lines = list(base)
                parts = lines[li].split(",")
                parts[col] = tok
                lines[li] = ",".join(parts)
                if col == 2 and tok == "2020-13-45":
                    ok = False
                add(f"line{li + 1}-{('user', 'item', 'timestamp')[col]}={tok!r}", text(lines),
                    ok, (f"line {li + 1}",))
        for tok, ok in LOG_RATING_TOKENS:
            lines = list(base)
            parts = lines[li].split(",")
            parts[3] = tok
            lines[li] = ",".join(parts)
            add(f"line{li + 1}-rating={tok!r}", text(lines), ok,
                (f"line {li + 1}", "rating"), opts='rating_col = "rating"')
    ln = 4
    bad = {
        "missing-field": base[:ln] + [",".join(base[ln].split(",")[:2])] + base[ln + 1:],
        "extra-field": base[:ln] + [base[ln] + ",9,9"] + base[ln + 1:],
        "unclosed-quote": base[:ln] + ['"1,2,3,4'] + base[ln + 1:],
        "binary-line": base[:ln] + ["\x89PNG\x00\x1a"] + base[ln + 1:],
    }
    for name, lines in bad.items():
        add(name, text(lines), False, ())
    add("missing-column", text([x.rsplit(",", 2)[0] + "," + x.rsplit(",", 1)[1]
                                 for x in base]), False, ("timestamp",))
    add("no-header", text(base[1:]), False, ())
    add("header-only", text(base[:1]), False)
    add("empty", "", False)
    add("blank-first-line", "\n" + text(base), True)  # blank lines are not data
    add("utf16", text(base).encode("utf-16"), False)
    add("latin1", text(base[:3] + ["1,caf\xe9,5,4"] + base[3:]).encode("latin-1"), False,
        ("line 4",))
    add("gzip", gzip.compress(text(base).encode()), False)
    add("random-bytes", random.Random(5).randbytes(3000), False)
    add("semicolons", text([x.replace(",", ";") for x in base]), False, ())
    add("rating-and-label", text(base), False, ("rating_col", "label_col"),
        opts='rating_col = "rating", label_col = "rating"', file_named=False)
    add("no-such-user-col", text(base), False, ("who",), opts='user_col = "who"')
    add("unknown-option", text(base), False, ("colour",), opts='colour = "red"', file_named=False)
    add("option-wrong-type", text(base), False, ("separator",), opts="separator = 5", file_named=False)
    add("strict-duplicates", text(base + base[1:4]), False, ("duplicate",),
        opts="strict = true")
    add("min-user-events-0", text(base), False, ("min_user_events",), opts="min_user_events = 0", file_named=False)
    add("min-user-events-huge", text(base), False, (("min_user_events", "100000"),),
        opts="min_user_events = 100000")
    add("category-without-items", text(base), False, ("category_feature",),
        opts='category_feature = "genre"', file_named=False)
    add("time-col-absent", text(base), False, ("when",), opts='time_col = "when"')
    # valid unusual
    add("crlf", text(base, "\r\n"), True)
    add("bom", b"\xef\xbb\xbf" + text(base).encode(), True)
    add("cr-only", text(base, "\r"), True)
    add("tsv", text(log_lines("\t")), True, file="log.tsv")
    add("quoted-fields", text(['"user","item","timestamp","rating"'] +
                              [",".join(f'"{p}"' for p in x.split(",")) for x in base[1:]]), True)
    add("string-ids", text([base[0]] + [f"u{x}" for x in base[1:]]), True)
    add("unicode-ids", text([base[0]] + [x.replace(",", "\u00e9\u4e2d,", 1) for x in base[1:]]),
        True)
    add("iso-dates", text([base[0]] + [
        ",".join((p[0], p[1], datetime.fromtimestamp(int(p[2]), timezone.utc)
                  .strftime("%Y-%m-%d %H:%M:%S"), p[3])) for p in (x.split(",") for x in base[1:])
    ]), True)
    add("float-ts-among-ints", text(base[:3] + [base[3].replace(",", ".5,", 3).replace(".5,", ",", 2)]
                                   + base[4:]), True)
    add("extra-columns", text([base[0] + ",note"] + [x + ",hello" for x in base[1:]]), True)
    add("columns-reordered", text([",".join(reversed(x.split(","))) for x in base]), True)
    add("space in dir", text(base), True, file="my logs/\u00fc log.csv")
    add("uppercase-suffix", text(base), True, file="LOG.CSV")
    add("no-time-column", text([",".join(x.split(",")[:2]) for x in base]), False,
        ("timestamp",))
    add("time-col-false", text(base), False, ("time_col",), opts="time_col = false", file_named=False)
    add("user-col-int", text(base), False, ("user_col",), opts="user_col = 1", file_named=False)
    add("item-features-int", text(base), False, ("item_features",), opts="item_features = 5", file_named=False)
    add("rating-col", text(base), True, opts='rating_col = "rating"')
    add("label-col", text(base), True, opts='label_col = "rating"')
    add("run-string-ids", text([base[0]] + [f"u{x}" for x in base[1:]]), True, use_run=True)
    add("run-dates", text([base[0]] + [
        ",".join((p[0], p[1], datetime.fromtimestamp(int(p[2]), timezone.utc)
                  .strftime("%Y-%m-%d"), p[3])) for p in (x.split(",") for x in base[1:])
    ]), True, use_run=True)
    add("run-float-ts", text([base[0]] + [x.replace(",88", ",88.25", 1) if k % 3 == 0 else x
                                          for k, x in enumerate(base[1:])]), True, use_run=True)
    add("run-space-path", text(base), True, file="a b/c d.csv", use_run=True)
    return out


def _parquet_cases() -> list[Case]:
    import polars as pl

    cat = "data:log-parquet"
    us = [e[0] for e in EVENTS]
    its = [e[1] for e in EVENTS]
    ts = [e[3] for e in EVENTS]
    out: list[Case] = []

    def frame_case(name: str, make: Callable[[], "pl.DataFrame"], valid: bool, needles=(),
                   use_run=False, file="log.parquet"):
        def setup(d: Path, make=make, file=file):
            p = d / file
            p.parent.mkdir(parents=True, exist_ok=True)
            make().write_parquet(p)

        args = [*RUN, "--data", "{d}/" + file, *CHEAP, *SMALL_K] if use_run else describe("{d}/" + file)
        out.append(Case(cat, name, args, valid, (Path(file).name, *needles) if not valid else (),
                        setup, _run_folder_written if (valid and use_run) else None))

    def bytes_case(name: str, data: Callable[[], bytes], needles=()):
        def setup(d: Path, data=data):
            _w(d / "log.parquet", data())

        out.append(Case(cat, name, describe("{d}/log.parquet"), False, ("log.parquet", *needles),
                        setup))

    def good() -> "pl.DataFrame":
        return pl.DataFrame({"user": us, "item": its, "timestamp": ts})

    def with_col(col, values, dtype=None):
        return lambda: good().with_columns(pl.Series(col, values, dtype=dtype))

    n = len(us)
    for col in ("user", "item"):
        frame_case(f"{col}-float", with_col(col, [float(x) for x in (us if col == "user" else its)]),
                   False, (col,))
        frame_case(f"{col}-null", with_col(col, [None] + (us if col == "user" else its)[1:],
                                           pl.Int64), False, (col, "row 1"))
        frame_case(f"{col}-uint64-big", with_col(col, [2**63 + 5] + [1] * (n - 1), pl.UInt64),
                   False, (col,))
        frame_case(f"{col}-bool", with_col(col, [True, False] * (n // 2)), False, (col,))
        frame_case(f"{col}-list", with_col(col, [[1]] * n), False, (col,))
        frame_case(f"{col}-empty-string", with_col(col, [""] + [str(x) for x in (us if col == "user" else its)[1:]]),
                   False, (col, "row 1"))
        frame_case(f"{col}-string", with_col(col, [f"x{x}" for x in (us if col == "user" else its)]), True)
        frame_case(f"{col}-int8", with_col(col, (us if col == "user" else its), pl.Int16), True)
        frame_case(f"{col}-categorical", lambda col=col: good().with_columns(
            pl.col(col).cast(pl.String).cast(pl.Categorical)), True)
        frame_case(f"{col}-unicode", with_col(col, [f"\u00fc{x}\u4e2d" for x in (us if col == "user" else its)]), True)
    frame_case("ts-nan", with_col("timestamp", [float("nan")] + [float(x) for x in ts[1:]]),
               False, ("timestamp", "row 1"))
    frame_case("ts-inf", with_col("timestamp", [float(x) for x in ts[:-1]] + [float("inf")]),
               False, ("timestamp", f"row {n}"))
    frame_case("ts-null", with_col("timestamp", [None] + ts[1:], pl.Int64), False, ("timestamp",))
    frame_case("ts-bool", with_col("timestamp", [True] * n), False, ("timestamp",))
    frame_case("ts-duration", lambda: good().with_columns(
        pl.duration(seconds=pl.col("timestamp")).alias("timestamp")), False, ("timestamp",))
    frame_case("ts-uint64-big", with_col("timestamp", [2**63 + 1] * n, pl.UInt64), False,
               ("timestamp",))
    frame_case("ts-bad-string", with_col("timestamp", ["2020-01-01"] * (n - 1) + ["never"]),
               False, ("timestamp", f"row {n}"))
    frame_case("ts-list", with_col("timestamp", [[1, 2]] * n), False, ("timestamp",))
    frame_case("missing-item", lambda: good().drop("item"), False, ("item",))
    frame_case("no-rows", lambda: good().head(0), False, ())
    frame_case("rating-nan-in-rating-col", lambda: good().with_columns(
        pl.Series("rating", [float("nan")] * n)), True)  # not read without rating_col
    # valid unusual
    frame_case("ts-datetime", lambda: good().with_columns(
        pl.from_epoch("timestamp", time_unit="s")), True)
    frame_case("ts-date", lambda: good().with_columns(
        pl.from_epoch("timestamp", time_unit="s").dt.date()), True)
    frame_case("ts-float", with_col("timestamp", [x + 0.25 for x in ts]), True)
    frame_case("ts-string-ints", with_col("timestamp", [str(x) for x in ts]), True)
    frame_case("ts-int32", with_col("timestamp", [x % 2**31 for x in ts], pl.Int32), True)
    frame_case("struct-extra-column", lambda: good().with_columns(
        pl.struct(pl.col("user").alias("a")).alias("extra")), True)
    frame_case("pq-suffix", good, True, file="log.pq")
    frame_case("space in path", good, True, file="my dir/l\u00f6g.parquet")
    frame_case("run-datetime", lambda: good().with_columns(
        pl.from_epoch("timestamp", time_unit="s")), True, use_run=True)
    frame_case("run-string-ids", with_col("item", [f"item-{x}" for x in its]), True, use_run=True)
    bytes_case("zero-bytes", lambda: b"")
    bytes_case("random-bytes", lambda: random.Random(1).randbytes(5000))
    bytes_case("csv-named-parquet", lambda: text(log_lines()).encode())

    def truncated() -> bytes:
        import io

        buf = io.BytesIO()
        good().write_parquet(buf)
        b = buf.getvalue()
        return b[: len(b) // 2]

    def bad_footer() -> bytes:
        import io

        buf = io.BytesIO()
        good().write_parquet(buf)
        b = bytearray(buf.getvalue())
        b[-12:-4] = b"\xff" * 8
        return bytes(b)

    def flipped() -> bytes:
        import io

        buf = io.BytesIO()
        good().write_parquet(buf, compression="uncompressed")
        b = bytearray(buf.getvalue())
        for k in range(8, len(b) - 200, 97):
            b[k] ^= 0xFF
        return bytes(b)

    bytes_case("truncated", truncated)
    bytes_case("bad-footer", bad_footer)
    bytes_case("bit-flipped", flipped)
    bytes_case("magic-only", lambda: b"PAR1PAR1")
    return out


# ---- data: item and user feature tables (through a config's data_options) ----------------------

def _feature_cases() -> list[Case]:
    import polars as pl

    cat = "data:features"
    out: list[Case] = []
    log = text(log_lines())
    items = items_csv_lines()
    users = users_csv_lines()

    def add(name, valid, needles=(), *, items_body=None, users_body=None, opts="",
            items_file="items.csv", users_file="users.csv", frame=None):
        o = []
        if items_body is not None or (frame and items_file.endswith("parquet")):
            o.append(f'item_features = "{items_file}"')
        if users_body is not None:
            o.append(f'user_features = "{users_file}"')
        if opts:
            o.append(opts)

        def setup(d: Path, items_body=items_body, users_body=users_body, frame=frame):
            _w(d / "log.csv", log)
            if items_body is not None:
                _w(d / items_file, items_body)
            if frame is not None:
                p = d / items_file
                p.parent.mkdir(parents=True, exist_ok=True)
                frame().write_parquet(p)
            if users_body is not None:
                _w(d / users_file, users_body)
            _w(d / "c.toml", 'data = "log.csv"\ndata_options = {' + ", ".join(o) + "}\n")

        out.append(Case(cat, name, [*RUN, "--config", "{d}/c.toml", *CHEAP, *SMALL_K], valid,
                        needles, setup, _run_folder_written if valid else None))

    add("items-duplicate-id", False, ("items.csv", f"line {len(items) + 1}", "line 4", "listed again"),
        items_body=text(items + [items[3]]))
    add("items-missing-id-column", False, ("items.csv", "item"),
        items_body=text(["id,genre"] + [x for x in items[1:]]))
    add("items-empty-id", False, ("items.csv", "line 3"),
        items_body=text(items[:2] + ["," + items[2].split(",", 1)[1]] + items[3:]))
    add("items-binary", False, ("items.csv",), items_body=random.Random(2).randbytes(2000))
    add("items-empty", False, ("items.csv",), items_body="")
    add("items-ragged", False, ("items.csv", "line 4"),
        items_body=text(items[:3] + ["1,a,b,c,d"] + items[4:]))
    add("items-missing-file", False, ("nope.csv",), opts='item_features = "nope.csv"')
    add("items-folder", False, ("feat",), opts='item_features = "feat"')
    out[-1].setup = (lambda d, f=out[-1].setup: (f(d), (d / "feat").mkdir()))
    add("items-control-byte", False, ("items.csv", "line 3"),
        items_body=text(items[:2] + [items[2].replace(",", ",\x01", 1)] + items[3:]))
    add("category-missing", False, ("category_feature", "nope"), items_body=text(items),
        opts='category_feature = "nope"')
    add("users-duplicate", False, ("users.csv", "listed again"), users_body=text(users + [users[1]]))
    add("users-missing-column", False, ("users.csv", "user"), users_body=text(["uid,country"] + users[1:]))
    add("users-utf16", False, ("users.csv",), users_body=text(users).encode("utf-16"))
    add("items-parquet-float-ids", False, ("items.parquet", "item"), items_file="items.parquet",
        frame=lambda: pl.DataFrame({"item": [float(i) for i in ITEMS], "g": ["a"] * len(ITEMS)}))
    add("items-parquet-dup", False, ("items.parquet", "listed again"), items_file="items.parquet",
        frame=lambda: pl.DataFrame({"item": ITEMS + ITEMS[:1], "g": ["a"] * (len(ITEMS) + 1)}))
    add("items-parquet-struct-col", False, ("items.parquet", "s"), items_file="items.parquet",
        frame=lambda: pl.DataFrame({"item": ITEMS}).with_columns(pl.struct(pl.col("item").alias("x")).alias("s")))
    # valid unusual
    add("items-good", True, items_body=text(items))
    add("items-crlf-bom", True, items_body=b"\xef\xbb\xbf" + text(items, "\r\n").encode())
    add("items-unknown-ids", True, items_body=text(items + ["99999,Drama,s1"]))
    add("items-missing-some", True, items_body=text(items[:10]))
    add("items-float-column", True, items_body=text([items[0] + ",price"] + [x + ",9.5" for x in items[1:]]))
    add("items-unicode", True, items_body=text([items[0]] + [x.replace("s", "\u00df\u4e2d") for x in items[1:]]))
    add("items-category-single", True, items_body=text(items), opts='category_feature = "studio"')
    add("items-parquet-lists", True, items_file="items.parquet",
        frame=lambda: pl.DataFrame({"item": ITEMS, "tags": [["a", "b"]] * len(ITEMS)}))
    add("users-good", True, users_body=text(users))
    add("both-tables-spaces", True, items_body=text(items), users_body=text(users),
        items_file="feat dir/it ems.csv", users_file="feat dir/us ers.csv")
    return out


# ---- data: paths that are not data -------------------------------------------------------------

def _path_cases() -> list[Case]:
    cat = "data:paths"
    out: list[Case] = []

    def add(name, args, valid, needles=(), setup=None, timeout=90.0):
        out.append(Case(cat, name, args, valid, needles, setup, timeout=timeout))

    def fifo(d: Path):
        os.mkfifo(d / "ratings.dat")

    def sock(d: Path):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / "log.csv"))  # left bound: the file stays a socket

    def loop(d: Path):
        (d / "a").symlink_to(d / "b")
        (d / "b").symlink_to(d / "a")

    def dangling(d: Path):
        (d / "log.csv").symlink_to(d / "gone.csv")

    def deep_dir(d: Path):
        (d / "a" / "b").mkdir(parents=True)
        _w(d / "a" / "b" / "u.data", text(udata_lines()))

    def two_datasets(d: Path):
        _w(d / "ds" / "u.data", text(udata_lines()))
        _w(d / "ds" / "ratings.dat", text(dat_lines()))

    def two_sub(d: Path):
        _w(d / "ds" / "x" / "u.data", text(udata_lines()))
        _w(d / "ds" / "y" / "ratings.dat", text(dat_lines()))

    def one_sub(d: Path):
        _w(d / "ds" / "ml-100k" / "u.data", text(udata_lines()))

    def u_data_dir(d: Path):
        (d / "ds" / "u.data").mkdir(parents=True)

    def symlinked(d: Path):
        _w(d / "real" / "u.data", text(udata_lines()))
        (d / "link").symlink_to(d / "real")

    def unreadable_dir(d: Path):
        _w(d / "locked" / "u.data", text(udata_lines()))

    add("nonexistent", describe("{d}/nope"), False, ("nope",))
    add("empty-string", describe(""), False, ("empty string",))
    add("blank-string", describe("   "), False, ("empty string",))
    add("empty-folder", describe("{d}"), False, ("no known dataset format",))
    add("fifo", describe("{d}/ratings.dat"), False, ("ratings.dat", "not a regular file"), fifo,
        timeout=30)
    add("fifo-in-folder", describe("{d}"), False, ("no known dataset format",), fifo, timeout=30)
    add("socket", describe("{d}/log.csv"), False, ("log.csv", "not a regular file"), sock)
    add("dev-null", describe("/dev/null"), False, ("/dev/null",))
    add("dev-zero", describe("/dev/zero"), False, ("/dev/zero",), timeout=30)
    add("dev-urandom-format", ["data", "describe", "--data", "/dev/urandom"], False,
        ("/dev/urandom",), timeout=30)
    add("proc-file", describe("/proc/self/status"), False, ("status",))
    add("symlink-loop", describe("{d}/a"), False, ("{d}/a",), loop)
    add("dangling-symlink", describe("{d}/log.csv"), False, ("log.csv",), dangling)
    add("two-deep", describe("{d}"), False, ("no known dataset format",), deep_dir)
    add("two-datasets", describe("{d}/ds"), False, ("u.data", "ratings.dat"), two_datasets)
    add("two-subfolders", describe("{d}/ds"), False, ("x", "y"), two_sub)
    add("u.data-is-a-folder", describe("{d}/ds"), False, ("no known dataset format",), u_data_dir)
    add("unknown-name", describe("ml-7m"), False, ("ml-7m",))
    add("known-name-offline", describe("ml-100k"), False, ("ml-100k",))
    add("synthetic-bad-preset", describe("synthetic:huge"), False, ("huge",))
    add("synthetic-empty-preset", describe("synthetic:"), False, ("synthetic",))
    add("very-long-path", describe("{d}/" + "x" * 5000), False, ("xxxx",))
    add("newline-in-path", describe("{d}/a\nb.csv"), False, ("a",))
    add("file-under-file", describe("{d}/f.csv/x.csv"), False, ("f.csv",),
        lambda d: _w(d / "f.csv", "user,item,timestamp\n"))
    add("notes-txt", describe("{d}/notes.txt"), False, ("notes.txt", "cannot tell the format"),
        lambda d: _w(d / "notes.txt", "hello world\n"))
    add("image-file", describe("{d}/pic.png"), False, ("pic.png",),
        lambda d: _w(d / "pic.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4))
    add("huge-single-line", describe("{d}/big.txt"), False, ("big.txt",),
        lambda d: _w(d / "big.txt", "1 " + "x" * 3_000_000))
    # valid
    add("one-level-down", describe("{d}/ds"), True, (), one_sub)
    add("symlinked-folder", describe("{d}/link"), True, (), symlinked)
    add("relative-path", describe("ds"), True, (), one_sub)
    add("tilde-home", describe("~/ds"), True, (), lambda d: _w(d / "home" / "ds" / "u.data",
                                                               text(udata_lines())))
    add("u1.base-split-file", describe("{d}/u1.base"), True, (),
        lambda d: _w(d / "u1.base", text(udata_lines())))
    add("synthetic-tiny", describe("synthetic:tiny"), True)
    return out


# ---- config: TOML files -------------------------------------------------------------------------

LEARNED_RETRIEVAL_TOML = (
    'data = "synthetic:tiny"\nesr = "popular"\nlsr = "popular"\n'
    'retrieval = {stage = "twotower", config = {train = {epochs = 1, max_steps_per_epoch = 3}}}\n'
)
CHEAP_TOML = ('data = "synthetic:tiny"\nretrieval = "popular"\nesr = "popular"\n'
              'lsr = "popular"\n')


def _cheap_head(body: str | bytes) -> str:
    """CHEAP_TOML without the top-level keys `body` sets itself (TOML forbids a key twice)."""
    if isinstance(body, bytes):
        return CHEAP_TOML
    top = body.split("\n[", 1)[0]
    keys = set(re.findall(r"^\s*([A-Za-z_]+)\s*=", top, flags=re.M))
    return "".join(line + "\n" for line in CHEAP_TOML.splitlines()
                   if line.split("=")[0].strip() not in keys)


def _config_cases() -> list[Case]:
    cat = "config"
    out: list[Case] = []

    def add(name, body: str | bytes, valid, needles=(), *, base=True, extra_args=(),
            file="c.toml", timeout=90.0):
        def setup(d: Path, body=body, file=file):
            head = _cheap_head(body) if base else ""
            data = head.encode() + body if isinstance(body, bytes) else head + body
            _w(d / file, data)

        args = [*RUN, "--config", "{d}/" + file, *extra_args]
        out.append(Case(cat, name, args, valid, needles, setup,
                        _run_folder_written if valid else None, timeout=timeout))

    int_keys = ["max_len", "seed", "batch_size", "warmup", "bootstrap", "oracle_requests",
                "reference_requests"]
    wrong_ints = ['"5"', "5.5", "true", "[1]", "{a = 1}", "-1", "99999999999999999999",
                  "1e400", "nan", "inf", "-inf", "2020-01-01"]
    for k in int_keys:
        for v in wrong_ints:
            add(f"{k}={v}", f"{k} = {v}\n", False, (k,))
            if v == "99999999999999999999" and k not in ("seed", "max_len"):
                out[-1].valid = None  # a huge count is capped (warmup, requests) or refused
    for k in ("retrain", "oracle", "reference", "exclude_seen"):
        for v in ('"yes"', "1", "0", "[true]"):
            add(f"{k}={v}", f"{k} = {v}\n", False, (k,))
    for k in ("name", "data", "device", "index", "cache_dir", "out"):
        for v in ("5", "true", "[]", "{x = 1}"):
            add(f"{k}={v}", f"{k} = {v}\n", False, (k,))
    for v in ('""', '"a/b"', '"   "'):
        add(f"name={v}", f"name = {v}\n", False, ("name",))
    for v in ('"tpu"', '"cuda:x"', '"CPU"', '""'):
        add(f"device={v}", f"device = {v}\n", False, ("device",))
    add("data=empty", 'data = ""\n', False, ("data",), base=False)
    add("index=blank", 'index = "  "\n', False, ("index",))
    for k in ("retrieval", "esr", "lsr", "esr_baseline"):
        for v, needle in (('""', k), ("5", k), ("[1, 2]", k), ('"nope"', "nope"),
                          ('{config = {}}', "stage"), ('{stage = "popular", colour = 1}', "colour"),
                          ('{stage = "popular", config = 5}', "config"),
                          ('{stage = "popular", config = {x = 1}}', "x"),
                          ('{stage = "popular", label = ""}', "label"),
                          ('{stage = "popular", label = 5}', "label"),
                          ('"module.that.does.not.exist:Cls"', "module.that.does.not.exist"),
                          ('":Cls"', ":Cls"), ('"mod:"', "mod:"), ('"os:path"', "os:path"),
                          ('"json:loads"', "json:loads")):
            add(f"{k}={v}", f"{k} = {v}\n", False, (needle,))
    twotower = [("dim", '"8"'), ("dim", "8.5"), ("dim", "0"), ("dim", "-4"), ("nope", "1"),
                ("train", "5"), ("train", '{epochs = "1"}'), ("train", "{epochs = 0}"),
                ("train", "{lr = -1.0}"), ("train", "{lr = nan}"), ("train", "{colour = 1}"),
                ("train", "{batch_size = 0}"), ("train", "{max_steps_per_epoch = 0}"),
                ("train", "{patience = 1.5}")]
    for kind in ("retrieval", "esr", "lsr"):
        stage = "lsr" if kind == "lsr" else "twotower"
        for key, v in twotower:
            body = f'{kind} = {{stage = "{stage}", config = {{{key} = {v}}}}}\n'
            add(f"{kind}.{stage}.{key}={v}", body, False, (key,))
    add("gesr.bad-type", 'esr = {stage = "gesr", config = {dim = "x"}}\n', False, ("dim",))
    add("gesr.bad-value", 'esr = {stage = "gesr", config = {attn_kind = "cosine"}}\n', False,
        ("attn_kind",))
    add("gesr.unknown", 'esr = {stage = "gesr", config = {warp_drive = 1}}\n', False,
        ("warp_drive",))
    splits = [("kind", '"random"'), ("kind", "5"), ("valid_frac", "2.0"), ("valid_frac", "-0.1"),
              ("valid_frac", '"x"'), ("max_requests", "-1"), ("max_requests", "0"),
              ("max_requests", '"5"'), ("nope", "1")]
    for key, v in splits:
        add(f"split.{key}={v}", f"[split]\n{key} = {v}\n", False, (key,))
    add("split=5", "split = 5\n", False, ("split",))
    budgets = [("retrieval", "1"), ("retrieval", "0"), ("retrieval", "-5"), ("esr", "2.5"),
               ("final", "0"), ("final", '"10"'), ("esr_share", "0"), ("esr_share", "1.5"),
               ("esr_share", "nan"), ("esr_share", "inf"), ("esr_share", "-0.5"),
               ("esr_share", '"a"'), ("retrieval", "99999999999999999999"), ("nope", "1"),
               ("retrieval", "100000")]
    for key, v in budgets:
        add(f"budgets.{key}={v}", f"[budgets]\n{key} = {v}\n", False, (key,))
    add("budgets-not-shrinking", "[budgets]\nretrieval = 20\nesr = 30\n", False, ("budgets",))
    add("budgets-equal", "[budgets]\nretrieval = 20\nesr = 20\nfinal = 5\n", False, ("budgets",))
    add("esr-above-catalogue", "[budgets]\nretrieval = 90000\nesr = 20\n", False,
        ("catalogue", "90000"))
    add("budgets=5", "budgets = 5\n", False, ("budgets",))
    add("esr_variants=5", "esr_variants = 5\n", False, ("esr_variants",))
    add("esr_variants-dup-labels", 'esr_variants = ["popular", "popular"]\n', False,
        ("esr_variants", "duplicate"))
    add("esr_variants-two-baselines",
        'esr_variants = [{stage = "popular", label = "a", baseline = true}, '
        '{stage = "popular", label = "b", baseline = true}]\n', False, ("baseline",))
    add("esr_variants-only-baseline",
        'esr_variants = [{stage = "popular", label = "a", baseline = true}]\n', False, ("baseline",))
    add("esr_variants-baseline-string",
        'esr_variants = [{stage = "popular", label = "a", baseline = "yes"}, "popular"]\n', False,
        ("baseline",))
    add("esr_variants-empty", "esr_variants = []\n", True)
    add("data_options=5", "data_options = 5\n", False, ("data_options",))
    add("data_options-unknown", "data_options = {colour = 1}\n", False, ("colour",))
    add("data_options-wrong-type", 'data_options = {n_users = "many"}\n', False, ("n_users",))
    add("data_options-negative", "data_options = {n_users = -5}\n", False, ("n_users",))
    add("unknown-top-key", "colour = 1\n", False, ("colour",))
    add("unknown-table", "[extras]\nx = 1\n", False, ("extras",))
    add("typo-key", "seeds = 1\n", False, ("seeds",))
    add("duplicate-key", "seed = 1\nseed = 2\n", False, ("c.toml",))
    add("invalid-toml", "seed = = 1\n", False, ("c.toml",))
    add("unterminated-string", 'name = "abc\n', False, ("c.toml",))
    add("binary", b"\x00\xff\xfe\x89garbage\x01\x02", False, ("c.toml",), base=False)
    add("utf16", ("seed = 1\n").encode("utf-16"), False, ("c.toml",), base=False)
    add("latin1", 'name = "caf\xe9"\n'.encode("latin-1"), False, ("c.toml",))
    add("nul-in-string", 'name = "a\x00b"\n', False, ("c.toml",))
    add("huge-name", f'name = "{"x" * 100_000}"\n', False, ("name", "100000 characters"))
    add("name-too-long-for-a-folder", f'name = "{"x" * 300}"\n', False, ("name", "200 bytes"))
    out[-1].args = ["run", "--no-progress", "--config", "{d}/c.toml"]
    add("name-newline", 'name = "a\\nb"\n', False, ("name",))
    add("name-200-bytes", 'name = "' + "\u00e9" * 100 + '"\n', True)
    add("deep-nesting", "x = " + "[" * 2000 + "]" * 2000 + "\n", False, ("c.toml",))
    add("gzip", gzip.compress(CHEAP_TOML.encode()), False, ("c.toml",), base=False)
    add("json-not-toml", '{"seed": 1}', False, ("c.toml",), base=False)
    add("yaml-not-toml", "seed: 1\ndata: synthetic\n", False, ("c.toml",), base=False)
    add("missing", "", False, ("nope.toml",), extra_args=())
    out[-1].args = [*RUN, "--config", "{d}/nope.toml"]
    out[-1].setup = None
    add("folder", "", False, ("c.toml",))
    out[-1].setup = lambda d: (d / "c.toml").mkdir()
    add("fifo", "", False, ("c.toml",), timeout=30)
    out[-1].setup = lambda d: os.mkfifo(d / "c.toml")
    add("dev-zero", "", False, ("/dev/zero",), timeout=30)
    out[-1].args = [*RUN, "--config", "/dev/zero"]
    out[-1].setup = None
    add("seed-huge", "seed = 4294967296\n", False, ("seed",))
    add("max_len-huge", "max_len = 100000\n", False, ("max_len",))
    add("bootstrap-small", "bootstrap = 5\n", False, ("bootstrap",))
    # valid unusual
    add("bom", b"\xef\xbb\xbf" + CHEAP_TOML.encode(), True, base=False)
    add("crlf", CHEAP_TOML.replace("\n", "\r\n"), True, base=False)
    add("bom-crlf", b"\xef\xbb\xbf" + CHEAP_TOML.replace("\n", "\r\n").encode(), True, base=False)
    add("comments-and-blank", "# a comment\n\n   \n# another\n", True)
    add("unicode-name", 'name = "r\u00e9sum\u00e9-\u4e2d"\n', True)
    add("space in path", "", True, file="my configs/r\u00fcn conf.toml")
    add("empty-with-flags", "", True, base=False,
        extra_args=[*TINY, *CHEAP])
    add("seed-max", "seed = 4294967295\n", True)
    add("inline-tables", 'retrieval = {stage = "popular"}\nesr = {stage = "popular", label = "p"}\n',
        True)
    add("esr_variants", 'esr_variants = [{stage = "popular", label = "a"}, '
        '{stage = "popular", label = "b", baseline = true}]\n', True)
    add("split-temporal", '[split]\nkind = "temporal"\n', True)
    add("budgets-given", "[budgets]\nretrieval = 40\nesr = 12\nfinal = 5\n", True)
    add("esr_share", "[budgets]\nesr_share = 0.5\n", True)
    add("data_options-synthetic", "data_options = {n_users = 60}\n", True)
    add("written-config-rerun", "", True)  # a run's own config.toml, rerun
    out[-1].setup = _rerun_setup
    out[-1].args = [*RUN, "--config", "{d}/first/config.toml"]
    return out


def _rerun_setup(d: Path) -> None:
    """A run folder written by this cascade, whose config.toml the case reruns."""
    shutil.copytree(GOOD_RUN, d / "first")


# ---- cli: bad values for every option ------------------------------------------------------------

def _cli_cases() -> list[Case]:
    out: list[Case] = []

    def add(cat, name, args, valid, needles=(), setup=None, check=None, timeout=90.0):
        out.append(Case(cat, name, args, valid, needles, setup, check, timeout=timeout))

    def precious(d: Path):
        _w(d / "mine" / "notes.txt", "my notes")
        _w(d / "mine" / "metrics.json", "{}")

    def precious_intact(d: Path, _out: str) -> str | None:
        if (d / "mine" / "notes.txt").read_text() != "my notes":
            return "a user's file was changed"
        return None

    c = "cli:run"
    base = [*RUN, *TINY, *CHEAP]
    ints = {"--retrieval-k": ["abc", "0", "1", "-5", "1.5", "99999999999999999999", "100000"],
            "--esr-k": ["abc", "0", "1", "-1", "2.5"],
            "--final-k": ["abc", "0", "-1", "100000"],
            "--seed": ["abc", "-1", "4294967296", "1e3", "99999999999999999999999"],
            "--max-len": ["abc", "0", "-3", "100000"],
            "--max-requests": ["abc", "-1", "0"],
            "--batch-size": ["abc", "0", "-1"],
            "--oracle-requests": ["abc", "-1"],
            "--reference-requests": ["abc", "-1"]}
    for opt, vals in ints.items():
        for v in vals:
            needles = (opt,) if v in ("abc", "1.5", "2.5", "1e3") else ((opt.strip("-").replace("-", "_").replace("_k", ""), opt),)
            add(c, f"{opt}={v}", [*base, opt, v], False, needles)
    for opt in ("--split", "--device", "--index", "--name", "--esr", "--esr-baseline",
                "--retrieval", "--lsr", "--data"):
        vals = {"--split": ["random", "", "LOO"], "--device": ["tpu", "cuda:x", "", "cuda:99"],
                "--index": ["", "   "], "--name": ["", "a/b", "   "],
                "--esr": ["", "nope", "nope:Nope", "os:getcwd"],
                "--esr-baseline": ["nope", ""], "--retrieval": ["nope", "twotower:x"],
                "--lsr": ["", "lsrr"], "--data": ["", "nope", "synthetic:nope"]}[opt]
        for v in vals:
            add(c, f"{opt}={v!r}", [*RUN, *TINY, *CHEAP, opt, v], False,
                ((opt.strip("-").replace("-", "_"), opt, repr(v), *([v] if v.strip() else [])),))
    add(c, "--index=Bogus-twotower", [*RUN, "--config", "{d}/c.toml", "--index", "Bogus42"],
        False, ("Bogus42",), setup=lambda d: _w(d / "c.toml", LEARNED_RETRIEVAL_TOML))
    add(c, "missing-value", [*RUN, *TINY, *CHEAP, "--seed"], False, ("--seed",))
    add(c, "unknown-option", [*RUN, *TINY, *CHEAP, "--colour", "red"], False, ("--colour",))
    add(c, "positional-arg", [*RUN, *TINY, *CHEAP, "extra"], False, ("extra",))
    add(c, "out-is-file", ["run", "--no-progress", *TINY, *CHEAP, "--out", "{d}/f"], False, ("{d}/f",),
        lambda d: _w(d / "f", "x"))
    add(c, "out-under-file", ["run", "--no-progress", *TINY, *CHEAP, "--out", "{d}/f/run"], False,
        ("{d}/f",), lambda d: _w(d / "f", "x"))
    add(c, "out-user-folder", ["run", "--no-progress", *TINY, *CHEAP, "--out", "{d}/mine"], False,
        ("{d}/mine", "refusing"), precious, precious_intact)
    add(c, "out-proc", ["run", "--no-progress", *TINY, *CHEAP, "--out", "/proc/cascade-run"], False,
        ("/proc",))
    add(c, "out-dev-null", ["run", "--no-progress", *TINY, *CHEAP, "--out", "/dev/null"], False,
        ("/dev/null",))
    add(c, "out-symlink-to-folder", ["run", "--no-progress", *TINY, *CHEAP, "--out", "{d}/link"],
        False, ("{d}/link",), lambda d: (precious(d), (d / "link").symlink_to(d / "mine")),
        precious_intact)
    add(c, "out-readonly-parent", ["run", "--no-progress", *TINY, *CHEAP, "--out", "{d}/ro/run"],
        False, ("{d}/ro",), lambda d: _readonly(d / "ro"))
    out[-1].cleanup = lambda d: _writable(d / "ro")
    add(c, "cache-dir-file", [*RUN, *TINY, *CHEAP, "--cache-dir", "{d}/f"], False, ("{d}/f",),
        lambda d: _w(d / "f", "x"))
    add(c, "cache-dir-proc", [*RUN, *TINY, *CHEAP, "--cache-dir", "/proc/x/y"], False, ("/proc/x",))
    add(c, "cache-dir-readonly", [*RUN, "--config", "{d}/c.toml", "--cache-dir", "{d}/ro"], False,
        ("{d}/ro",), lambda d: (_readonly(d / "ro"), _w(d / "c.toml", LEARNED_RETRIEVAL_TOML)))
    out[-1].cleanup = lambda d: _writable(d / "ro")
    add(c, "config-missing", [*RUN, "--config", "{d}/nope.toml"], False, ("nope.toml",))
    add(c, "no-args", ["run", "--colour"], False, ("--colour",))
    # valid unusual
    add(c, "out-existing-run-replaced", [*RUN, *TINY, *CHEAP], True, (),
        lambda d: shutil.copytree(GOOD_RUN, d / "out"), _run_folder_written)
    add(c, "out-empty-folder", [*RUN, *TINY, *CHEAP], True, (), lambda d: (d / "out").mkdir(),
        _run_folder_written)
    add(c, "out-space-unicode", ["run", "--no-progress", *TINY, *CHEAP, "--out", "{d}/r\u00fcn s/o ut"],
        True, (), None, lambda d, o: _run_folder_written(d, out="r\u00fcn s/o ut"))
    add(c, "default-out", ["run", "--no-progress", *TINY, *CHEAP], True, (), None,
        lambda d, o: None if any((d / "runs").glob("*/metrics.json")) else "no run under runs/")
    add(c, "name-unicode", [*RUN, *TINY, *CHEAP, "--name", "r\u00e9sum\u00e9 \u4e2d"], True, (),
        None, _run_folder_written)
    add(c, "seed-max", [*RUN, *TINY, *CHEAP, "--seed", "4294967295"], True, (), None,
        _run_folder_written)
    add(c, "cache-dir-space", [*RUN, *TINY, *CHEAP, "--cache-dir", "{d}/c a c h e"], True, (), None,
        _run_folder_written)
    add(c, "temporal-split", [*RUN, *TINY, *CHEAP, "--split", "temporal"], True, (), None,
        _run_folder_written)
    add(c, "no-oracle-no-reference", [*RUN, *TINY, *CHEAP, "--no-oracle", "--no-reference"], True,
        (), None, _run_folder_written)
    add(c, "esr-baseline", [*RUN, *TINY, *CHEAP, "--esr-baseline", "popular"], True, (), None,
        _run_folder_written)
    add(c, "batch-size-1", [*RUN, *TINY, *CHEAP, "--batch-size", "1", "--max-requests", "20"], True,
        (), None, _run_folder_written)

    c = "cli:compare"
    add(c, "no-args", ["compare"], False, (("RUNS", "runs"), "Missing"))
    add(c, "nonexistent", ["compare", "{d}/nope"], False, ("{d}/nope",))
    add(c, "a-file", ["compare", "{d}/f"], False, ("{d}/f",), lambda d: _w(d / "f", "x"))
    add(c, "empty-folder", ["compare", "{d}/e"], False, ("{d}/e",), lambda d: (d / "e").mkdir())
    add(c, "format-xml", ["compare", "{d}/r", "--format", "xml"], False, ("xml",), _copy_run)
    add(c, "bootstrap-5", ["compare", "{d}/r", "--bootstrap", "5"], False, ("--bootstrap",), _copy_run)
    add(c, "bootstrap-abc", ["compare", "{d}/r", "--bootstrap", "abc"], False, ("--bootstrap",), _copy_run)
    add(c, "seed-abc", ["compare", "{d}/r", "--seed", "abc"], False, ("--seed",), _copy_run)
    add(c, "seed-negative", ["compare", "{d}/r", "--seed", "-1"], False, ("--seed",), _copy_run)
    add(c, "seed-huge", ["compare", "{d}/r", "--seed", "99999999999999999999999"], None,
        ("--seed",), _copy_run)  # numpy seeds any non-negative integer
    add(c, "out-file", ["compare", "{d}/r", "--out", "{d}/f"], False, ("{d}/f",),
        lambda d: (_copy_run(d), _w(d / "f", "x")))
    add(c, "out-readonly", ["compare", "{d}/r", "--out", "{d}/ro/cmp"], False, ("{d}/ro",),
        lambda d: (_copy_run(d), _readonly(d / "ro")))
    out[-1].cleanup = lambda d: _writable(d / "ro")
    add(c, "second-missing", ["compare", "{d}/r", "{d}/nope"], False, ("{d}/nope",), _copy_run)
    for fmt in ("table", "markdown", "json", "csv"):
        add(c, f"valid-{fmt}", ["compare", "{d}/r", "{d}/r2", "--format", fmt], True, (),
            lambda d: (_copy_run(d), shutil.copytree(GOOD_RUN, d / "r2")))
    add(c, "valid-same-run-twice", ["compare", "{d}/r", "{d}/r"], True, (), _copy_run)
    add(c, "valid-space-path", ["compare", "{d}/r\u00fc n", "--out", "{d}/c m p"], True, (),
        lambda d: shutil.copytree(GOOD_RUN, d / "r\u00fc n"))

    c = "cli:report"
    add(c, "no-args", ["report"], False, (("RUN", "run"), "Missing"))
    add(c, "nonexistent", ["report", "{d}/nope"], False, ("{d}/nope",))
    add(c, "a-file", ["report", "{d}/f"], False, ("{d}/f",), lambda d: _w(d / "f", "x"))
    add(c, "user-folder", ["report", "{d}/mine"], False, ("{d}/mine",), precious, precious_intact)
    add(c, "two-args", ["report", "{d}/r", "{d}/r"], False, ("{d}/r",), _copy_run)
    add(c, "valid", ["report", "{d}/r"], True, (), _copy_run)
    add(c, "valid-space", ["report", "{d}/a r\u00fcn"], True, (),
        lambda d: shutil.copytree(GOOD_RUN, d / "a r\u00fcn"))

    c = "cli:sweep"
    sw = ["sweep", *TINY, *CHEAP, "--no-progress", "--final-k", "5"]
    add(c, "no-ks", sw, False, ("--retrieval-k",))
    add(c, "no-esr-k", [*sw, "--retrieval-k", "20"], False, ("--esr-k",))
    for v in ("a,b", "0", "-5", ",", "1.5", "20,,x", "99999999999999999999"):
        add(c, f"retrieval-k={v!r}", [*sw, "--retrieval-k", v, "--esr-k", "5"], False,
            (("--retrieval-k", "retrieval"),))
    for v in ("x", "0", "1", "50"):
        add(c, f"esr-k={v!r}", [*sw, "--retrieval-k", "20", "--esr-k", v], False,
            (("--esr-k", "esr", "ESR K", "budgets"),))
    for v in ("abc", "nan", "-1", "0", "inf"):
        add(c, f"p99-ms={v}", [*sw, "--retrieval-k", "20", "--esr-k", "10", "--p99-ms", v], False,
            (("--p99-ms", "p99"),))
    add(c, "format-xml", [*sw, "--retrieval-k", "20", "--esr-k", "10", "--format", "xml"], False,
        ("xml",))
    add(c, "esr-twice", [*sw, "--esr", "popular", "--retrieval-k", "20", "--esr-k", "10"], True)
    out[-1].args = ["sweep", *TINY, "--retrieval", "popular", "--lsr", "popular", "--esr", "popular",
                    "--esr", "popular", "--retrieval-k", "20", "--esr-k", "10", "--no-progress"]
    out[-1].valid = False
    out[-1].needles = ("--esr",)
    add(c, "out-file", [*sw, "--retrieval-k", "20", "--esr-k", "10", "--out", "{d}/f"], False,
        ("{d}/f",), lambda d: _w(d / "f", "x"))
    add(c, "final-k-0", [*sw, "--retrieval-k", "20", "--esr-k", "10", "--final-k", "0"], False,
        ("final",))
    add(c, "seed-negative", [*sw, "--retrieval-k", "20", "--esr-k", "10", "--seed", "-1"], False,
        ("seed",))
    add(c, "config-missing", [*sw, "--retrieval-k", "20", "--esr-k", "10", "--config", "{d}/n.toml"],
        False, ("n.toml",))
    add(c, "valid", [*sw, "--retrieval-k", "20,30", "--esr-k", "10", "--out", "{d}/sw"], True)
    add(c, "valid-json", [*sw, "--retrieval-k", "20", "--esr-k", "10", "--format", "json",
                          "--p99-ms", "1000"], True)

    c = "cli:ablation"
    ab = ["ablation", *TINY, "--no-progress", "--out", "{d}/out"]
    for opt, vals in (("--esr-k", ["1", "0", "abc", "-2"]), ("--retrieval-k", ["0", "1", "abc"]),
                      ("--max-requests", ["-1", "abc"]), ("--seed", ["-1", "abc"]),
                      ("--split", ["random"]), ("--device", ["tpu"]), ("--data", ["", "nope"])):
        for v in vals:
            needles = (opt,) if v == "abc" else ((opt.strip("-").replace("-", "_").replace("_k", ""),
                                                  opt, v or "empty"),)
            add(c, f"{opt}={v!r}", [*ab, opt, v], False, needles)
    add(c, "config-missing", [*ab, "--config", "{d}/n.toml"], False, ("n.toml",))
    add(c, "config-bad-key", [*ab, "--config", "{d}/a.toml"], False, ("colour",),
        lambda d: _w(d / "a.toml", "colour = 1\n"))
    add(c, "config-bad-gesr", [*ab, "--config", "{d}/a.toml"], False, ("warp",),
        lambda d: _w(d / "a.toml", "[gesr]\nwarp = 1\n"))
    add(c, "out-user-folder", ["ablation", *TINY, "--no-progress", "--out", "{d}/mine"], False,
        ("{d}/mine",), precious, precious_intact)
    add(c, "cache-dir-file", [*ab, "--cache-dir", "{d}/f"], False, ("{d}/f",),
        lambda d: _w(d / "f", "x"))

    c = "cli:data"
    add(c, "describe-no-data", ["data", "describe"], False, ("--data",))
    add(c, "describe-format-xml", ["data", "describe", "--data", "synthetic:tiny", "--format", "xml"],
        False, ("xml",))
    add(c, "describe-cache-dir-file", ["data", "describe", "--data", "ml-100k", "--cache-dir", "{d}/f"],
        False, (("{d}/f", "ml-100k"),), lambda d: _w(d / "f", "x"))
    add(c, "describe-unknown-opt", ["data", "describe", "--data", "synthetic:tiny", "--x"], False,
        ("--x",))
    add(c, "unknown-subcommand", ["data", "explode"], False, ("explode",))
    add(c, "unknown-command", ["explode"], False, ("explode",))
    add(c, "download-unknown", ["data", "download", "ml-7m"], False, ("ml-7m",))
    add(c, "download-offline", ["data", "download", "ml-100k", "--cache-dir", "{d}/dl"], False,
        ("ml-100k",))
    add(c, "describe-json", ["data", "describe", "--data", "synthetic:tiny", "--format", "json"], True)
    add(c, "describe-strict", ["data", "describe", "--data", "{d}/log.csv", "--strict"], True, (),
        lambda d: _w(d / "log.csv", text(log_lines())))
    add(c, "describe-strict-dups", ["data", "describe", "--data", "{d}/log.csv", "--strict"], False,
        ("log.csv", "duplicate"), lambda d: _w(d / "log.csv", text(log_lines() + log_lines()[1:3])))
    add(c, "version", ["version"], True)
    add(c, "help", ["--help"], True)
    add(c, "run-help", ["run", "--help"], True)
    return out


# read-only folders: chmod for ordinary users; root writes through modes, so the folder is made
# immutable (chattr +i) instead, and made writable again after the case
def _readonly(p: Path) -> None:
    p.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        p.chmod(0o555)
    else:
        subprocess.run(["chattr", "+i", str(p)], check=True, capture_output=True)


def _writable(p: Path) -> None:
    if not p.exists():
        return
    if os.geteuid() != 0:
        p.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(p)], capture_output=True)
    for q in p.rglob("*"):
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(q)], capture_output=True)
        else:
            q.chmod(0o755 if q.is_dir() else 0o644)


# ---- plugins ---------------------------------------------------------------------------------------

PLUGIN_BASE = textwrap.dedent('''
    import sys

    import torch

    from cascade.stages.base import Candidates


    class Ranker:
        name = "p"

        def fit(self, ctx):
            self.n = ctx.dataset.n_items
            return self

        def score(self, batch, candidates):
            return -candidates.float()


    class Retriever:
        name = "pr"

        def fit(self, ctx):
            self.n = ctx.dataset.n_items
            return self

        def retrieve(self, batch, k):
            ids = torch.arange(k).repeat(len(batch), 1)
            return Candidates(ids=ids, scores=-ids.float())
''')

# (name, kind, class body appended to the module, valid, needles)
PLUGIN_CLASSES = [
    ("fit-raises", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        raise KeyError('price')\n",
     False, ("C", "fit", "KeyError")),
    ("score-raises", "esr", "class C(Ranker):\n    def score(self, b, c):\n        raise RuntimeError('boom')\n",
     False, ("C", "score", "boom")),
    ("retrieve-raises", "retrieval", "class C(Retriever):\n    def retrieve(self, b, k):\n        raise ValueError('nope')\n",
     False, ("C", "retrieve", "nope")),
    ("lsr-score-raises", "lsr", "class C(Ranker):\n    def score(self, b, c):\n        raise ZeroDivisionError('z')\n",
     False, ("C", "score")),
    ("fit-returns-none", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        self.n = 1\n",
     True, ()),
    ("score-wrong-shape", "esr", "class C(Ranker):\n    def score(self, b, c):\n        return torch.zeros(len(b), 3)\n",
     False, ("C", "shape")),
    ("score-1d", "esr", "class C(Ranker):\n    def score(self, b, c):\n        return torch.zeros(c.shape[1])\n",
     False, ("C", "shape")),
    ("score-nan", "esr", "class C(Ranker):\n    def score(self, b, c):\n        return torch.full(c.shape, float('nan'))\n",
     False, ("C", "NaN")),
    ("score-inf", "lsr", "class C(Ranker):\n    def score(self, b, c):\n        s = -c.float()\n        s[0, 0] = float('inf')\n        return s\n",
     False, ("C", "inf")),
    ("score-list", "esr", "class C(Ranker):\n    def score(self, b, c):\n        return c.tolist()\n",
     False, ("C", "list")),
    ("score-numpy", "esr", "class C(Ranker):\n    def score(self, b, c):\n        return (-c.float()).numpy()\n",
     False, ("C", "ndarray")),
    ("score-none", "esr", "class C(Ranker):\n    def score(self, b, c):\n        return None\n",
     False, ("C", "NoneType")),
    ("score-int-dtype", "esr", "class C(Ranker):\n    def score(self, b, c):\n        return -c\n",
     True, ()),
    ("score-bool", "esr", "class C(Ranker):\n    def score(self, b, c):\n        return c > 5\n",
     False, ("C", "bool")),
    ("score-complex", "esr", "class C(Ranker):\n    def score(self, b, c):\n        return c.to(torch.complex64)\n",
     False, ("C",)),
    ("score-string", "esr", "class C(Ranker):\n    def score(self, b, c):\n        return 'high'\n",
     False, ("C", "str")),
    ("score-requires-grad", "esr", "class C(Ranker):\n    def score(self, b, c):\n        return (-c.float()).requires_grad_()\n",
     True, ()),
    ("score-on-meta", "esr", "class C(Ranker):\n    def score(self, b, c):\n        return torch.zeros(c.shape, device='meta')\n",
     False, ("C",)),
    ("retrieve-duplicates", "retrieval", "class C(Retriever):\n    def retrieve(self, b, k):\n        return Candidates(ids=torch.zeros(len(b), k, dtype=torch.long), scores=torch.zeros(len(b), k))\n",
     False, ("C", "more than once")),
    ("retrieve-out-of-range", "retrieval", "class C(Retriever):\n    def retrieve(self, b, k):\n        ids = torch.arange(k).repeat(len(b), 1) + 10**6\n        return Candidates(ids=ids, scores=-ids.float())\n",
     False, ("C", "outside the catalogue")),
    ("retrieve-negative", "retrieval", "class C(Retriever):\n    def retrieve(self, b, k):\n        ids = -5 - torch.arange(k).repeat(len(b), 1)\n        return Candidates(ids=ids, scores=ids.float())\n",
     False, ("C", "outside the catalogue")),
    ("retrieve-float-ids", "retrieval", "class C(Retriever):\n    def retrieve(self, b, k):\n        ids = torch.arange(k).repeat(len(b), 1).float()\n        return Candidates(ids=ids, scores=ids)\n",
     False, ("C", "float")),
    ("retrieve-short", "retrieval", "class C(Retriever):\n    def retrieve(self, b, k):\n        ids = torch.arange(k - 1).repeat(len(b), 1)\n        return Candidates(ids=ids, scores=-ids.float())\n",
     False, ("C", "shape")),
    ("retrieve-tensor", "retrieval", "class C(Retriever):\n    def retrieve(self, b, k):\n        return torch.arange(k).repeat(len(b), 1)\n",
     True, ()),
    ("retrieve-none", "retrieval", "class C(Retriever):\n    def retrieve(self, b, k):\n        return None\n",
     False, ("C", "NoneType")),
    ("retrieve-list", "retrieval", "class C(Retriever):\n    def retrieve(self, b, k):\n        return [[0] * k] * len(b)\n",
     False, ("C", "list")),
    ("retrieve-all-padding", "retrieval", "class C(Retriever):\n    def retrieve(self, b, k):\n        ids = torch.full((len(b), k), -1)\n        return Candidates(ids=ids, scores=torch.zeros(len(b), k))\n",
     True, ()),
    ("fit-sys-exit-0", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        sys.exit(0)\n",
     False, ("C", "sys.exit(0)")),
    ("fit-sys-exit-3", "lsr", "class C(Ranker):\n    def fit(self, ctx):\n        sys.exit(3)\n",
     False, ("C", "sys.exit(3)")),
    ("score-sys-exit", "esr", "class C(Ranker):\n    def score(self, b, c):\n        sys.exit('bye')\n",
     False, ("C", "sys.exit")),
    ("retrieve-sys-exit", "retrieval", "class C(Retriever):\n    def retrieve(self, b, k):\n        raise SystemExit(None)\n",
     False, ("C", "sys.exit")),
    ("fit-keyboard-interrupt", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        raise KeyboardInterrupt\n",
     False, (("plug.py", "C"), "KeyboardInterrupt")),
    ("score-keyboard-interrupt", "esr", "class C(Ranker):\n    def score(self, b, c):\n        raise KeyboardInterrupt\n",
     False, (("plug.py", "C"), "KeyboardInterrupt")),
    ("fit-generator-exit", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        raise GeneratorExit\n",
     False, ("C", "GeneratorExit")),
    ("fit-recursion", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        return self.fit(ctx)\n",
     False, ("C", "RecursionError")),
    ("fit-memory-error", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        raise MemoryError('simulated')\n",
     False, ("C", "MemoryError")),
    ("fit-oserror", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        open('/nonexistent/x')\n",
     False, ("C", "/nonexistent/x")),
    ("fit-dataerror", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        from cascade.data.dataset import DataError\n        raise DataError('my table is bad')\n",
     False, ("my table is bad",)),
    ("fit-stageerror", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        from cascade.stages.base import StageError\n        raise StageError('plugin says no')\n",
     False, ("plugin says no",)),
    ("fit-exception-bad-str", "esr", "class E(Exception):\n    def __str__(self):\n        raise RuntimeError('str fails')\nclass C(Ranker):\n    def fit(self, ctx):\n        raise E()\n",
     False, ("C", "fit")),
    ("fit-raises-markup", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        raise ValueError('[bold]x[/bold] :smile:')\n",
     False, ("C", "[bold]x[/bold] :smile:")),
    ("fit-warns", "esr", "import warnings\nclass C(Ranker):\n    def fit(self, ctx):\n        warnings.warn('careful')\n        return self\n",
     True, ()),
    ("fit-prints", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        print('hello from fit')\n        return self\n",
     True, ()),
    ("ctor-needs-args", "esr", "class C(Ranker):\n    def __init__(self, x):\n        self.x = x\n",
     False, ("C", "constructed")),
    ("ctor-raises", "esr", "class C(Ranker):\n    def __init__(self):\n        raise RuntimeError('ctor')\n",
     False, ("plug:C", "ctor")),
    ("no-score", "esr", "class C:\n    name = 'c'\n    def fit(self, ctx):\n        return self\n",
     False, ("C", "score")),
    ("no-fit", "lsr", "class C:\n    name = 'c'\n    def score(self, b, c):\n        return c.float()\n",
     False, ("C", "fit")),
    ("no-retrieve", "retrieval", "class C(Ranker):\n    pass\n", False, ("C", "retrieve")),
    ("score-not-callable", "esr", "class C(Ranker):\n    score = 5\n", False, ("C", "score")),
    ("not-a-class", "esr", "C = 5\n", False, ("C",)),
    ("a-function", "esr", "def C():\n    return Ranker()\n", False, ("plug:C", "fit")),
    ("name-not-string", "esr", "class C(Ranker):\n    name = 5\n", True, ()),
    ("name-missing", "esr", "class C:\n    def fit(self, ctx):\n        return self\n    def score(self, b, c):\n        return -c.float()\n",
     True, ()),
    ("config-class-not-dataclass", "esr", "class C(Ranker):\n    config_class = dict\n    def __init__(self, config=None):\n        pass\n",
     True, ()),
    ("fit-report-not-mapping", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        self.fit_report_ = 5\n        return self\n",
     True, ()),
    ("fit-report-unserialisable", "esr", "class C(Ranker):\n    def fit(self, ctx):\n        self.fit_report_ = {'obj': object(), 't': torch.ones(2)}\n        return self\n",
     False, ("C", "report", "not JSON")),
]

PLUGIN_MODULES = [  # (name, module text, class, valid, needles): failures at import
    ("syntax-error", "def (:\n", "C", False, ("plug", ("SyntaxError", "syntax"))),
    ("import-error", "import no_such_module_xyz\n", "C", False, ("plug", "no_such_module_xyz")),
    ("raises-at-import", "raise RuntimeError('import boom')\n", "C", False, ("plug", "import boom")),
    ("sys-exit-at-import", "import sys\nsys.exit(4)\n", "C", False, ("plug",)),
    ("sys-exit-0-at-import", "import sys\nsys.exit(0)\n", "C", False, ("plug",)),
    ("keyboard-interrupt-at-import", "raise KeyboardInterrupt\n", "C", False,
     ("plug", "KeyboardInterrupt")),
    ("missing-class", "x = 1\n", "C", False, ("plug", "'C'")),
    ("binary-module", None, "C", False, ("plug",)),
    ("utf16-module", "utf16", "C", False, ("plug",)),
    ("empty-module", "", "C", False, ("plug", "'C'")),
]


def _plugin_cases() -> list[Case]:
    cat = "plugin"
    out: list[Case] = []
    cheap = {"retrieval": "popular", "esr": "popular", "lsr": "popular"}
    for name, kind, body, valid, needles in PLUGIN_CLASSES:
        stages = {**cheap, kind: "plug:C"}
        args = [*RUN, *TINY, *SMALL_K, "--max-requests", "40",
                *[x for k, v in stages.items() for x in (f"--{k}", v)]]

        def setup(d: Path, body=body):
            _w(d / "plug.py", PLUGIN_BASE + "\n\n" + body)

        # the stage is named by its spec, its class or its `name` ("p", "pr")
        needles = tuple((("C", " p'", " pr'", "'p'", "'pr'", "plug.py") if n == "C" else n)
                        for n in needles)
        out.append(Case(cat, f"{kind}-{name}", args, valid, needles, setup,
                        _run_folder_written if valid else None))
    for name, mod, cls, valid, needles in PLUGIN_MODULES:
        for kind in ("esr", "retrieval"):
            stages = {**cheap, kind: f"plug:{cls}"}
            args = [*RUN, *TINY, *SMALL_K, *[x for k, v in stages.items() for x in (f"--{k}", v)]]

            def setup(d: Path, mod=mod):
                if mod is None:
                    data = random.Random(9).randbytes(500)
                elif mod == "utf16":
                    data = PLUGIN_BASE.encode("utf-16")
                else:
                    data = mod.encode()
                _w(d / "plug.py", data)

            out.append(Case(cat, f"{kind}-{name}", args, valid, needles, setup))
    # names that are not module:Class
    for spec, needle in (("plug:", "plug:"), (":C", ":C"), ("plug:C:D", "plug:C:D"),
                         ("../plug:C", "../plug"), ("plug.py:C", "plug.py"), ("p lug:C", "p lug"),
                         ("plug:Ranker.x", "Ranker.x"), ("nonexistent_mod_xyz:C", "nonexistent_mod_xyz"),
                         ("os.path:join", "os.path:join"), ("builtins:print", "builtins:print"),
                         ("\u00fcmod:C", "\u00fcmod")):
        args = [*RUN, *TINY, *SMALL_K, "--retrieval", "popular", "--lsr", "popular", "--esr", spec]
        out.append(Case(cat, f"spec={spec!r}", args, False, (needle,),
                        lambda d: _w(d / "plug.py", PLUGIN_BASE)))
    # a package plugin and a config table for a plugin without config_class
    out.append(Case(cat, "package-plugin", [*RUN, *TINY, *CHEAP, *SMALL_K, "--esr", "mypkg.sub:Ranker"],
                    True, (), lambda d: (_w(d / "mypkg" / "__init__.py", ""),
                                         _w(d / "mypkg" / "sub.py", PLUGIN_BASE)),
                    _run_folder_written))
    out.append(Case(cat, "config-for-configless-plugin", [*RUN, "--config", "{d}/c.toml"], False,
                    ("Ranker", "config"),
                    lambda d: (_w(d / "plug.py", PLUGIN_BASE),
                               _w(d / "c.toml", _cheap_head("esr = 1") + '[esr]\nstage = "plug:Ranker"\n'
                                  'config = {alpha = 1}\n'))))
    out.append(Case(cat, "valid-plugin-space-dir", [*RUN, *TINY, *CHEAP, *SMALL_K, "--esr", "plug:Ranker"],
                    True, (), lambda d: _w(d / "plug.py", PLUGIN_BASE), _run_folder_written))
    return out


# ---- runs: damaged run folders for compare and report ---------------------------------------------

GOOD_RUN: Path  # set by `prepare_good_run`


def _copy_run(d: Path, name: str = "r") -> Path:
    return Path(shutil.copytree(GOOD_RUN, d / name))


def _edit_json(rel: str, fn: Callable[[dict], object], *, replace: bool = False
               ) -> Callable[[Path], None]:
    """Copy the good run and change one JSON file in place (or, with `replace`, write what `fn`
    returns instead)."""
    def setup(d: Path):
        r = _copy_run(d)
        obj = json.loads((r / rel).read_text())
        res = fn(obj)
        (r / rel).write_text(json.dumps(res if replace else obj))
    return setup


def _first_variant(m: dict) -> dict:
    return next(iter(m["variants"].values()))


# damage a reader may survive: shown as "-" or left out, or refused; both are fine
HARMLESS = {"empty-config.toml", "stage-recall-nan", "final-null", "stage-recall-null", "huge-numbers", "stage-no-survival", "final-missing-metric",
            "final-empty", "primary-unknown", "baseline-unknown", "name-int", "seed-string",
            "stage-k-negative", "reference-string", "comparisons-string", "stage-no-latency",
            "funnel-latency-missing", "requests-rank-float-nan", "latency-ms-nan",
            "requests-null-ranks", "latency-no-rows", "stages-empty", "primary-int",
            "n-requests-string", "budgets-retrieval-string", "latency-stage-int"}


def _runs_cases() -> list[Case]:
    import polars as pl

    cat = "runs"
    out: list[Case] = []

    def add(name, setup, valid=False, needles=("{d}/r",), both=True):
        cmds = (("compare", ["compare", "{d}/r"]), ("report", ["report", "{d}/r"]))
        for cmd, args in cmds if both else cmds[:1]:
            out.append(Case(cat, f"{cmd}-{name}", args, valid, needles if not valid else (), setup))

    for f in ("metrics.json", "config.toml", "env.json", "requests.parquet", "latency.parquet"):
        add(f"missing-{f}", lambda d, f=f: (_copy_run(d) / f).unlink(), needles=("{d}/r", f))
        add(f"empty-{f}", lambda d, f=f: (_copy_run(d) / f).write_bytes(b""), needles=("{d}/r", f))
        add(f"binary-{f}", lambda d, f=f: (_copy_run(d) / f).write_bytes(random.Random(4).randbytes(900)),
            needles=("{d}/r", f))
        add(f"folder-{f}", lambda d, f=f: ((_copy_run(d) / f).unlink(), (d / "r" / f).mkdir()),
            needles=("{d}/r", f))
        add(f"truncated-{f}", lambda d, f=f: _truncate(_copy_run(d) / f), needles=("{d}/r", f))
        add(f"symlink-loop-{f}", lambda d, f=f: _loop(_copy_run(d) / f), needles=("{d}/r", f))
    for c in out:  # an empty config.toml: the run's settings are unknown, its results are not
        if c.name.endswith("-empty-config.toml"):
            c.valid = None
    add("metrics-a-list", _edit_json("metrics.json", lambda m: [m], replace=True),
        needles=("metrics.json",))
    add("metrics-null", _edit_json("metrics.json", lambda m: None, replace=True),
        needles=("metrics.json",))
    add("format-old", _edit_json("metrics.json", lambda m: m.update(format="cascade-run/1")),
        needles=("cascade-run/1",))
    add("format-missing", _edit_json("metrics.json", lambda m: m.pop("format")),
        needles=("format", "None"))
    damages = {
        "no-variants": lambda m: m.pop("variants"),
        "variants-empty": lambda m: m.update(variants={}),
        "variants-list": lambda m: m.update(variants=[1]),
        "variant-null": lambda m: m["variants"].update({k: None for k in m["variants"]}),
        "stages-missing": lambda m: _first_variant(m).pop("stages"),
        "stages-dict": lambda m: _first_variant(m).update(stages={}),
        "stages-empty": lambda m: _first_variant(m).update(stages=[]),
        "stage-k-string": lambda m: _first_variant(m)["stages"][0].update(k="ten"),
        "stage-k-float": lambda m: _first_variant(m)["stages"][0].update(k=10.5),
        "stage-k-negative": lambda m: _first_variant(m)["stages"][0].update(k=-3),
        "stage-name-int": lambda m: _first_variant(m)["stages"][0].update(name=5),
        "stage-recall-string": lambda m: _first_variant(m)["stages"][0].update(recall="high"),
        "stage-recall-nan": lambda m: _first_variant(m)["stages"][0].update(recall=float("nan")),
        "stage-latency-string": lambda m: _first_variant(m)["stages"][0].update(latency_ms="fast"),
        "stage-latency-p50-string": lambda m: _first_variant(m)["stages"][0]["latency_ms"].update(p50="x"),
        "stage-no-latency": lambda m: _first_variant(m)["stages"][0].pop("latency_ms"),
        "stage-no-survival": lambda m: _first_variant(m)["stages"][0].pop("survival"),
        "final-string": lambda m: _first_variant(m)["final"].update({"ndcg@10": "high"}),
        "final-list": lambda m: _first_variant(m).update(final=[1]),
        "final-missing-metric": lambda m: _first_variant(m)["final"].pop("ndcg@10"),
        "final-empty": lambda m: _first_variant(m).update(final={}),
        "throughput-string": lambda m: _first_variant(m).update(throughput_rps="fast"),
        "funnel-latency-missing": lambda m: _first_variant(m).pop("funnel_latency_ms"),
        "data-missing": lambda m: m.pop("data"),
        "data-list": lambda m: m.update(data=[]),
        "traffic-key-missing": lambda m: m["data"].pop("traffic_key"),
        "n-requests-string": lambda m: m["data"].update(n_requests="many"),
        "budgets-missing": lambda m: m.pop("budgets"),
        "budgets-string": lambda m: m.update(budgets="x"),
        "budgets-retrieval-string": lambda m: m["budgets"].update(retrieval="x"),
        "primary-unknown": lambda m: m.update(primary="ghost"),
        "primary-int": lambda m: m.update(primary=5),
        "baseline-unknown": lambda m: m.update(baseline="ghost"),
        "name-int": lambda m: m.update(name=5),
        "reference-string": lambda m: m.update(reference="x"),
        "comparisons-string": lambda m: m.update(comparisons="x"),
        "seed-string": lambda m: m.update(seed="x"),
        "huge-numbers": lambda m: _first_variant(m)["final"].update({"ndcg@10": 1e308 * 10}),
        # null is what a NaN metric is written as: allowed by the reader, so it must be shown
        "final-null": lambda m: _first_variant(m)["final"].update({"ndcg@10": None}),
        "stage-recall-null": lambda m: _first_variant(m)["stages"][0].update(recall=None),
    }
    for name, fn in damages.items():
        add(name, _edit_json("metrics.json", fn), needles=("{d}/r",))
        if name in HARMLESS:
            out[-1].valid = out[-2].valid = None
    add("env-a-list", _edit_json("env.json", lambda e: [e], replace=True), needles=("env.json",))
    add("config-not-toml", lambda d: (_copy_run(d) / "config.toml").write_text("= = ="),
        needles=("config.toml",))

    def edit_parquet(f: str, fn):
        def setup(d: Path):
            r = _copy_run(d)
            df = pl.read_parquet(r / f)
            fn(df).write_parquet(r / f)
        return setup

    pq = {
        "requests-no-variant-col": ("requests.parquet", lambda df: df.drop("variant")),
        "requests-no-rows": ("requests.parquet", lambda df: df.head(0)),
        "requests-other-variant": ("requests.parquet", lambda df: df.with_columns(pl.lit("ghost").alias("variant"))),
        "requests-rank-string": ("requests.parquet", lambda df: df.with_columns(pl.col("rank_lsr").cast(pl.String) + "x")),
        "requests-rank-float-nan": ("requests.parquet", lambda df: df.with_columns(pl.lit(float("nan")).alias("rank_lsr"))),
        "requests-hit-string": ("requests.parquet", lambda df: df.with_columns(pl.lit("yes").alias("hr@10"))),
        "requests-request-id-string": ("requests.parquet", lambda df: df.with_columns(pl.lit("r").alias("request_id"))),
        "requests-null-ranks": ("requests.parquet", lambda df: df.with_columns(pl.lit(None, pl.Int64).alias("rank_esr"))),
        "requests-is-csv": ("requests.parquet", None),
        "latency-no-ms": ("latency.parquet", lambda df: df.drop("ms")),
        "latency-ms-string": ("latency.parquet", lambda df: df.with_columns(pl.lit("fast").alias("ms"))),
        "latency-no-rows": ("latency.parquet", lambda df: df.head(0)),
        "latency-batch-size-string": ("latency.parquet", lambda df: df.with_columns(pl.lit("x").alias("batch_size"))),
        "latency-ms-nan": ("latency.parquet", lambda df: df.with_columns(pl.lit(float("nan")).alias("ms"))),
        "latency-stage-int": ("latency.parquet", lambda df: df.with_columns(pl.lit(3).alias("stage"))),
    }
    for name, (f, fn) in pq.items():
        if fn is None:
            setup = lambda d, f=f: (_copy_run(d) / f).write_text("a,b\n1,2\n")
        else:
            setup = edit_parquet(f, fn)
        add(name, setup, needles=("{d}/r",))
        if name in HARMLESS:
            out[-1].valid = out[-2].valid = None
    # read-only run folder: report cannot write, compare only reads (valid)
    out.append(Case(cat, "report-readonly-folder", ["report", "{d}/r"], False, ("{d}/r",),
                    lambda d: (_copy_run(d), _readonly(d / "r")), cleanup=lambda d: _writable(d / "r")))
    out.append(Case(cat, "compare-readonly-folder", ["compare", "{d}/r"], True, (),
                    lambda d: (_copy_run(d), _readonly(d / "r")), cleanup=lambda d: _writable(d / "r")))
    out.append(Case(cat, "report-readonly-figures", ["report", "{d}/r"], None, ("figures",),
                    lambda d: (_copy_run(d), _readonly(d / "r" / "figures")),
                    cleanup=lambda d: _writable(d / "r" / "figures")))
    out.append(Case(cat, "report-figures-is-file", ["report", "{d}/r"], None, ("figures",),
                    lambda d: (_copy_run(d), shutil.rmtree(d / "r" / "figures"),
                               _w(d / "r" / "figures", "x"))))
    out.append(Case(cat, "report-report-md-is-folder", ["report", "{d}/r"], False, ("report.md",),
                    lambda d: (_copy_run(d), (d / "r" / "report.md").unlink(),
                               (d / "r" / "report.md").mkdir())))
    # valid unusual
    out.append(Case(cat, "report-good", ["report", "{d}/r"], True, (), _copy_run))
    out.append(Case(cat, "compare-good", ["compare", "{d}/r"], True, (), _copy_run))
    out.append(Case(cat, "report-no-report-md", ["report", "{d}/r"], True, (),
                    lambda d: (_copy_run(d) / "report.md").unlink()))
    out.append(Case(cat, "report-no-figures", ["report", "{d}/r"], True, (),
                    lambda d: shutil.rmtree(_copy_run(d) / "figures")))
    out.append(Case(cat, "compare-extra-user-file", ["compare", "{d}/r"], True, (),
                    lambda d: _w(_copy_run(d) / "notes.txt", "mine")))
    out.append(Case(cat, "compare-symlinked-run", ["compare", "{d}/link"], True, (),
                    lambda d: (_copy_run(d), (d / "link").symlink_to(d / "r"))))
    out.append(Case(cat, "compare-unicode-metrics", ["compare", "{d}/r"], True, (),
                    _edit_json("metrics.json", lambda m: m.update(name="r\u00e9sum\u00e9 \u4e2d [bold]x[/bold]"))))
    out.append(Case(cat, "report-unicode-name", ["report", "{d}/r"], True, (),
                    _edit_json("metrics.json", lambda m: m.update(name="r\u00e9sum\u00e9 :smile:"))))
    out.append(Case(cat, "compare-null-latency", ["compare", "{d}/r", "--format", "json"], None, ("p50",),
                    _edit_json("metrics.json", lambda m: _first_variant(m)["stages"][0]["latency_ms"].update(p50=None))))
    return out


def _truncate(p: Path) -> None:
    b = p.read_bytes()
    p.write_bytes(b[: max(1, len(b) // 2)])


def _loop(p: Path) -> None:
    p.unlink()
    p.symlink_to(p)


# ---- the corpus ------------------------------------------------------------------------------------

def corpus() -> list[Case]:
    cases: list[Case] = []
    for fmt in (ML100K, MLDAT, MLCSV):
        cases += _ml_cases(fmt)
    cases += _metadata_cases()
    cases += _sequence_cases()
    cases += _log_csv_cases()
    cases += _parquet_cases()
    cases += _feature_cases()
    cases += _path_cases()
    cases += _config_cases()
    cases += _cli_cases()
    cases += _plugin_cases()
    cases += _runs_cases()
    seen: set[str] = set()
    for c in cases:  # unique ids
        base, k = c.id, 2
        while c.id in seen:
            c.name = f"{base.split('/', 1)[1]}#{k}"
            k += 1
        seen.add(c.id)
    return cases


# ---- runners ---------------------------------------------------------------------------------------

def cascade_script() -> str:
    """The installed console script of this interpreter (not a shell shim in front of it)."""
    p = Path(sysconfig.get_path("scripts")) / "cascade"
    if p.is_file():
        return str(p)
    found = shutil.which("cascade")
    if not found:
        raise SystemExit("the cascade console script is not installed (pip install -e .)")
    return found


def base_env(work: Path) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYENV_VERSION", "VIRTUAL_ENV")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MPLCONFIGDIR=str(work / "mpl"), TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1",
               COLUMNS="200")
    return env


class SubprocessRunner:
    """The console script, one process per case."""

    def __init__(self, env: dict[str, str]):
        self.script = cascade_script()

    def run(self, argv, cwd, env, out, err, timeout) -> tuple[int, bool]:
        with open(out, "wb") as fo, open(err, "wb") as fe:
            p = subprocess.Popen([self.script, *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                 stdout=fo, stderr=fe, start_new_session=True)
            try:
                rc, timed_out = p.wait(timeout), False
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
            _killpg(p.pid)
            if rc is None:
                rc = p.wait()
        return rc, timed_out

    def close(self) -> None:
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class ForkRunner:
    """A pre-imported zygote that forks one child per case (see the module docstring)."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-P", str(Path(__file__).resolve()), "--zygote", cascade_script()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, cwd="/",
        )
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the fork runner did not start: {ready!r}")

    def run(self, argv, cwd, env, out, err, timeout) -> tuple[int, bool]:
        req = {"argv": argv, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err),
               "timeout": timeout}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork runner died")
        reply = json.loads(line)
        return reply["rc"], reply["timed_out"]

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except BaseException:  # noqa: BLE001 - never leave a zygote behind
            self.proc.kill()


def zygote(script: str) -> None:
    """The fork runner's server: import what the console script imports, then fork per case."""
    sys.path.insert(0, str(Path(script).parent))  # as for the console script: its own folder
    import cascade.cli  # noqa: F401 - the import every case would pay for
    # what most cases import later anyway; importing it here changes nothing but the time
    import matplotlib

    matplotlib.use("Agg")
    import importlib

    for mod in ("cascade.compare", "cascade.experiment", "cascade.report", "cascade.figures",
                "cascade.sweep", "cascade.ablation", "cascade.data.loaders", "cascade.data.derive",
                "cascade.data.describe", "cascade.data.synthetic", "sklearn.cluster",
                "sklearn.decomposition", "matplotlib.pyplot", "faiss"):
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - the case that needs it will say why
            print(f"zygote: cannot preload {mod}: {e!r}", file=sys.stderr)
    from cascade.data import formats

    formats.names()
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _zygote_child(req)
        t0 = time.monotonic()
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - t0 > req["timeout"]:
                timed_out = True
                _killpg(pid)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.02)
        _killpg(pid)  # anything the case left running
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out}),
              flush=True)


def _zygote_child(req: dict) -> None:
    code = 1
    try:
        os.setsid()
        for fd, path in ((1, req["out"]), (2, req["err"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        sys.stdin = open(0, closefd=False)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = ["cascade", *req["argv"]]
        from cascade.cli import app

        try:
            app()
            code = 0
        except SystemExit as e:  # what the interpreter does with it
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code & 0xFF
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
    except BaseException:  # noqa: BLE001 - what the interpreter prints for an uncaught error
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# ---- running and classifying ---------------------------------------------------------------------

@dataclass
class Result:
    case: Case
    outcome: str
    rc: int | None
    seconds: float
    output: str
    reason: str = ""


def _leftovers(d: Path) -> list[str]:
    found = []
    for p in d.rglob("*"):
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            found.append(str(p.relative_to(d)))
    return found


def classify(case: Case, rc: int | None, timed_out: bool, output: str, d: Path) -> tuple[str, str]:
    if timed_out:
        return "hang", f"no exit within {case.timeout:.0f} s"
    if "Traceback (most recent call last)" in output:
        return "traceback", "a traceback reached the user"
    if rc == 1:
        return "internal", "exit 1"
    if case.valid is True and rc != 0:
        return "wrong-refusal", f"exit {rc} on valid input"
    if case.valid is False and rc == 0:
        return "silent-accept", "exit 0 on invalid input"
    if rc not in (0, 2):
        return "other", f"exit {rc}"
    if rc == 2:
        missing = []
        for n in case.needles:
            alts = n if isinstance(n, tuple) else (n,)
            if not any(_fmt(a, d) in output for a in alts):
                missing.append(" | ".join(_fmt(a, d) for a in alts))
        if missing:
            return "unnamed", "the message does not name: " + "; ".join(missing)
    if case.check is not None:
        try:
            why = case.check(d, output) if (rc == 0 or not case.valid) else None
        except Exception as e:  # noqa: BLE001 - the check itself failed: say so
            why = f"the case's check failed: {e!r}"[:300]
        if why:
            return ("other" if rc == 0 else "leftover"), why
    left = _leftovers(d)
    if left:
        return "leftover", "temporaries left: " + ", ".join(left[:5])
    return "ok", ""


def run_case(runner, case: Case, work: Path, env0: dict[str, str], index: int) -> Result:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", case.id)[:80]
    d = work / "cases" / f"{index:04d}-{slug}"
    d.mkdir(parents=True)
    (d / "home").mkdir()
    env = {**env0, "HOME": str(d / "home"), "CASCADE_CACHE_DIR": str(d / "cache"),
           "CASCADE_DATA_DIR": str(d / "datasets"), "CASCADE_DATA_MIRROR": str(d / "no-mirror"),
           **case.env}
    argv = [_fmt(a, d) for a in case.args]
    t0 = time.perf_counter()
    try:
        if case.setup is not None:
            case.setup(d)
    except Exception as e:  # noqa: BLE001 - a broken case is the harness's bug: say so
        return Result(case, "other", None, 0.0, f"case setup failed: {e!r}", "setup failed")
    try:
        rc, timed_out = runner.run(argv, d, env, d / ".stdout", d / ".stderr", case.timeout)
        seconds = time.perf_counter() - t0
        output = ((d / ".stdout").read_text(errors="replace") + (d / ".stderr").read_text(
            errors="replace"))
        (d / ".stdout").unlink()
        (d / ".stderr").unlink()
        outcome, reason = classify(case, rc, timed_out, output, d)
    except Exception as e:  # noqa: BLE001 - a harness bug must not stop the other cases
        return Result(case, "other", None, time.perf_counter() - t0,
                      traceback.format_exc()[-3000:], f"harness error: {e!r}"[:300])
    finally:
        if case.cleanup is not None:
            case.cleanup(d)
    if outcome == "ok":
        shutil.rmtree(d, ignore_errors=True)
    else:
        (d / "OUTCOME.txt").write_text(f"{outcome}: {reason}\n$ {' '.join(map(_quote, ['cascade', *argv]))}"
                                       f"\nexit {rc}\n{output}")
    return Result(case, outcome, rc, seconds, output, reason)


def prepare_good_run(work: Path, runner) -> Path:
    """A complete run folder of this cascade, copied by the run-folder cases."""
    d = work / "good"
    d.mkdir(parents=True)
    env = {**base_env(work), "HOME": str(d), "CASCADE_CACHE_DIR": str(d / "cache")}
    argv = [_fmt(a, d) for a in [*RUN, *TINY, *CHEAP, "--esr-baseline", "popular",
                                  "--max-requests", "60"]]
    rc, _ = runner.run(argv, d, env, d / "o", d / "e", 300)
    if rc != 0:
        raise SystemExit("could not write the reference run folder:\n" + (d / "o").read_text()
                         + (d / "e").read_text())
    return d / "out"


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("cascade-recsys", "torch", "polars", "pyarrow", "typer", "click", "rich",
                "faiss-cpu", "hypothesis"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
            "euid": os.geteuid()}


def table(results: list[Result]) -> tuple[list[str], list[list]]:
    by = defaultdict(Counter)
    for r in results:
        by[r.case.category][r.outcome] += 1
        by[r.case.category][{True: "valid", False: "invalid", None: "either"}[r.case.valid]] += 1
    header = ["category", "cases", "invalid", "valid", "either", *OUTCOMES]
    rows = []
    total: Counter = Counter()
    for cat in sorted(by):
        c = by[cat]
        total.update(c)
        rows.append([cat, c["valid"] + c["invalid"] + c["either"], c["invalid"], c["valid"],
                     c["either"], *[c[o] for o in OUTCOMES]])
    rows.append(["total", total["valid"] + total["invalid"] + total["either"], total["invalid"],
                 total["valid"], total["either"], *[total[o] for o in OUTCOMES]])
    return header, rows


def markdown(header, rows, failures: list[Result], meta: dict) -> str:
    lines = [
        "# Fuzzing the cascade CLI (`experiments/fuzz_cli.py`)", "",
        f"{meta['cases']} cases, runner `{meta['runner']}`, {meta['jobs']} jobs, "
        f"{meta['seconds']:.0f} s on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
        f"{meta['created']}.", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    lines += ["", f"## Failing cases ({len(failures)})", ""]
    for r in failures:
        cmd = " ".join(_quote(a) for a in ["cascade", *r.case.args])
        tail = r.output.strip().splitlines()[-6:]
        lines += [f"- **{r.case.id}** ({r.outcome}: {r.reason}): `{cmd}`",
                  "  ```", *["  " + t[:300] for t in tail], "  ```"]
    return "\n".join(lines) + "\n"


def _quote(a: str) -> str:
    return a if re.fullmatch(r"[\w@%+=:,./{}-]+", a) else repr(a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runner", choices=("fork", "subprocess"), default="fork")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", action="append", help="category prefix or case id substring")
    ap.add_argument("--sample", type=int, help="run every n-th case only")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--show-failures", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    ap.add_argument("--out", type=Path, default=RESULTS / "fuzz_cli.json")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    cases = corpus()
    if args.only:
        cases = [c for c in cases if any(c.category.startswith(o) or o in c.id for o in args.only)]
    if args.sample:
        cases = cases[:: args.sample]
    if args.list:
        for c in cases:
            print(f"{ {True: 'valid  ', False: 'invalid', None: 'either '}[c.valid]} {c.id}")
        print(f"{len(cases)} cases")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="cascade-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    env0 = base_env(work)
    make = ForkRunner if args.runner == "fork" else SubprocessRunner
    t0 = time.perf_counter()
    runners = [make(env0) for _ in range(max(1, args.jobs))]
    global GOOD_RUN
    GOOD_RUN = prepare_good_run(work, runners[0])
    free = list(runners)
    lock = threading.Lock()

    def one(ic):
        i, c = ic
        with lock:
            r = free.pop()
        try:
            return run_case(r, c, work, env0, i)
        finally:
            with lock:
                free.append(r)

    results: list[Result] = []
    try:
        with cf.ThreadPoolExecutor(max_workers=len(runners)) as pool:
            for k, res in enumerate(pool.map(one, enumerate(cases)), start=1):
                results.append(res)
                if res.outcome != "ok":
                    print(f"[{k}/{len(cases)}] {res.outcome:14s} {res.case.id}: {res.reason}",
                          flush=True)
                elif k % 50 == 0:
                    print(f"[{k}/{len(cases)}] ... {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        for r in runners:
            r.close()
    seconds = time.perf_counter() - t0
    header, rows = table(results)
    failures = [r for r in results if r.outcome != "ok"]
    _print_table(header, rows)
    if args.show_failures:
        for r in failures:
            print(f"\n== {r.case.id} [{r.outcome}] {r.reason}\n$ "
                  + " ".join(_quote(a) for a in ["cascade", *r.case.args]))
            print(r.output.strip()[-2000:])
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runner": args.runner, "jobs": len(runners), "cases": len(results),
        "seconds": round(seconds, 1), "machine": machine(), "versions": versions(),
    }
    if not args.no_write:
        record = {
            **meta,
            "valid_cases": sum(r.case.valid is True for r in results),
            "counts": {row[0]: dict(zip(header[1:], row[1:])) for row in rows},
            "failures": [{"id": r.case.id, "outcome": r.outcome, "reason": r.reason,
                          "valid": r.case.valid, "exit": r.rc, "seconds": round(r.seconds, 2),
                          "command": ["cascade", *r.case.args],
                          "output": r.output[-4000:]} for r in failures],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        args.out.with_suffix(".md").write_text(markdown(header, rows, failures, meta))
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    elif failures:
        print(f"failing cases' folders are kept under {work / 'cases'}")
    return 1 if failures else 0


def _print_table(header, rows) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="cascade CLI fuzzing: cases by category and outcome", title_justify="left")
    for h in header:
        t.add_column(h, justify="left" if h == "category" else "right")
    for r in rows:
        t.add_row(*[str(x) for x in r], end_section=r[0] == rows[-2][0])
    Console(width=200).print(t)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--zygote":
        zygote(sys.argv[2])
    else:
        sys.exit(main())
