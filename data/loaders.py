"""Loaders: the public entry point. A dataset name, path or `synthetic[:preset]` -> `Dataset`.

`load_dataset(spec)` takes a known name (`ml-100k`, `ml-1m`, ...: read from the cache directory,
downloaded from GroupLens when absent, see `cascade.data.download`), a path (format detected by
`detect_format`) or `synthetic` / `synthetic:<preset>`. Every dataset it returns has a
`category_feature`: the genres when the data has them, else k-means pseudo-categories
(`cascade.data.derive.add_pseudo_categories`).

The formats themselves live in `cascade.data.formats`, one module each, found through its
registry (`formats.names()`): MovieLens 100k, 1M/10M and latest/25M/32M (`movielens`), per-user
sequence text (`sequence`) and generic CSV/Parquet interaction logs (`log`). A path names
exactly what is read: a named ratings file is never swapped for a sibling (see `movielens`).

Bad input policy (STYLE.md "Data": strict, nothing silently dropped), shared by every format:
- errors (`DataError` naming the file, 1-based line number or column, and what was expected):
  a line with the wrong number of fields, a missing or misnamed column / header, a
  non-numeric id, rating or timestamp where the format requires a number, a rating or label
  that is not finite (nan, inf, or too large for its type), a MovieLens rating outside 0.5-5,
  a timestamp that is not finite or does not fit 64 bits, a Parquet UInt64 id from 2^63 up,
  a control byte (0x1F, NUL, ...) in a text field or bytes that are not UTF-8 in a CSV, an
  empty file, a path that is neither a known name nor an existing file (the empty string
  included), a file that cannot be read (the OS's reason), a FIFO, socket or device (refused
  from its `stat`, never opened), a directory with no known format or with two, a user listed
  on two lines of a per-user sequence file, an id listed twice in a feature table. A value or
  line quoted in a message is cut to 60 characters: a wrong file given as data is named, not
  dumped.
- filtered and reported (one line each in `dataset.report`, with counts), or errors with
  `strict=True`: exact duplicate events (same user, item and timestamp; the first is kept),
  and users with fewer than `min_user_events` (default 2) events, since a user needs a
  history before any request. Items left without events after that are not part of the
  dataset; metadata rows for items without events and events for items without metadata are
  counted in the report too.
- blank lines are not data and are skipped (they still count for line numbers). A line ends
  at LF, CRLF or a lone CR (old Mac files); a UTF-8 byte-order mark is ignored.

Raw ids map to contiguous ints in sorted raw-id order (`raw_user_ids` / `raw_item_ids` map
back). Feature codes start at 1 in the order of `vocab[name][1:]`; 0 is unknown / padding.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any

from cascade.data.dataset import Dataset, DataError
from cascade.data.formats import detect_format, get_format, resolve
from cascade.data.formats.log import load_interaction_log
from cascade.util.tables import check_type

__all__ = ["load_dataset", "detect_format", "load_interaction_log"]

_GENERAL_OPTIONS = ("format", "download", "pseudo_categories", "seed")


def _load_synthetic(spec: str, opts: dict[str, Any]) -> Dataset:
    from cascade.data.synthetic import generate, preset

    name = spec.split(":", 1)[1] if ":" in spec else "small"
    try:
        cfg = preset(name, **opts)
    except (TypeError, ValueError) as e:  # an unknown preset or option, a bad option value
        raise ValueError(f"dataset {spec!r}: {e}") from None
    return generate(cfg)


def _check_option_types(load, opts: dict[str, Any], fmt: str) -> None:
    """Each option's value against the loader's annotation (`user_col = 1` names the option
    instead of failing later as a missing column 1)."""
    try:
        hints = typing.get_type_hints(load)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check against
        return
    for k, v in opts.items():
        if k in hints:
            check_type(v, hints[k], f"option {k} of the {fmt!r} format", classes=True)


def load_dataset(spec: str | Path, *, cache_dir: Path | None = None, **opts: Any) -> Dataset:
    """Load a dataset by known name, path or `synthetic[:preset]` (see the module docstring).

    Options: `format` (a registered format name, overrides detection), `download` (known
    names: fetch when absent, default True), `pseudo_categories` (k-means clusters when the
    data has no categories, default 32), `seed`, and the chosen loader's own keyword arguments
    (`strict`, `min_user_events`, `name`, and for logs `user_col`, `item_col`, ...). For
    `synthetic`, options are overrides of the preset's SyntheticConfig.
    """
    from cascade.data.derive import add_pseudo_categories
    from cascade.data.download import KNOWN_DATASETS, dataset_dir

    spec_s = str(spec)
    if not spec_s.strip():
        raise DataError(
            "the empty string is not a dataset: expected a known name (ml-100k, ...), a path "
            "or synthetic[:preset]"
        )
    if spec_s == "synthetic" or spec_s.startswith("synthetic:"):
        ds = _load_synthetic(spec_s, opts)
        return ds if ds.category_feature is not None else add_pseudo_categories(ds)
    fmt = opts.pop("format", None)
    download = opts.pop("download", True)
    n_pseudo = opts.pop("pseudo_categories", 32)
    seed = opts.pop("seed", 0)
    if spec_s in KNOWN_DATASETS:
        path = dataset_dir(spec_s, cache_dir, download=download)
        opts.setdefault("name", spec_s)
    else:
        path = Path(spec_s).expanduser()
        try:
            exists = path.exists()
        except OSError as e:  # e.g. a folder on the way that may not be searched
            raise DataError(f"{path}: cannot read it: {e.strerror or e}") from None
        if not exists:
            raise DataError(
                f"{spec_s!r} is not a known dataset ({', '.join(KNOWN_DATASETS)}), nor "
                "'synthetic[:tiny|small|medium|large]', nor an existing file or directory"
            )
    if fmt is None:
        form, path = resolve(path)
    else:
        form = get_format(fmt)
    accepted = [k for k in inspect.signature(form.load).parameters if k != "path"]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise ValueError(
            f"option(s) {unknown} do not apply to the {form.name!r} format; it accepts "
            f"{accepted} plus {', '.join(_GENERAL_OPTIONS)}"
        )
    _check_option_types(form.load, opts, form.name)
    if opts.get("min_user_events", 2) < 1:
        raise ValueError(f"min_user_events must be >= 1, got {opts['min_user_events']}")
    ds = form.load(path, **opts)
    if ds.category_feature is None:
        ds = add_pseudo_categories(ds, n_clusters=int(n_pseudo), seed=int(seed))
    return ds
