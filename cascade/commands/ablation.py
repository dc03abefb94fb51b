"""`cascade ablation`: the paper-style GESR ablation table as one command (see
`cascade.ablation`).

    cascade ablation                                   # synthetic data with a strong cross signal
    cascade ablation --data ml-100k
    cascade ablation --config experiments/configs/ablation.toml
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape


def register(app: typer.Typer) -> None:
    @app.command("ablation")
    def ablation(
        config: Annotated[Path | None, typer.Option("--config", help="Ablation TOML (a RunConfig plus gesr / twotower / oracles tables).")] = None,
        data: Annotated[str | None, typer.Option(help="Dataset (default: synthetic:small with a strong cross signal).")] = None,
        split: Annotated[str | None, typer.Option(help="loo (leave-one-out) or temporal.")] = None,
        max_requests: Annotated[int | None, typer.Option(help="Cap on validation and test requests (seeded sample).")] = None,
        retrieval_k: Annotated[int | None, typer.Option(help="Candidates retrieval passes on (default: ~15% of the catalogue, 50..1000).")] = None,
        esr_k: Annotated[int | None, typer.Option(help="Candidates the ESR passes on (default: a tenth of retrieval's, at least 2 x final).")] = None,
        device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
        seed: Annotated[int | None, typer.Option(help="Seed for training and sampling.")] = None,
        out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<time>-ablation).")] = None,
        cache_dir: Annotated[Path | None, typer.Option(help="Trained-stage cache.")] = None,
        retrain: Annotated[bool, typer.Option("--retrain", help="Ignore cached checkpoints.")] = False,
        no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars or log lines.")] = False,
    ) -> None:
        """GESR ablation: two-tower, +HMA, +self attention, +cross attention, +MLPG, as ESR
        variants of one run; prints the table and writes ablation.md / ablation.json."""
        from cascade.ablation import ablation_rows, ablation_table, build_ablation_config, write_ablation
        from cascade.commands.run import execute, write_report_into

        def extras(folder: Path, metrics: dict) -> None:  # inside the run folder, before it appears
            write_report_into(folder, metrics)
            write_ablation(folder, metrics, ablation_rows(metrics))

        console, result = execute(
            lambda: build_ablation_config(config, dict(
                data=data, split=split, max_requests=max_requests, retrieval_k=retrieval_k,
                esr_k=esr_k, device=device, seed=seed,
                out=out, cache_dir=cache_dir, retrain=retrain or None,
            )),
            no_progress, extras,
        )
        console.print(ablation_table(result.metrics, ablation_rows(result.metrics)))
        if result.path is not None:
            console.print(f"saved to [bold]{escape(str(result.path))}[/bold] (ablation.md, "
                          "ablation.json)", soft_wrap=True)
