"""`bpfree bench`: training throughput of each algorithm next to its BP twin, against the machine's peak.

Per pair (algorithm on its native architecture, BP on the identical one): one warm-up epoch (it
also counts FLOPs), then the median of several timed epochs, per phase. Reported: samples/s,
achieved FLOP/s as a share of the measured fp32 matmul peak, evaluation samples/s, peak memory,
and the epoch-time ratio against BP. The data-handling share is the time to draw an epoch's
batches alone, over the BP epoch time.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bpfree.algorithms import algorithm_names
from bpfree.config import build_config
from bpfree.build import build_run, resolve_device
from bpfree.data import train_batches
from bpfree.loop import epoch_clock, evaluate, train_epoch
from bpfree.meters.environment import cpu_model
from bpfree.meters.flops import FlopLedger
from bpfree.meters.memory import MemoryMeter
from bpfree.meters.timer import synchronize


@dataclass(frozen=True)
class BenchCase:
    label: str
    algorithm: str
    model: str
    batch_size: int
    params: dict[str, Any] = field(default_factory=dict)
    target_ratio: float | None = None  # epoch time vs BP must stay at or under this


DEFAULT_CASES = (
    BenchCase("BP roofline", "bp", "mlp:3x2000", 256),
    BenchCase("MF", "mf", "mlp:3x2000", 256, target_ratio=1.0),
    BenchCase("FF", "ff", "mlp:3x2000", 256, target_ratio=3.0),
    BenchCase("CaFo-Rand", "cafo", "cnn3", 128, {"variant": "rand"}, target_ratio=1.0),
    BenchCase("NoProp-DT", "noprop", "noprop", 128),
)


def matmul_peak_flops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Best sustained fp32 FLOP/s of one large square matmul on this device."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def measure(case: BenchCase, dataset: str, epochs: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Train-epoch and eval throughput for one case (each phase timed separately)."""
    cfg = build_config(
        {
            "algorithm": case.algorithm,
            "dataset": dataset,
            "model": case.model,
            "batch_size": case.batch_size,
            "epochs": epochs,
            "device": device,
            "seed": seed,
            "checkpoint": False,
            "params": case.params,
        }
    )
    parts = build_run(cfg)
    dev, algo, data = parts.device, parts.algorithm, parts.data
    memory = MemoryMeter(dev)
    n_train = data.train_x.shape[0]
    phase_rows = []
    peak = None
    for phase in algo.schedule():
        algo.begin_phase(phase)
        ledger = FlopLedger()
        times = []
        for epoch in range(epochs + 1):  # epoch 0 warms up and counts FLOPs
            clock = epoch_clock(phase, min(epoch, phase.epochs - 1), epoch, n_train, cfg.batch_size)
            outcome = train_epoch(
                algo, data, clock, parts.data_generator,
                flops=ledger if epoch == 0 else None, memory=memory, autocast=parts.autocast,
            )
            if epoch == 0:
                flops_per_epoch = ledger.total
            else:
                times.append(outcome.seconds)
            peak = max(peak or 0, outcome.peak_memory_bytes or 0) or None
        phase_rows.append({"phase": phase.name, "epoch_s": statistics.median(times), "flops_per_epoch": flops_per_epoch})
    algo.end_training()
    evaluate(algo, data.test_x[: cfg.eval_batch_size], data.test_y[: cfg.eval_batch_size], cfg.eval_batch_size)  # warm-up
    eval_s = evaluate(algo, data.test_x, data.test_y, cfg.eval_batch_size, autocast=parts.autocast).seconds
    epoch_s = statistics.mean(r["epoch_s"] for r in phase_rows)
    flops = statistics.mean(r["flops_per_epoch"] for r in phase_rows)
    # Data handling alone: shuffling, gathering and (for CIFAR) augmenting one epoch of batches.
    synchronize(dev)
    start = time.perf_counter()
    for _ in train_batches(data, cfg.batch_size, parts.data_generator):
        pass
    synchronize(dev)
    data_s = time.perf_counter() - start
    return {
        "label": case.label,
        "algorithm": case.algorithm,
        "model": case.model,
        "batch_size": case.batch_size,
        "phases": phase_rows,
        "epoch_s": epoch_s,
        "samples_per_s": n_train / epoch_s,
        "flops_per_s": flops / epoch_s,
        "eval_samples_per_s": data.test_x.shape[0] / eval_s,
        "peak_memory_bytes": peak,
        "memory_method": memory.method,
        "data_s": data_s,
        "device": str(dev),
    }


