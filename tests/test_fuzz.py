"""Property-based fuzzing of the CLI (issue 15): malformed files of every format, wrong-typed
configs, misbehaving plugins and damaged run folders never reach the user as a traceback or an
internal error; a refusal exits with status 2 and names the offending file, line or key.

The commands run in-process (typer's CliRunner). The "ci" hypothesis profile is loaded here: a
fixed, small number of examples, derandomized (the same examples on every run), no example
database. `experiments/fuzz_cli.py` runs a much larger fixed corpus through the console script.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from typer.testing import CliRunner

from cascade.cli import app
from cascade.util.serialize import dumps_toml

set_hypothesis_home_dir(tempfile.mkdtemp(prefix="hypothesis-"))  # nothing written into the repo
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("ci")

runner = CliRunner()
_counter = itertools.count()


@contextmanager
def case_dir():
    """A fresh folder per example (tmp_path is shared by every example of a test)."""
    d = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def cli(*args: str, cwd: Path | None = None):
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(app, list(args))
    finally:
        os.chdir(old)


def assert_clean(res, *needles: str, accept: bool = False) -> None:
    """No traceback, no internal error; exit 2 naming every needle (or 0 when `accept`)."""
    out = res.output
    assert "Traceback" not in out, out
    assert "internal error" not in out, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    if accept and res.exit_code == 0:
        return
    assert res.exit_code == 2, out
    assert any(x.startswith("error:") for x in out.splitlines()) or "Error" in out, out
    for n in needles:
        assert n in out, (n, out)


# ---- data: malformed files of every format ------------------------------------------------------

def _events(n_users: int = 12, per_user: int = 5) -> list[tuple[int, int, int, int]]:
    rng = random.Random(0)
    return [(u, rng.randrange(1, 40), rng.randrange(1, 6), 880_000_000 + 100 * u + j)
            for u in range(1, n_users + 1) for j in range(per_user)]


EVENTS = _events()
# (file name, separator, header line or None): the MovieLens ratings files
ML_FORMATS = {
    "u.data": ("\t", None),
    "ratings.dat": ("::", None),
    "ratings.csv": (",", "userId,movieId,rating,timestamp"),
}
FIELDS = ("user", "item", "rating", "ts")
# tokens that are never a number: a letter or symbol first, no separator or space inside
BAD_TOKEN = st.from_regex(r"[A-Za-z_#@!?%&][A-Za-z0-9_.#@!?%&+-]{0,6}", fullmatch=True)


ITEM_IDS = sorted({e[1] for e in EVENTS})
# each format's item metadata, so that items have genres and no pseudo-categories are computed
ML_META = {
    "u.data": ("u.item", "".join(f"{i}|M{i} (1995)|01-Jan-1995||u|" + "|".join(
        "1" if g == i % 19 else "0" for g in range(19)) + "\n" for i in ITEM_IDS)),
    "ratings.dat": ("movies.dat", "".join(f"{i}::M{i} (1995)::Drama|G{i % 3}\n" for i in ITEM_IDS)),
    "ratings.csv": ("movies.csv", "movieId,title,genres\n" + "".join(
        f"{i},M{i} (1995),Drama|G{i % 3}\n" for i in ITEM_IDS)),
}


def write_ml(d: Path, fmt: str, data: str | bytes) -> None:
    (d / fmt).write_bytes(data.encode() if isinstance(data, str) else data)
    meta, text = ML_META[fmt]
    (d / meta).write_text(text)


def ml_lines(fmt: str) -> list[str]:
    sep, header = ML_FORMATS[fmt]
    body = [sep.join(map(str, e)) for e in EVENTS]
    return ([header] if header else []) + body


@given(fmt=st.sampled_from(sorted(ML_FORMATS)), row=st.integers(0, len(EVENTS) - 1),
       field=st.integers(0, 3), token=BAD_TOKEN)
def test_a_bad_field_names_the_file_line_and_field(fmt, row, field, token):
    sep, header = ML_FORMATS[fmt]
    lines = ml_lines(fmt)
    i = row + (1 if header else 0)
    parts = lines[i].split(sep)
    parts[field] = token
    lines[i] = sep.join(parts)
    with case_dir() as d:
        write_ml(d, fmt, "\n".join(lines) + "\n")
        res = cli("data", "describe", "--data", str(d))
        assert_clean(res, fmt, f"line {i + 1}", f"'{FIELDS[field]}'")


@given(fmt=st.sampled_from(sorted(ML_FORMATS)), row=st.integers(0, len(EVENTS) - 1),
       change=st.sampled_from(["drop-field", "extra-field", "no-separator"]))
def test_a_line_with_the_wrong_field_count_is_named(fmt, row, change):
    sep, header = ML_FORMATS[fmt]
    lines = ml_lines(fmt)
    i = row + (1 if header else 0)
    parts = lines[i].split(sep)
    lines[i] = {"drop-field": sep.join(parts[:-1]), "extra-field": lines[i] + sep + "7",
                "no-separator": "".join(parts)}[change]
    with case_dir() as d:
        write_ml(d, fmt, "\n".join(lines) + "\n")
        assert_clean(cli("data", "describe", "--data", str(d)), fmt, f"line {i + 1}")


@given(fmt=st.sampled_from(sorted(ML_FORMATS) + ["seq.txt", "log.csv"]),
       cut=st.floats(0.0, 1.0), junk=st.binary(min_size=1, max_size=64),
       mode=st.sampled_from(["insert", "truncate", "replace-all"]))
def test_damaged_bytes_never_crash(fmt, cut, junk, mode):
    """Garbage anywhere in any format: accepted when what is left still parses, else a clean
    refusal naming the file; never a traceback."""
    if fmt == "seq.txt":
        good = "\n".join(f"{u} " + " ".join(str(e[1]) for e in EVENTS if e[0] == u)
                         for u in range(1, 13)) + "\n"
    elif fmt == "log.csv":
        good = "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, _, t in EVENTS)
    else:
        good = "\n".join(ml_lines(fmt)) + "\n"
    raw = good.encode()
    at = int(cut * len(raw))
    data = {"insert": raw[:at] + junk + raw[at:], "truncate": raw[:at],
            "replace-all": junk}[mode]
    with case_dir() as d:
        target = d / fmt
        if fmt in ML_FORMATS:
            write_ml(d, fmt, data)
        else:
            target.write_bytes(data)
        res = cli("data", "describe", "--data", str(d if fmt in ML_FORMATS else target))
        assert_clean(res, fmt, accept=True)


@given(row=st.integers(0, 11), pos=st.integers(0, 5), token=BAD_TOKEN)
def test_a_bad_sequence_token_names_the_line(row, pos, token):
    lines = [f"{u} " + " ".join(str(e[1]) for e in EVENTS if e[0] == u) for u in range(1, 13)]
    parts = lines[row].split(" ")
    parts[min(pos, len(parts) - 1)] = token
    lines[row] = " ".join(parts)
    with case_dir() as d:
        p = d / "seq.txt"
        p.write_text("\n".join(lines) + "\n")
        res = cli("data", "describe", "--data", str(p))
        # a bad first line keeps the file from being recognised: that message names line 1
        assert_clean(res, "seq.txt", f"line {row + 1}", "token" if row else "")


TS_BAD = st.one_of(BAD_TOKEN, st.sampled_from(["nan", "inf", "-inf", "1e400",
                                                "99999999999999999999", ""]))


@given(row=st.integers(0, len(EVENTS) - 1), token=TS_BAD, sep=st.sampled_from([",", "\t"]),
       crlf=st.booleans(), bom=st.booleans())
def test_a_bad_log_timestamp_names_line_and_column(row, token, sep, crlf, bom):
    lines = [sep.join(("user", "item", "timestamp"))] + [
        sep.join((str(u), str(i), str(t))) for u, i, _, t in EVENTS]
    parts = lines[row + 1].split(sep)
    parts[2] = token
    lines[row + 1] = sep.join(parts)
    end = "\r\n" if crlf else "\n"
    with case_dir() as d:
        p = d / ("log.csv" if sep == "," else "log.tsv")
        p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + (end.join(lines) + end).encode())
        res = cli("data", "describe", "--data", str(p))
        assert_clean(res, p.name, f"line {row + 2}", "'timestamp'")


@given(drop=st.sampled_from(["user", "item", "timestamp"]),
       order=st.permutations(["user", "item", "timestamp", "rating"]))
def test_a_missing_log_column_is_named(drop, order):
    cols = [c for c in order if c != drop]
    rows = [dict(zip(("user", "item", "rating", "timestamp"), e)) for e in EVENTS]
    with case_dir() as d:
        p = d / "log.csv"
        p.write_text(",".join(cols) + "\n" + "".join(
            ",".join(str(r[c]) for c in cols) + "\n" for r in rows))
        assert_clean(cli("data", "describe", "--data", str(p)), "log.csv", drop)


PARQUET_COLUMNS = {
    # (values, valid): dtypes a log column may have, and some it may not
    "int": (lambda col: pl.Series(col), True),
    "string": (lambda col: pl.Series([f"x{v}" for v in col]), True),
    "float": (lambda col: pl.Series([float(v) for v in col]), None),  # ids no; timestamps yes
    "bool": (lambda col: pl.Series([v % 2 == 0 for v in col]), False),
    "list": (lambda col: pl.Series([[v] for v in col]), False),
    "null": (lambda col: pl.Series([None] * len(col), dtype=pl.Int64), False),
    "date": (lambda col: pl.Series(col).cast(pl.Datetime("ms")), None),
}


@given(user=st.sampled_from(sorted(PARQUET_COLUMNS)), item=st.sampled_from(sorted(PARQUET_COLUMNS)),
       ts=st.sampled_from(sorted(PARQUET_COLUMNS)))
def test_parquet_column_types_are_accepted_or_named(user, item, ts):
    cols = {"user": [e[0] for e in EVENTS], "item": [e[1] for e in EVENTS],
            "timestamp": [e[3] for e in EVENTS]}
    kinds = {"user": user, "item": item, "timestamp": ts}
    frame = pl.DataFrame([PARQUET_COLUMNS[k][0](cols[c]).alias(c) for c, k in kinds.items()])
    with case_dir() as d:
        p = d / "log.parquet"
        frame.write_parquet(p)
        res = cli("data", "describe", "--data", str(p))
        assert_clean(res, "log.parquet", accept=True)
        bad = [c for c, k in kinds.items() if PARQUET_COLUMNS[k][1] is False]
        if bad:
            assert res.exit_code == 2 and any(f"'{c}'" in res.output for c in kinds), res.output


# ---- configs: wrong-typed values, unknown keys -----------------------------------------------------

CHEAP = {"data": "synthetic:tiny", "retrieval": "popular", "esr": "popular", "lsr": "popular"}
TOML_VALUES = {
    "int": st.integers(-5, 10**6),
    "float": st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: x != int(x)),
    "bool": st.booleans(),
    "str": st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=8),
    "list": st.lists(st.integers(0, 9), max_size=3),
    "table": st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), st.integers(0, 9),
                             min_size=1, max_size=2),
}
# a top-level key (or key path) and the kinds of value it accepts
TYPED_KEYS = {
    "seed": {"int"}, "max_len": {"int"}, "batch_size": {"int"}, "warmup": {"int"},
    "bootstrap": {"int"}, "oracle_requests": {"int"}, "reference_requests": {"int"},
    "retrain": {"bool"}, "oracle": {"bool"}, "reference": {"bool"}, "exclude_seen": {"bool"},
    "name": {"str"}, "device": {"str"}, "index": {"str"}, "cache_dir": {"str"}, "out": {"str"},
    "budgets.retrieval": {"int"}, "budgets.esr": {"int"}, "budgets.final": {"int"},
    "budgets.esr_share": {"int", "float"}, "split.kind": {"str"},
    "split.valid_frac": {"int", "float"}, "split.max_requests": {"int"},
    "esr_variants": {"list"}, "data_options": {"table"},
}


@st.composite
def wrong_typed(draw):
    key = draw(st.sampled_from(sorted(TYPED_KEYS)))
    kind = draw(st.sampled_from(sorted(set(TOML_VALUES) - TYPED_KEYS[key] - {"table"}
                                       if "." in key else set(TOML_VALUES) - TYPED_KEYS[key])))
    return key, draw(TOML_VALUES[kind])


def _write_config(d: Path, extra: dict) -> Path:
    doc = dict(CHEAP)
    for key, v in extra.items():
        head, _, tail = key.partition(".")
        if tail:
            doc.setdefault(head, {})[tail] = v
        else:
            doc[head] = v
    p = d / "c.toml"
    p.write_text(dumps_toml(doc))
    return p


@given(kv=wrong_typed())
def test_a_wrong_typed_config_value_names_the_key(kv):
    key, value = kv
    with case_dir() as d:
        cfg = _write_config(d, {key: value})
        res = cli("run", "--config", str(cfg), "--out", str(d / "out"), "--cache-dir",
                  str(d / "c"), "--no-progress")
        assert_clean(res, key.split(".")[-1])
        assert not (d / "out").exists()


@given(key=st.from_regex(r"[a-z][a-z_]{2,10}", fullmatch=True),
       where=st.sampled_from(["", "split", "budgets", "retrieval.config", "lsr.config.train"]),
       value=st.integers(0, 5))
def test_an_unknown_config_key_is_named(key, where, value):
    from cascade.config import _TOP_KEYS

    known = {"": set(_TOP_KEYS), "split": {"kind", "valid_frac", "test_frac", "max_requests", "seed"},
             "budgets": {"retrieval", "esr", "final", "esr_share"},
             "retrieval.config": set(), "lsr.config.train": set()}
    if key in known[where] or (where == "retrieval.config" and key in _fields("twotower")) or (
            where == "lsr.config.train" and key in _fields("train")):
        return
    with case_dir() as d:
        doc = dict(CHEAP)
        if where == "":
            doc[key] = value
        elif where in ("split", "budgets"):
            doc[where] = {key: value}
        elif where == "retrieval.config":
            doc["retrieval"] = {"stage": "twotower", "config": {key: value}}
        else:
            doc["lsr"] = {"stage": "lsr", "config": {"train": {key: value}}}
        (d / "c.toml").write_text(dumps_toml(doc))
        res = cli("run", "--config", str(d / "c.toml"), "--out", str(d / "out"), "--no-progress",
                  "--cache-dir", str(d / "c"))
        assert_clean(res, repr(key), "unknown key")


def _fields(which: str) -> set[str]:
    import dataclasses

    from cascade.stages.training import TrainConfig
    from cascade.stages.twotower import TwoTowerConfig

    cls = TrainConfig if which == "train" else TwoTowerConfig
    return {f.name for f in dataclasses.fields(cls)}


@settings(max_examples=10)
@given(data=st.binary(min_size=1, max_size=200), bom=st.booleans())
def test_binary_config_files_name_the_file(data, bom):
    with case_dir() as d:
        p = d / "c.toml"
        p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
        res = cli("run", "--config", str(p), "--out", str(d / "out"), "--no-progress",
                  "--cache-dir", str(d / "c"), "--data", "synthetic:tiny", "--retrieval",
                  "popular", "--esr", "popular", "--lsr", "popular", "--max-requests", "20")
        assert_clean(res, accept=True)
        if res.exit_code == 2:
            assert "c.toml" in res.output or "config" in res.output, res.output


# ---- plugins that misbehave ---------------------------------------------------------------------

LOG = "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, _, t in _events(30, 8))
ITEMS = "item,genre\n" + "".join(f"{i},g{i % 4}|g{(i + 1) % 4}\n" for i in range(1, 40))
DATA_TOML = 'data = "log.csv"\ndata_options = {item_features = "items.csv"}\n'

RAISES = ["ValueError('bad value')", "KeyError('col')", "RuntimeError('boom')",
          "ZeroDivisionError()", "AssertionError('no')", "GeneratorExit()",
          "KeyboardInterrupt()", "SystemExit(3)", "SystemExit(0)", "MemoryError()",
          "RecursionError()", "NotImplementedError()"]
RETURNS = ["torch.zeros(len(batch), 3)", "torch.zeros(candidates.shape[1])",
           "torch.full(candidates.shape, float('nan'))", "torch.full(candidates.shape, float('inf'))",
           "None", "candidates.tolist()", "'high'", "(-candidates.float()).numpy()",
           "torch.zeros(candidates.shape[0], candidates.shape[1], 2)",
           "torch.zeros(candidates.shape, device='meta')",
           "torch.ones(candidates.shape, dtype=torch.complex64)"]
RETRIEVE = ["torch.zeros(len(batch), k, dtype=torch.long)", "torch.arange(k).repeat(len(batch), 1) + 10**6",
            "torch.arange(k - 1).repeat(len(batch), 1)", "torch.arange(k).repeat(len(batch), 1).float()",
            "None", "[[0] * k] * len(batch)", "torch.arange(k).repeat(len(batch) + 1, 1)",
            "torch.zeros(len(batch), k, dtype=torch.long, device='meta')"]

PLUGIN = '''
import sys
import torch


class C:
    name = "fuzzed"

    def fit(self, ctx):
        {fit}
        return self

    def {method}(self, batch, {arg}):
        {body}
'''


@st.composite
def misbehaving(draw):
    kind = draw(st.sampled_from(["esr", "lsr", "retrieval"]))
    where = draw(st.sampled_from(["fit", "call", "import"]))
    raise_ = draw(st.sampled_from(RAISES))
    if where == "call" and draw(st.booleans()):
        body = "return " + draw(st.sampled_from(RETRIEVE if kind == "retrieval" else RETURNS))
    else:
        body = f"raise {raise_}" if where == "call" else (
            "return torch.arange(k).repeat(len(batch), 1)" if kind == "retrieval"
            else "return -candidates.float()")
    return kind, where, raise_, body


@settings(max_examples=12)
@given(case=misbehaving())
def test_a_misbehaving_plugin_is_named_never_a_traceback(case):
    kind, where, raise_, body = case
    mod = f"fuzzplug{next(_counter)}"
    method, arg = ("retrieve", "k") if kind == "retrieval" else ("score", "candidates")
    text = PLUGIN.format(fit=f"raise {raise_}" if where == "fit" else "pass", method=method,
                         arg=arg, body=body)
    if where == "import":
        text = f"raise {raise_}\n" + text
    stages = {"retrieval": "popular", "esr": "popular", "lsr": "popular", kind: f"{mod}:C"}
    with case_dir() as d:
        (d / f"{mod}.py").write_text(text)
        (d / "log.csv").write_text(LOG)
        (d / "items.csv").write_text(ITEMS)
        (d / "c.toml").write_text(DATA_TOML + "".join(f'{k} = "{v}"\n' for k, v in stages.items()))
        try:
            res = cli("run", "--config", "c.toml", "--out", "out", "--no-progress",
                      "--retrieval-k", "12", "--esr-k", "6", "--final-k", "3", "--no-reference",
                      cwd=d)
        finally:
            sys.modules.pop(mod, None)
        assert_clean(res)
        # named by its module, its label (the class, C) or its name attribute (fuzzed)
        assert any(n in res.output for n in (mod, "fuzzed", "'C'", " C'")), res.output
        assert not (d / "out").exists()


# ---- damaged run folders ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good")
    res = cli("run", "--data", "synthetic:tiny", "--retrieval", "popular", "--esr", "popular",
              "--lsr", "popular", "--esr-baseline", "popular", "--max-requests", "40",
              "--out", str(d / "run"), "--cache-dir", str(d / "c"), "--no-progress")
    assert res.exit_code == 0, res.output
    return d / "run"


def _paths(obj, prefix=()):
    """Every key path of a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
                        st.lists(st.integers(), max_size=2), st.just({}), st.just({"x": 1}))


