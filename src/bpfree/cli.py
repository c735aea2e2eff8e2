"""The `bpfree` command line."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Optional, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bpfree import escape
from bpfree.errors import UserError
from bpfree.fileio import printable_path
from bpfree.history import HEARTBEAT_ENV
from bpfree.live import duration, json_line, text_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Train with backpropagation-free algorithms and measure them side by side with backprop.",
)


def _console(stderr: bool) -> Console:
    """A terminal gets rich's width; a log file or pipe (Slurm output) gets lines that are never cut."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=int(os.environ.get("BPFREE_LOG_WIDTH", "400")), soft_wrap=True)


console = _console(stderr=True)
out = _console(stderr=False)


class OutputFormat(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"


FORMAT_HELP = "table (terminal), markdown (pipe into a file or issue) or json (machine-readable)"


class LogFormat(str, Enum):
    auto = "auto"
    text = "text"
    json = "json"


LOG_FORMAT_HELP = "progress: auto (a bar on a terminal, one plain line per epoch otherwise), text (lines) or json (JSON lines)"
MLFLOW_HELP = "log each epoch as it ends to this MLflow tracking URI, e.g. sqlite:///mlflow.db or http://HOST:5000 (pip install 'bpfree[mlflow]')"
TENSORBOARD_HELP = "log each epoch as it ends to TensorBoard under DIR/<run_id> (pip install 'bpfree[tensorboard]')"
HEARTBEAT_HELP = "seconds between heartbeat lines inside long epochs (default 60, or $BPFREE_HEARTBEAT_S; 0: none)"


class LineLog:
    """Progress as lines for logs (Slurm output, nohup, CI): one per epoch, heartbeats, start and end.

    Each row of a run's history (:mod:`bpfree.history`) becomes one line, written whole and
    flushed (never cut or wrapped): plain text (:func:`bpfree.live.text_line`) or the row as
    JSON. Safe to call from several threads.
    """

    def __init__(self, as_json: bool = False, stream: TextIO | None = None) -> None:
        self.as_json = as_json
        self.stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()

    def __call__(self, row: dict[str, Any]) -> None:
        self._write(json_line(row) if self.as_json else text_line(row))

    def note(self, event: str, text: str, **fields: Any) -> None:
        """A line of the command itself (a plan, a failed run): plain text, or JSON with ``event`` and ``message``."""
        if self.as_json:
            self._write(json.dumps({"event": event, "time": time.time(), "message": text, **fields}, default=str))
        else:
            self._write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {escape.plain(text, one_line=True)}")

    def _write(self, line: str) -> None:
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def line_log(log_format: LogFormat, quiet: bool) -> LineLog | None:
    """Lines instead of a bar: asked for, or the progress stream is not a terminal; None with -q."""
    if quiet or (log_format is LogFormat.auto and sys.stderr.isatty()):
        return None
    return LineLog(as_json=log_format is LogFormat.json)


def set_heartbeat(seconds: Optional[float]) -> None:
    """Runs in worker processes and Slurm jobs read their heartbeat interval from the environment."""
    if seconds is not None:
        if seconds < 0:
            raise UserError(f"--heartbeat {seconds:g}: must be >= 0 (0: no heartbeats)")
        os.environ[HEARTBEAT_ENV] = repr(float(seconds))


def _version(value: bool) -> None:
    if value:
        from bpfree import __version__

        print(f"bpfree {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="log to stderr: -v info, -vv debug"),
) -> None:
    """Train with backpropagation-free algorithms and measure them side by side with backprop."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


class Interrupted(Exception):
    """Ctrl-C inside a command, carried past typer (which would turn it into a silent exit 130)."""


# What to tell the user if Ctrl-C arrives now; commands update it as they go.
_on_interrupt = {"message": "interrupted"}


def interruptible(command):
    """Turn Ctrl-C in a command body into ``Interrupted`` with the command's own advice."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _on_interrupt["message"] = "interrupted"
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted(_on_interrupt["message"]) from None

    return wrapper


def _announce_run(run_dir: Path, lines: LineLog | None = None) -> None:
    shown = printable_path(run_dir)
    if lines is not None and lines.as_json:
        lines.note("run_directory", f"run directory: {shown}", run_dir=shown)
    else:
        console.print(f"run directory: {escape.console(shown)}", highlight=False, soft_wrap=True)
    _on_interrupt["message"] = f"interrupted; continue with `bpfree resume {shown}`"


def step_status(info: dict[str, Any], elapsed: float) -> str:
    """The progress line for a step event: steps, rate, and the ETA of the epoch and of the run
    (the run's from the current rate, assuming every remaining epoch has this epoch's steps)."""
    rate = info["step"] / elapsed if elapsed > 0 else None
    status = f"{info['phase']} step {info['step']}/{info['steps']}"
    if rate:
        epoch_left = (info["steps"] - info["step"]) / rate
        run_left = epoch_left + (info["total_epochs"] - info["epochs_run"] - 1) * info["steps"] / rate
        status += f"  {rate:.1f} it/s  epoch ETA {epoch_left:.0f}s  run ETA {run_left:.0f}s"
    return status


@contextmanager
def epoch_progress(label: str, enabled: bool = True):
    """A rich progress bar fed by the engine's per-epoch callback.

    The bar appears with the first training step (steps, rate, ETA for the epoch and the run), so
    a run that fails while it is being set up (missing data, bad output directory) prints its
    one-line error and nothing else.
    """
    if not enabled:
        yield lambda info: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = bar.add_task(label, total=None, status="")
    clock: dict[str, Any] = {}

    def update(info: dict[str, Any]) -> None:
        import time

        if not bar.live.is_started:
            bar.start()
        now = time.perf_counter()
        if info.get("event") == "step":
            # Counts only (no device sync): the rate is of steps issued, which a bounded GPU queue keeps honest.
            if info["step"] == 1 or clock.get("epochs_run") != info["epochs_run"]:
                clock.update(start=now, epochs_run=info["epochs_run"])
            status = step_status(info, now - clock["start"])
            bar.update(task, total=info["total_epochs"], completed=info["epochs_run"] + info["step"] / max(1, info["steps"]), status=status)
            return
        bar.update(
            task,
            total=info["total_epochs"],
            completed=info["epochs_run"],
            status=f"{info['phase']} ep {info['epoch']}  loss {info['train_loss']:.4f}  val {info['val_accuracy']:.4f}",
        )

    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()


def result_data(results: list[dict[str, Any]], title: str = "Results"):
    from bpfree.report.render import TableData, fmt_bytes, fmt_flops

    columns = ["algorithm", "model", "status", "test acc", "epochs", "train s", "eval s", "train FLOPs", "peak mem", "energy"]
    rows = []
    for r in results:
        energy = f"{r['energy_j']:.1f} J" if r.get("energy_j") is not None else "null"
        acc = f"{r['test_accuracy']:.4f}" if r.get("test_accuracy") is not None else "—"
        rows.append([
            r["algorithm"],
            r["model"],
            r["status"],
            acc,
            str(r["epochs_run"]),
            f"{r['train_time_s']:.1f}",
            f"{r['eval_time_s']:.1f}",
            fmt_flops(r.get("train_flops")),
            fmt_bytes(r.get("peak_memory_bytes")),
            energy,
        ])
    return TableData(title, columns, rows)


def result_table(results: list[dict[str, Any]], title: str = "Results") -> Table:
    from bpfree.report.render import rich_table

    return rich_table(result_data(results, title))


def print_run(result: dict[str, Any], run_dir: Path, fmt: OutputFormat) -> None:
    from bpfree.report.render import markdown_table

    if fmt is OutputFormat.json:
        print(json.dumps({**result, "run_dir": str(run_dir)}, indent=2, allow_nan=False))
        return
    if fmt is OutputFormat.markdown:
        print(markdown_table(result_data([result])))
    else:
        out.print(result_table([result]))
    console.print(f"result: {run_dir / 'result.json'}", highlight=False)


@app.command()
@interruptible
def run(
    config: Optional[Path] = typer.Argument(None, help="YAML config; flags override its fields"),
    algorithm: Optional[str] = typer.Option(None, "--algorithm", "-a", help="bp, mf, ff, cafo, noprop, noprop-ct, noprop-fm (see `bpfree list`)"),
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
    eval_every: Optional[str] = typer.Option(
        None, "--eval-every", help="also evaluate inside epochs: '0.25 epoch' (every quarter epoch) or '200 steps'"
    ),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="directory with torchvision datasets"),
    download: Optional[bool] = typer.Option(None, "--download/--no-download", help="download missing datasets"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="results directory (default results/)"),
    set_: list[str] = typer.Option([], "--set", help="any field as key=value, e.g. params.schedule=layerwise"),
    keep_checkpoint: bool = typer.Option(False, help="keep checkpoint.pt after a completed run"),
    mlflow: Optional[str] = typer.Option(None, "--mlflow", help=MLFLOW_HELP),
    tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help=TENSORBOARD_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or progress lines"),
    log_format: LogFormat = typer.Option(LogFormat.auto, "--log-format", help=LOG_FORMAT_HELP),
    heartbeat: Optional[float] = typer.Option(None, "--heartbeat", help=HEARTBEAT_HELP),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help=FORMAT_HELP),
) -> None:
    """Train one model with one algorithm and write <output>/<run_id>/result.json (and its live history.jsonl)."""
    from bpfree.config import load_config, run_label
    from bpfree.runner import execute
    from bpfree.tracking import check_options

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
        "eval_every": eval_every,
        "data_root": data_root,
        "download": download,
        "output": output,
    }
    cfg = load_config(config, overrides, set_)
    tracking = check_options(mlflow, tensorboard)
    set_heartbeat(heartbeat)
    lines = line_log(log_format, quiet)
    with epoch_progress(run_label(cfg), enabled=not quiet and lines is None) as update:
        run_dir, result = execute(
            cfg, progress=update, keep_checkpoint=keep_checkpoint, step_progress=update,
            on_start=functools.partial(_announce_run, lines=lines), on_event=lines, heartbeat_s=heartbeat, tracking=tracking,
        )
    print_run(result, run_dir, fmt)


