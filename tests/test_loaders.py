"""Loaders: every format from small fixture files, MovieLens 100k when present, the download
cache (without network: file:// and a local http server), and `cascade data describe`."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from cascade.data.dataset import DataError
from cascade.data.describe import describe
from cascade.data.download import CHECKSUMS, KNOWN_DATASETS, dataset_dir, dataset_url
from cascade.data.formats.movielens import (
    ML100K_GENRES,
    load_movielens_100k,
    load_movielens_csv,
    load_movielens_dat,
)
from cascade.data.formats.sequence import load_sequences
from cascade.data.loaders import detect_format, load_dataset, load_interaction_log


# k-means on a handful of fixture items finds fewer distinct clusters than asked: expected
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def _user_items(ds) -> dict:
    """raw user id -> list of raw item ids in the dataset's time order."""
    users, items = ds.raw_user_ids.tolist(), ds.raw_item_ids.tolist()
    out: dict = {}
    for u, i in zip(ds.events["user"].to_list(), ds.events["item"].to_list()):
        out.setdefault(users[u], []).append(items[i])
    return out


def _item_values(ds, raw_item, feature: str) -> list[str]:
    """The decoded values of one item's feature."""
    idx = int(np.flatnonzero(ds.raw_item_ids == raw_item)[0])
    table = ds.items
    codes = (
        table.multi[feature][idx] if feature in table.multi else [table.categorical[feature][idx]]
    )
    return [table.vocab[feature][c] for c in codes if c > 0]


def _user_value(ds, raw_user, feature: str) -> str:
    idx = int(np.flatnonzero(ds.raw_user_ids == raw_user)[0])
    return ds.users.vocab[feature][ds.users.categorical[feature][idx]]


# ---------------------------------------------------------------------------------------------
# fixture writers


def write_ml100k(d: Path) -> Path:
    # users 7, 3, 9 (unsorted on purpose); user 9 has one rating only -> filtered
    _write(
        d / "u.data",
        "7\t20\t5\t300\n7\t10\t3\t100\n3\t10\t1\t50\n3\t30\t4\t60\n7\t30\t2\t200\n9\t10\t5\t10\n",
    )
    flags = {10: [0, 1, 1] + [0] * 16, 20: [0] * 5 + [1] + [0] * 13, 30: [1] + [0] * 18}
    lines = []
    for i, title, date in [(10, "Café Society (1995)", "01-Jan-1995"), (20, "B (1977)", "01-Jan-1977"),
                           (30, "unknown", ""), (40, "Never rated (1990)", "01-Jan-1990")]:  # fmt: skip
        f = flags.get(i, [0] * 19)
        lines.append("|".join([str(i), title, date, "", "http://x", *map(str, f)]))
    _write(d / "u.item", "\n".join(lines) + "\n", encoding="latin-1")
    _write(d / "u.user", "3|24|M|technician|85711\n7|61|F|writer|94043\n9|17|M|student|1\n")
    _write(d / "u.genre", "".join(f"{g}|{j}\n" for j, g in enumerate(ML100K_GENRES)) + "\n")
    return d


def write_ml1m(d: Path, *, users: bool = True, sep_rating: str = "5") -> Path:
    _write(
        d / "ratings.dat",
        f"1::1193::{sep_rating}::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
        "2::3408::1::978299000\n2::661::2::978299100\n",
    )
    _write(
        d / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "3408::Erin Brockovich (2000)::Drama\n"
        "99::Les Misérables (1995)::Drama|Musical\n",
        encoding="latin-1",
    )
    if users:
        _write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    return d


def write_ml_csv(d: Path) -> Path:
    _write(
        d / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n"
        "5,1,0.5,847434962\n5,2,3.0,847435000\n5,3,5.0,847435100\n",
    )
    _write(
        d / "movies.csv",
        "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation|Children\n"
        '2,"American President, The (1995)",(no genres listed)\n'
        "3,Dekalog (1989-1990),Drama\n",
    )
    return d


# ---------------------------------------------------------------------------------------------
# MovieLens


