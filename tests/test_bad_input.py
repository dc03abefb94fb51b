"""Bad input: every malformed file gets a DataError naming the file and the line or column and
what was expected; what a loader filters (duplicates, users too short) is reported with counts,
or is an error with strict=True. Never a traceback from the CLI."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from cascade.data.dataset import DataError
from cascade.data.formats.movielens import load_movielens_100k
from cascade.data.formats.sequence import load_sequences
from cascade.data.loaders import detect_format, load_dataset, load_interaction_log


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _udata(d: Path, text: str) -> Path:
    _write(d / "u.data", text)
    return d


GOOD = "1\t10\t5\t100\n1\t11\t4\t101\n2\t10\t3\t102\n2\t12\t1\t103\n"


def _err(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    return str(e.value)


# --------------------------------------------------------------------------------------------
# malformed lines, non-numeric values


def test_wrong_field_count_names_file_and_line(tmp_path):
    d = _udata(tmp_path, GOOD + "3\t10\t5\n3\t11\t2\t7\n")
    msg = _err(load_movielens_100k, d)
    assert f"{d / 'u.data'}, line 5: expected 4 fields" in msg
    assert "found 3: '3\\t10\\t5'" in msg


def test_too_many_fields_after_a_blank_line(tmp_path):
    # the blank line still counts for line numbers
    d = _udata(tmp_path, GOOD + "\n3\t10\t5\t1\t9\n")
    assert "u.data, line 6: expected 4 fields" in _err(load_movielens_100k, d)


def test_non_numeric_id(tmp_path):
    d = _udata(tmp_path, GOOD + "3\tabc\t5\t104\n")
    msg = _err(load_movielens_100k, d)
    assert "u.data, line 5, field 'item'" in msg and "expected an integer, found 'abc'" in msg


def test_non_numeric_timestamp_in_dat(tmp_path):
    _write(tmp_path / "ratings.dat", "1::10::5::100\n1::11::4::yesterday\n1::12::4::1e9\n")
    msg = _err(load_dataset, str(tmp_path))
    assert "ratings.dat, line 2, field 'ts'" in msg and "'yesterday'" in msg
    assert "(and 1 more such line)" in msg  # 1e9 is not an integer either


def test_non_numeric_rating(tmp_path):
    d = _udata(tmp_path, GOOD + "3\t10\tfive\t104\n")
    assert "line 5, field 'rating'" in _err(load_movielens_100k, d)
    assert "expected a number, found 'five'" in _err(load_movielens_100k, d)


def test_sequence_non_numeric_token(tmp_path):
    p = _write(tmp_path / "seq.txt", "1 2 3\n2 4 x5 6\n")
    msg = _err(load_sequences, p)
    assert f"{p}, line 2, token 3: expected an integer id, found 'x5'" in msg


def test_sequence_user_on_two_lines(tmp_path):
    p = _write(tmp_path / "seq.txt", "1 2 3\n2 4 5\n1 6 7\n")
    assert "seq.txt, line 3: user 1 already has a line (1)" in _err(load_sequences, p)


def test_csv_log_bad_timestamp_and_ragged_line(tmp_path):
    p = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,100\n1,3,101\n2,3,soon\n2,4,103\n")
    msg = _err(load_interaction_log, p)
    assert f"{p}, line 4, column 'timestamp'" in msg and "found 'soon'" in msg
    p = _write(tmp_path / "log2.csv", "user,item,timestamp\n1,2,100\n1,3,101,9\n")
    assert f"{p}, line 3: expected 3 fields separated by ','" in _err(load_interaction_log, p)


def test_csv_log_empty_id(tmp_path):
    p = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,100\n,3,101\n")
    assert "line 3, column 'user': expected an id, found an empty value" in _err(
        load_interaction_log, p
    )


def test_parquet_log_null_id_names_row(tmp_path):
    p = tmp_path / "log.parquet"
    pl.DataFrame({"user": [1, None, 2], "item": [1, 2, 3], "timestamp": [1, 2, 3]}).write_parquet(p)
    assert f"{p}, row 2, column 'user'" in _err(load_interaction_log, p)


def test_genre_flag_not_binary(tmp_path):
    d = _udata(tmp_path, GOOD)
    flags = ["0"] * 19
    flags[3] = "2"
    _write(d / "u.item", "|".join(["10", "A (1990)", "01-Jan-1990", "", "u", *flags]) + "\n")
    assert "u.item, line 1, genre flag 'g3': expected 0 or 1, found 2" in _err(
        load_movielens_100k, d
    )


# --------------------------------------------------------------------------------------------
# missing or misnamed columns


def test_misnamed_header_in_movielens_csv(tmp_path):
    _write(tmp_path / "ratings.csv", "userId,itemId,rating,timestamp\n1,2,3,4\n")
    msg = _err(load_dataset, str(tmp_path))
    assert "ratings.csv, line 1: expected the header 'userId,movieId,rating,timestamp'" in msg
    assert "missing column(s) ['movieId']" in msg


def test_missing_column_in_log(tmp_path):
    p = _write(tmp_path / "log.csv", "user_id,item,timestamp\n1,2,3\n")
    msg = _err(load_interaction_log, p)
    assert f"{p}: missing column(s) ['user']" in msg and "'user_id'" in msg
    # and the option that fixes it works
    p2 = _write(tmp_path / "ok.csv", "user_id,item,timestamp\n1,2,3\n1,3,4\n")
    assert load_dataset(str(p2), user_col="user_id").n_events == 2


def test_feature_table_missing_key_and_duplicate_id(tmp_path):
    log = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n1,3,4\n")
    items = _write(tmp_path / "items.csv", "id,genre\n2,a\n")
    assert f"{items}: missing column(s) ['item']" in _err(
        load_interaction_log, log, item_features=items
    )
    items = _write(tmp_path / "items2.csv", "item,genre\n2,a\n3,b\n2,c\n")
    msg = _err(load_interaction_log, log, item_features=items)
    assert f"{items}, line 4: item id '2' is listed again (first at line 2)" in msg


# --------------------------------------------------------------------------------------------
# empty files, unknown layouts


def test_empty_files(tmp_path):
    d = _udata(tmp_path / "a", "")
    assert "u.data: the file has no data lines" in _err(load_movielens_100k, d)
    d = _udata(tmp_path / "b", "\n\n")
    assert "u.data: the file has no data lines" in _err(load_movielens_100k, d)
    p = _write(tmp_path / "empty.txt", "")
    assert f"{p}: the file is empty" in _err(load_dataset, str(p))
    p = _write(tmp_path / "only_header.csv", "user,item,timestamp\n")
    assert "has a header but no data lines" in _err(load_interaction_log, p)
    p = _write(tmp_path / "nothing.csv", "")
    assert f"{p}: the file is empty" in _err(load_interaction_log, p)


def test_directory_with_no_known_format(tmp_path):
    _write(tmp_path / "README.txt", "hello")
    msg = _err(load_dataset, str(tmp_path))
    assert f"{tmp_path}: no known dataset format" in msg
    assert "u.data" in msg and "ratings.dat" in msg and "ratings.csv" in msg and "README.txt" in msg


def test_unknown_name_or_missing_path():
    msg = _err(load_dataset, "ml-7m")
    assert "'ml-7m' is not a known dataset (ml-100k, ml-1m" in msg and "existing file" in msg


def test_file_of_unknown_layout(tmp_path):
    p = _write(tmp_path / "notes.txt", "hello world\n")
    assert f"{p}, line 1: cannot tell the format" in _err(detect_format, p)


# --------------------------------------------------------------------------------------------
# filtered and reported, or errors with strict=True


def test_short_users_reported_or_strict(tmp_path):
    d = _udata(tmp_path, GOOD + "3\t10\t5\t104\n4\t10\t5\t105\n")
    ds = load_movielens_100k(d)
    assert ds.n_users == 2 and ds.n_events == 4
    assert "removed 2 users with fewer than 2 events (2 events)" in "\n".join(ds.report)
    msg = _err(load_movielens_100k, d, strict=True)
    assert (
        "u.data: user 3 has 1 event(s); expected at least 2 per user (and 1 more such user)" in msg
    )
    ds = load_movielens_100k(d, min_user_events=1)
    assert ds.n_users == 4 and not any("removed" in r for r in ds.report)


def test_duplicate_events_reported_or_strict(tmp_path):
    d = _udata(tmp_path, GOOD + "1\t11\t2\t101\n2\t10\t3\t102\n")
    ds = load_movielens_100k(d)
    assert ds.n_events == 4
    assert any("removed 2 duplicate events (same user, item and timestamp" in r for r in ds.report)
    # the first copy is kept: user 1's item 11 keeps rating 4, not the later 2
    assert ds.events.filter((pl.col("user") == 0) & (pl.col("ts") == 101))["rating"].item() == 4.0
    msg = _err(load_movielens_100k, d, strict=True)
    assert (
        "u.data, line 5: duplicate event (user 1, item 11, timestamp 101) already on line 2" in msg
    )


def test_sequence_line_without_items_is_a_short_user(tmp_path):
    p = _write(tmp_path / "seq.txt", "1 2 3\n2\n3 4 5\n")
    ds = load_sequences(p)
    assert ds.n_users == 2 and any(
        "removed 1 users with fewer than 2 events" in r for r in ds.report
    )
    assert "1 user(s) have no events" in _err(load_sequences, p, strict=True)


def test_nothing_left_after_filtering(tmp_path):
    d = _udata(tmp_path, "1\t10\t5\t100\n2\t10\t5\t100\n")
    assert "no user has at least 2 events; nothing to load" in _err(load_movielens_100k, d)


def test_bad_options(tmp_path):
    p = _write(tmp_path / "seq.txt", "1 2 3\n")
    with pytest.raises(ValueError, match="min_user_events must be >= 1, got 0"):
        load_dataset(str(p), min_user_events=0)
    with pytest.raises(ValueError, match="layout must be 'auto', 'lines' or 'pairs', got 'rows'"):
        load_dataset(str(p), layout="rows")
    with pytest.raises(DataError, match="unknown format 'xml'; the known formats are .*ml-100k"):
        load_dataset(str(p), format="xml")


# --------------------------------------------------------------------------------------------
# the CLI turns all of it into a clean message and exit code 2


@pytest.mark.parametrize(
    "files, expect",
    [
        ({"u.data": "1\t2\n"}, "line 1: expected 4 fields"),
        ({"ratings.csv": "a,b\n1,2\n"}, "line 1: expected the header"),
        ({"notes.md": "x"}, "no known dataset format"),
    ],
)
def test_cli_bad_input_exit_2(tmp_path, files, expect):
    from cascade.cli import app

    for name, text in files.items():
        _write(tmp_path / name, text)
    r = CliRunner().invoke(app, ["data", "describe", "--data", str(tmp_path)])
    assert r.exit_code == 2
    assert r.output.startswith("error: ") and expect in r.output
    assert "Traceback" not in r.output


def test_cli_bad_format_option(tmp_path):
    from cascade.cli import app

    r = CliRunner().invoke(app, ["data", "describe", "--data", str(tmp_path), "--format", "xml"])
    assert r.exit_code == 2 and "--format must be 'table' or 'json', got 'xml'" in r.output


# --------------------------------------------------------------------------------------------
# numbers that parse but are not data: nan, inf, out of range


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e300", "7", "0"])
def test_movielens_ratings_not_finite_or_out_of_range(tmp_path, value):
    d = _udata(tmp_path / "100k", GOOD + f"3\t10\t{value}\t104\n")
    msg = _err(load_movielens_100k, d)
    assert f"{d / 'u.data'}, line 5, field 'rating'" in msg and f"found {value!r}" in msg
    assert "expected a finite number from 0.5 to 5" in msg
    _write(tmp_path / "1m" / "ratings.dat", f"1::10::5::100\n1::11::{value}::101\n")
    msg = _err(load_dataset, str(tmp_path / "1m"))
    assert "ratings.dat, line 2, field 'rating'" in msg and f"found {value!r}" in msg
    _write(tmp_path / "csv" / "ratings.csv", f"userId,movieId,rating,timestamp\n1,2,{value},4\n")
    msg = _err(load_dataset, str(tmp_path / "csv"))
    assert "ratings.csv, line 2, field 'rating'" in msg and f"found {value!r}" in msg


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1e300"])
def test_log_rating_and_label_not_finite(tmp_path, value):
    p = _write(tmp_path / "log.csv", f"user,item,timestamp,r\n1,2,100,4\n1,3,101,{value}\n")
    msg = _err(load_interaction_log, p, rating_col="r")
    assert f"{p}, line 3, column 'r': expected a finite number, found {value!r}" in msg
    if value != "1e300":  # a label only needs a sign: 1e300 is a positive action
        msg = _err(load_interaction_log, p, label_col="r")
        assert f"{p}, line 3, column 'r': expected a finite number" in msg
    q = tmp_path / "log.parquet"
    pl.DataFrame(
        {"user": [1, 1], "item": [2, 3], "timestamp": [1, 2], "r": [4.0, float(value)]}
    ).write_parquet(q)
    assert f"{q}, row 2, column 'r': expected a finite number" in _err(
        load_interaction_log, q, rating_col="r"
    )


# --------------------------------------------------------------------------------------------
# files that are not readable data: no permission, not a regular file, binary, the wrong file


def _deny(monkeypatch, target: Path) -> None:
    """Make `target` unreadable: chmod 000, and as root (who reads anyway) the one place every
    loader opens a file through refuses it the way the kernel would."""
    import builtins
    import errno
    import os

    import cascade.data.formats.text as text

    target.chmod(0)
    if os.geteuid() == 0:

        def fake_open(path, *a, **kw):
            if Path(path) == target:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return builtins.open(path, *a, **kw)

        monkeypatch.setattr(text, "open", fake_open, raising=False)


ML_CSV = "userId,movieId,rating,timestamp\n"


def _unreadable_cases(d: Path) -> list[tuple[str, Path, object]]:
    """(case, file made unreadable, how it is loaded)."""
    log = _write(d / "log" / "log.csv", "user,item,timestamp\n1,2,3\n1,3,4\n")
    pq = d / "pq" / "log.parquet"
    pq.parent.mkdir()
    pl.DataFrame({"user": [1, 1], "item": [2, 3], "timestamp": [1, 2]}).write_parquet(pq)
    feats = _write(d / "log" / "items.csv", "item,genre\n2,a\n")
    _write(d / "ml1m" / "movies.dat", "2::A (1990)::Drama\n")
    _write(d / "mlcsv" / "movies.csv", "movieId,title,genres\n2,A (1990),Drama\n")
    return [
        ("u.data", _write(d / "ml" / "u.data", GOOD), d / "ml"),
        ("u.item", _write(d / "ml" / "u.item", "10|A|01-Jan-1990||u" + "|0" * 19 + "\n"), d / "ml"),
        ("ratings.dat", _write(d / "ml1m" / "ratings.dat", "1::2::5::1\n1::3::4::2\n"), d / "ml1m"),
        ("movies.dat", d / "ml1m" / "movies.dat", d / "ml1m"),
        ("ratings.csv", _write(d / "mlcsv" / "ratings.csv", ML_CSV + "1,2,3,4\n"), d / "mlcsv"),
        ("movies.csv", d / "mlcsv" / "movies.csv", d / "mlcsv"),
        ("sequence", _write(d / "seq" / "seq.txt", "1 2 3\n2 3 4\n"), d / "seq" / "seq.txt"),
        ("log.csv", log, log),
        ("log.parquet", pq, pq),
        ("item features", feats, (log, feats)),
    ]


@pytest.mark.parametrize(
    "case",
    ["u.data", "u.item", "ratings.dat", "movies.dat", "ratings.csv", "movies.csv", "sequence",
     "log.csv", "log.parquet", "item features"],
)  # fmt: skip
def test_unreadable_file_is_named(tmp_path, monkeypatch, case):
    cases = {c: (f, how) for c, f, how in _unreadable_cases(tmp_path)}
    target, how = cases[case]
    _deny(monkeypatch, target)
    try:
        if isinstance(how, tuple):
            msg = _err(load_interaction_log, how[0], item_features=how[1])
        else:
            msg = _err(load_dataset, str(how))
    finally:
        target.chmod(0o644)
    assert msg == f"{target}: cannot read the file: Permission denied"


def _no_hang(fn, *args, **kw):
    """Call fn, failing (not hanging) if it blocks on opening a FIFO."""
    import signal

    def boom(*_):
        raise TimeoutError("blocked: the loader opened a FIFO")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(10)
    try:
        return fn(*args, **kw)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_fifo_socket_and_device_are_refused_without_opening(tmp_path):
    import os
    import socket

    fifo = tmp_path / "ratings.dat"
    os.mkfifo(fifo)
    sock_path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for p in (fifo, sock_path, Path("/dev/null")):
            msg = _no_hang(_err, load_dataset, str(p))
            assert msg == f"{p}: not a regular file or directory; expected a dataset file or folder"
            assert "not a regular file" in _no_hang(_err, detect_format, p)
        # the loaders called directly, and a feature table, refuse it too
        want = f"{fifo}: not a regular file (a FIFO, socket or device); expected a data file"
        assert _no_hang(_err, load_dataset, str(fifo), format="ml-dat") == want
        assert _no_hang(_err, load_dataset, str(fifo), format="sequence") == want
        log = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n1,3,4\n")
        assert _no_hang(_err, load_interaction_log, log, item_features=fifo) == want
        # a folder whose u.data is a FIFO: not a dataset folder of that kind
        os.mkfifo(tmp_path / "u.data")
        assert "no known dataset format" in _no_hang(_err, load_dataset, str(tmp_path))
    finally:
        sock.close()


def test_empty_string_is_not_a_dataset():
    msg = _err(load_dataset, "")
    assert msg.startswith("the empty string is not a dataset: expected a known name")
    assert "'.'" not in msg and "the empty string is not a path" in _err(detect_format, "")


@pytest.mark.parametrize(
    "name, data, where",
    [
        ("u.data", b"1\t10\t5\t100\n1\x1f\t11\t4\t101\n", "u.data, line 2, field 'user'"),
        ("u.data", b"1\t10\t5\t100\n\x00\xff\xfe\x89PNG\t\x07\t\x1a\x00\t\n", "u.data, line 2"),
        ("ratings.dat", b"1::10::5::100\n1::11::4\x1f::101\n", "ratings.dat, line 2, field 'rati"),
        ("ratings.dat", b"1::10::5::100\n\x89PNG\r\n\x1a\n\x00\x00", "ratings.dat, line 2"),
        ("seq.txt", b"1 2 3\n2 4\x1f5 6\n", "seq.txt, line 2, token 2"),
        ("seq.txt", b"1 2 3\n2 \xff\xfe\x00 6\n", "seq.txt, line 2, token 2"),
        ("log.csv", b"user,item,timestamp\n1,2,3\n1,a\x1fb,4\n", "log.csv, line 3, column 'item'"),
        ("log.csv", b"user,item,timestamp\n1,2,3\n1,\xff\xfe,4\n", "log.csv, line 3: expected UTF"),
        ("log.csv", b"user,item,timestamp\n1,2,3\n1,3,\x00\n", "log.csv, line 3, column 'timest"),
    ],
)
def test_control_bytes_and_binary_garbage(tmp_path, name, data, where):
    p = tmp_path / name
    p.write_bytes(data)
    fmt = {"u.data": "ml-100k", "ratings.dat": "ml-dat", "seq.txt": "sequence"}.get(name, "log")
    msg = _err(load_dataset, str(p), format=fmt)
    assert where in msg and str(tmp_path) in msg
    assert len(msg) < 400


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300", "99999999999999999999"])
def test_timestamp_not_finite_or_too_large(tmp_path, value):
    for sep, suffix in ((",", "csv"), ("\t", "tsv")):
        p = _write(tmp_path / f"log.{suffix}", f"user{sep}item{sep}timestamp\n1{sep}2{sep}100\n"
                   f"1{sep}3{sep}{value}\n")  # fmt: skip
        msg = _err(load_interaction_log, p)
        assert f"{p}, line 3, column 'timestamp': expected a finite timestamp below 2^63" in msg
        assert f"found {value!r}" in msg
    q = tmp_path / "log.parquet"
    ts = [100.0, float(value)]
    pl.DataFrame({"user": [1, 1], "item": [2, 3], "timestamp": ts}).write_parquet(q)
    assert f"{q}, row 2, column 'timestamp': expected a finite timestamp" in _err(
        load_interaction_log, q
    )


def test_parquet_uint64_at_or_above_2_63(tmp_path):
    big = 2**63
    for col in ("user", "item", "timestamp"):
        cols = {"user": [1, 1, 2], "item": [2, 3, 2], "timestamp": [1, 2, 3]}
        cols[col] = [5, big + 7, 6]
        p = tmp_path / f"{col}.parquet"
        pl.DataFrame(cols, schema={c: pl.UInt64 for c in cols}).write_parquet(p)
        msg = _err(load_interaction_log, p)
        assert f"{p}, row 2, column {col!r}: expected " in msg
        assert f"below 2^63 (a signed 64-bit integer), found {big + 7}" in msg
    # below 2^63 they load as before
    p = tmp_path / "ok.parquet"
    cols = {"user": [1, 1], "item": [2**63 - 1, 3], "timestamp": [1, 2]}
    pl.DataFrame(cols, schema={c: pl.UInt64 for c in cols}).write_parquet(p)
    assert load_interaction_log(p).raw_item_ids.tolist() == [3, 2**63 - 1]


def test_wrong_file_as_item_features_is_named_not_dumped(tmp_path):
    log = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n1,3,4\n")
    secret = "token=" + "s3cr3t" * 100
    # a config file: one long "header", then ragged lines
    notes = _write(tmp_path / "notes.txt", f"{secret},a,b\nx,y\n{secret}\n")
    msg = _err(load_interaction_log, log, item_features=notes)
    assert str(notes) in msg and "s3cr3t" * 12 not in msg and len(msg) < 400
    notes2 = _write(tmp_path / "notes2.csv", f"item,b\n1,2\n{secret},3,4,5\n")
    msg = _err(load_interaction_log, log, item_features=notes2)
    assert f"{notes2}, line 3: expected 2 fields" in msg
    assert "s3cr3t" * 12 not in msg and "... (612 characters)" in msg


def test_float_timestamp_among_integers_is_floored(tmp_path):
    p = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,978300000\n1,3,978300000.5\n"
               "1,4,978300002\n")  # fmt: skip
    ds = load_interaction_log(p)
    assert ds.events["ts"].to_list() == [978300000, 978300000, 978300002]
    assert any("have fractions: floored" in r for r in ds.report)


def test_old_mac_line_ends_in_a_csv_log(tmp_path):
    p = tmp_path / "log.csv"
    p.write_bytes(b"user,item,timestamp\r1,2,3\r1,3,4\r")
    assert load_interaction_log(p).events["ts"].to_list() == [3, 4]


# --------------------------------------------------------------------------------------------
# found by experiments/fuzz_cli.py


def test_a_csv_line_short_of_the_header_is_named_not_filled_with_nulls(tmp_path):
    movies = "movieId,title,genres\n1,\"A, The (1990)\",Drama\n2,\"B (1991)\"\n"
    _write(tmp_path / "ml" / "ratings.csv", ML_CSV + "1,1,4,1\n1,2,3,2\n")
    _write(tmp_path / "ml" / "movies.csv", movies)
    msg = _err(load_dataset, str(tmp_path / "ml"))
    assert "movies.csv, line 3: expected 3 fields separated by ',' like the header, found 2" in msg
    log = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n1,3\n")
    assert "log.csv, line 3: expected 3 fields" in _err(load_interaction_log, log)


def test_blank_lines_before_a_csv_header_are_skipped_and_counted(tmp_path):
    p = _write(tmp_path / "log.csv", "\n\nuser,item,timestamp\n1,2,3\n1,3,x\n")
    assert "log.csv, line 5, column 'timestamp'" in _err(load_interaction_log, p)
    _write(p, "\n\nuser,item,timestamp\n1,2,3\n1,3,4\n")
    assert load_interaction_log(p).n_events == 2


def test_a_text_timestamp_that_fits_no_format_names_its_line(tmp_path):
    p = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,?\n1,3,4\n")
    assert "log.csv, line 2, column 'timestamp': expected a timestamp" in _err(
        load_interaction_log, p)


@pytest.mark.parametrize("opts, needle", [
    ({"user_col": 1}, "option user_col of the 'log' format must be a string, got 1"),
    ({"time_col": False}, "option time_col of the 'log' format must be a string (or left out)"),
    ({"separator": 5}, "option separator of the 'log' format"),
    ({"item_features": 5}, "option item_features of the 'log' format"),
    ({"strict": "yes"}, "option strict of the 'log' format must be true or false"),
])
def test_loader_options_of_the_wrong_type_are_named(tmp_path, opts, needle):
    p = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n1,3,4\n")
    with pytest.raises(ValueError) as e:
        load_dataset(str(p), **opts)
    assert needle in str(e.value)


def test_an_unknown_synthetic_preset_names_the_spec():
    with pytest.raises(ValueError, match="dataset 'synthetic:nope': unknown synthetic preset"):
        load_dataset("synthetic:nope")


@pytest.mark.parametrize("args, needle", [
    (["explode"], "No such command 'explode'"),
    (["run", "--seed", "abc"], "'--seed'"),
    (["data", "describe"], "--data"),
    (["compare", "x", "--format", "xml"], "'xml'"),
])
def test_usage_errors_exit_2_not_as_an_internal_error(args, needle):
    from cascade.cli import app

    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and needle in r.output and "internal error" not in r.output, r.output