@app.command()
@interruptible
def resume(
    run_dir: Path = typer.Argument(..., help="an interrupted run's directory (holds config.json, checkpoint.pt)"),
    mlflow: Optional[str] = typer.Option(None, "--mlflow", help="MLflow tracking URI (default: where the run was tracked, continuing its MLflow run)"),
    tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help="TensorBoard folder (default: the run's, if it had one)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    log_format: LogFormat = typer.Option(LogFormat.auto, "--log-format", help=LOG_FORMAT_HELP),
    heartbeat: Optional[float] = typer.Option(None, "--heartbeat", help=HEARTBEAT_HELP),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help=FORMAT_HELP),
) -> None:
    """Continue an interrupted run from its last checkpoint."""
    from bpfree.runner import resume as resume_run
    from bpfree.tracking import check_options

    tracking = check_options(mlflow, tensorboard)
    set_heartbeat(heartbeat)
    lines = line_log(log_format, quiet)
    with epoch_progress(f"resume {escape.console(run_dir.name)}", enabled=not quiet and lines is None) as update:
        path, result = resume_run(
            run_dir, progress=update, step_progress=update, on_start=functools.partial(_announce_run, lines=lines),
            on_event=lines, heartbeat_s=heartbeat, tracking=tracking,
        )
    print_run(result, path, fmt)


