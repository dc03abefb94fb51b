"""The format registry: what it lists, how it sniffs, and adding a format in one file."""

from __future__ import annotations

import ast
from pathlib import Path

import polars as pl
import pytest

import cascade.data.formats as formats
from cascade.data.dataset import Dataset, DataError
from cascade.data.formats import detect_format, get_format, register_format
from cascade.data.formats.assemble import assemble
from cascade.data.loaders import load_dataset

BUILTIN = ["ml-100k", "ml-dat", "ml-csv", "sequence", "log"]
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _samples(d: Path) -> dict[str, list[Path]]:
    """format -> files of that format (each alone in its own folder, so no sibling interferes)."""
    pq = d / "pq" / "log.parquet"
    pq.parent.mkdir(parents=True)
    pl.DataFrame({"user": [1, 1], "item": [2, 3], "timestamp": [1, 2]}).write_parquet(pq)
    return {
        "ml-100k": [
            _write(d / "a" / "u.data", "1\t10\t5\t100\n1\t11\t4\t101\n"),
            _write(d / "b" / "u1.base", "1\t10\t5\t100\n1\t11\t4\t101\n"),
        ],
        "ml-dat": [
            _write(d / "c" / "ratings.dat", "1::10::5::100\n1::11::4::101\n"),
            _write(d / "d" / "subset.txt", "1::10::5::100\n1::11::4::101\n"),
        ],
        "ml-csv": [_write(d / "e" / "few.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n")],
        "sequence": [_write(d / "f" / "Beauty.txt", "1 2 3 4\n2 3 4\n")],
        "log": [_write(d / "g" / "log.tsv", "user\titem\n1\t2\n1\t3\n"), pq],
    }


def test_registry_lists_the_builtin_formats():
    assert sorted(formats.names()) == sorted(BUILTIN)
    assert {f: get_format(f).folder for f in BUILTIN} == {
        "ml-100k": "u.data", "ml-dat": "ratings.dat", "ml-csv": "ratings.csv",
        "sequence": None, "log": None,
    }  # fmt: skip


def test_unknown_format_name_lists_the_known_ones(tmp_path):
    with pytest.raises(DataError) as e:
        get_format("xml")
    assert str(e.value).startswith("unknown format 'xml'; the known formats are ")
    assert all(f in str(e.value) for f in BUILTIN)
    p = _write(tmp_path / "seq.txt", "1 2 3\n")
    with pytest.raises(DataError, match="unknown format 'json'; the known formats are .*sequence"):
        load_dataset(str(p), format="json")


def test_each_sniffer_claims_its_own_samples_and_no_others(tmp_path):
    samples = _samples(tmp_path)
    for fmt in BUILTIN:
        f = get_format(fmt)
        for owner, files in samples.items():
            for p in files:
                claims = f.detect(p)
                if owner == fmt:
                    assert claims, (fmt, p)
                elif not f.fallback:
                    assert not claims, (fmt, p)  # specific formats claim only their own
                assert detect_format(p) == owner  # a fallback yields to a specific claim
    # folders: the marker file decides
    assert detect_format(tmp_path / "a") == "ml-100k" and detect_format(tmp_path / "c") == "ml-dat"
    _write(tmp_path / "h" / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n")
    assert detect_format(tmp_path / "h") == "ml-csv"


def test_folder_with_two_datasets_names_both(tmp_path):
    _write(tmp_path / "u.data", "1\t10\t5\t100\n")
    _write(tmp_path / "ratings.dat", "1::10::5::100\n")
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path))
    msg = str(e.value)
    assert f"{tmp_path}: this directory holds more than one dataset" in msg
    assert "u.data (ml-100k)" in msg and "ratings.dat (ml-dat)" in msg
    assert "no known dataset format" not in msg
    # one level down: two dataset folders are named, not guessed between
    _write(tmp_path / "top" / "ml-100k" / "u.data", "1\t10\t5\t100\n")
    _write(tmp_path / "top" / "ml-1m" / "ratings.dat", "1::10::5::100\n")
    with pytest.raises(DataError, match=r"more than one dataset one folder down: ml-100k/ \(ml-1"):
        detect_format(tmp_path / "top")


def test_a_new_format_is_one_registration(tmp_path, monkeypatch):
    """The worked example: JSON lines with user, item and ts, registered in one place."""
    formats.names()  # the built-ins are in the registry before it is swapped for a copy
    monkeypatch.setattr(formats, "_REGISTRY", dict(formats._REGISTRY))

    @register_format(
        "jsonl", detect=lambda p: p.suffix == ".jsonl", describe="a .jsonl log (user, item, ts)"
    )
    def load_jsonl(path, *, min_user_events: int = 2, name: str | None = None) -> Dataset:
        events = pl.read_ndjson(path).select("user", "item", "ts")
        return assemble(
            name=name or Path(path).stem, source=str(path), file=str(path), events=events,
            min_user_events=min_user_events,
        )  # fmt: skip

    p = _write(tmp_path / "clicks.jsonl", "".join(
        f'{{"user": {u}, "item": {i}, "ts": {t}}}\n'
        for u, i, t in [(7, 1, 30), (7, 2, 10), (8, 1, 5), (8, 3, 6), (9, 3, 1)]
    ))  # fmt: skip
    assert "jsonl" in formats.names() and detect_format(p) == "jsonl"
    ds = load_dataset(str(p))
    assert (ds.n_users, ds.n_items, ds.n_events) == (2, 3, 4)  # user 9 has one event: filtered
    assert ds.events.filter(pl.col("user") == 0)["ts"].to_list() == [10, 30]
    assert ds.category_feature == "pseudo_category"  # load_dataset's shared step still applies
    with pytest.raises(ValueError, match=r"\['layout'\] do not apply to the 'jsonl' format"):
        load_dataset(str(p), layout="lines")
    assert load_dataset(str(p), format="jsonl", min_user_events=1).n_users == 3
    # the error for a file no sniffer claims now offers the new format too
    with pytest.raises(DataError, match=r"cannot tell the format: .*a \.jsonl log"):
        detect_format(_write(tmp_path / "notes.md", "hello\n"))
    # a name is taken once
    with pytest.raises(ValueError, match="format 'log' is already registered by"):
        register_format("log", detect=lambda p: False, describe="x")(load_jsonl)


def test_data_imports_only_cascade_data():
    """data/ sits above only the bottom helpers: it imports nothing of cascade but cascade.data
    and cascade.util."""
    root = Path(__file__).resolve().parents[1] / "data"
    bad = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            mods = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )  # fmt: skip
            bad += [
                f"{f.relative_to(root)}: {m}"
                for m in mods
                if m.split(".")[0] == "cascade"
                and m.split(".")[:2] not in (["cascade", "data"], ["cascade", "util"])
            ]
    assert bad == []
