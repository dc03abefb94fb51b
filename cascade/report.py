"""`report.md`: a run folder a person can read without opening JSON.

`write_report(run_dir)` reads a finished run folder (format "cascade-run/1", see
`cascade.records`), draws its figures into `figures/` (funnel and per-stage latency, each PNG
beside the CSV it was drawn from) and writes `report.md`: the configuration in words, the funnel
table (every stage named, with its K, recall and latency), per-stage latency, the final metrics,
the in-run comparison of the primary ESR against the baseline with its paired bootstrap
interval, the reference points, the breakdowns, the figures as relative image links, and the
environment.

Everything is written atomically (temporary file, then rename). Drawing a figure may fail
(a broken matplotlib, an odd run) without losing anything: the report says which figure is
missing and why, and the run's metrics are never touched.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import polars as pl

from cascade.compare import FUNNEL_STAGE, Run, read_run
from cascade.figures import write_atomic

FIGURES = (
    ("funnel", "Recall after each stage of the funnel, one line per ESR variant."),
    ("latency", "Latency per batch of each stage and of the whole funnel (box p25-p75, "
                "whiskers p1 and p99, dot the mean), one box per ESR variant."),
)


def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "-"
        return f"{x:.{digits}f}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_f(v, digits) for v in x) + "]"
    return str(x)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_f(c, digits) if not isinstance(c, str) else c
                                        for c in r) + " |")
    return "\n".join(lines) + "\n"


def _dict_table(obj: Any, key_name: str) -> str:
    """A dict of dicts as a table (outer keys = rows), a dict of numbers as two columns."""
    if not isinstance(obj, dict) or not obj:
        return f"{_f(obj)}\n"
    if all(isinstance(v, dict) for v in obj.values()):
        cols = list(dict.fromkeys(k for v in obj.values() for k in v))
        if all(not isinstance(v.get(c), (dict, list)) for v in obj.values() for c in cols):
            return md_table([key_name, *cols], ([k, *[v.get(c) for c in cols]]
                                                for k, v in obj.items()))
    if all(not isinstance(v, dict) for v in obj.values()):
        return md_table([key_name, "value"], ([k, v] for k, v in obj.items()))
    return "\n".join(f"- {k}: {_f(v)}" for k, v in obj.items()) + "\n"


def _stage_spec(run: Run, stage: str, variant: str) -> str:
    """The stage implementation's name (e.g. `twotower`, `gesr`), from metrics or config."""
    if stage == "esr":
        spec = run.metrics["variants"][variant].get("esr")
        if spec:
            return str(spec)
    cfg = run.config
    for where in (cfg.get("stages", {}), cfg):
        v = where.get(stage) if isinstance(where, dict) else None
        if isinstance(v, str):
            return v
        if isinstance(v, dict):
            for key in ("spec", "name", "stage"):
                if isinstance(v.get(key), str):
                    return v[key]
    return "?"


def _index_spec(cfg: dict[str, Any]) -> str | None:
    for where in (cfg, cfg.get("retrieval"), cfg.get("stages", {}).get("retrieval")):
        if isinstance(where, dict) and isinstance(where.get("index"), str):
            return where["index"]
    return None