@app.command()
@interruptible
def bench(
    dataset: str = typer.Option("mnist5k", help="dataset to time on"),
    epochs: int = typer.Option(3, min=1, help="timed epochs per case (after one warm-up epoch)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    only: list[str] = typer.Option([], "--only", help="restrict to these case labels or algorithms"),
    write: Optional[Path] = typer.Option(None, "--write", help="update the generated block of this BENCHMARKS.md"),
) -> None:
    """Throughput of each algorithm next to its BP twin, against the measured matmul peak."""
    from bpfree.bench import default_cases, markdown, run_bench, write_benchmarks_md
    from bpfree.build import resolve_device

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r}: choose auto, cpu or cuda")
    if write is not None:
        check_benchmarks_target(write)
    all_cases = default_cases(resolve_device(device))
    wanted = {name.lower() for name in only}
    cases = tuple(c for c in all_cases if not wanted or c.label.lower() in wanted or c.algorithm in wanted)
    if not cases:
        raise UserError(f"--only {' '.join(only)}: matches no case; cases are {', '.join(c.label for c in all_cases)}")
    with console.status("benchmarking") as status:
        report = run_bench(cases, dataset, epochs, device, progress=lambda text: status.update(f"benchmarking {text}"))
    command = "bpfree bench " + " ".join(sys.argv[2:])
    section = markdown(report, command.strip())
    print(section)
    if write is not None:
        write_benchmarks_md(write, section)
        out.print(f"updated {write}")


