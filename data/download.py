"""Known MovieLens datasets: where they live in the cache, and how they are fetched from GroupLens
and verified before anything of them is used.

`dataset_dir(name)` returns the unzipped folder of a known dataset, downloading and unpacking
the GroupLens zip when absent. The cache root is `cache_dir`, else `$CASCADE_DATA_DIR`, else
`~/.cache/cascade/datasets`.

Where the zip comes from: `https://files.grouplens.org/datasets/movielens/<archive>`, or the
base that `$CASCADE_DATA_MIRROR` names. The mirror (and an explicit `url=`) must be
  - an `https://` URL,
  - a `file://` URL or a local folder path (a folder of zips, for machines without network), or
  - an `http://` URL whose host is loopback (`localhost`, 127.0.0.0/8, `::1`): a server on this
    machine, which no one on the network can stand in for.
Anything else (plain http to another host, ftp, ...) is refused with a `DataError`, and so is
a redirect to such a URL.

What is accepted:
  - `CHECKSUMS` pins the SHA-256 and size of the GroupLens archives whose digest is published
    for exactly that URL (ml-100k, ml-1m, ml-25m, ml-latest-small). An archive with another
    digest, from GroupLens or any mirror, is refused with a `DataError` naming both digests,
    and deleted; a download past the pinned size is stopped.
  - ml-10m, ml-latest and ml-32m are UNVERIFIED: no SHA-256 of them is pinned, so their archive
    is only held to `UNVERIFIED_MAX_BYTES` (2 GiB) and the zip checks below. ml-latest changes
    whenever GroupLens refreshes it, so it cannot be pinned.
  - Every zip member must stay inside the folder it unpacks to (no absolute path, no `..`) and
    must not be a symbolic link; together they may unpack to at most `MAX_UNPACKED_BYTES`.

Writes are atomic: the zip downloads to a temporary file, unpacks into a temporary folder next
to the target, and only a complete folder is renamed into place, so an interrupted download
never leaves a half dataset that later looks complete. The temporaries are named by
`cascade.util.fsio.temporary_prefix` (`.<name>.<pid>.<random>.tmp`); before each download
those of killed processes are removed. Without network the error names the URL that failed and
where to put the files by hand.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlsplit

from cascade.data.dataset import DataError
from cascade.util.fsio import clean_stale_temporaries, temporary_prefix

BASE_URL = "https://files.grouplens.org/datasets/movielens"
MIRROR_ENV = "CASCADE_DATA_MIRROR"
UNVERIFIED_MAX_BYTES = 2 << 30  # the cap on an archive without a pinned size (ml-latest: ~0.3 GiB)
MAX_UNPACKED_BYTES = 8 << 30  # all members together; the largest, ml-latest, unpacks to ~1.5 GiB


@dataclass(frozen=True)
class KnownDataset:
    name: str
    archive: str  # zip file name under the base URL
    folder: str  # folder the zip unpacks to
    marker: str  # a file that exists when the folder is complete
    size: str  # download size, for the user


KNOWN_DATASETS: dict[str, KnownDataset] = {
    k.name: k
    for k in [
        KnownDataset("ml-100k", "ml-100k.zip", "ml-100k", "u.data", "5 MB"),
        KnownDataset("ml-1m", "ml-1m.zip", "ml-1m", "ratings.dat", "6 MB"),
        KnownDataset("ml-10m", "ml-10m.zip", "ml-10M100K", "ratings.dat", "63 MB"),
        KnownDataset(
            "ml-latest-small", "ml-latest-small.zip", "ml-latest-small", "ratings.csv", "1 MB"
        ),
        KnownDataset("ml-latest", "ml-latest.zip", "ml-latest", "ratings.csv", "335 MB"),
        KnownDataset("ml-25m", "ml-25m.zip", "ml-25m", "ratings.csv", "250 MB"),
        KnownDataset("ml-32m", "ml-32m.zip", "ml-32m", "ratings.csv", "239 MB"),
    ]
}

# name -> (SHA-256, size in bytes) of https://files.grouplens.org/datasets/movielens/<name>.zip.
# All four are the values tensorflow/datasets pins for exactly these URLs, in
# tensorflow_datasets/url_checksums/movielens.txt (commit 1c076ac3c19c8ea83e1d1a75e0623c9a699e0d7c).
# ml-latest-small is the September 2018 release; should GroupLens refresh it, the new archive is
# refused until this pin is updated. No SHA-256 for ml-10m, ml-latest or ml-32m was found
# published for these URLs, so they are unverified (see the module docstring).
CHECKSUMS: dict[str, tuple[str, int]] = {
    "ml-100k": ("50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229", 4924029),
    "ml-1m": ("a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20", 5917549),
    "ml-25m": ("8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa", 261978986),
    "ml-latest-small": (
        "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
        978202,
    ),
}


def data_home(cache_dir: str | Path | None = None) -> Path:
    """The cache root: `cache_dir`, else $CASCADE_DATA_DIR, else ~/.cache/cascade/datasets."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CASCADE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "cascade" / "datasets"


