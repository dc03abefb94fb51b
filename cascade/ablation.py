"""The GESR ablation as one run, and its table (`cascade ablation`).

    cascade ablation                                   # synthetic data with a strong cross signal
    cascade ablation --data ml-100k
    cascade ablation --config experiments/configs/ablation.toml

Follows the ablation of "Generative Early Stage Ranking" (Hong et al., arXiv 2511.21095): the
modules are added one at a time on top of the two towers. One run holds
every row as an ESR variant (`RunConfig.esr_variants`), so all rows rank the same retrieved
candidates, feed the same late-stage ranker, replay the same traffic and get paired deltas
against the two-tower ESR with bootstrap 95% intervals.

On synthetic data with a ground truth, two more rows bound what an ESR can gain: `oracle-dot`
(the decoupled part of the truth: what a two-tower model can express at best) and `oracle`
(the full truth); the table then reports, per row, the share of the oracle's gain from the
cross signal that the row recovers: (row - oracle-dot) / (oracle - oracle-dot) in ESR recall
(0% = no better than the best decoupled ranker, 100% = as good as the truth).

Each row: ESR recall@K, final HR@10 / NDCG@10 (with paired deltas vs two-tower), ESR latency
p50 / p99 per batch, funnel throughput. Written as `ablation.md` and `ablation.json` (atomically)
into the run folder, beside the run's own records. Unless an ESR budget is given (`[budgets]`
esr or esr_share, `--esr-k`), the ESR keeps a tenth of the retrieved candidates (`ESR_SHARE`),
so that its cut binds; the table's header gives the LSR over every retrieved candidate (no ESR
cut) for comparison. A run on the CPU adds "full GESR, int8": the full GESR's checkpoint served
with dynamic int8 linear layers (`quantize = "int8"`, no retraining), its quality and latency
beside the float model's.

The rows themselves are data beside GESR (`cascade.stages.gesr.ablation`). The TOML is a
RunConfig (see `cascade.config`) plus three ablation keys: `gesr` (a table of
GESRConfig overrides applied to every GESR row), `twotower` (TwoTowerConfig overrides of the
baseline) and `oracles` (true/false/"auto": add the oracle rows when the data has a ground truth).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from rich.table import Table

from cascade.config import RunConfig, read_toml
from cascade.stages.base import StageError
from cascade.stages.gesr.ablation import BASELINE, ORACLES, ablation_variants
from cascade.util.fsio import atomic_write_bytes

# synthetic data whose affinity has a strong user-item cross part (category-count matches and
# repeats), the setting GESR's MoA modules exist for
DEFAULT_DATA = "synthetic:small"
DEFAULT_DATA_OPTIONS = {"cross_strength": 8.0, "repeat_strength": 1.0}

# the ESR's share of the retrieved candidates when no ESR budget is given: a cut that binds (the
# paper's ESR passes tens of its hundreds of candidates on). With the run's gentler default (a
# quarter), the ESR keeps nearly every item the LSR would put in its top 10 whatever it does, so
# ESR quality barely reaches the final list: on synthetic:small at 450 -> 110 the two-tower ESR
# cuts 0.7% of the LSR's top-10 items, and even the ground-truth oracle as ESR moves NDCG@10 by
# +0.0006 [-0.0006, +0.0021] (experiments/results/ablation-synthetic-cross-esr110.md).
ESR_SHARE = 0.1

_ABLATION_KEYS = ("gesr", "twotower", "oracles")


def _has_oracles() -> bool:
    from cascade.stages.base import resolve_stage_class

    try:
        for _, stage in ORACLES:
            resolve_stage_class("esr", stage)
    except StageError:
        return False
    return True


def build_ablation_config(config: Path | None, overrides: Mapping[str, Any]):
    """RunConfig for the ablation from an optional TOML plus command-line overrides."""
    raw: dict[str, Any] = read_toml(config) if config is not None else {}
    where = f"config file {config}" if config is not None else "ablation"
    for k in ("esr", "esr_baseline", "esr_variants"):
        if k in raw:
            raise ValueError(f"{where}: {k!r} is set by the ablation itself; use the 'gesr' and "
                             "'twotower' tables to configure its rows")
    abl = {k: raw.pop(k) for k in _ABLATION_KEYS if k in raw}
    for k in ("gesr", "twotower"):
        if not isinstance(abl.get(k, {}), Mapping):
            raise ValueError(f"{where}: {k} must be a table of config overrides")
    o = {k: v for k, v in overrides.items() if v is not None}
    if "data" in o:  # a new dataset drops the TOML's data options (they belong to its data)
        raw["data"] = o.pop("data")
        raw.pop("data_options", None)
    raw.setdefault("data", DEFAULT_DATA)
    if raw["data"] == DEFAULT_DATA and "data_options" not in raw:
        raw["data_options"] = dict(DEFAULT_DATA_OPTIONS)
    split = dict(raw.get("split", {}))
    if "split" in o:
        split["kind"] = o.pop("split")
    if "max_requests" in o:
        split["max_requests"] = o.pop("max_requests")
    if split:
        raw["split"] = split
    budgets = raw.get("budgets", {})
    if not isinstance(budgets, Mapping):
        raise ValueError(f"{where}: budgets must be a table, got {budgets!r}")
    budgets = dict(budgets)
    for flag, key in (("retrieval_k", "retrieval"), ("esr_k", "esr")):
        if flag in o:
            budgets[key] = o.pop(flag)
    if "esr" not in budgets:
        budgets.setdefault("esr_share", ESR_SHARE)
    raw["budgets"] = budgets
    for k in ("out", "cache_dir"):
        if k in o:
            o[k] = str(o[k])
    raw.update(o)
    raw.setdefault("name", "ablation")
    want = abl.get("oracles", "auto")
    if want not in (True, False, "auto"):
        raise ValueError(f"{where}: oracles must be true, false or \"auto\", got {want!r}")
    synthetic = str(raw["data"]).startswith("synthetic")
    oracles = bool(want) if want != "auto" else (synthetic and _has_oracles())
    # the int8 row serves on the CPU only (`cascade.stages.quantize`)
    device = str(raw.get("device", "auto"))
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    raw["esr_variants"] = ablation_variants(abl.get("gesr"), abl.get("twotower"), oracles=oracles,
                                            serving_rows=cpu)
    return RunConfig.from_dict(raw, where=where)


# ---- the table --------------------------------------------------------------------------------


def ablation_rows(metrics: Mapping[str, Any]) -> list[dict]:
    """One dict per variant: the ablation's numbers, read from the run's metrics.json."""
    comps = metrics.get("comparisons") or {}
    variants = metrics["variants"]
    oracle_gain = None
    if "oracle" in variants and "oracle-dot" in variants:
        rec = {k: _stage(variants[k], "esr")["recall"] for k in ("oracle", "oracle-dot")}
        ndcg = {k: variants[k]["final"]["ndcg@10"] for k in ("oracle", "oracle-dot")}
        oracle_gain = {"recall@esr": rec["oracle"] - rec["oracle-dot"],
                       "ndcg@10": ndcg["oracle"] - ndcg["oracle-dot"]}
    rows = []
    base = variants.get(BASELINE)
    for label, v in variants.items():
        esr = _stage(v, "esr")
        c = comps.get(label, {})
        row = {
            "variant": label,
            "esr": v["esr"],
            "esr_config": v.get("esr_config") or {},
            "esr_k": esr["k"],
            "esr_recall": esr["recall"],
            "hr@10": v["final"]["hr@10"],
            "ndcg@10": v["final"]["ndcg@10"],
            "esr_latency_ms": {"p50": esr["latency_ms"]["p50"], "p99": esr["latency_ms"]["p99"]},
            "throughput_rps": v["throughput_rps"],
            "delta_vs_two_tower": {
                m: {"delta": c[m]["delta"], "ci95": c[m]["ci95"]}
                for m in ("recall@esr", "hr@10", "ndcg@10") if m in c
            },
        }
        if base is not None and base.get("throughput_rps"):
            row["throughput_vs_two_tower"] = v["throughput_rps"] / base["throughput_rps"]
        if oracle_gain is not None:
            dot = variants["oracle-dot"]
            got = {"recall@esr": esr["recall"] - _stage(dot, "esr")["recall"],
                   "ndcg@10": v["final"]["ndcg@10"] - dot["final"]["ndcg@10"]}
            row["share_of_oracle_gain"] = {
                m: (got[m] / oracle_gain[m] if oracle_gain[m] > 0 else None) for m in got
            }
        rows.append(row)
    return rows


def _stage(v: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    return next(s for s in v["stages"] if s["name"] == name)


def _num(x: Any, d: int = 4) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def _delta(c: Mapping[str, Any] | None) -> str:
    if not c or c.get("delta") is None:  # no paired requests: no delta
        return ""
    lo, hi = c["ci95"]
    return f"{c['delta']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


COLUMNS = ("variant", "ESR recall@K", "Δ recall (95% CI)", "HR@10", "NDCG@10",
           "Δ NDCG@10 (95% CI)", "ESR p50 ms", "ESR p99 ms", "funnel req/s", "× two-tower",
           "oracle gain recovered")


def _cells(r: Mapping[str, Any]) -> list[str]:
    d = r["delta_vs_two_tower"]
    share = (r.get("share_of_oracle_gain") or {}).get("recall@esr")
    return [
        r["variant"], _num(r["esr_recall"]), _delta(d.get("recall@esr")), _num(r["hr@10"]),
        _num(r["ndcg@10"]), _delta(d.get("ndcg@10")), _num(r["esr_latency_ms"]["p50"], 2),
        _num(r["esr_latency_ms"]["p99"], 2), _num(r["throughput_rps"], 1),
        _num(r.get("throughput_vs_two_tower"), 2), "-" if share is None else f"{share:.0%}",
    ]


def no_esr_cut(metrics: Mapping[str, Any]) -> dict | None:
    """The LSR's final metrics over every retrieved candidate (the run's oracle pass), or None
    when the run skipped it."""
    for v in metrics["variants"].values():
        ref = (v.get("funnel_loss") or {}).get("oracle")
        if ref:
            return dict(ref)
    return None


def ablation_markdown(metrics: Mapping[str, Any], rows: list[dict]) -> str:
    data, b = metrics["data"], metrics["budgets"]
    no_cut = no_esr_cut(metrics)
    lines = [
        f"# GESR ablation: {metrics.get('name', '')}",
        "",
        f"Data {data['name']} ({data.get('n_items', '?')} items), {data['n_requests']} test "
        f"requests, budgets {b['retrieval']} -> {b['esr']} -> {b['final']}, device "
        f"{metrics.get('device', '?')}. Rows are cumulative; deltas are paired against the "
        "two-tower ESR with bootstrap 95% intervals; \"oracle gain recovered\" is (row - "
        "oracle-dot) / (oracle - oracle-dot) in ESR recall: the share of what the truth's cross "
        "part adds over the best decoupled (two-tower-expressible) ranker."
        + (" \"full GESR, int8\" serves the full GESR's checkpoint with its linear layers "
           "quantized to dynamic int8 (quantize = \"int8\", no retraining)."
           if any(r["variant"] == "full GESR, int8" for r in rows) else ""),
        "",
        *([f"The LSR over every retrieved candidate (no ESR cut) gets HR@10 {_num(no_cut.get('hr@10'))}, "
           f"NDCG@10 {_num(no_cut.get('ndcg@10'))}: an ESR changes the final list only through what "
           "its cut removes.", ""] if no_cut else []),
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _with_delta(value: Any, c: Mapping[str, Any] | None) -> str:
    if not c or c.get("delta") is None:
        return _num(value)
    lo, hi = c["ci95"]
    text = f"{_num(value)} ({c['delta']:+.4f})"
    return f"[bold]{text}[/bold]" if (lo > 0 or hi < 0) else text


def ablation_table(metrics: Mapping[str, Any], rows: list[dict]) -> Table:
    """Compact terminal table (the markdown has the intervals): Δ vs two-tower in brackets,
    bold when its 95% interval excludes 0."""
    t = Table(title=f"GESR ablation ({metrics['data']['name']}, ESR keeps {metrics['budgets']['esr']}"
                    f" of {metrics['budgets']['retrieval']})", title_justify="left")
    for i, c in enumerate(("variant", "ESR recall (Δ)", "NDCG@10 (Δ)", "HR@10", "ESR p50/p99 ms",
                           "req/s (× 2T)", "oracle gain")):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        d = r["delta_vs_two_tower"]
        share = (r.get("share_of_oracle_gain") or {}).get("recall@esr")
        lat = r["esr_latency_ms"]
        t.add_row(
            r["variant"], _with_delta(r["esr_recall"], d.get("recall@esr")),
            _with_delta(r["ndcg@10"], d.get("ndcg@10")), _num(r["hr@10"]),
            f"{_num(lat['p50'], 1)}/{_num(lat['p99'], 1)}",
            f"{_num(r['throughput_rps'], 0)} ({_num(r.get('throughput_vs_two_tower'), 2)})",
            "-" if share is None else f"{share:.0%}",
        )
    return t


def write_ablation(folder: Path, metrics: Mapping[str, Any], rows: list[dict]) -> tuple[Path, Path]:
    """ablation.md and ablation.json in `folder`, each written atomically."""
    md, js = folder / "ablation.md", folder / "ablation.json"
    atomic_write_bytes(md, ablation_markdown(metrics, rows).encode())
    record = {"format": "cascade-ablation/1", "name": metrics.get("name"), "data": metrics["data"],
              "budgets": metrics["budgets"], "device": metrics.get("device"),
              "no_esr_cut": no_esr_cut(metrics), "rows": rows}
    atomic_write_bytes(js, json.dumps(record, indent=2).encode())
    return md, js