@settings(max_examples=10)
@given(data=st.data(), command=st.sampled_from(["compare", "report"]),
       action=st.sampled_from(["replace", "delete"]))
def test_a_damaged_metrics_json_is_refused_by_name_or_survived(good_run, data, command, action):
    metrics = json.loads((good_run / "metrics.json").read_text())
    paths = sorted(_paths(metrics), key=repr)
    path = data.draw(st.sampled_from(paths))
    value = data.draw(JSON_VALUES)
    with case_dir() as d:
        run = Path(shutil.copytree(good_run, d / "run"))
        doc = json.loads((run / "metrics.json").read_text())
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if action == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        (run / "metrics.json").write_text(json.dumps(doc))
        res = cli(command, str(run))
        assert_clean(res, str(run), accept=True)


@settings(max_examples=6)
@given(file=st.sampled_from(["requests.parquet", "latency.parquet"]), data=st.data())
def test_a_damaged_parquet_column_is_refused_by_name_or_survived(good_run, file, data):
    frame = pl.read_parquet(good_run / file)
    col = data.draw(st.sampled_from(frame.columns))
    kind = data.draw(st.sampled_from(["drop", "text", "null", "float", "empty"]))
    n = frame.height
    changed = {"drop": lambda f: f.drop(col), "text": lambda f: f.with_columns(pl.lit("x").alias(col)),
               "null": lambda f: f.with_columns(pl.lit(None).alias(col)),
               "float": lambda f: f.with_columns(pl.Series(col, [0.5] * n)),
               "empty": lambda f: f.head(0)}[kind](frame)
    with case_dir() as d:
        run = Path(shutil.copytree(good_run, d / "run"))
        changed.write_parquet(run / file)
        for command in ("compare", "report"):
            assert_clean(cli(command, str(run)), str(run), accept=True)


def test_a_huge_run_name_is_cut_for_reports_and_figures(good_run, tmp_path):
    """A hand-edited name of 100,000 characters once kept `cascade report` drawing a figure
    title for minutes; the name a run folder shows is cut to the 200 bytes a config allows."""
    run = Path(shutil.copytree(good_run, tmp_path / "run"))
    doc = json.loads((run / "metrics.json").read_text())
    doc["name"] = "x" * 100_000
    (run / "metrics.json").write_text(json.dumps(doc))
    res = cli("report", str(run))
    assert res.exit_code == 0, res.output
    title = (run / "report.md").read_text().splitlines()[0]
    assert title.startswith(f"# cascade run `{'x' * 200}` (")
