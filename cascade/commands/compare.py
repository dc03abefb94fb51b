"""`cascade compare`, `cascade report` and `cascade sweep`: reading saved runs side by side, a
run's report.md, and budget sweeps under a latency budget. Command bodies are short; the work is
in `cascade.compare`, `cascade.report` and `cascade.sweep`."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer



class Format(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"
    csv = "csv"


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders; the first is the reference.")],
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Folder for comparison.md/.json and the figures."),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples for the paired 95% intervals.", min=100)
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resampling.", min=0)] = 0,
) -> None:
    """Put saved runs side by side (funnel recall, final metrics, latency, throughput).

    Every ESR variant of every run is a column. When runs replayed the same traffic, each shows
    paired per-request deltas with bootstrap 95% intervals against the first run's primary
    variant; otherwise only the unpaired summaries, and the output says why."""
    from cascade import compare as cmp

    c = cmp.compare_runs(cmp.read_runs(runs), n_boot=bootstrap, seed=seed)
    written = cmp.write_comparison(c, out) if out is not None else []
    if fmt is Format.json:
        typer.echo(json.dumps(c.to_json(), indent=2))
    elif fmt is Format.csv:
        typer.echo(cmp.to_csv(c), nl=False)
    elif fmt is Format.markdown:
        typer.echo(cmp.to_markdown(c), nl=False)
    else:
        from rich.console import Console

        con = Console(emoji=False)
        con.print(cmp.to_rich(c))
        for note in c.notes:
            con.print(f"- {note}", highlight=False)
    if written:
        typer.echo(f"wrote {len(written)} files to {out}", err=fmt is not Format.table)


def report(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
) -> None:
    """(Re)draw a run's figures and write its report.md."""
    from cascade.report import write_report

    path = write_report(run)
    typer.echo(f"wrote {path}")


def _ints(values: Optional[list[str]], option: str) -> list[int] | None:
    """Repeated options and comma lists alike: --retrieval-k 100,200 --retrieval-k 400."""
    if not values:
        return None
    out = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise ValueError(f"{option}: {part!r} is not an integer") from None
    return out


def _esr_specs(esrs: list[str]):
    """One ESR variant per --esr, labelled by its name (the class name for 'module:Class')."""
    from cascade.config import StageSpec

    short = [e.split(":")[-1] for e in esrs]
    labels = [sh if short.count(sh) == 1 else e for sh, e in zip(short, esrs)]
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise ValueError(f"--esr: {dup} given more than once")
    return tuple(StageSpec(stage=e, label=lab) for e, lab in zip(esrs, labels))


def sweep(
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="RunConfig TOML file (flags override it).")] = None,
    data: Annotated[Optional[str], typer.Option(
        help="ml-100k, a path, or synthetic[:tiny|small|medium|large].")] = None,
    esr: Annotated[Optional[list[str]], typer.Option(
        help="An ESR choice (repeat for several): twotower, gesr, popular, module:Class.")] = None,
    retrieval: Annotated[Optional[str], typer.Option(help="Retrieval stage.")] = None,
    lsr: Annotated[Optional[str], typer.Option(help="Late-stage ranker.")] = None,
    retrieval_k: Annotated[Optional[list[str]], typer.Option(
        help="Retrieval budgets: repeat or comma-separate, e.g. 100,200,400.")] = None,
    esr_k: Annotated[Optional[list[str]], typer.Option(
        help="ESR budgets: repeat or comma-separate, e.g. 20,50.")] = None,
    final_k: Annotated[Optional[int], typer.Option(help="Final list length (default 10).")] = None,
    p99_ms: Annotated[Optional[float], typer.Option(
        help="Full-funnel p99 latency budget (ms per batch): name the best configuration "
             "under it.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Folder for sweep.json/.csv/.md and the figure.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
    index: Annotated[Optional[str], typer.Option(help="FAISS index_factory string.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for training and sampling.")] = None,
    max_requests: Annotated[Optional[int], typer.Option(
        help="Cap on validation and test requests (seeded sample).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Replay batch size.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Trained-stage cache.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress output.")] = False,
    backend: Annotated[Optional[str], typer.Option(
        help="Where replay runs: inprocess (default) or ray (each budget point a task).")] = None,
    ray_address: Annotated[Optional[str], typer.Option(
        help="With --backend ray: auto, ray://host:port or host:port (default: a local Ray).")] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="With --backend ray: replay workers (default one per CPU).")] = None,
) -> None:
    """Sweep retrieval K x ESR K for one or more ESRs under a latency budget.

    Every stage is fitted once and the test traffic replayed per budget pair. Prints NDCG@10
    against full-funnel p99 latency, the non-dominated frontier and, with --p99-ms, the best
    configuration whose p99 stays under that budget."""
    from cascade import sweep as sw
    from cascade.config import config_with_overrides

    err = typer.echo if fmt is Format.table else (lambda m: typer.echo(m, err=True))
    r_ks = _ints(retrieval_k, "--retrieval-k")
    e_ks = _ints(esr_k, "--esr-k")
    if r_ks is None or e_ks is None:
        raise ValueError("sweep needs --retrieval-k and --esr-k (one or more values each)")
    cfg = config_with_overrides(config, dict(
        data=data, retrieval=retrieval, lsr=lsr, final_k=final_k, index=index,
        device=device, seed=seed, max_requests=max_requests, batch_size=batch_size,
        cache_dir=cache_dir, esr_variants=_esr_specs(esr) if esr else None,
        backend=backend, ray_address=ray_address, workers=workers,
    ))
    res = sw.run_sweep(cfg, retrieval_ks=r_ks, esr_ks=e_ks, budget_ms=p99_ms,
                       progress=not no_progress,
                       log=None if no_progress else (lambda m: err(m)))
    written = sw.write_sweep(res, out) if out is not None else []
    if fmt is Format.json:
        typer.echo(json.dumps(res.to_json(), indent=2, default=str))
    elif fmt is Format.csv:
        typer.echo(sw.to_csv(res), nl=False)
    elif fmt is Format.markdown:
        typer.echo(sw.to_markdown(res), nl=False)
    else:
        from rich.console import Console

        con = Console(emoji=False)
        con.print(sw.to_rich(res))
        front = ", ".join(f"{r['label']}" for r in res.frontier.iter_rows(named=True))
        con.print(f"frontier (fastest first): {front}", highlight=False)
        if res.verdict():
            con.print(res.verdict(), style="bold", highlight=False)
        for n in res.notes:
            con.print(f"- {n}", highlight=False)
    if written:
        typer.echo(f"wrote {len(written)} files to {out}", err=fmt is not Format.table)


def _help(fn) -> str:
    """The docstring with each paragraph on one line: rich help keeps single newlines, which
    would break the text at the source's line ends."""
    import inspect

    paras = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paras)


def register(app: typer.Typer) -> None:
    for name, fn in (("compare", compare), ("report", report), ("sweep", sweep)):
        app.command(name, help=_help(fn))(fn)