def dataset_url(name: str) -> str:
    """Where the archive of `name` is fetched from: GroupLens, or the $CASCADE_DATA_MIRROR base
    (refused with a DataError unless it is https, file://, a local folder or loopback http)."""
    info = _known(name)
    mirror = os.environ.get(MIRROR_ENV)
    base = checked_source(mirror, f"${MIRROR_ENV}") if mirror else BASE_URL
    return f"{base.rstrip('/')}/{info.archive}"


def checked_source(source: str, origin: str) -> str:
    """`source` as a URL, if it is one cascade fetches from: https, file:// (a local path is
    turned into one), or http to a loopback host. Otherwise a DataError naming `origin`."""
    if "://" not in source:  # a local folder or file path
        return Path(source).expanduser().resolve().as_uri()
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in ("https", "file"):
        return source
    if scheme == "http" and _is_loopback(parts.hostname):
        return source
    raise DataError(
        f"{origin} is {source!r}: cascade downloads over https only. Use an https:// URL, a "
        "file:// URL or local folder of the zips, or http:// to this machine (localhost, "
        "127.0.0.1, ::1)."
    )


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it could resolve anywhere
        return False


def _known(name: str) -> KnownDataset:
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")
    return KNOWN_DATASETS[name]


def dataset_dir(
    name: str,
    cache_dir: str | Path | None = None,
    *,
    download: bool = True,
    url: str | None = None,
    progress: bool = True,
) -> Path:
    """The unzipped folder of a known dataset, fetched from `url` (default GroupLens, or the
    mirror) and verified if absent."""
    info = _known(name)
    root = data_home(cache_dir)
    target = root / info.folder
    if (target / info.marker).is_file():
        return target
    url = checked_source(url, "the download URL") if url else dataset_url(name)
    manual = (
        f"Download {BASE_URL}/{info.archive} yourself and unzip it into {root} so that "
        f"{target / info.marker} exists (set CASCADE_DATA_DIR to use another folder), or pass "
        "the unzipped folder as a path (--data PATH)."
    )
    if target.exists():
        raise DataError(f"{target} exists but has no {info.marker}: it is incomplete. {manual}")
    if not download:
        raise DataError(f"{name} is not in the cache ({target / info.marker} is missing). {manual}")
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(root)
    _clean_old_partials(root)
    expected = CHECKSUMS.get(name)
    limit = expected[1] if expected else UNVERIFIED_MAX_BYTES
    fd, tmp = tempfile.mkstemp(
        dir=root, prefix=temporary_prefix(root / info.archive), suffix=".tmp"
    )
    tmp_zip = Path(tmp)
    tmp_dir = Path(tempfile.mkdtemp(dir=root, prefix=temporary_prefix(target), suffix=".tmp"))
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                digest, n_bytes = fetch(url, out, f"{name} ({info.size})", progress, limit)
        except (urllib.error.URLError, OSError, ValueError) as e:
            if isinstance(e, DataError):
                raise DataError(f"{e} {manual}") from None
            # HTTPError's str has the status code; URLError's reason has the cause
            reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
            raise DataError(f"could not download {name} from {url}: {reason}. {manual}") from None
        if expected is not None and (digest, n_bytes) != expected:
            raise DataError(
                f"{info.archive} from {url} is not the GroupLens archive: its SHA-256 is "
                f"{digest} ({n_bytes} bytes), expected {expected[0]} ({expected[1]} bytes). "
                f"The file was deleted. {manual}"
            )
        _unpack(tmp_zip, tmp_dir, url, manual)
        unpacked = tmp_dir / info.folder
        if not (unpacked / info.marker).is_file():
            raise DataError(f"the archive from {url} has no {info.folder}/{info.marker}. {manual}")
        try:
            os.replace(unpacked, target)
        except OSError:
            if not (target / info.marker).is_file():  # not a concurrent download that won
                raise DataError(
                    f"could not move the unpacked {name} to {target}. {manual}"
                ) from None
    finally:
        tmp_zip.unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