def _config_words(run: Run) -> str:
    m, cfg = run.metrics, run.config
    data, budgets = m["data"], m["budgets"]
    lines = []
    src = f" from `{data['source']}`" if data.get("source") else ""
    fp = f", fingerprint `{data['fingerprint']}`" if data.get("fingerprint") else ""
    lines.append(
        f"- **Data**: `{data.get('name', '?')}`{src}{fp}; split `{data.get('split', '?')}`; "
        f"{_f(data.get('n_requests'))} test requests replayed (traffic key "
        f"`{data['traffic_key']}`: runs with the same key replayed the same requests)."
    )
    v0 = run.primary
    names = run.stage_names(v0)
    ks = {s["name"]: s["k"] for s in run.stages(v0)}
    parts = []
    for i, s in enumerate(names):
        spec = "the ESR" if s == "esr" else f"`{_stage_spec(run, s, v0)}`"
        if i == 0:
            index = _index_spec(cfg)
            idx = f" (FAISS index `{index}`)" if index else ""
            parts.append(f"{s} {spec}{idx} keeps the top {_f(ks[s])} items")
        elif i == len(names) - 1:
            parts.append(f"{s} {spec} returns the final {_f(ks[s])}")
        else:
            parts.append(f"{s} ({spec}) keeps {_f(ks[s])}")
    lines.append(
        f"- **Funnel**: {' → '.join(parts)} (budgets: "
        + ", ".join(f"{k} {_f(v)}" for k, v in budgets.items()) + ")."
    )
    roles = {m.get("primary"): "primary", m.get("baseline"): "baseline"}
    lines.append(
        "- **ESR variants**: "
        + ", ".join(
            f"`{v}` ({roles.get(v, 'variant')}, stage `{_stage_spec(run, 'esr', v)}`)"
            for v in run.variants
        )
        + "."
    )
    extra = [f"{k} `{cfg[k]}`" for k in ("seed", "device", "batch_size", "max_len")
             if k in cfg and not isinstance(cfg[k], dict)]
    hist = cfg.get("history", {})
    if isinstance(hist, dict) and "max_len" in hist:
        extra.append(f"history max_len `{hist['max_len']}`")
    if extra:
        lines.append("- **Run**: " + ", ".join(extra) + ".")
    lines.append("\nThe full resolved configuration is in [config.toml](config.toml); every number "
                 "below is in [metrics.json](metrics.json), per request in requests.parquet and per "
                 "batch in latency.parquet.")
    return "\n".join(lines) + "\n"


def _funnel_section(run: Run) -> str:
    rows = []
    for v in run.variants:
        for s in run.stages(v):
            lat = s.get("latency_ms") or {}
            rows.append([f"`{v}`", f"{s['name']} (`{_stage_spec(run, s['name'], v)}`)", s["k"],
                         s["recall"], s.get("survival"), _f(lat.get("p50"), 3),
                         _f(lat.get("p99"), 3)])
    out = md_table(["variant", "stage", "K", "recall", "survival", "p50 ms", "p99 ms"], rows)
    return out + (
        "\n*recall*: share of requests whose target is still among the stage's output; "
        "*survival*: share of the targets that entered the stage and left it.\n"
    )


def _latency_section(run: Run) -> str:
    from cascade.figures import latency_stats, run_latency_frame

    stats = latency_stats(run_latency_frame(run))
    rows = []
    per_req = {}
    for v in run.variants:
        for s in run.stages(v):
            per_req[(v, s["name"])] = (s.get("latency_per_request_ms") or {}).get("p99")
    for r in stats.iter_rows(named=True):  # one row per (variant, stage)
        stage = "full funnel" if r["stage"] == FUNNEL_STAGE else r["stage"]
        rows.append([f"`{r['series']}`", stage, r["n"], r["p50"], r["mean"], r["p99"], r["max"],
                     per_req.get((r["series"], r["stage"]))])
    return md_table(
        ["variant", "stage", "batches", "p50 ms", "mean ms", "p99 ms", "max ms",
         "p99 ms / request"], rows, digits=3,
    )


def _final_section(run: Run) -> str:
    finals = run.final_names()
    rows = []
    for v in run.variants:
        vm = run.metrics["variants"][v]
        rows.append([f"`{v}`", *[vm["final"].get(k) for k in finals],
                     vm.get("consistency@10"), _f(vm.get("throughput_rps"), 1)])
    return md_table(["variant", *finals, "consistency@10", "throughput req/s"], rows)


def _comparison_section(run: Run) -> str | None:
    comp = run.metrics.get("comparison") or {}
    if not comp:
        return None
    rows = []
    for metric, c in comp.items():
        ci = c.get("ci95") or [None, None]
        lo, hi = ci[0], ci[1]
        sig = "-"
        if lo is not None and hi is not None:
            sig = "yes" if (lo > 0 or hi < 0) else "no"
        rows.append([metric, f"`{c.get('variant')}`", f"`{c.get('baseline')}`", c.get("delta"),
                     lo, hi, sig])
    return md_table(["metric", "variant", "baseline", "delta", "95% CI low", "95% CI high",
                     "CI excludes 0"], rows) + (
        "\nDeltas are variant minus baseline over the same requests, with paired bootstrap 95% "
        "confidence intervals.\n"
    )


def _breakdowns(run: Run) -> str:
    out = []
    for key, title, col in (("funnel_loss", "Where the target is lost", "stage"),
                            ("by_history_length", "By history length", "history length"),
                            ("by_popularity", "By target popularity", "popularity bucket")):
        parts = []
        for v in run.variants:
            obj = run.metrics["variants"][v].get(key)
            if obj:
                parts.append(f"**`{v}`**\n\n{_dict_table(obj, col)}")
        if parts:
            out.append(f"### {title}\n\n" + "\n".join(parts))
    return "\n".join(out)