def test_ml100k_fixture(tmp_path):
    ds = load_movielens_100k(write_ml100k(tmp_path / "ml"))
    assert (ds.n_users, ds.n_items, ds.n_events) == (2, 3, 5)
    assert ds.raw_user_ids.tolist() == [3, 7]  # sorted raw ids -> 0, 1
    assert ds.raw_item_ids.tolist() == [10, 20, 30]
    assert _user_items(ds) == {3: [10, 30], 7: [10, 30, 20]}  # time order, not file order
    ev = ds.events.filter(pl.col("user") == 1)
    assert ev["ts"].to_list() == [100, 200, 300] and ev["pos"].to_list() == [0, 1, 2]
    assert ev["rating"].to_list() == [3.0, 2.0, 5.0] and ev["action"].to_list() == [0, -1, 1]
    assert ds.category_feature == "genre"
    assert ds.items.cardinality["genre"] == 20 and ds.items.vocab["genre"][1:] == ML100K_GENRES
    assert _item_values(ds, 10, "genre") == ["Action", "Adventure"]
    assert _item_values(ds, 30, "genre") == ["unknown"]
    assert _item_values(ds, 10, "year") == ["1995"] and _item_values(ds, 30, "year") == []
    assert _user_value(ds, 3, "age") == "18-24" and _user_value(ds, 7, "age") == "56+"
    assert _user_value(ds, 7, "occupation") == "writer" and _user_value(ds, 3, "gender") == "M"
    rep = "\n".join(ds.report)
    assert "removed 1 users with fewer than 2 events (1 events)" in rep
    assert "1 items listed in" in rep and "u.item have no events" in rep  # item 40


def test_ml100k_real(ml100k_path):
    ds = load_dataset(str(ml100k_path))
    assert (ds.n_users, ds.n_items, ds.n_events) == (943, 1682, 100_000)
    assert ds.name == "ml-100k" and ds.category_feature == "genre"
    assert ds.items.cardinality["genre"] == 20  # 19 genres (one named "unknown") + padding
    assert ds.items.vocab["genre"][1:] == ML100K_GENRES
    assert _item_values(ds, 1, "genre") == ["Animation", "Children's", "Comedy"]  # Toy Story
    assert _item_values(ds, 1, "year") == ["1995"]
    assert _user_value(ds, 1, "age") == "18-24" and _user_value(ds, 1, "occupation") == "technician"
    assert ds.raw_user_ids[0] == 1 and ds.raw_item_ids[-1] == 1682
    # every user's events ascend in time and `pos` counts them
    ev = ds.events
    assert ev.select((pl.col("ts").diff().over("user").fill_null(0) >= 0).all()).item()
    assert (
        ev.group_by("user")
        .agg(pl.col("pos").max() + 1 == pl.len())
        .select(pl.all().exclude("user"))
        .to_series()
        .all()
    )
    assert np.bincount(ev["user"].to_numpy()).min() >= 20
    assert ev["rating"].sum() == pytest.approx(352_986.0)  # the sum of u.data's ratings


def test_ml1m_dat(tmp_path):
    ds = load_movielens_dat(write_ml1m(tmp_path / "ml-1m"))
    assert (ds.n_users, ds.n_items, ds.n_events) == (2, 3, 5)
    assert _user_items(ds) == {1: [1193, 661], 2: [1193, 3408, 661]}
    assert _item_values(ds, 661, "genre") == ["Animation", "Children's", "Musical"]
    assert _item_values(ds, 3408, "year") == ["2000"]
    assert _user_value(ds, 1, "age") == "Under 18" and _user_value(ds, 2, "age") == "56+"
    assert _user_value(ds, 1, "occupation") == "K-12 student"
    assert _user_value(ds, 2, "occupation") == "self-employed"
    assert "Musical" in ds.items.vocab["genre"]
    assert detect_format(tmp_path / "ml-1m") == "ml-dat"


