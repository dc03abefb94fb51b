"""`report.md`: a run folder a person can read without opening JSON.

`write_report(run_dir)` reads a finished run folder (see
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

from cascade.compare import entry_values
from cascade.metrics import FUNNEL_STAGE
from cascade.records import Run, read_run
from cascade.metrics import final_metrics
from cascade.util.fsio import atomic_write_bytes

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


def _stage_spec(run: Run, stage: str, variant: str) -> str:
    """The implementation behind a funnel stage of a variant (e.g. `twotower`, `gesr`): the
    stage entry in metrics.json, else metrics["stages"], else config.toml."""
    for s in run.stages(variant):
        if s["name"] == stage and isinstance(s.get("stage"), str):
            return s["stage"]
    if stage == "esr" and isinstance(run.metrics["variants"][variant].get("esr"), str):
        return run.metrics["variants"][variant]["esr"]
    declared = run.metrics.get("stages") or {}
    spec = declared.get(stage)
    if stage == "esr" and isinstance(spec, dict):
        spec = spec.get(variant)
    for v in (spec, run.config.get(stage)):
        if isinstance(v, str):
            return v
        if isinstance(v, dict) and isinstance(v.get("stage"), str):
            return v["stage"]
    return "?"


def _config_words(run: Run) -> str:
    m, cfg = run.metrics, run.config
    data = m["data"]
    src = f" from `{data['source']}`" if data.get("source") else ""
    size = ""
    if data.get("n_users") is not None:
        size = (f" ({_f(data.get('n_users'))} users, {_f(data.get('n_items'))} items, "
                f"{_f(data.get('n_events'))} events)")
    lines = [
        f"- **Data**: `{data.get('name', '?')}`{src}{size}, fingerprint "
        f"`{data.get('fingerprint', '?')}`; split `{data.get('split', '?')}`; "
        f"{_f(data.get('n_requests'))} test requests replayed (traffic key "
        f"`{data['traffic_key']}`: runs with the same key replayed the same requests)."
    ]
    v0 = run.primary
    stages = run.stages(v0)
    parts = []
    for i, st in enumerate(stages):
        name, k = st["name"], _f(st["k"])
        spec = f"`{_stage_spec(run, name, v0)}`" if name != "esr" else "(the ESR variant)"
        if i == 0:
            index = cfg.get("index")
            extra = [f"FAISS index `{index}`"] if index else []
            if data.get("exclude_seen") is not None:
                extra.append("seen items excluded" if data["exclude_seen"]
                             else "seen items allowed")
            extra_s = f" ({', '.join(extra)})" if extra else ""
            parts.append(f"{name} {spec}{extra_s} keeps the top {k} items")
        elif i == len(stages) - 1:
            parts.append(f"{name} {spec} returns the final {k}")
        else:
            parts.append(f"{name} {spec} keeps {k}")
    lines.append(f"- **Funnel**: {' → '.join(parts)}.")
    roles = {m.get("primary"): "primary", m.get("baseline"): "baseline"}
    lines.append(
        "- **ESR variants** (each scores the same retrieved candidates and feeds the same "
        "LSR): " + ", ".join(
            f"`{v}` ({roles.get(v, 'variant')}, stage `{_stage_spec(run, 'esr', v)}`"
            + (f", config `{run.metrics['variants'][v]['esr_config']}`"
               if run.metrics["variants"][v].get("esr_config") else "") + ")"
            for v in run.variants
        ) + "."
    )
    extra = []
    for key, words in (("seed", "seed"), ("device", "device"), ("batch_size", "replay batch size"),
                       ("max_len", "history length"), ("warmup", "untimed warm-up batches"),
                       ("bootstrap", "bootstrap resamples")):
        val = m.get(key, cfg.get(key)) if key in ("seed", "device") else cfg.get(key)
        if val is None and key == "max_len":
            val = data.get("max_len")
        if val is not None and not isinstance(val, dict):
            extra.append(f"{words} {val}")
    if extra:
        lines.append("- **Run**: " + ", ".join(extra) + ".")
    lines.append("\nThe full resolved configuration is in [config.toml](config.toml); every "
                 "number below is in [metrics.json](metrics.json), per request in "
                 "`requests.parquet` and per batch in `latency.parquet`.")
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


def _concurrency(run: Run) -> str:
    """One sentence when replay ran on several workers at once (`execution` in metrics.json)."""
    ex = run.metrics.get("execution")
    if not isinstance(ex, dict) or ex.get("backend") != "ray":
        return ""
    nodes = ex.get("nodes") if isinstance(ex.get("nodes"), list) else []
    hosts = ", ".join(str(n.get("hostname")) for n in nodes if isinstance(n, dict))
    return (f" Replay ran on {ex.get('workers')} Ray workers at once on {len(nodes)} node(s)"
            f"{f' ({hosts})' if hosts else ''}; each timed its own batches, so per-stage latency "
            "under concurrency is per worker, with the workers sharing their node's cores.")


def _final_section(run: Run) -> str:
    finals = [m for m in final_metrics() if m.key in run.final_names()]
    rows = []
    for v in run.variants:
        vm = run.metrics["variants"][v]
        share = vm.get("vs_lsr_full_catalogue") or {}
        rows.append([f"`{v}`", *[vm["final"].get(m.key) for m in finals],
                     _f(vm.get("throughput_rps"), 1), *[share.get(m.key) for m in finals]])
    out = md_table(["variant", *[m.label for m in finals], "throughput req/s",
                    *[f"{m.label} / LSR alone" for m in finals]], rows)
    return out + ("\n*/ LSR alone*: the funnel's value over that of the LSR scoring "
                  "the whole catalogue, both on the requests the reference scored (see References).\n")


def _comparison_section(run: Run) -> str | None:
    comps = run.metrics.get("comparisons") or {}
    rows = []
    for label, comp in comps.items():
        for metric, c in (comp or {}).items():
            lo, hi = (c.get("ci95") or [None, None])[:2]
            sig = "-" if lo is None or hi is None else ("yes" if (lo > 0 or hi < 0) else "no")
            rows.append([f"`{c.get('variant', label)}`", f"`{c.get('baseline')}`", metric,
                         c.get("delta"), lo, hi, sig])
    if not rows:
        return None
    return md_table(["variant", "baseline", "metric", "delta", "95% CI low", "95% CI high",
                     "CI excludes 0"], rows) + (
        "\nDeltas are variant minus baseline over the same requests (paired), with percentile "
        "bootstrap 95% confidence intervals over requests.\n"
    )


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k} "))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _breakdowns(run: Run) -> str:
    out = []
    for key, title, col in (("by_history_length", "By history length (earlier events of the "
                                                   "user)", "history"),
                            ("by_popularity", "By popularity of the target (head: the items "
                                              "making the first 50% of training events, torso "
                                              "the next 30%, tail the rest)", "popularity")):
        rows, cols = [], []
        for v in run.variants:
            obj = run.metrics["variants"][v].get(key) or {}
            for bucket, vals in obj.items():
                flat = _flat(vals) if isinstance(vals, dict) else {"value": vals}
                cols += [c for c in flat if c not in cols]
                rows.append((v, bucket, flat))
        if rows:
            out.append(f"### {title}\n\n" + md_table(
                ["variant", col, *cols],
                ([f"`{v}`", str(b), *[f.get(c) for c in cols]] for v, b, f in rows)))
    return "\n".join(out)


def _funnel_loss(run: Run) -> str | None:
    finals = [m for m in final_metrics() if m.key in run.final_names()]
    rows = []
    for v in run.variants:
        fl = run.metrics["variants"][v].get("funnel_loss")
        if not isinstance(fl, dict):
            continue
        orc = fl.get("oracle") or {}
        rows.append([f"`{v}`", *[x for m in finals for x in (orc.get(m.key), fl.get(m.key))],
                     fl.get("esr_cut_rate"), run.metrics["variants"][v].get("consistency@10")])
    if not rows:
        return None
    heads = [h for m in finals for h in (f"LSR on all retrieved: {m.label}",
                                         f"{m.label} lost to the ESR cut")]
    return md_table(["variant", *heads, "ESR cut rate", "consistency@10"], rows) + (
        "\nThe LSR scoring every retrieved candidate is what the funnel would return without "
        "the ESR's cut; the loss is that minus the funnel's result. *ESR cut rate*: of the "
        "targets the LSR would have put in its top 10, the share the ESR dropped. "
        "*consistency@10*: overlap of the ESR's top 10 with the LSR's top 10 over all retrieved.\n"
    )


def _training(run: Run) -> str | None:
    fits = run.metrics.get("training") or {}
    if not fits:
        return None
    rows = []
    for what, f in fits.items():
        rep = f.get("report") or {}
        rows.append([what.replace("esr:", "esr "), f"`{f.get('stage', '?')}`",
                     _f(f.get("seconds"), 2), "yes" if f.get("cached") else "no",
                     rep.get("epochs_run"), rep.get("best_valid")])
    return md_table(["stage", "implementation", "fit seconds", "from cache", "epochs",
                     "best validation"], rows)


def _references(run: Run) -> str | None:
    ref = run.metrics.get("reference") or {}
    if not ref:
        return None
    words = {"lsr_full_catalogue": "LSR over the whole catalogue (no funnel: the ceiling the "
                                   "funnel loses against)",
             "most_popular": "most popular items (the floor)"}
    cols = list(dict.fromkeys(k for v in ref.values() if isinstance(v, dict) for k in v))
    rows = [[words.get(k, k), *[(v or {}).get(c) for c in cols]]
            for k, v in ref.items() if isinstance(v, dict)]
    table = md_table(["reference", *cols], rows)
    n = ref.get("n_requests")
    if n is None or n == run.metrics["data"].get("n_requests"):
        return table
    return f"Scored on {n:,} evenly spaced test requests (`reference_requests`).\n\n{table}"


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


def _headline(run: Run) -> str:
    m = run.metrics
    prim, base = m.get("primary"), m.get("baseline")
    q = "ndcg@10" if "ndcg@10" in run.final_names() else run.final_names()[0]
    p99 = {v: entry_values(run, v).get(f"p99_ms@{FUNNEL_STAGE}") for v in run.variants}

    def one(v: str) -> str:
        return (f"`{v}` {q} {_f(m['variants'][v]['final'].get(q))}, full-funnel p99 "
                f"{_f(p99.get(v), 2)} ms per batch")
    text = "**Result**: " + "; ".join(one(v) for v in run.variants) + "."
    comp = ((m.get("comparisons") or {}).get(prim) or {}).get(q)
    if base and comp and comp.get("delta") is not None:
        lo, hi = comp["ci95"]
        verdict = ("better" if lo > 0 else "worse" if hi < 0 else
                   "not distinguishable (the interval contains 0)")
        text += (f" `{prim}` against `{base}`: {q} {comp['delta']:+.4f} "
                 f"[{lo:+.4f}, {hi:+.4f}] (paired bootstrap 95% CI): {verdict}.")
    return text + "\n"


def render_report(run: Run, figures: dict[str, str]) -> str:
    """The report's markdown. `figures` maps a figure name to its relative PNG path, or
    "<name>:error" to why it could not be drawn."""
    m = run.metrics
    created = f" ({m['created']})" if m.get("created") else ""
    names = [f"{s['name']} (`{_stage_spec(run, s['name'], run.primary)}`)"
             if s["name"] != "esr" else "esr" for s in run.stages(run.primary)]
    out = [f"# cascade run `{run.name}`{created}\n"]
    out.append(
        f"A recommendation funnel {' → '.join(names)} replayed over "
        f"{_f(m['data'].get('n_requests'))} test requests of `{m['data'].get('name', '?')}`, "
        f"with {len(run.variants)} early-stage ranker (ESR) variant(s): "
        + ", ".join(f"`{v}`" for v in run.variants) + ".\n"
    )
    out.append(_headline(run))
    out.append("## Configuration\n\n" + _config_words(run))

    def fig(name: str) -> str:
        caption = dict(FIGURES)[name]
        if figures.get(name):
            png = figures[name]
            csv = Path(png).with_suffix(".csv").as_posix()
            return f"\n![{caption}]({png})\n\n*{caption}* Drawn from [{csv}]({csv}).\n"
        err = figures.get(f"{name}:error")
        return f"\n*Figure `{name}` could not be drawn: {err}*\n" if err else ""

    out.append("## Funnel\n\n" + _funnel_section(run) + fig("funnel"))
    out.append("## Latency per stage\n\nMilliseconds per batch of requests (the shared "
               "retrieval is counted in every variant); *full funnel* is every stage of a batch "
               "summed, what a request waits for end to end." + _concurrency(run) + "\n\n"
               + _latency_section(run) + fig("latency"))
    out.append("## Final metrics\n\n" + _final_section(run))
    for title, section in (
        ("Comparison against the baseline", _comparison_section(run)),
        ("Funnel loss: what the ESR's cut costs", _funnel_loss(run)),
        ("References", _references(run)),
        ("Breakdowns", _breakdowns(run) or None),
        ("Training", _training(run)),
        ("Environment", _environment(run)),
    ):
        if section:
            out.append(f"## {title}\n\n{section}")
    return "\n".join(out)


def write_report(run_dir: str | Path) -> Path:
    """Draw the run's figures and write `report.md` into `run_dir`; returns its path.

    Raises `DataError` when `run_dir` is not a complete run folder. A figure that fails to draw
    is reported inside report.md instead of raising."""
    from cascade import figures as figs

    run = read_run(run_dir)
    fig_dir = run.path / "figures"
    drawn: dict[str, str] = {}
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
    atomic_write_bytes(path, text.encode())
    return path