BENCH_START, BENCH_END = "<!-- bench:start -->", "<!-- bench:end -->"


def check_benchmarks_target(path: Path) -> None:
    """Refuse a --write target that cannot take the generated block, before anything is measured."""
    if path.is_dir():
        raise UserError(f"--write {path}: is a directory; name a Markdown file such as BENCHMARKS.md")
    if not path.exists():
        if not path.parent.is_dir():
            raise UserError(f"--write {path}: folder {path.parent} does not exist")
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--write {path}: cannot read it ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    starts, ends = text.count(BENCH_START), text.count(BENCH_END)
    if starts > 1 or ends > 1 or starts != ends or (starts and text.index(BENCH_END) < text.index(BENCH_START)):
        raise UserError(
            f"--write {path}: needs one {BENCH_START} followed by one {BENCH_END} (or neither); "
            f"found {starts} start and {ends} end markers"
        )


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


def plan_summary(plan) -> str:
    resume_n = sum(1 for t in plan.tasks if t.action == "resume")
    return (
        f"{plan.total} runs in {plan.output}: {len(plan.skipped)} already complete (skipped), "
        f"{resume_n} to resume, {len(plan.tasks) - resume_n} new"
        + (f", {len(plan.in_flight)} still queued or running in Slurm (left to their jobs)" if plan.in_flight else "")
    )


@contextmanager
def followed_runs(root: Path | None, lines: LineLog | None):
    """Log lines of runs that train elsewhere (worker processes, Slurm jobs, tune trials), read from
    their history files under ``root`` as they are appended; yields a function that starts it at a
    given root (when the root is known only later, e.g. a suite's output)."""
    from bpfree.protocol.status import HistoryFollower  # protocol pulls in torch: imported only by the commands that run

    followers: list[HistoryFollower] = []

    def follow(where: Path) -> None:
        if lines is not None and not followers:
            followers.append(HistoryFollower(Path(where), lines).start())

    if root is not None:
        follow(root)
    try:
        yield follow
    finally:
        for follower in followers:
            follower.stop()