def test_ml10m_dat_without_users_half_star_ratings(tmp_path):
    d = write_ml1m(tmp_path / "ml-10M100K", users=False, sep_rating="4.5")
    ds = load_dataset(str(tmp_path))  # the unzipped archive folder: data one level down
    assert ds.n_events == 5 and ds.users.names == []
    assert ds.events.filter(pl.col("ts") == 978300760)["rating"].item() == 4.5
    assert any("no users.dat" in r for r in ds.report)
    assert ds.source == str(d)


def test_ml_latest_csv(tmp_path):
    ds = load_movielens_csv(write_ml_csv(tmp_path / "ml-latest-small"))
    assert (ds.n_users, ds.n_items, ds.n_events) == (2, 3, 5)
    assert _user_items(ds) == {1: [3, 1], 5: [1, 2, 3]}
    assert _item_values(ds, 1, "genre") == ["Adventure", "Animation", "Children"]
    assert _item_values(ds, 2, "genre") == []  # "(no genres listed)"
    assert _item_values(ds, 2, "year") == ["1995"] and _item_values(ds, 3, "year") == ["1989"]
    assert "(no genres listed)" not in ds.items.vocab["genre"]
    assert ds.events.filter(pl.col("ts") == 847434962)["action"].item() == -1  # 0.5 stars
    assert detect_format(tmp_path / "ml-latest-small" / "ratings.csv") == "ml-csv"


# ---------------------------------------------------------------------------------------------
# sequences and generic logs


def test_sequences_per_user_lines(tmp_path):
    p = _write(tmp_path / "beauty.txt", "2 5 6 5\n\n1 7 8\n3\t9  10 11\n4 12\n")
    assert detect_format(p) == "sequence"
    ds = load_dataset(str(p))
    assert ds.name == "beauty" and (ds.n_users, ds.n_events) == (3, 8)
    assert _user_items(ds) == {1: [7, 8], 2: [5, 6, 5], 3: [9, 10, 11]}  # repeats are kept
    assert ds.events.filter(pl.col("user") == 1)["ts"].to_list() == [0, 1, 2]
    assert any("removed 1 users with fewer than 2 events (1 events)" in r for r in ds.report)
    assert ds.category_feature == "pseudo_category"  # no genres: derived
    assert ds.items.multi["pseudo_category"].shape == (ds.n_items, 1)
    assert (ds.events["action"] == 1).all()


def test_sequences_pairs(tmp_path):
    p = _write(tmp_path / "pairs.txt", "1 10\n2 10\n1 11\n2 12\n1 10\n")
    ds = load_sequences(p)
    assert _user_items(ds) == {1: [10, 11, 10], 2: [10, 12]}
    assert ds.events.filter(pl.col("user") == 0)["ts"].to_list() == [1, 3, 5]  # line numbers
    # forced per-user layout reads the same file as one line per user -> user repeats -> error
    with pytest.raises(DataError, match=r"pairs\.txt, line 3: user 1 already has a line \(1\)"):
        load_sequences(p, layout="lines")


def test_generic_csv_log_with_features(tmp_path):
    log = _write(
        tmp_path / "clicks.csv",
        "uid,iid,when,stars\nu2,a,2024-01-02 10:00:00,5\nu1,b,2024-01-01,1\nu2,b,2024-01-01,3\n"
        "u1,a,2024-01-03T08:00:00,4\nu1,c,2024-01-02,2\n",
    )
    items = _write(
        tmp_path / "items.csv",
        "iid,tags,brand,price\na,x|y,7,1.5\nb,y,12,2.0\nc,,7,3.0\nz,q,1,0.1\n",
    )
    users = _write(tmp_path / "users.csv", "uid,country\nu1,fr\nu2,de\n")
    ds = load_interaction_log(
        log, user_col="uid", item_col="iid", time_col="when", rating_col="stars",
        item_features=items, user_features=users,
    )  # fmt: skip
    assert ds.raw_user_ids.tolist() == ["u1", "u2"] and ds.raw_item_ids.tolist() == ["a", "b", "c"]
    assert _user_items(ds) == {"u1": ["b", "c", "a"], "u2": ["b", "a"]}
    first = ds.events.filter(pl.col("user") == 0)["ts"][0]
    assert first == 1704067200  # 2024-01-01 as epoch seconds
    assert ds.category_feature == "tags"
    assert _item_values(ds, "a", "tags") == ["x", "y"] and _item_values(ds, "c", "tags") == []
    assert ds.items.vocab["brand"] == ["<unknown>", "7", "12"]  # integer codes sort as numbers
    assert _user_value(ds, "u2", "country") == "de"
    assert "price" not in ds.items.names
    rep = "\n".join(ds.report)
    assert "left out the numeric column 'price'" in rep and "1 items listed in" in rep
    assert detect_format(log) == "log"


