"""Regression tests for what must never happen to a user (issue 15): a folder of theirs deleted,
a run silently replaced, code imported from the folder they run cascade in without their naming
it. The data-loss test comes first."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from cascade.cli import app
from cascade.records import MARKER, is_run_folder, load_run, write_run
from cascade.util.fsio import clean_stale_temporaries

FRAME = pl.DataFrame({"a": [1]})


def _write(path: Path, name: str = "r", **kw) -> Path:
    return write_run(path, config_toml="", metrics={"name": name}, requests=FRAME, latency=FRAME,
                     env={}, **kw)


def test_out_never_deletes_a_user_folder_holding_metrics_json(tmp_path):
    mine = tmp_path / "project"
    (mine / "src").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "src" / "train.py").write_text("print('mine')")
    (mine / "metrics.json").write_text("{}")
    res = CliRunner().invoke(app, ["run", "--data", "synthetic:tiny", "--out", str(mine),
                                   "--no-progress", "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2, res.output
    assert "refusing to overwrite" in res.output
    assert (mine / "notes.txt").read_text() == "my notes"
    assert (mine / "src" / "train.py").read_text() == "print('mine')"
    with pytest.raises(ValueError, match="refusing to overwrite"):
        _write(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.json", "notes.txt", "src"]


def test_a_run_folder_is_recognised_by_its_marker_not_by_a_file_name(tmp_path):
    run = _write(tmp_path / "run", "first")
    assert (run / MARKER).is_file() and is_run_folder(run)
    _write(run, "second")  # replacing a run of ours is allowed
    assert load_run(run).name == "second"
    (run / "my-notes.txt").write_text("keep me")  # a user's file inside a run folder
    assert not is_run_folder(run)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        _write(run, "third")
    assert (run / "my-notes.txt").read_text() == "keep me" and load_run(run).name == "second"
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "metrics.json").write_text(json.dumps({"format": "cascade-run/2"}))
    assert not is_run_folder(fake)


def test_replacing_a_run_leaves_no_temporary_and_keeps_the_new_run(tmp_path):
    run = _write(tmp_path / "run", "old")
    _write(run, "new")
    assert load_run(run).name == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_default_run_names_never_collide(tmp_path):
    a = _write(tmp_path / "same", "a", unique=True)
    b = _write(tmp_path / "same", "b", unique=True)
    assert a != b and b.name == "same-2"
    assert load_run(a).name == "a" and load_run(b).name == "b"


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".run.{pid}.abc123.tmp"
    stale.mkdir()
    (stale / "metrics.json").write_text("{}")
    live = tmp_path / f".run.{os.getpid()}.def456.tmp"
    live.mkdir()
    user_file = tmp_path / ".hidden.tmp"  # not ours: no pid field
    user_file.write_text("x")
    removed = clean_stale_temporaries(tmp_path)
    assert removed == [stale] and not stale.exists()
    assert live.exists() and user_file.exists()


# ---- nothing is imported from the current directory unless named (defect 3) ----------------------

CANARIES = ("faiss", "scipy", "sklearn", "matplotlib", "polars", "numpy", "pyarrow", "rich",
            "typer", "threadpoolctl", "joblib", "triton", "torch", "tomllib", "report", "figures",
            "stages", "data", "kernels", "cascade_plugin_helper")

PLUGIN = textwrap.dedent('''
    import pathlib
    pathlib.Path("imported-myesr").write_text("named")

    import torch


    class Ranker:
        name = "myesr"

        def fit(self, ctx):
            return self

        def score(self, batch, candidates):
            return -candidates.float()
''')


def _cascade_command() -> list[str]:
    """The installed console script (sys.path[0] is its own folder, as for a user); `-P` keeps
    the current directory off sys.path where it is not installed."""
    import shutil

    script = shutil.which("cascade")
    return [script] if script else [sys.executable, "-P", "-m", "cascade.cli"]


def test_only_the_named_plugin_module_is_imported_from_the_current_directory(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in CANARIES:
        (work / f"{name}.py").write_text(
            f"import pathlib\npathlib.Path({f'imported-{name}'!r}).write_text('canary')\n"
            "raise SystemExit('canary imported')\n"
        )
    (work / "myesr.py").write_text(PLUGIN)
    (work / "run.toml").write_text(textwrap.dedent('''
        data = "synthetic:tiny"
        retrieval = {stage = "twotower", config = {train = {epochs = 1, max_steps_per_epoch = 5}}}
        esr = "myesr:Ranker"
        esr_baseline = {stage = "twotower", config = {train = {epochs = 1, max_steps_per_epoch = 5}}}
        lsr = {stage = "lsr", config = {train = {epochs = 1, max_steps_per_epoch = 5}, pretrain = {epochs = 1, max_steps_per_epoch = 5}}}
        reference_requests = 50
        [split]
        max_requests = 100
    '''))
    env = {**os.environ, "CASCADE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": ""}
    res = subprocess.run(
        [*_cascade_command(), "run", "--config", "run.toml", "--out", str(tmp_path / "out"),
         "--no-progress"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    imported = sorted(p.name for p in work.glob("imported-*"))
    assert imported == ["imported-myesr"], imported
    assert load_run(tmp_path / "out").metrics["stages"]["esr"]["Ranker"]["stage"] == "myesr:Ranker"


# ---- failures caught before any training, and every bad input a clear error (defects 4-10) --------

runner = CliRunner()
TINY = ["--data", "synthetic:tiny", "--no-progress"]


def _cli(*args: str, cwd: Path | None = None):
    if cwd is None:
        return runner.invoke(app, list(args))
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, list(args))
    finally:
        os.chdir(old)


def _assert_user_error(res, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in res.output, (n, res.output)


def test_out_inside_a_file_and_a_file_as_cache_dir_fail_before_training(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = _cli("run", *TINY, "--out", str(afile / "run"), "--cache-dir", str(tmp_path / "c"))
    _assert_user_error(res, "is not a folder")
    assert not (tmp_path / "c").exists()  # nothing trained, nothing cached
    res = _cli("run", *TINY, "--out", str(tmp_path / "run"), "--cache-dir", str(afile))
    _assert_user_error(res, f"cache folder {afile}")
    assert not (tmp_path / "run").exists()


def test_max_len_is_bounded_by_the_longest_history(tmp_path):
    res = _cli("run", *TINY, "--max-len", "100000", "--out", str(tmp_path / "r"),
               "--cache-dir", str(tmp_path / "c"))
    _assert_user_error(res, "max_len 100000 is longer than any history", "use at most")


@pytest.mark.parametrize("toml, needle", [
    ("[split]\nmax_requests = \"5\"\n", "split.max_requests must be"),
    ("[split]\nvalid_frac = \"x\"\n", "split.valid_frac must be a number, got 'x'"),
    ('retrieval = {stage = "twotower", config = {dim = 8.5}}\n', "dim must be an integer, got 8.5"),
    ("seed = 99999999999999999999999\n", "seed must be < 2**32"),
    ("seed = 18446744073709551615\n", "seed must be < 2**32"),
    ("batch_size = true\n", "batch_size must be an integer, got True"),
    ("[budgets]\nesr = 2.5\n", "budgets.esr must be an integer (or left out), got 2.5"),
])
def test_wrong_typed_config_values_name_the_key(tmp_path, toml, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    res = _cli("run", "--config", str(cfg), "--no-progress", "--cache-dir", str(tmp_path / "c"),
               "--out", str(tmp_path / "r"))
    _assert_user_error(res, needle)
    assert not (tmp_path / "r").exists()


def test_a_utf8_bom_config_is_accepted_and_binary_config_is_named(tmp_path):
    from cascade.config import RunConfig

    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbfseed = 3\n")
    assert RunConfig.load(bom).seed == 3
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\x00\xff\xfe\x80garbage")
    res = _cli("run", "--config", str(binary))
    _assert_user_error(res, f"config file {binary}")


def test_rich_markup_and_emoji_codes_in_values_are_printed_literally(tmp_path):
    weird = tmp_path / ":smile: [bold]x[/bold].toml"
    res = _cli("run", "--config", str(weird))
    _assert_user_error(res, ":smile: [bold]x[/bold].toml")


BAD_PLUGIN = textwrap.dedent('''
    import sys


    class Base:
        name = "bad"

        def fit(self, ctx):
            return self

        def score(self, batch, candidates):
            return -candidates.float()


    class FitRaises(Base):
        def fit(self, ctx):
            raise KeyError("no such column 'price'")


    class ScoreRaises(Base):
        def score(self, batch, candidates):
            raise RuntimeError("CUDA out of memory (simulated)")


    class Exits(Base):
        def fit(self, ctx):
            sys.exit(0)
''')


@pytest.mark.parametrize("cls, needle", [
    ("FitRaises", "esr stage 'FitRaises' (bad) raised KeyError in fit(): \"no such column 'price'\""),
    ("ScoreRaises", "esr stage 'ScoreRaises' (bad) raised RuntimeError in score(): CUDA out of memory"),
    ("Exits", "esr stage 'Exits' (bad) called sys.exit(0) in fit()"),
])
def test_plugin_failures_are_named_with_stage_and_method(tmp_path, cls, needle):
    (tmp_path / "badplugin.py").write_text(BAD_PLUGIN)
    res = _cli("run", "--data", "synthetic:tiny", "--no-progress", "--esr", f"badplugin:{cls}",
               "--retrieval", "popular", "--lsr", "popular", "--out", str(tmp_path / "r"),
               "--cache-dir", str(tmp_path / "c"), cwd=tmp_path)
    sys.modules.pop("badplugin", None)
    _assert_user_error(res, needle)
    assert not (tmp_path / "r").exists()


def _good_run(tmp_path: Path) -> Path:
    res = _cli("run", "--data", "synthetic:tiny", "--no-progress", "--retrieval", "popular",
               "--esr", "popular", "--lsr", "popular", "--out", str(tmp_path / "run"),
               "--cache-dir", str(tmp_path / "c"))
    assert res.exit_code == 0, res.output
    return tmp_path / "run"


def test_damaged_run_folders_are_refused_by_compare_and_report(tmp_path):
    run = _good_run(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    damages = {
        "variants a list": lambda m: m.update(variants=[1, 2]),
        "final not numbers": lambda m: next(iter(m["variants"].values()))["final"].update(
            {"ndcg@10": "high"}),
        "stage k a string": lambda m: next(iter(m["variants"].values()))["stages"][0].update(
            k="ten"),
    }
    for what, damage in damages.items():
        bad = json.loads(json.dumps(metrics))
        damage(bad)
        (run / "metrics.json").write_text(json.dumps(bad))
        for cmd in (["compare", str(run)], ["report", str(run)]):
            res = _cli(*cmd)
            _assert_user_error(res, str(run))
    (run / "metrics.json").write_bytes(b"\xff\xfe binary")
    _assert_user_error(_cli("compare", str(run)), "metrics.json: not UTF-8")
    (run / "metrics.json").unlink()
    (run / "metrics.json").mkdir()
    _assert_user_error(_cli("compare", str(run)), "metrics.json: not a regular file")


def test_null_metrics_are_shown_as_missing_by_compare_and_report(tmp_path):
    """A null final metric or stage recall (nothing to measure) is a gap in the tables, not an
    internal error (found by experiments/fuzz_cli.py)."""
    run = _good_run(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    variant = next(iter(metrics["variants"].values()))
    metric = next(iter(variant["final"]))
    variant["final"][metric] = None
    variant["stages"][0]["recall"] = None
    (run / "metrics.json").write_text(json.dumps(metrics))
    for cmd in (["compare", str(run), "--format", "json"], ["report", str(run)]):
        res = _cli(*cmd)
        assert res.exit_code == 0 and "internal error" not in res.output, res.output
    table = json.loads(_cli("compare", str(run), "--format", "json").output)
    assert metric in json.dumps(table)


def test_scores_or_ids_on_the_meta_device_are_refused_by_name():
    import torch

    from cascade.stages.base import StageError, check_scores

    with pytest.raises(StageError, match="'meta' device"):
        check_scores("esr 'm'", torch.zeros(2, 3, device="meta"), (2, 3))


# ---- a damaged checkpoint heals (defect 5) ---------------------------------------------------------


@pytest.fixture(scope="module")
def small_ctx(tmp_path_factory):
    import dataclasses

    sys.path.insert(0, str(Path(__file__).parent))
    from funnel_toys import planted_dataset

    from cascade.config import RunConfig
    from cascade.session import prepare

    ctx = prepare(RunConfig(device="cpu"), dataset=planted_dataset(), progress=False).ctx
    return dataclasses.replace(ctx, cache_dir=tmp_path_factory.mktemp("ckpt"))


def _damage(folder: Path, how: str) -> None:
    import torch

    weights = folder / "model.pt"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "random bytes":
        weights.write_bytes(os.urandom(2048))
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "another stage's weights":
        buf = __import__("io").BytesIO()
        torch.save(torch.nn.Linear(3, 2).state_dict(), buf)
        weights.write_bytes(buf.getvalue())
    elif how == "meta {}":
        (folder / "meta.json").write_text("{}")


@pytest.mark.parametrize("how", ["truncated", "random bytes", "empty", "another stage's weights",
                                 "meta {}"])
def test_a_damaged_checkpoint_is_reported_and_retrained(small_ctx, how, capsys):
    import torch

    from cascade.stages.training import cached_fit

    calls = []

    def train(model):
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(0.5)
        return {"epochs_run": 1}

    def fit():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        return model, cached_fit(model, stage=f"heal-{how}", config={"x": 1}, ctx=small_ctx,
                                 train=lambda: train(model))

    _, first = fit()
    assert first["cached"] is False and len(calls) == 1
    folder = Path(first["checkpoint"])
    _damage(folder, how)
    model, second = fit()
    assert second["cached"] is False and len(calls) == 2  # trained again, no traceback
    assert "warning: checkpoint" in capsys.readouterr().err
    assert torch.all(model.weight == 0.5)
    model, third = fit()  # the rewritten checkpoint loads
    assert third["cached"] is True and len(calls) == 2 and torch.all(model.weight == 0.5)


def test_complex_scores_are_refused_at_the_funnel_boundary():
    import torch

    from cascade.stages.base import StageError, check_scores

    with pytest.raises(StageError, match="complex64 scores, expected real numbers"):
        check_scores("esr 'c'", torch.ones(2, 3, dtype=torch.complex64), (2, 3))
    assert check_scores("esr 'c'", torch.ones(2, 3, dtype=torch.float64), (2, 3)).dtype == torch.float32