def run_bench(
    cases: tuple[BenchCase, ...] = DEFAULT_CASES,
    dataset: str = "mnist5k",
    epochs: int = 3,
    device: str = "auto",
    progress=None,
) -> dict[str, Any]:
    """Measure the peak, then every case next to its BP twin (same model, batch and data)."""
    registered = set(algorithm_names())
    dev = resolve_device(device)
    peak = matmul_peak_flops(dev)
    rows = []
    bp_cache: dict[tuple[str, int], dict[str, Any]] = {}
    skipped = []
    for case in cases:
        if case.algorithm not in registered:
            skipped.append(f"{case.label}: algorithm {case.algorithm!r} not available")
            continue
        twin_key = (case.model, case.batch_size)
        if twin_key not in bp_cache:
            if progress:
                progress(f"BP {case.model} b{case.batch_size}")
            bp_cache[twin_key] = measure(BenchCase("BP", "bp", case.model, case.batch_size), dataset, epochs, device)
        bp = bp_cache[twin_key]
        if case.algorithm == "bp":
            row = dict(bp, label=case.label)
        else:
            if progress:
                progress(f"{case.label} {case.model} b{case.batch_size}")
            row = measure(case, dataset, epochs, device)
        row["bp_epoch_s"] = bp["epoch_s"]
        row["ratio_vs_bp"] = row["epoch_s"] / bp["epoch_s"]
        row["peak_share"] = row["flops_per_s"] / peak
        row["data_share_of_bp_epoch"] = bp["data_s"] / bp["epoch_s"]
        row["target_ratio"] = case.target_ratio
        rows.append(row)
    return {
        "peak_flops": peak,
        "dataset": dataset,
        "epochs": epochs,
        "rows": rows,
        "skipped": skipped,
        "machine": {
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


def markdown(report: dict[str, Any], command: str) -> str:
    m = report["machine"]
    lines = [
        f"### {m['gpu'] or m['cpu']} ({m['device']}, {m['threads']} threads), torch {m['torch']}, Python {m['python']}",
        "",
        f"Command: `{command}`  ",
        f"Dataset {report['dataset']}; median of {report['epochs']} timed epochs after one warm-up epoch. "
        f"Measured fp32 matmul peak: **{report['peak_flops'] / 1e9:.1f} GFLOP/s**.",
        "",
        "| case | model | batch | epoch s | samples/s | GFLOP/s | % of peak | epoch vs BP | target | eval samples/s | peak mem MiB | data share of BP epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in report["rows"]:
        target = f"≤ {r['target_ratio']:.1f}× {'✓' if r['ratio_vs_bp'] <= r['target_ratio'] else '✗'}" if r["target_ratio"] else ""
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] else "—"
        lines.append(
            f"| {r['label']} | {r['model']} | {r['batch_size']} | {r['epoch_s']:.3f} | {r['samples_per_s']:.0f} | "
            f"{r['flops_per_s'] / 1e9:.1f} | {100 * r['peak_share']:.0f}% | {r['ratio_vs_bp']:.2f}× | {target} | "
            f"{r['eval_samples_per_s']:.0f} | {mem} | {100 * r['data_share_of_bp_epoch']:.1f}% |"
        )
    for note in report["skipped"]:
        lines.append(f"\nSkipped: {note}")
    return "\n".join(lines) + "\n"


def write_benchmarks_md(path: Path, section: str) -> None:
    """Replace the generated block of BENCHMARKS.md (between markers), keeping hand-written text."""
    from bpfree.results import atomic_write_text

    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n" + start + "\n" + end + "\n"
    if start not in text:
        text += "\n" + start + "\n" + end + "\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = head + start + "\n" + section + end + tail
    atomic_write_text(path, new)