def test_generic_parquet_log_label_and_list_features(tmp_path):
    import datetime as dt

    p = tmp_path / "log.parquet"
    pl.DataFrame(
        {
            "user": [5, 5, 6, 6, 6],
            "item": [100, 200, 100, 300, 200],
            "timestamp": [dt.datetime(2024, 1, d) for d in (2, 1, 1, 2, 3)],
            "click": [1, 0, 1, 1, 0],
        }
    ).write_parquet(p)
    feats = pl.DataFrame(
        {"item": [100, 200, 300], "cats": [["a"], ["b", "a"], []], "shop": ["s", "t", "s"]}
    )
    ds = load_dataset(str(p), label_col="click", item_features=feats)
    assert _user_items(ds) == {5: [200, 100], 6: [100, 300, 200]}
    assert ds.events.filter(pl.col("user") == 0)["action"].to_list() == [-1, 1]
    assert ds.events["rating"].null_count() == 5
    assert ds.category_feature == "cats" and _item_values(ds, 200, "cats") == ["b", "a"]
    assert ds.items.multi["cats"].shape == (3, 2)
    # a single-valued column can be the category too: it becomes a width-1 multi-valued feature
    ds = load_dataset(str(p), label_col="click", item_features=feats, category_feature="shop")
    assert ds.category_feature == "shop" and "shop" not in ds.items.categorical
    assert ds.items.multi["shop"][:, 0].tolist() == [1, 2, 1]  # items 100, 200, 300: s, t, s
    with pytest.raises(DataError, match=r"category_feature 'brand' is not an item feature"):
        load_dataset(str(p), item_features=feats, category_feature="brand")


def test_log_without_time_column_uses_row_order(tmp_path):
    p = _write(tmp_path / "log.tsv", "user\titem\n1\t3\n1\t2\n2\t3\n2\t1\n")
    ds = load_dataset(str(p), time_col=None)
    assert _user_items(ds) == {1: [3, 2], 2: [3, 1]}
    assert ds.category_feature == "pseudo_category"


def test_load_dataset_rejects_options_of_other_formats(tmp_path):
    d = write_ml100k(tmp_path / "ml")
    with pytest.raises(ValueError, match=r"\['user_col'\] do not apply to the 'ml-100k' format"):
        load_dataset(str(d), user_col="x")


def test_synthetic_spec_delegates():
    pytest.importorskip("cascade.data.synthetic")
    ds = load_dataset("synthetic:tiny", n_users=50, n_items=80, n_events=1500)
    assert ds.n_users <= 50 and ds.n_items <= 80 and ds.category_feature is not None


# ---------------------------------------------------------------------------------------------
# known names: the cache and the download (no network: file:// and 127.0.0.1)


def _ml_zip(tmp_path: Path, monkeypatch, name: str = "ml-latest-small") -> Path:
    """A crafted archive, pinned in place of the GroupLens one (tests/test_download.py checks
    that an unpinned one is refused)."""
    src = write_ml_csv(tmp_path / "src" / name)
    z = tmp_path / "mirror" / f"{name}.zip"
    z.parent.mkdir(parents=True)
    with zipfile.ZipFile(z, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f"{name}/{f.name}")
    data = z.read_bytes()
    monkeypatch.setitem(CHECKSUMS, name, (hashlib.sha256(data).hexdigest(), len(data)))
    return z