_OLD_PARTIAL = re.compile(r"\..+\.zip\.[^.]+\.part|\..+\.unpack-[^.]+")


def _clean_old_partials(root: Path) -> None:
    """Remove the temporaries that earlier versions of this module named without a pid
    (`.<archive>.*.part`, `.<name>.unpack-*`), once untouched for an hour: a live download
    writes every second, and one that stalls for 60 s fails."""
    cutoff = time.time() - 3600
    for p in root.glob(".*"):
        if not _OLD_PARTIAL.fullmatch(p.name):
            continue
        try:
            if p.lstat().st_mtime > cutoff:
                continue
        except OSError:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


class _CheckedRedirect(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL `checked_source` accepts (no https -> http downgrade)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        checked_source(newurl, f"the redirect from {req.full_url}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, out: BinaryIO, label: str, progress: bool, limit: int) -> tuple[str, int]:
    """Stream `url` into `out` with a rich progress bar; returns the SHA-256 (hex) and the byte
    count. More than `limit` bytes (announced or received) is a DataError."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    too_big = f"{url} is larger than {limit} bytes, the most accepted for it; download stopped."
    opener = urllib.request.build_opener(_CheckedRedirect)
    req = urllib.request.Request(url, headers={"User-Agent": "cascade-recsys"})
    sha = hashlib.sha256()
    n = 0
    with opener.open(req, timeout=60) as resp:
        total = resp.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        if total is not None and total > limit:
            raise DataError(too_big)
        with Progress(
            TextColumn("downloading {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=True,
            disable=not progress,
        ) as bar:
            task = bar.add_task(label, total=total)
            while chunk := resp.read(1 << 20):
                n += len(chunk)
                if n > limit:
                    raise DataError(too_big)
                sha.update(chunk)
                out.write(chunk)
                bar.advance(task, len(chunk))
    return sha.hexdigest(), n


def _unpack(archive: Path, dest: Path, url: str, manual: str) -> None:
    """Unzip `archive` into `dest` after checking every member: inside `dest`, not a symbolic
    link, and at most MAX_UNPACKED_BYTES together."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for m in members:
                path = PurePosixPath(m.filename.replace("\\", "/"))
                drive = bool(path.parts) and ":" in path.parts[0]  # C:... on Windows
                if path.is_absolute() or ".." in path.parts or drive:
                    raise DataError(
                        f"the archive from {url} has a member outside its folder: "
                        f"{m.filename!r}. Refused. {manual}"
                    )
                if stat.S_ISLNK(m.external_attr >> 16):
                    raise DataError(
                        f"the archive from {url} has a symbolic link: {m.filename!r}. "
                        f"Refused. {manual}"
                    )
            unpacked = sum(m.file_size for m in members)
            if unpacked > MAX_UNPACKED_BYTES:
                raise DataError(
                    f"the archive from {url} unpacks to {unpacked} bytes, more than the "
                    f"{MAX_UNPACKED_BYTES} accepted. Refused. {manual}"
                )
            zf.extractall(dest)  # zipfile checks each member's CRC as it writes it
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as e:
        raise DataError(f"{url} is not a valid zip archive ({e}). {manual}") from None
    except OSError as e:
        raise DataError(f"could not unpack {url} into {dest.parent}: {e}. {manual}") from None
