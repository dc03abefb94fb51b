"""`cascade run`: train (or load) the funnel's stages, replay the test traffic, print the funnel.

    cascade run --data ml-100k --esr gesr --esr-baseline twotower
    cascade run --config experiments/configs/ml100k.toml --seed 1

Command-line flags override the TOML. The table has one column per ESR variant and, with a
baseline, the paired delta (variant - baseline) with its bootstrap 95% interval.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cascade.config import config_with_overrides
from cascade.metrics import final_metrics


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _delta(c: dict | None) -> str:
    if not c or c.get("delta") is None:
        return ""
    lo, hi = c["ci95"]
    sig = lo is not None and hi is not None and (lo > 0 or hi < 0)
    text = f"{c['delta']:+.4f} ({lo:+.3f}, {hi:+.3f})"
    return f"[bold]{text}[/bold]" if sig else text


def funnel_table(metrics: dict) -> Table:
    """The funnel of a run's metrics.json as a rich table: one column per ESR variant and, with
    a baseline, the paired delta with its 95% interval (bold when it excludes 0)."""
    labels = list(metrics["variants"])
    primary, baseline = metrics.get("primary"), metrics.get("baseline")
    order = [x for x in (primary, baseline) if x in labels] + [
        x for x in labels if x not in (primary, baseline)
    ]
    comp = (metrics.get("comparisons") or {}).get(primary) or {}
    data = metrics["data"]
    title = (
        f"{metrics.get('name', '')}: {data['n_requests']:,} test requests, "
        f"budgets {metrics['budgets']['retrieval']} -> {metrics['budgets']['esr']} -> "
        f"{metrics['budgets']['final']}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("metric", no_wrap=True)
    for label in order:
        table.add_column(label + (" (base)" if label == baseline else ""), justify="right")
    if comp:
        table.add_column("Δ (95% CI)", justify="right", no_wrap=True)
    v = {label: metrics["variants"][label] for label in order}
    first = v[order[0]]
    comp_for_stage = {"esr": comp.get("recall@esr"), "lsr": comp.get("recall@final")}

    def row(name: str, values: list[str], delta: str = "", end_section: bool = False) -> None:
        table.add_row(name, *values, *([delta] if comp else []), end_section=end_section)

    stages = first["stages"]
    for i, s in enumerate(stages):
        row(
            f"recall@{s['k']} {s['name']}",
            [_fmt(v[x]["stages"][i]["recall"]) for x in order],
            _delta(comp_for_stage.get(s["name"])),
        )
    for i, s in enumerate(stages):
        row(
            f"survival {s['name']}",
            [_fmt(v[x]["stages"][i]["survival"]) for x in order],
            end_section=i == len(stages) - 1,
        )
    finals = final_metrics()
    for i, m in enumerate(finals):
        row(
            f"final {m.label}",
            [_fmt(v[x]["final"].get(m.key)) for x in order],
            _delta(comp.get(m.key)),
            end_section=i == len(finals) - 1,
        )
    if first.get("consistency@10") is not None:
        row("ESR-LSR consistency@10", [_fmt(v[x]["consistency@10"]) for x in order])
        for i, m in enumerate(finals):
            row(
                f"funnel loss {m.label}",
                [_fmt((v[x].get("funnel_loss") or {}).get(m.key)) for x in order],
                end_section=i == len(finals) - 1,
            )
    for i, s in enumerate(stages):
        for p in ("p50", "p95", "p99"):
            row(f"{s['name']} {p} ms/batch", [_ms(v[x]["stages"][i]["latency_ms"][p]) for x in order])
    for p in ("p50", "p95", "p99"):
        row(f"funnel {p} ms/batch", [_ms(v[x]["funnel_latency_ms"][p]) for x in order])
    row(
        "funnel p50 ms/request",
        [_ms(v[x]["funnel_latency_per_request_ms"]["p50"]) for x in order],
    )
    row("throughput requests/s", [_fmt(v[x]["throughput_rps"], 1) for x in order])
    return table


def reference_table(metrics: dict) -> Table | None:
    ref = metrics.get("reference")
    if not ref:
        return None
    n = ref.get("n_requests")
    on = f", {n:,} test requests" if n is not None else ""
    table = Table(title=f"reference points (no funnel: every catalogue item scored{on})", title_justify="left")
    keys = [m.key for m in final_metrics()]
    table.add_column("", justify="left")
    for m in final_metrics():
        table.add_column(m.label, justify="right")
    for name, key in (("LSR, full catalogue", "lsr_full_catalogue"), ("most popular", "most_popular")):
        r = ref.get(key) or {}
        table.add_row(name, *(_fmt(r.get(k)) for k in keys))
    for label, v in metrics["variants"].items():
        ratio = v.get("vs_lsr_full_catalogue")
        if ratio:
            same = v.get("final_on_reference_requests")
            if same:  # written only when the reference scored a subsample
                table.add_row(f"funnel ({label}), same requests", *(_fmt(same.get(k)) for k in keys))
            table.add_row(
                f"funnel ({label}) / LSR full",
                *(f"{ratio[k]:.1%}" if ratio.get(k) is not None else "-" for k in keys),
            )
    return table


def write_report_into(folder: Path, metrics: dict) -> None:
    """The run folder's report.md and figures, written before the folder is published."""
    from cascade.report import write_report

    write_report(folder)


