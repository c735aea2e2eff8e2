"""The `bpfree` command line."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bpfree.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train with backpropagation-free algorithms and measure them side by side with backprop.",
)
console = Console(stderr=True)
out = Console()


@contextmanager
def epoch_progress(label: str, enabled: bool = True):
    """A rich progress bar fed by the engine's per-epoch callback."""
    if not enabled:
        yield lambda info: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=None, status="")

        def update(info: dict[str, Any]) -> None:
            bar.update(
                task,
                total=info["total_epochs"],
                completed=info["epochs_run"],
                status=f"{info['phase']} ep {info['epoch']}  loss {info['train_loss']:.4f}  val {info['val_accuracy']:.4f}",
            )

        yield update


def format_bytes(value: float | None) -> str:
    if value is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def format_flops(value: float | None) -> str:
    if value is None:
        return "—"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def result_table(results: list[dict[str, Any]], title: str = "Results") -> Table:
    table = Table(title=title)
    for column in ("run", "algorithm", "model", "status", "test acc", "epochs", "train s", "eval s", "train FLOPs", "peak mem", "energy"):
        table.add_column(column)
    for r in results:
        energy = f"{r['energy_j']:.1f} J" if r.get("energy_j") is not None else "null"
        acc = f"{r['test_accuracy']:.4f}" if r.get("test_accuracy") is not None else "—"
        table.add_row(
            r["run_id"],
            r["algorithm"],
            r["model"],
            r["status"],
            acc,
            str(r["epochs_run"]),
            f"{r['train_time_s']:.1f}",
            f"{r['eval_time_s']:.1f}",
            format_flops(r.get("train_flops")),
            format_bytes(r.get("peak_memory_bytes")),
            energy,
        )
    return table


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="YAML config; flags override its fields"),
    algorithm: Optional[str] = typer.Option(None, "--algorithm", "-a", help="bp, mf, ff, cafo, noprop (see `bpfree list`)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="mnist5k (embedded), mnist, fashion_mnist, cifar10, cifar100"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="e.g. mlp:2x1000, cnn3"),
    epochs: Optional[int] = typer.Option(None, help="maximum epochs (per phase)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    optimizer: Optional[str] = typer.Option(None, help="adam, adamw or sgd"),
    patience: Optional[int] = typer.Option(None, help="early-stopping patience on validation accuracy"),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="directory with torchvision datasets"),
    download: Optional[bool] = typer.Option(None, "--download/--no-download", help="download missing datasets"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="results directory (default results/)"),
    set_: list[str] = typer.Option([], "--set", help="any field as key=value, e.g. params.schedule=layerwise"),
    keep_checkpoint: bool = typer.Option(False, help="keep checkpoint.pt after a completed run"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train one model with one algorithm and write <output>/<run_id>/result.json."""
    from bpfree.config import load_config
    from bpfree.runner import execute

    overrides = {
        "algorithm": algorithm,
        "dataset": dataset,
        "model": model,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "optimizer": optimizer,
        "patience": patience,
        "seed": seed,
        "device": device,
        "data_root": data_root,
        "download": download,
        "output": output,
    }
    cfg = load_config(config, overrides, set_)
    with epoch_progress(f"{cfg.algorithm} {cfg.model} {cfg.dataset} s{cfg.seed}", enabled=not quiet) as update:
        run_dir, result = execute(cfg, progress=update, keep_checkpoint=keep_checkpoint)
    out.print(result_table([result]))
    out.print(f"result: {run_dir / 'result.json'}")


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="an interrupted run's directory (holds config.json, checkpoint.pt)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Continue an interrupted run from its last checkpoint."""
    from bpfree.runner import resume as resume_run

    with epoch_progress(f"resume {run_dir.name}", enabled=not quiet) as update:
        path, result = resume_run(run_dir, progress=update)
    out.print(result_table([result]))
    out.print(f"result: {path / 'result.json'}")


@app.command("list")
def list_components() -> None:
    """List algorithms, datasets and model forms."""
    from bpfree.algorithms import algorithm_names, get_algorithm
    from bpfree.data import dataset_names
    from bpfree.models import model_names

    table = Table(title="Algorithms")
    table.add_column("name")
    table.add_column("paper")
    table.add_column("models")
    for name in algorithm_names():
        cls = get_algorithm(name)
        table.add_row(name, cls.paper, ", ".join(cls.model_families))
    out.print(table)
    out.print("Datasets: " + ", ".join(dataset_names()))
    out.print("Models: " + "; ".join(model_names()))


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; an interrupted run continues with `bpfree resume <run_dir>`")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