def _references(run: Run) -> str | None:
    ref = run.metrics.get("reference") or {}
    if not ref:
        return None
    words = {"lsr_full_catalogue": "LSR over the whole catalogue (no funnel: the ceiling the "
                                   "funnel loses against)",
             "most_popular": "most popular items (the floor)"}
    cols = list(dict.fromkeys(k for v in ref.values() if isinstance(v, dict) for k in v))
    rows = [[words.get(k, k), *[(v or {}).get(c) for c in cols]] for k, v in ref.items()]
    return md_table(["reference", *cols], rows)


def _environment(run: Run) -> str | None:
    env = run.env
    if not env:
        return None
    lines = []
    for k, v in env.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        elif isinstance(v, list):
            v = " ".join(str(x) for x in v)
        lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


def render_report(run: Run, figures: dict[str, str | None]) -> str:
    """The report's markdown. `figures` maps figure name -> relative PNG path, or None with the
    reason it is missing under the key name + ':error'."""
    m = run.metrics
    created = f" ({m['created']})" if m.get("created") else ""
    out = [f"# cascade run `{run.name}`{created}\n"]
    stages = " → ".join(run.stage_names())
    out.append(
        f"A recommendation funnel {stages} replayed over "
        f"{_f(m['data'].get('n_requests'))} test requests, with "
        f"{len(run.variants)} early-stage ranker variant(s): "
        + ", ".join(f"`{v}`" for v in run.variants) + ".\n"
    )
    out.append("## Configuration\n\n" + _config_words(run))

    def fig(name: str, caption: str) -> str:
        if figures.get(name):
            return f"\n![{caption}]({figures[name]})\n\n*{caption}* Data: " \
                   f"[{Path(figures[name]).with_suffix('.csv').as_posix()}]" \
                   f"({Path(figures[name]).with_suffix('.csv').as_posix()}).\n"
        err = figures.get(f"{name}:error")
        return f"\n*Figure `{name}` could not be drawn: {err}*\n" if err else ""

    captions = dict(FIGURES)
    out.append("## Funnel\n\n" + _funnel_section(run) + fig("funnel", captions["funnel"]))
    out.append("## Latency per stage\n\nMilliseconds per batch of requests; *full funnel* is "
               "every stage of a batch summed, what a request waits for end to end.\n\n"
               + _latency_section(run) + fig("latency", captions["latency"]))
    out.append("## Final metrics\n\n" + _final_section(run))
    comp = _comparison_section(run)
    if comp:
        out.append(f"## Comparison: `{m.get('primary')}` against `{m.get('baseline')}`\n\n" + comp)
    refs = _references(run)
    if refs:
        out.append("## References\n\n" + refs)
    br = _breakdowns(run)
    if br:
        out.append("## Breakdowns\n\n" + br)
    env = _environment(run)
    if env:
        out.append("## Environment\n\n" + env)
    return "\n".join(out)


def write_report(run_dir: str | Path) -> Path:
    """Draw the run's figures and write `report.md` into `run_dir`; returns its path.

    Raises `DataError` when `run_dir` is not a complete run folder. A figure that fails to draw
    is reported inside report.md instead of raising."""
    from cascade import figures as figs

    run = read_run(run_dir)
    fig_dir = run.path / "figures"
    drawn: dict[str, str | None] = {}
    drawers = {
        "funnel": lambda: figs.funnel_figure(
            figs.run_funnel_table(run), fig_dir / "funnel.png",
            title=f"Recall through the funnel: {run.name}"),
        "latency": lambda: figs.latency_figure(
            figs.latency_stats(figs.run_latency_frame(run)), fig_dir / "latency.png",
            title=f"Latency per batch, by stage: {run.name}"),
    }
    for name, draw in drawers.items():
        try:
            draw()
            drawn[name] = f"figures/{name}.png"
        except Exception as e:  # noqa: BLE001 - a figure must never cost the run its report
            drawn[f"{name}:error"] = f"{type(e).__name__}: {e}"
    text = render_report(run, drawn)
    path = run.path / "report.md"
    write_atomic(path, text.encode())
    return path