def execute(
    make_config: Callable[[], Any], no_progress: bool,
    extras: Callable[[Path, dict], None] = write_report_into,
) -> tuple[Console, Any]:
    """Build the config and run the experiment, as `cascade run` and `cascade ablation` do:
    log lines (the budgets always); `extras` adds files to the run folder before it appears
    (the report by default). Errors reach the CLI's error boundary. Returns (console,
    RunResult)."""
    from cascade.experiment import run_experiment

    console = Console(emoji=False, highlight=False)

    def log(msg: str) -> None:
        # the budgets are part of the result: printed even with --no-progress
        if msg.startswith("budgets:"):
            console.print(escape(msg), soft_wrap=True)
        elif not no_progress:
            console.print(f"[dim]{escape(msg)}[/dim]", soft_wrap=True)

    return console, run_experiment(make_config(), progress=not no_progress, log=log,
                                   extras=extras)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        config: Annotated[Path | None, typer.Option("--config", help="RunConfig TOML file (flags override it).")] = None,
        data: Annotated[str | None, typer.Option(help="ml-100k, ml-1m, ..., a path, or synthetic[:tiny|small|medium|large] (default synthetic).")] = None,
        split: Annotated[str | None, typer.Option(help="loo (leave-one-out) or temporal.")] = None,
        esr: Annotated[str | None, typer.Option(help="Early-stage ranker: twotower (default), gesr, popular, or package.module:Class.")] = None,
        esr_baseline: Annotated[str | None, typer.Option(help="A second ESR on the same candidates; adds paired deltas with 95% CIs.")] = None,
        retrieval: Annotated[str | None, typer.Option(help="Retrieval stage (default twotower) or package.module:Class.")] = None,
        lsr: Annotated[str | None, typer.Option(help="Late-stage ranker (default lsr) or package.module:Class.")] = None,
        retrieval_k: Annotated[int | None, typer.Option(help="Candidates retrieval passes on (default: ~15% of the catalogue, 50..1000).")] = None,
        esr_k: Annotated[int | None, typer.Option(help="Candidates the ESR passes on (default: ~retrieval/4).")] = None,
        final_k: Annotated[int | None, typer.Option(help="Length of the final list (default 10).")] = None,
        index: Annotated[str | None, typer.Option(help="FAISS index_factory string for retrieval: Flat, IVF256,Flat, HNSW32, ...")] = None,
        device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
        seed: Annotated[int | None, typer.Option(help="Seed for training and sampling.")] = None,
        max_len: Annotated[int | None, typer.Option(help="History events per request the stages see (default 50).")] = None,
        max_requests: Annotated[int | None, typer.Option(help="Cap on validation and test requests (seeded sample).")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Replay batch size (default 256).")] = None,
        out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<time>-<name>).")] = None,
        name: Annotated[str | None, typer.Option(help="Run name.")] = None,
        cache_dir: Annotated[Path | None, typer.Option(help="Trained-stage cache (default $CASCADE_CACHE_DIR or ~/.cache/cascade/models).")] = None,
        retrain: Annotated[bool, typer.Option("--retrain", help="Ignore cached checkpoints and train again.")] = False,
        no_oracle: Annotated[bool, typer.Option("--no-oracle", help="Skip the LSR pass over every retrieved candidate.")] = False,
        oracle_requests: Annotated[int | None, typer.Option(help="Test requests the oracle pass (LSR over every retrieved candidate) scores (default 500, evenly spaced, the reference's; 0 = all).")] = None,
        no_reference: Annotated[bool, typer.Option("--no-reference", help="Skip the full-catalogue LSR and most-popular reference points.")] = False,
        reference_requests: Annotated[int | None, typer.Option(help="Test requests the full-catalogue reference scores (evenly spaced; default 500, fewer past 20,000 items: at most 10M request-item pairs; 0 = all).")] = None,
        no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars or log lines.")] = False,
        backend: Annotated[str | None, typer.Option(help="Where replay runs: inprocess (default) or ray (pip install -e \".[ray]\").")] = None,
        ray_address: Annotated[str | None, typer.Option(help="With --backend ray: auto, ray://host:port or host:port (default: start a local Ray).")] = None,
        workers: Annotated[int | None, typer.Option(help="With --backend ray: replay workers (default one per CPU of the Ray cluster).")] = None,
    ) -> None:
        """Train (or load) retrieval, the ESR(s) and the LSR, replay the test traffic through the
        funnel, print recall through it and per-stage latency, and save the run folder."""
        console, result = execute(
            lambda: config_with_overrides(
                config,
                dict(
                    data=data, split=split, esr=esr, esr_baseline=esr_baseline,
                    retrieval=retrieval, lsr=lsr, retrieval_k=retrieval_k, esr_k=esr_k,
                    final_k=final_k, index=index, device=device, seed=seed, max_len=max_len,
                    max_requests=max_requests, batch_size=batch_size, out=out, name=name,
                    cache_dir=cache_dir, retrain=retrain or None,
                    oracle=False if no_oracle else None,
                    reference=False if no_reference else None,
                    reference_requests=reference_requests, oracle_requests=oracle_requests,
                    backend=backend, ray_address=ray_address, workers=workers,
                ),
            ),
            no_progress,
        )
        console.print(funnel_table(result.metrics))
        ref = reference_table(result.metrics)
        if ref is not None:
            console.print(ref)
        if result.path is not None:
            console.print(f"saved to [bold]{escape(str(result.path))}[/bold]", soft_wrap=True)
