"""`cascade data describe`: the numbers that say what a dataset is before anything trains on it.

`describe(dataset)` returns a JSON-able dict: sizes and density, history-length (events per
user) and item-popularity (events per item) percentiles, time span, feedback mix, the features
present with their cardinalities and coverage, and the loader's report (what was filtered or
derived and why). `render(description)` turns it into rich tables.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cascade.data.dataset import Dataset, FeatureTable

PERCENTILES = (0, 25, 50, 75, 90, 99, 100)


def _distribution(counts: np.ndarray) -> dict[str, float]:
    """Percentiles (nearest observed value) and mean of a count vector."""
    if counts.size == 0:
        return {"mean": 0.0, **{_pname(p): 0 for p in PERCENTILES}}
    qs = np.percentile(counts, PERCENTILES, method="nearest")
    return {
        "mean": round(float(counts.mean()), 3),
        **{_pname(p): int(q) for p, q in zip(PERCENTILES, qs)},
    }


def _pname(p: int) -> str:
    return {0: "min", 100: "max"}.get(p, f"p{p}")


def _features(table: FeatureTable, category: str | None = None) -> list[dict[str, Any]]:
    out = []
    for name, codes in table.categorical.items():
        out.append(
            {
                "name": name,
                "kind": "categorical",
                "cardinality": int(table.cardinality[name]),  # codes incl. 0 = unknown
                "values": int(table.cardinality[name]) - 1,
                "coverage": round(float((codes > 0).mean()) if table.n else 0.0, 4),
            }
        )
    for name, codes in table.multi.items():
        per_row = (codes > 0).sum(axis=1)
        out.append(
            {
                "name": name,
                "kind": "multi-valued" + (" (category)" if name == category else ""),
                "cardinality": int(table.cardinality[name]),
                "values": int(table.cardinality[name]) - 1,
                "coverage": round(float((per_row > 0).mean()) if table.n else 0.0, 4),
                "mean_per_row": round(float(per_row.mean()) if table.n else 0.0, 3),
            }
        )
    return out


def describe(dataset: Dataset) -> dict[str, Any]:
    """A JSON-able summary of `dataset` (see the module docstring)."""
    ev = dataset.events
    per_user = np.bincount(ev["user"].to_numpy(), minlength=dataset.n_users)
    per_item = dataset.item_popularity()
    action = ev["action"].to_numpy()
    ts = ev["ts"]
    n_cells = dataset.n_users * dataset.n_items
    return {
        "name": dataset.name,
        "source": dataset.source,
        "fingerprint": dataset.fingerprint(),
        "users": dataset.n_users,
        "items": dataset.n_items,
        "events": dataset.n_events,
        "density": float(dataset.n_events / n_cells) if n_cells else 0.0,
        "history_length": _distribution(per_user),
        "item_popularity": _distribution(per_item),
        "items_without_events": int((per_item == 0).sum()),
        "time": {"min": int(ts.min()), "max": int(ts.max())} if ev.height else None,
        "ratings": ev["rating"].null_count() < ev.height,
        "actions": {
            "positive": int((action == 1).sum()),
            "neutral": int((action == 0).sum()),
            "negative": int((action == -1).sum()),
        },
        "category_feature": dataset.category_feature,
        "features": {
            "items": _features(dataset.items, dataset.category_feature),
            "users": _features(dataset.users),
        },
        "report": list(dataset.report),
    }


def render(desc: dict[str, Any]):
    """Rich renderable (a group of tables) for a `describe` result."""
    from rich.console import Group
    from rich.table import Table

    head = Table(title=f"dataset {desc['name']}", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column(justify="right")
    head.add_row("source", desc["source"])
    head.add_row("users", f"{desc['users']:,}")
    head.add_row("items", f"{desc['items']:,}")
    head.add_row("events", f"{desc['events']:,}")
    head.add_row("density", f"{desc['density']:.4%}")
    a = desc["actions"]
    head.add_row("feedback", "ratings" if desc["ratings"] else "implicit (no ratings)")
    head.add_row("actions +/0/-", f"{a['positive']:,} / {a['neutral']:,} / {a['negative']:,}")
    if desc["time"]:
        head.add_row("time span", f"{desc['time']['min']} .. {desc['time']['max']}")
    head.add_row("category feature", str(desc["category_feature"]))
    head.add_row("fingerprint", desc["fingerprint"])

    dist = Table(title="distributions", title_justify="left")
    dist.add_column("")
    cols = ["min", "p25", "p50", "p75", "p90", "p99", "max", "mean"]
    for c in cols:
        dist.add_column(c, justify="right")
    for label, key in (
        ("events per user (history length)", "history_length"),
        ("events per item (popularity)", "item_popularity"),
    ):
        d = desc[key]
        dist.add_row(label, *[f"{d[c]:,}" if c != "mean" else f"{d[c]:,.1f}" for c in cols])

    feats = Table(title="features", title_justify="left")
    for c, j in (
        ("entity", "left"),
        ("feature", "left"),
        ("kind", "left"),
        ("values", "right"),
        ("coverage", "right"),
    ):
        feats.add_column(c, justify=j)
    for entity in ("items", "users"):
        for f in desc["features"][entity]:
            feats.add_row(entity, f["name"], f["kind"], f"{f['values']:,}", f"{f['coverage']:.1%}")
    if not feats.row_count:
        feats.add_row("-", "none", "", "", "")

    parts = [head, dist, feats]
    if desc["report"]:
        rep = Table(
            title="loader report (filtered / derived)", title_justify="left", show_header=False
        )
        rep.add_column()
        for line in desc["report"]:
            rep.add_row(line)
        parts.append(rep)
    return Group(*parts)
