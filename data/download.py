"""Known MovieLens datasets: where they live in the cache and how to fetch them from GroupLens.

`dataset_dir(name)` returns the unzipped folder of a known dataset, downloading and unpacking
the GroupLens zip when absent. The cache root is `cache_dir`, else `$CASCADE_DATA_DIR`, else
`~/.cache/cascade/datasets`. `$CASCADE_DATA_MIRROR` replaces the GroupLens base URL (a mirror,
or a `file://` folder of zips for machines without network).

Writes are atomic: the zip downloads to a temporary file, unpacks into a temporary folder next
to the target, and only a complete folder is renamed into place, so an interrupted download
never leaves a half dataset that later looks complete. Without network the error names the
URL that failed and where to put the files by hand.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cascade.data.dataset import DataError

BASE_URL = "https://files.grouplens.org/datasets/movielens"


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


def data_home(cache_dir: str | Path | None = None) -> Path:
    """The cache root: `cache_dir`, else $CASCADE_DATA_DIR, else ~/.cache/cascade/datasets."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CASCADE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "cascade" / "datasets"


def dataset_url(name: str) -> str:
    info = _known(name)
    base = os.environ.get("CASCADE_DATA_MIRROR") or BASE_URL
    return f"{base.rstrip('/')}/{info.archive}"


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
    """The unzipped folder of a known dataset, fetched from `url` (default GroupLens) if absent."""
    info = _known(name)
    root = data_home(cache_dir)
    target = root / info.folder
    if (target / info.marker).is_file():
        return target
    url = url or dataset_url(name)
    manual = (
        f"Download {url} yourself and unzip it into {root} so that {target / info.marker} "
        "exists (set CASCADE_DATA_DIR to use another folder), or pass the unzipped folder "
        "as a path (--data PATH)."
    )
    if target.exists():
        raise DataError(f"{target} exists but has no {info.marker}: it is incomplete. {manual}")
    if not download:
        raise DataError(f"{name} is not in the cache ({target / info.marker} is missing). {manual}")
    root.mkdir(parents=True, exist_ok=True)
    tmp_zip = Path(tempfile.mkstemp(dir=root, prefix=f".{info.archive}.", suffix=".part")[1])
    tmp_dir = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.unpack-"))
    try:
        try:
            _fetch(url, tmp_zip, f"{name} ({info.size})", progress)
        except (urllib.error.URLError, OSError, ValueError) as e:
            # HTTPError's str has the status code; URLError's reason has the cause
            reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
            raise DataError(f"could not download {name} from {url}: {reason}. {manual}") from None
        try:
            with zipfile.ZipFile(tmp_zip) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise zipfile.BadZipFile(f"corrupt member {bad}")
                zf.extractall(tmp_dir)
        except zipfile.BadZipFile as e:
            raise DataError(f"{url} is not a valid zip archive ({e}). {manual}") from None
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


def _fetch(url: str, dest: Path, label: str, progress: bool) -> None:
    """Stream `url` into `dest` with a rich progress bar."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    req = urllib.request.Request(url, headers={"User-Agent": "cascade-recsys"})
    with urllib.request.urlopen(req, timeout=60) as resp, open(dest, "wb") as out:
        total = resp.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
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
                out.write(chunk)
                bar.advance(task, len(chunk))