@contextmanager
def runs_progress(enabled: bool = True, lines: LineLog | None = None):
    """Progress over the runs of a suite or comparison; yields (on_plan, on_done).

    On a terminal a rich bar over the runs; with ``lines`` (logs) the plan and failures as lines,
    and each run's epochs, heartbeats, start and end followed from its history file (the runs train
    in other processes or jobs, whose output is not this one's: reading the files they append to
    works the same for every executor, and one process writes every line, so lines never interleave).
    """
    state: dict[str, Any] = {}
    if not enabled:
        yield (lambda plan: None), (lambda task, outcome: None)
        return
    if lines is not None:
        with followed_runs(None, lines) as follow:

            def plan_lines(plan) -> None:
                lines.note("plan", plan_summary(plan), runs=plan.total, output=str(plan.output))
                follow(plan.output)

            def done_lines(task, outcome) -> None:
                if not outcome.get("ok"):
                    lines.note("run_failed", f"run failed: {task.label} ({task.run_dir}): {outcome.get('error')}", run=task.label)

            yield plan_lines, done_lines
        return
    with Progress(
        TextColumn("[bold]runs"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:

        def on_plan(plan) -> None:
            console.print(plan_summary(plan))
            state["task"] = bar.add_task("runs", total=len(plan.tasks), last="")

        def on_done(task, outcome) -> None:
            if outcome.get("ok"):
                acc = outcome.get("test_accuracy")
                last = f"{task.label}: {outcome.get('status')}" + (f" {acc:.4f}" if acc is not None else "")
            else:
                last = f"{task.label}: FAILED"
                console.print(f"[red]run failed[/red] {task.label} ({task.run_dir}): {outcome.get('error')}", highlight=False)
            if "task" in state:
                bar.update(state["task"], advance=1, last=last)

        yield on_plan, on_done


def print_report(report, full: bool = False, fmt: OutputFormat = OutputFormat.table) -> None:
    from bpfree.report.render import markdown_table, rich_table

    tables = report.tables if fmt is OutputFormat.json else report.tables[: (5 if full else 2)]
    if fmt is OutputFormat.json:
        payload = {
            "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows, "caption": t.caption} for t in tables],
            "notes": list(report.notes),
            "report": {"markdown": str(report.markdown), "html": str(report.html)},
        }
        print(json.dumps(payload, indent=2))
        return
    for data in tables:
        if fmt is OutputFormat.markdown:
            print(markdown_table(data) + "\n")
        else:
            out.print(rich_table(data))
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    from bpfree.fileio import printable_path

    console.print(f"report: {printable_path(report.markdown)}  {printable_path(report.html)}", highlight=False)


@app.command()
@interruptible
def compare(
    configs: list[Path] = typer.Option([], "--configs", "-c", help="config files or directories (default: configs/quick)"),
    dataset: list[str] = typer.Option([], "--dataset", "-d", help="run the comparison on these datasets (repeatable; default: each config's own)"),
    algorithm: list[str] = typer.Option([], "--algorithm", "-a", help="only these alternative algorithms (repeatable; default: all registered)"),
    seeds: int = typer.Option(3, "--seeds", help="number of seeds per configuration (at most 10000)"),
    first_seed: int = typer.Option(0, "--first-seed", help="seeds are first-seed, first-seed+1, ..."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="override every config's epoch budget (per phase)"),
    output: Path = typer.Option(Path("results/compare"), "--output", "-o", help="results directory (resumable: finished runs are kept)"),
    jobs: int = typer.Option(0, "--jobs", "-j", min=0, help="runs in parallel, each in its own process; 0 = auto (1 with a GPU or energy counter, else one per allocated CPU up to 4)"),
    executor: str = typer.Option("local", "--executor", help="local (processes), inline (this process), submitit-local, debug"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads per run (default: allocated CPUs / jobs)"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda (default: each config's)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="directory with torchvision datasets"),
    bp_config: Optional[Path] = typer.Option(None, "--bp-config", help="BP config whose optimizer/lr/weight_decay/momentum the derived BP twins use (e.g. a tuned one)"),
    set_: list[str] = typer.Option([], "--set", help="any field for every run as key=value"),
    budget: str = typer.Option("passes", "--budget", help="derived BP twin's epoch cap: passes (the alternative's total over all its phases) or epochs (its per-phase epochs)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or progress lines"),
    log_format: LogFormat = typer.Option(LogFormat.auto, "--log-format", help=LOG_FORMAT_HELP),
    heartbeat: Optional[float] = typer.Option(None, "--heartbeat", help=HEARTBEAT_HELP),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help=FORMAT_HELP),
) -> None:
    """Each alternative algorithm next to BP on the identical architecture: runs, table and report."""
    import time

    from bpfree.config import parse_seeds
    from bpfree.protocol.compare import compare as run_compare

    _on_interrupt["message"] = f"interrupted; rerun the same command to continue (finished runs in {output} are kept)"
    start = time.perf_counter()
    common = {"device": device, "data_root": str(data_root) if data_root else None}
    set_heartbeat(heartbeat)
    with runs_progress(not quiet, line_log(log_format, quiet)) as (on_plan, on_done):
        outcome = run_compare(
            configs=configs or None,
            output=output,
            seeds=parse_seeds(seeds, "--seeds", first=first_seed) or [first_seed],
            datasets=dataset,
            algorithms=algorithm,
            epochs=epochs,
            jobs=jobs,
            executor=executor,
            assignments=set_,
            bp_config=bp_config,
            common=common,
            on_plan=on_plan,
            on_done=on_done,
            threads=threads,
            budget=budget,
        )
    print_report(outcome.report, fmt=fmt)
    console.print(f"compare took {time.perf_counter() - start:.0f} s")
    if outcome.suite.failed:
        raise typer.Exit(1)


@app.command()
@interruptible
def tune(
    config: Path = typer.Argument(..., help="the config to tune (never modified)"),
    trials: int = typer.Option(20, "--trials", "-n", help="trials for this study (the same for every algorithm)"),
    epochs: int = typer.Option(10, "--epochs", help="epochs per trial (the same for every algorithm)"),
    output: Path = typer.Option(Path("results/tune"), "--output", "-o", help="where trial runs, the default SQLite file and the tuned YAML go"),
    storage: Optional[str] = typer.Option(None, "--storage", help="sqlite:///f.db (default <output>/optuna.db), journal:<file>, or a database URL"),
    study_name: Optional[str] = typer.Option(None, "--study-name", help="default: <config stem>-<config key>"),
    seed: int = typer.Option(0, "--seed", help="TPE sampler seed"),
    out_path: Optional[Path] = typer.Option(None, "--out", help="tuned YAML (default <output>/<config stem>.tuned.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="override config fields as key=value before tuning"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    log_format: LogFormat = typer.Option(LogFormat.auto, "--log-format", help=LOG_FORMAT_HELP),
    heartbeat: Optional[float] = typer.Option(None, "--heartbeat", help=HEARTBEAT_HELP),
) -> None:
    """Optuna TPE over the algorithm's search space; objective: best validation accuracy."""
    from bpfree.protocol.tune import tune as run_tune

    def on_trial(number: int, value: float, params: dict[str, Any]) -> None:
        if not quiet:
            shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
            console.print(f"trial {number}: val {value:.4f}  {shown}", highlight=False)

    _on_interrupt["message"] = "interrupted; rerun the same command to continue the study (completed trials are kept)"
    set_heartbeat(heartbeat)
    with followed_runs(output / "trials", line_log(log_format, quiet)):  # each trial's epochs, from its history
        result = run_tune(config, trials, epochs, output, storage, study_name, seed, out_path, set_, on_trial)
    out.print(
        f"study {result.study_name} ({result.storage}): {result.completed} trials x {result.epochs} epochs; "
        f"best trial {result.best_trial}: best_val_accuracy {result.best_value:.4f}"
    )
    out.print("best: " + ", ".join(f"{k}={v}" for k, v in result.best_params.items()))
    out.print(f"tuned config: {result.tuned_path}")


@app.command()
@interruptible
def suite(
    suite_file: Path = typer.Argument(..., help="suite YAML: configs, seeds, overrides, output"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="results directory (default: the suite's, else results/<suite stem>)"),
    executor: str = typer.Option("local", "--executor", help="local, inline, slurm, submitit-local or debug"),
    jobs: int = typer.Option(1, "--jobs", "-j", help="local: runs in parallel (one process each); slurm: array parallelism"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="local: torch threads per run (default: allocated CPUs / jobs)"),
    set_: list[str] = typer.Option([], "--set", help="override a field in every config, key=value"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="override the suite's seeds: a count (3) or a list (0,1,2)"),
    partition: Optional[str] = typer.Option(None, help="slurm partition"),
    account: Optional[str] = typer.Option(None, help="slurm account"),
    gpus: Optional[int] = typer.Option(None, help="GPUs per job"),
    time_min: Optional[int] = typer.Option(None, "--time-min", help="job time limit in minutes"),
    cpus: Optional[int] = typer.Option(None, help="CPUs per job"),
    mem_gb: Optional[float] = typer.Option(None, "--mem-gb", help="memory per job (GB)"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="wait for submitted jobs"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would run, run nothing"),
    report: bool = typer.Option(True, "--report/--no-report", help="write report.md/html when done"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    log_format: LogFormat = typer.Option(LogFormat.auto, "--log-format", help=LOG_FORMAT_HELP),
    heartbeat: Optional[float] = typer.Option(None, "--heartbeat", help=HEARTBEAT_HELP),
) -> None:
    """Run configs x seeds once each; finished runs are skipped and interrupted ones resumed."""
    from bpfree.config import parse_seeds
    from bpfree.protocol.suite import SlurmOptions, run_suite
    from bpfree.report.render import write_report

    _on_interrupt["message"] = "interrupted; rerun the same command to continue (finished runs are kept, interrupted ones resume)"
    options = SlurmOptions(partition, account, gpus, time_min, cpus, mem_gb)
    seed_list = parse_seeds(seeds, "--seeds")
    set_heartbeat(heartbeat)
    with runs_progress(not quiet or dry_run, None if dry_run else line_log(log_format, quiet)) as (on_plan, on_done):
        outcome = run_suite(
            suite_file, output, set_, seed_list, executor, jobs, options, wait, on_plan=on_plan, on_done=on_done, dry_run=dry_run,
            threads=threads,
        )
    if dry_run:
        for task in outcome.plan.tasks:
            out.print(f"{task.action:6s} {task.label}  {task.run_dir}")
        return
    if outcome.job_ids:
        out.print(f"submitted {len(outcome.job_ids)} jobs: {', '.join(outcome.job_ids[:5])}{' ...' if len(outcome.job_ids) > 5 else ''}")
    if report and outcome.plan.total and (wait or executor in ("local", "inline")):
        print_report(write_report(outcome.plan.output))
    if outcome.failed:
        raise typer.Exit(1)


@app.command()
@interruptible
def report(
    results_dir: Path = typer.Argument(..., help="a results directory (holds <run_id>/result.json)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="where report.md, report.html and figures/ go (default: results_dir)"),
    full: bool = typer.Option(False, "--full", help="also print the runs, environment and deviations tables"),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help=FORMAT_HELP),
    ci: str = typer.Option("t", "--ci", help="CI of the paired accuracy difference: t (Student t) or bootstrap (percentile, scipy.stats.bootstrap)"),
) -> None:
    """Rebuild tables and plots from stored results alone."""
    from bpfree.report.render import write_report

    if ci not in ("t", "bootstrap"):
        raise UserError(f"--ci {ci}: choose t or bootstrap")
    print_report(write_report(results_dir, out_dir, ci=ci), full=full, fmt=fmt)


STATUS_COLUMNS = ["run", "state", "epoch", "val acc", "test acc", "ETA", "updated", "detail", "run id"]


def status_cells(row) -> list[str]:
    """A status row as plain text cells (escaped for their sink by the caller)."""
    epoch = "" if row.epoch is None else f"{row.epoch}/{row.total_epochs}" if row.total_epochs else str(row.epoch)
    return [
        row.run, row.state, epoch,
        "" if row.val_accuracy is None else f"{row.val_accuracy:.4f}",
        "" if row.test_accuracy is None else f"{row.test_accuracy:.4f}",
        "" if row.eta_s is None else duration(row.eta_s),
        "" if row.updated_s is None else f"{duration(row.updated_s)} ago",
        row.detail, row.run_id,
    ]


def status_renderable(report):
    """A rich table of the runs with the summary as its caption (every cell escaped for rich)."""
    table = Table(title=f"Runs in {escape.console(printable_path(report.directory))}", caption=escape.console(report.summary_line()),
                  caption_justify="left")
    for column in STATUS_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in report.rows:
        table.add_row(*(escape.console(cell) for cell in status_cells(row)))
    return table


def print_status(report, fmt: OutputFormat) -> None:
    if fmt is OutputFormat.json:
        print(json.dumps(report.to_json(), indent=2, allow_nan=False), flush=True)
    elif fmt is OutputFormat.markdown:
        lines = [f"## Runs in {escape.markdown(printable_path(report.directory))}", ""]
        lines.append("| " + " | ".join(STATUS_COLUMNS) + " |")
        lines.append("|" + "|".join("---" for _ in STATUS_COLUMNS) + "|")
        lines += ["| " + " | ".join(escape.markdown(cell) for cell in status_cells(row)) + " |" for row in report.rows]
        lines += ["", escape.markdown(report.summary_line())]
        print("\n".join(lines), flush=True)
    else:
        out.print(status_renderable(report))


@app.command()
def status(
    directory: Path = typer.Argument(..., help="a results, suite, compare or tune directory, or one run's directory"),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help=FORMAT_HELP),
    watch: bool = typer.Option(False, "--watch", "-w", help="refresh until no run is running or queued (Ctrl-C stops)"),
    interval: float = typer.Option(10.0, "--interval", min=0.5, help="seconds between refreshes with --watch"),
) -> None:
    """Where every run stands (running with its ETA, completed, failed, interrupted, queued), from the files alone."""
    from bpfree.protocol.status import scan

    if not directory.is_dir():
        raise UserError(f"{printable_path(directory)}: not a directory")
    report = scan(directory)
    if not report.rows and not watch:
        raise UserError(f"{printable_path(directory)}: no bpfree runs in it (run directories hold config.json, history.jsonl or result.json)")
    if not watch:
        print_status(report, fmt)
        return
    try:
        if fmt is OutputFormat.table and out.is_terminal:
            from rich.live import Live

            with Live(status_renderable(report), console=out, auto_refresh=False) as live:
                while report.active or not report.rows:
                    time.sleep(interval)
                    report = scan(directory)
                    live.update(status_renderable(report), refresh=True)
            return
        while True:
            print_status(report, fmt)
            if report.rows and not report.active:
                return
            time.sleep(interval)
            report = scan(directory)
            print("", flush=True)
    except KeyboardInterrupt:
        return


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="a completed run's directory (holds config.json, result.json, weights.safetensors)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="default: the dataset it was trained on"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="directory with torchvision datasets"),
    split: str = typer.Option("test", "--split", help="test, val or train"),
    download: bool = typer.Option(False, "--download/--no-download", help="download a missing dataset"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda (default: the run's)"),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help=FORMAT_HELP),
) -> None:
    """Accuracy of a completed run's saved weights on a dataset split; stored under <run_dir>/evaluations/."""
    from bpfree.evaluation import evaluate_run

    path, record = evaluate_run(run_dir, dataset, data_root, split, download, device)
    if fmt is OutputFormat.json:
        print(json.dumps({**record, "path": str(path)}, indent=2))
    else:
        line = f"{record['dataset']} {record['split']}: accuracy {record['accuracy']:.4f} on {record['n']} samples"
        print(line)
        console.print(f"evaluation: {path}", highlight=False)


@app.command()
def schema(
    write: Optional[Path] = typer.Option(None, "--write", help="write the schema to this file instead of printing it"),
) -> None:
    """The JSON schema of result.json (also shipped as schema/result.schema.json)."""
    from bpfree.fileio import atomic_write_text
    from bpfree.results import result_schema

    text = json.dumps(result_schema(), indent=2) + "\n"
    if write is None:
        print(text, end="")
    else:
        atomic_write_text(write, text)
        console.print(f"wrote {write}")


class ExportFormat(str, Enum):
    csv = "csv"
    parquet = "parquet"


@app.command()
def export(
    results_dir: Path = typer.Argument(..., help="a results directory (holds <run_id>/result.json)"),
    fmt: ExportFormat = typer.Option(ExportFormat.csv, "--format", "-f", help="csv, or parquet (needs the 'parquet' extra)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="where runs, curves, phases and telemetry go (default: <results_dir>/export)"),
) -> None:
    """Runs, curves, phases and telemetry as tidy tables (one row per run, evaluation point, phase or resource sample)."""
    from bpfree.export import export_tables

    for path in export_tables(results_dir, out_dir or results_dir / "export", fmt.value):
        out.print(str(path), highlight=False)


def main() -> None:
    # Typer handles usage errors itself (message + exit 2); user mistakes deeper down arrive as UserError.
    try:
        app(standalone_mode=True)
    except UserError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as exc:
        console.print(str(exc) or "interrupted", highlight=False, soft_wrap=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