def test_known_names_urls():
    assert dataset_url("ml-100k") == "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
    assert (
        dataset_url("ml-10m").endswith("/ml-10m.zip")
        and KNOWN_DATASETS["ml-10m"].folder == "ml-10M100K"
    )
    assert set(KNOWN_DATASETS) == {
        "ml-100k",
        "ml-1m",
        "ml-10m",
        "ml-latest-small",
        "ml-latest",
        "ml-25m",
        "ml-32m",
    }


def test_download_from_file_url_then_cache(tmp_path, monkeypatch):
    z = _ml_zip(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CASCADE_DATA_MIRROR", z.parent.as_uri())
    monkeypatch.setenv("CASCADE_DATA_DIR", str(cache))
    ds = load_dataset("ml-latest-small")
    assert ds.name == "ml-latest-small" and ds.n_events == 5
    assert (cache / "ml-latest-small" / "ratings.csv").is_file()
    assert [p.name for p in cache.iterdir()] == ["ml-latest-small"]  # no temp files left
    z.unlink()  # the second load reads the cache, not the mirror
    assert load_dataset("ml-latest-small").n_events == 5


def test_download_from_local_http_server(tmp_path, monkeypatch):
    z = _ml_zip(tmp_path, monkeypatch)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(z.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(
            DataError, match=r"could not download ml-latest-small from .*/nope\.zip: .*404"
        ):
            dataset_dir("ml-latest-small", tmp_path / "c", url=f"{base}/nope.zip", progress=False)
        d = dataset_dir("ml-latest-small", tmp_path / "c", url=f"{base}/{z.name}")
    finally:
        server.shutdown()
    assert d == tmp_path / "c" / "ml-latest-small" and (d / "movies.csv").is_file()
    assert load_movielens_csv(d).n_events == 5


def test_download_failure_names_url_and_manual_path(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/ml-100k.zip"
    with pytest.raises(DataError) as e:
        dataset_dir("ml-100k", tmp_path / "c", url=url, progress=False)
    msg = str(e.value)
    assert f"could not download ml-100k from {url}" in msg
    assert str(tmp_path / "c" / "ml-100k" / "u.data") in msg and "--data PATH" in msg
    assert list((tmp_path / "c").iterdir()) == []  # no half dataset, no temp files


def test_download_bad_zip_and_no_download(tmp_path, monkeypatch):
    bad = _write(tmp_path / "m" / "ml-10m.zip", "not a zip")  # ml-10m: no pinned checksum
    monkeypatch.setenv("CASCADE_DATA_MIRROR", bad.parent.as_uri())
    with pytest.raises(DataError, match=r"ml-10m\.zip is not a valid zip archive"):
        dataset_dir("ml-10m", tmp_path / "c", progress=False)
    with pytest.raises(DataError, match=r"ml-1m is not in the cache .*ratings\.dat is missing"):
        load_dataset("ml-1m", cache_dir=tmp_path / "c", download=False)


# ---------------------------------------------------------------------------------------------
# describe and the CLI


def test_describe_numbers(tmp_path):
    ds = load_dataset(str(write_ml1m(tmp_path / "ml-1m")))
    d = describe(ds)
    assert (d["users"], d["items"], d["events"]) == (2, 3, 5)
    assert d["density"] == pytest.approx(5 / 6)
    assert d["history_length"]["min"] == 2 and d["history_length"]["max"] == 3
    assert d["item_popularity"]["max"] == 2 and d["item_popularity"]["mean"] == pytest.approx(
        5 / 3, abs=1e-3
    )
    assert d["actions"] == {"positive": 2, "neutral": 1, "negative": 2}
    genre = next(f for f in d["features"]["items"] if f["name"] == "genre")
    assert genre["values"] == 4 and genre["kind"].startswith("multi-valued")  # not 99's genres
    assert d["report"] == list(ds.report)


def _cli():
    from cascade.cli import app

    return app


def test_cli_describe_fixture_table_and_json(tmp_path):
    d = write_ml100k(tmp_path / "ml")
    r = CliRunner().invoke(_cli(), ["data", "describe", "--data", str(d)])
    assert r.exit_code == 0, r.output
    assert "events per user" in r.output and "removed 1 users" in r.output
    r = CliRunner().invoke(_cli(), ["data", "describe", "--data", str(d), "--format", "json"])
    assert r.exit_code == 0
    got = json.loads(r.stdout)
    assert (got["users"], got["items"], got["events"]) == (2, 3, 5)


def test_cli_describe_ml100k(ml100k_path):
    r = CliRunner().invoke(_cli(), ["data", "describe", "--data", str(ml100k_path)])
    assert r.exit_code == 0, r.output
    for number in ("943", "1,682", "100,000", "genre"):
        assert number in r.output


def test_cli_describe_bad_directory(tmp_path):
    _write(tmp_path / "notes.md", "hello")
    r = CliRunner().invoke(_cli(), ["data", "describe", "--data", str(tmp_path)])
    assert r.exit_code == 2
    assert "error:" in r.output and "no known dataset format" in r.output
    assert (
        "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    )


def test_windows_line_ends_and_header_bom(tmp_path):
    d = tmp_path / "ml-latest-small"
    _write(d / "ratings.csv", "\ufeffuserId,movieId,rating,timestamp\r\n1,1,4.0,5\r\n1,2,2.0,6\r\n")
    _write(d / "movies.csv", "movieId,title,genres\r\n1,A (1990),Drama\r\n2,B (1991),Drama|War\r\n")
    ds = load_dataset(str(d))
    assert ds.events["ts"].to_list() == [5, 6] and _item_values(ds, 2, "genre") == ["Drama", "War"]
    p = _write(tmp_path / "seq.txt", "1 5 6\r\n2 7 8\r\n")
    assert _user_items(load_dataset(str(p))) == {1: [5, 6], 2: [7, 8]}


def test_old_mac_line_ends(tmp_path):
    # a lone CR ends a line (it used to make the whole file one line, i.e. one user)
    p = _write(tmp_path / "seq.txt", "1 5 6\r2 7 8\r3 9 5 6\r")
    ds = load_dataset(str(p))
    assert _user_items(ds) == {1: [5, 6], 2: [7, 8], 3: [9, 5, 6]}
    d = write_ml1m(tmp_path / "ml-1m")
    (d / "ratings.dat").write_bytes((d / "ratings.dat").read_bytes().replace(b"\n", b"\r"))
    assert load_dataset(str(d)).n_events == 5


# ---------------------------------------------------------------------------------------------
# a named file is read, never its sibling


def test_named_dat_subset_is_read_not_its_sibling_ratings_dat(tmp_path):
    d = write_ml1m(tmp_path / "ml-1m")
    sub = _write(d / "my_subset.txt", "2::1193::4::978298413\n2::3408::1::978299000\n")
    assert detect_format(sub) == "ml-dat"
    ds = load_dataset(str(sub))
    assert (ds.n_users, ds.n_events) == (1, 2) and _user_items(ds) == {2: [1193, 3408]}
    assert ds.name == "my_subset" and ds.source == str(sub)
    # a file under another name is not the dataset's own: movies.dat beside it is not its metadata
    assert ds.category_feature == "pseudo_category" and "genre" not in ds.items.names
    assert any("my_subset.txt is not named ratings.dat" in r for r in ds.report)
    # the dataset's own ratings.dat, named as a file, keeps its metadata
    ds = load_dataset(str(d / "ratings.dat"))
    assert ds.n_events == 5 and ds.category_feature == "genre" and ds.source == str(d)


def test_named_u_data_and_ratings_csv_subsets(tmp_path):
    d = write_ml100k(tmp_path / "ml")
    sub = _write(d / "part.tsv", "3\t10\t1\t50\n3\t30\t4\t60\n")
    ds = load_dataset(str(sub), format="ml-100k")
    assert _user_items(ds) == {3: [10, 30]} and "genre" not in ds.items.names
    d = write_ml_csv(tmp_path / "mlcsv")
    sub = _write(d / "few.csv", "userId,movieId,rating,timestamp\n1,1,4.0,1\n1,3,4.5,2\n")
    assert detect_format(sub) == "ml-csv"
    ds = load_dataset(str(sub))
    assert _user_items(ds) == {1: [1, 3]} and "genre" not in ds.items.names
