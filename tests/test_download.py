"""Downloads of the known MovieLens archives, without network: crafted zips served from a local
folder, a file:// mirror or a loopback HTTP server. Checksums, size limits, the mirror rule,
unsafe zip members and the temporaries of killed downloads."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from cascade.data import download
from cascade.data.dataset import DataError
from cascade.data.download import (
    CHECKSUMS,
    KNOWN_DATASETS,
    checked_source,
    dataset_dir,
    dataset_url,
)

U_DATA = b"1\t1\t5\t881250949\n2\t1\t3\t881250950\n"


def _zip(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _pin(monkeypatch, name: str, archive: Path) -> str:
    """Pin `name` to the crafted `archive`, as if it were the GroupLens one."""
    data = archive.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(CHECKSUMS, name, (digest, len(data)))
    return digest


def _ml100k(tmp_path: Path) -> Path:
    return _zip(tmp_path / "mirror" / "ml-100k.zip", {"ml-100k/u.data": U_DATA})


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


class _Server:
    """A loopback HTTP server whose GET answers with `handle(handler)`."""

    def __init__(self, handle):
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                handle(self)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------
# the checksum table


def test_checksum_table_shape():
    assert set(CHECKSUMS) <= set(KNOWN_DATASETS)
    for name, (sha, size) in CHECKSUMS.items():
        assert re.fullmatch(r"[0-9a-f]{64}", sha), name
        assert isinstance(size, int) and size > 0, name
    # the unverified ones are named in the module docstring
    unverified = set(KNOWN_DATASETS) - set(CHECKSUMS)
    assert unverified == {"ml-10m", "ml-latest", "ml-32m"}
    assert all(n in download.__doc__ for n in unverified)


# ---------------------------------------------------------------------------------------------
# checksums and sizes


def test_pinned_archive_from_a_local_folder_is_accepted(tmp_path, monkeypatch):
    z = _ml100k(tmp_path)
    _pin(monkeypatch, "ml-100k", z)
    monkeypatch.setenv("CASCADE_DATA_MIRROR", str(z.parent))  # a plain folder path
    cache = tmp_path / "cache"
    d = dataset_dir("ml-100k", cache, progress=False)
    assert d == cache / "ml-100k" and (d / "u.data").read_bytes() == U_DATA
    assert [p.name for p in cache.iterdir()] == ["ml-100k"]  # no temporaries left


def test_wrong_content_is_refused_naming_both_digests(tmp_path, monkeypatch):
    z = _ml100k(tmp_path)  # a crafted ml-100k.zip: a valid zip with the right layout
    actual = hashlib.sha256(z.read_bytes()).hexdigest()
    expected = CHECKSUMS["ml-100k"][0]
    monkeypatch.setenv("CASCADE_DATA_MIRROR", z.parent.as_uri())
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        dataset_dir("ml-100k", cache, progress=False)
    msg = str(e.value)
    assert "ml-100k.zip" in msg and actual in msg and expected in msg
    assert f"({z.stat().st_size} bytes)" in msg and f"({CHECKSUMS['ml-100k'][1]} bytes)" in msg
    assert list(cache.iterdir()) == []  # neither the bad zip nor a half dataset


def test_download_past_the_pinned_size_is_stopped(tmp_path, monkeypatch):
    z = _ml100k(tmp_path)
    monkeypatch.setitem(CHECKSUMS, "ml-100k", ("0" * 64, 100))
    cache = tmp_path / "cache"
    # announced: the file's Content-Length is refused before reading
    with pytest.raises(DataError, match=r"larger than 100 bytes.*download stopped"):
        dataset_dir("ml-100k", cache, url=z.as_uri(), progress=False)
    assert list(cache.iterdir()) == []

    # not announced: a server that streams without Content-Length is cut off at the limit
    sent = []

    def stream(h):
        h.send_response(200)
        h.end_headers()
        try:
            for _ in range(64):
                h.wfile.write(b"x" * 1024)
                sent.append(1024)
        except OSError:  # the client hung up, as it should
            pass

    monkeypatch.setattr(download, "UNVERIFIED_MAX_BYTES", 5000)
    with _Server(stream) as s, pytest.raises(DataError, match=r"larger than 5000 bytes"):
        dataset_dir("ml-32m", cache, url=f"{s.base}/ml-32m.zip", progress=False)
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# unsafe zip members (ml-32m is unverified, so a crafted archive reaches the member checks)


def test_symlink_member_is_refused(tmp_path):
    z = _zip(
        tmp_path / "m" / "ml-32m.zip",
        {"ml-32m/ratings.csv": b"userId,movieId,rating,timestamp\n"},
        links={"ml-32m/movies.csv": "/etc/passwd"},
    )
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"symbolic link: 'ml-32m/movies\.csv'"):
        dataset_dir("ml-32m", cache, url=z.as_uri(), progress=False)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("member", ["../evil.csv", "ml-32m/../../evil.csv", "/tmp/evil.csv"])
def test_member_outside_the_folder_is_refused(tmp_path, member):
    z = _zip(tmp_path / "m" / "ml-32m.zip", {"ml-32m/ratings.csv": b"x\n", member: b"x\n"})
    cache = tmp_path / "a" / "cache"
    with pytest.raises(DataError, match=r"member outside its folder"):
        dataset_dir("ml-32m", cache, url=z.as_uri(), progress=False)
    assert list(cache.iterdir()) == [] and not (tmp_path / "a" / "evil.csv").exists()


def test_unpacked_size_is_capped(tmp_path, monkeypatch):
    z = _zip(tmp_path / "m" / "ml-32m.zip", {"ml-32m/ratings.csv": b"0" * 10_000})
    monkeypatch.setattr(download, "MAX_UNPACKED_BYTES", 9_999)
    with pytest.raises(DataError, match=r"unpacks to 10000 bytes, more than the 9999"):
        dataset_dir("ml-32m", tmp_path / "cache", url=z.as_uri(), progress=False)


# ---------------------------------------------------------------------------------------------
# where archives may come from


@pytest.mark.parametrize(
    "mirror",
    [
        "https://mirror.example.org/movielens",
        "http://127.0.0.1:8080/ml",
        "http://127.5.6.7/ml",
        "http://localhost/ml",
        "http://[::1]:8000/ml",
        "file:///srv/zips",
    ],
)
def test_mirror_accepted(monkeypatch, mirror):
    monkeypatch.setenv("CASCADE_DATA_MIRROR", mirror)
    assert dataset_url("ml-100k") == f"{mirror}/ml-100k.zip"


def test_mirror_folder_path_becomes_a_file_url(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_DATA_MIRROR", str(tmp_path))
    assert dataset_url("ml-1m") == f"{tmp_path.resolve().as_uri()}/ml-1m.zip"


@pytest.mark.parametrize(
    "mirror",
    [
        "http://files.grouplens.org/datasets/movielens",
        "http://10.0.0.5/ml",
        "http://localhost.example.com/ml",
        "ftp://127.0.0.1/ml",
    ],
)
def test_mirror_refused(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("CASCADE_DATA_MIRROR", mirror)
    with pytest.raises(DataError, match=r"\$CASCADE_DATA_MIRROR is .*https only"):
        dataset_url("ml-100k")
    with pytest.raises(DataError, match=r"\$CASCADE_DATA_MIRROR"):
        dataset_dir("ml-100k", tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()  # refused before anything was written
    with pytest.raises(DataError, match=r"the download URL is .*https only"):
        checked_source(f"{mirror}/ml-100k.zip", "the download URL")


def test_redirect_to_plain_http_is_refused(tmp_path):
    def redirect(h):
        h.send_response(302)
        h.send_header("Location", "http://files.grouplens.org/datasets/movielens/ml-1m.zip")
        h.end_headers()

    cache = tmp_path / "cache"
    with _Server(redirect) as s, pytest.raises(DataError, match=r"the redirect from .*https only"):
        dataset_dir("ml-1m", cache, url=f"{s.base}/ml-1m.zip", progress=False)
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# temporaries of killed downloads


def test_temporaries_of_killed_downloads_are_removed(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = _dead_pid()
    stale_zip = cache / f".ml-100k.zip.{dead}.k3x9q.tmp"
    stale_zip.write_bytes(b"half a zip")
    stale_dir = cache / f".ml-100k.{dead}.p0w2e.tmp"
    (stale_dir / "ml-100k").mkdir(parents=True)
    old_part = cache / ".ml-1m.zip.a8f2_x.part"  # named by an earlier version, no pid
    old_part.write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(old_part, (two_hours_ago, two_hours_ago))
    recent_part = cache / ".ml-1m.zip.zz91.part"  # maybe still being written
    recent_part.write_bytes(b"half")
    live = cache / f".ml-1m.zip.{os.getpid()}.abc.tmp"  # this process: alive
    live.write_bytes(b"in progress")

    z = _ml100k(tmp_path)
    _pin(monkeypatch, "ml-100k", z)
    dataset_dir("ml-100k", cache, url=z.as_uri(), progress=False)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        ["ml-100k", recent_part.name, live.name]
    )
