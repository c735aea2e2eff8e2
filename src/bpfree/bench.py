"""`bpfree bench`: training throughput of each algorithm next to its BP twin, against the machine's peak.

Per pair (algorithm on its native architecture, BP on the identical one): one warm-up epoch (it
also counts FLOPs), then the median of several timed epochs, per phase. Reported: samples/s,
achieved FLOP/s as a share of the row's peak, evaluation samples/s, peak memory, and the
epoch-time ratio against BP. The data-handling share is the time to draw an epoch's batches alone,
over the BP epoch time.

A row's peak is the one its operators can reach: convolutions run on cuDNN, which uses TF32 by
default (``torch.backends.cudnn.allow_tf32``), so their FLOPs are judged against the measured TF32
peak; matmuls against fp32 unless TF32 matmuls are allowed. A row that mixes both is judged against
the FLOP-weighted harmonic blend (the time both shares would take at their peaks).

Energy per epoch: a captured GPU epoch of a small network lasts tens of milliseconds, shorter than
the NVML counter's refresh, so J/epoch is read over one window of back-to-back epochs lasting at
least ``ENERGY_WINDOW_S`` (and the meter's minimum window), per phase, after the timed epochs.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bpfree import escape
from bpfree.algorithms import algorithm_names
from bpfree.algorithms.base import Algorithm, Phase
from bpfree.build import build_run, resolve_device
from bpfree.capture import CapturedStep, warmup_stream
from bpfree.config import RunConfig, build_config
from bpfree.data import train_batches
from bpfree.errors import UserError
from bpfree.fileio import atomic_write_text, read_bounded
from bpfree.loop import EpochOutcome, epoch_clock, evaluate, train_epoch
from bpfree.meters.cpu import flush_denormal_scope
from bpfree.meters.energy import EnergyMeter
from bpfree.meters.environment import cpu_model
from bpfree.meters.flops import FlopLedger, flop_counter
from bpfree.meters.memory import MemoryMeter
from bpfree.meters.timer import synchronize

BENCH_START, BENCH_END = "<!-- bench:start -->", "<!-- bench:end -->"
MAX_MARKDOWN_BYTES = 16 * 2**20
ENERGY_WINDOW_S = 2.0  # J/epoch is read over back-to-back epochs lasting at least this long
MAX_ENERGY_EPOCHS = 100_000  # a bound for the loop only: the window length is what stops it


@dataclass(frozen=True)
class BenchCase:
    label: str
    algorithm: str
    model: str
    batch_size: int
    params: dict[str, Any] = field(default_factory=dict)
    target_ratio: float | None = None  # epoch time vs BP must stay at or under this
    target_vs_reference: float | None = None  # epoch time vs the captured plain-PyTorch BP step
    target_epoch_s: float | None = None  # an absolute epoch-time target


DEFAULT_CASES = (
    BenchCase("BP roofline", "bp", "mlp:3x2000", 256),
    BenchCase("MF", "mf", "mlp:3x2000", 256, target_ratio=1.0),
    BenchCase("FF", "ff", "mlp:3x2000", 256, target_ratio=3.0),
    BenchCase("CaFo-Rand", "cafo", "cnn3", 128, {"variant": "rand"}, target_ratio=1.0),
    BenchCase("NoProp-DT", "noprop", "noprop", 128),
    BenchCase("NoProp-CT", "noprop-ct", "noprop-ct", 128),  # its BP twin backpropagates through the solver's steps
    BenchCase("NoProp-FM", "noprop-fm", "noprop-fm", 128),
)

# On a GPU: the targets of the GPU work, on the papers' MNIST networks (`--dataset mnist`).
GPU_CASES = (
    BenchCase("BP", "bp", "mlp:2x1000", 128, target_vs_reference=1.3),
    BenchCase("MF", "mf", "mlp:2x1000", 128, target_ratio=1.0),
    BenchCase("FF", "ff", "mlp:3x1000", 128, target_ratio=2.0),
    BenchCase("CaFo-Rand", "cafo", "cnn3", 128, {"variant": "rand"}, target_ratio=1.0),
    BenchCase("NoProp-DT", "noprop", "noprop", 128, {"parallel": True}, target_epoch_s=3.0),
)


def default_cases(device: torch.device) -> tuple[BenchCase, ...]:
    return GPU_CASES if device.type == "cuda" else DEFAULT_CASES


def matmul_peaks(device: torch.device) -> dict[str, float]:
    """Measured matmul peaks: fp32 everywhere; on CUDA also TF32 and bf16 (FLOP/s)."""
    peaks = {"fp32": _matmul_peak(device, torch.float32, tf32=False)}
    if device.type == "cuda":
        peaks["tf32"] = _matmul_peak(device, torch.float32, tf32=True)
        peaks["bf16"] = _matmul_peak(device, torch.bfloat16, tf32=False)
    return peaks


def _matmul_peak(device: torch.device, dtype: torch.dtype, tf32: bool) -> float:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        n = 8192 if device.type == "cuda" else 2048
        return matmul_peak_flops(device, n=n, dtype=dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def matmul_peak_flops(device: torch.device, n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Best sustained FLOP/s of one large square matmul on this device."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
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


def conv_flop_share(algorithm: Algorithm, x: torch.Tensor, y: torch.Tensor) -> float:
    """The share of one training step's counted FLOPs that are convolutions (forward and backward).

    Runs one real step of the current phase under the FLOP counter (outside every timed window).
    """
    counting = flop_counter()
    with counting:
        algorithm.train_step(x, y)
    counts = counting.counter.get_flop_counts().get("Global", {})
    total = sum(counts.values())
    conv = sum(v for op, v in counts.items() if "convolution" in str(op))
    return conv / total if total else 0.0


def row_peak(peaks: dict[str, float], conv_share: float, device: torch.device) -> float:
    """The FLOP/s a row's operators can reach: convolutions at TF32 where cuDNN uses it, matmuls at fp32
    unless TF32 matmuls are allowed; a mix at the harmonic blend."""
    cuda = device.type == "cuda" and "tf32" in peaks
    conv = peaks["tf32"] if cuda and torch.backends.cudnn.allow_tf32 else peaks["fp32"]
    matmul = peaks["tf32"] if cuda and torch.backends.cuda.matmul.allow_tf32 else peaks["fp32"]
    return 1.0 / (conv_share / conv + (1.0 - conv_share) / matmul)


def energy_per_epoch(run_epoch: Callable[[], None], energy: EnergyMeter, device: torch.device) -> dict[str, Any]:
    """Energy of back-to-back epochs in one window of at least ``ENERGY_WINDOW_S`` (and the meter's minimum)."""
    target = max(ENERGY_WINDOW_S, energy.min_window_s)
    synchronize(device)
    energy.begin()
    start = time.perf_counter()
    epochs, seconds = 0, 0.0
    while seconds < target and epochs < MAX_ENERGY_EPOCHS:
        run_epoch()
        synchronize(device)
        epochs += 1
        seconds = time.perf_counter() - start
    reading = energy.end()
    joules = reading.joules
    return {
        "joules_per_epoch": joules / epochs if joules is not None else None,
        "window_s": seconds,
        "epochs": epochs,
        "mean_power_w": joules / seconds if joules is not None else None,
        "reason": reading.reason,
    }


def measure(
    case: BenchCase, dataset: str, epochs: int, device: str, seed: int = 0, energy: EnergyMeter | None = None,
    measure_energy: bool = True,
) -> dict[str, Any]:
    """One case's epoch time and FLOPs, with subnormals flushed on CPU as in every run (RunConfig default).

    ``energy``: the meter (default: the machine's counters); ``measure_energy=False`` skips the energy windows.
    """
    with flush_denormal_scope(True):
        return _measure(case, dataset, epochs, device, seed, energy, measure_energy)


def _measure(
    case: BenchCase, dataset: str, epochs: int, device: str, seed: int, energy: EnergyMeter | None, measure_energy: bool
) -> dict[str, Any]:
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
    energy = energy if energy is not None else EnergyMeter(dev) if measure_energy else None
    captured = CapturedStep.for_run(parts)
    n_train = data.train_x.shape[0]

    def run_epoch(phase: Phase, epoch: int, flops: FlopLedger | None = None, meter: MemoryMeter | None = None) -> EpochOutcome:
        clock = epoch_clock(phase, min(epoch, phase.epochs - 1), epoch, n_train, cfg.batch_size, cfg.drop_last)
        return train_epoch(
            algo, data, clock, parts.data_generator, flops=flops, memory=meter, autocast=parts.autocast,
            step=captured, drop_last=cfg.drop_last,
        )

    phase_rows = []
    windows: list[dict[str, Any]] = []
    peak = None
    for phase in algo.schedule():
        algo.begin_phase(phase)
        if captured is not None:
            captured.begin_phase(phase.name)
        # The FLOP mix (convolution share) of one real step, before the warm-up epoch and outside every window.
        algo.train_mode()
        algo.begin_epoch(epoch_clock(phase, 0, 0, n_train, cfg.batch_size, cfg.drop_last))
        xb, yb = next(iter(train_batches(data, cfg.batch_size, parts.data_generator, cfg.drop_last)))
        with parts.autocast:
            conv_share = conv_flop_share(algo, xb, yb)
        ledger = FlopLedger()
        times = []
        for epoch in range(epochs + 1):  # epoch 0 warms up (captures) and counts FLOPs
            outcome = run_epoch(phase, epoch, ledger if epoch == 0 else None, memory)
            if epoch > 0:
                times.append(outcome.seconds)
            peak = max(peak or 0, outcome.peak_memory_bytes or 0) or None
        row: dict[str, Any] = {
            "phase": phase.name, "epoch_s": statistics.median(times), "flops_per_epoch": ledger.total, "conv_flop_share": conv_share,
        }
        if energy is not None and energy.available:
            row["energy"] = energy_per_epoch(lambda phase=phase: run_epoch(phase, epochs), energy, dev)
            windows.append(row["energy"])
        phase_rows.append(row)
    algo.end_training()
    evaluate(algo, data.test_x[: cfg.eval_batch_size], data.test_y[: cfg.eval_batch_size], cfg.eval_batch_size)  # warm-up
    eval_s = evaluate(algo, data.test_x, data.test_y, cfg.eval_batch_size, autocast=parts.autocast).seconds
    epoch_s = statistics.mean(r["epoch_s"] for r in phase_rows)
    flops = statistics.mean(r["flops_per_epoch"] for r in phase_rows)
    total_flops = sum(r["flops_per_epoch"] for r in phase_rows)
    conv_share = sum(r["flops_per_epoch"] * r["conv_flop_share"] for r in phase_rows) / total_flops if total_flops else 0.0
    # Energy per epoch: the mean over phases, each read over its own long window, and the mean power.
    measured = len(windows) == len(phase_rows) and all(w["joules_per_epoch"] is not None for w in windows)
    joules_per_epoch = statistics.mean(w["joules_per_epoch"] for w in windows) if measured else None
    mean_power_w = statistics.mean(w["mean_power_w"] for w in windows) if measured else None
    if measured:
        energy_reason = None
    elif energy is None:
        energy_reason = "energy not measured (measure_energy=False)"
    else:
        energy_reason = next((w["reason"] for w in windows if w["reason"]), None) or energy.reason
    # Data handling alone: shuffling, gathering and (for CIFAR) augmenting one epoch of batches.
    synchronize(dev)
    start = time.perf_counter()
    for _ in train_batches(data, cfg.batch_size, parts.data_generator, cfg.drop_last):
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
        "conv_flop_share": conv_share,
        "joules_per_epoch": joules_per_epoch,
        "mean_power_w": mean_power_w,
        "energy_window_s": sum(w["window_s"] for w in windows) if windows else None,
        "energy_epochs": sum(w["epochs"] for w in windows) if windows else None,
        "energy_reason": energy_reason,
        "cuda_graphs": captured.summary() if captured is not None else None,
    }


def reference_bp_epoch(model_spec: str, batch_size: int, dataset: str, device: str, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Plain PyTorch BP on the same model, data and batch, written without bpfree's loop: data on the
    device, fused Adam, and on CUDA the whole step captured in one CUDA graph (the hardware's pace)."""
    cfg = build_config({"algorithm": "bp", "dataset": dataset, "model": model_spec, "batch_size": batch_size,
                        "device": device, "seed": seed, "checkpoint": False})
    with flush_denormal_scope(cfg.flush_denormal):
        return _reference_bp_epoch(cfg, batch_size, epochs)


def _reference_bp_epoch(cfg: RunConfig, batch_size: int, epochs: int) -> dict[str, Any]:
    parts = build_run(cfg)
    dev, model, data = parts.device, parts.model, parts.data
    cuda = dev.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=cuda)
    n = data.train_x.shape[0]
    full = n - n % batch_size  # whole batches only: one graph
    static_x = data.train_x[:batch_size].clone()
    static_y = data.train_y[:batch_size].clone()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(static_x), static_y).backward()
        optimizer.step()

    model.train()
    graph = None
    if cuda:
        side = warmup_stream(dev)  # the process's one warm-up stream: no new cuBLAS workspace per case
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            step()
    else:
        step()
    times = []
    generator = torch.Generator(device=dev).manual_seed(cfg.seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator, device=dev)[:full].view(-1, batch_size)
        synchronize(dev)
        start = time.perf_counter()
        for index in order:
            torch.index_select(data.train_x, 0, index, out=static_x)
            torch.index_select(data.train_y, 0, index, out=static_y)
            if graph is not None:
                graph.replay()
            else:
                step()
        synchronize(dev)
        times.append((time.perf_counter() - start) * n / full)  # scaled to a whole epoch
    return {"epoch_s": statistics.median(times), "captured": graph is not None}


def _bench_case(
    case: BenchCase, dataset: str, epochs: int, device: str, dev: torch.device, peaks: dict[str, float],
    bp_cache: dict[tuple[str, int], dict[str, Any]], reference_cache: dict[tuple[str, int], dict[str, Any]], progress,
) -> dict[str, Any]:
    """One row: the case next to its BP twin and the reference step (both measured once per model and batch)."""
    twin_key = (case.model, case.batch_size)
    if twin_key not in bp_cache:
        if progress:
            progress(f"BP {case.model} b{case.batch_size}")
        bp_cache[twin_key] = measure(BenchCase("BP", "bp", case.model, case.batch_size), dataset, epochs, device)
        if progress:
            progress(f"reference BP {case.model} b{case.batch_size}")
        reference_cache[twin_key] = reference_bp_epoch(case.model, case.batch_size, dataset, device, epochs)
    bp, reference = bp_cache[twin_key], reference_cache[twin_key]
    if case.algorithm == "bp":
        row = dict(bp, label=case.label)
    else:
        if progress:
            progress(f"{case.label} {case.model} b{case.batch_size}")
        row = measure(case, dataset, epochs, device)
    row["bp_epoch_s"] = bp["epoch_s"]
    row["ratio_vs_bp"] = row["epoch_s"] / bp["epoch_s"]
    row["reference_epoch_s"] = reference["epoch_s"]
    row["ratio_vs_reference"] = row["epoch_s"] / reference["epoch_s"]
    row["peak_flops"] = row_peak(peaks, row["conv_flop_share"], dev)
    row["peak_share"] = row["flops_per_s"] / row["peak_flops"]
    row["data_share_of_bp_epoch"] = bp["data_s"] / bp["epoch_s"]
    row["target_ratio"] = case.target_ratio
    row["target_vs_reference"] = case.target_vs_reference
    row["target_epoch_s"] = case.target_epoch_s
    return row


def run_bench(
    cases: tuple[BenchCase, ...] | None = None,
    dataset: str = "mnist5k",
    epochs: int = 3,
    device: str = "auto",
    progress=None,
) -> dict[str, Any]:
    """Measure the matmul peaks, then every case next to its BP twin (same model, batch and data) and
    next to the plain-PyTorch reference step of that model (captured on CUDA).

    A case that fails (anything but a user error, which stops the bench) is listed under ``skipped``
    with its error, and the other cases still run."""
    registered = set(algorithm_names())
    dev = resolve_device(device)
    cases = default_cases(dev) if cases is None else cases
    peaks = matmul_peaks(dev)
    peak = row_peak(peaks, 0.0, dev)  # a matmul-only row's peak
    rows = []
    bp_cache: dict[tuple[str, int], dict[str, Any]] = {}
    reference_cache: dict[tuple[str, int], dict[str, Any]] = {}
    skipped = []
    for case in cases:
        if case.algorithm not in registered:
            skipped.append(f"{case.label}: algorithm {case.algorithm!r} not available")
            continue
        try:
            rows.append(_bench_case(case, dataset, epochs, device, dev, peaks, bp_cache, reference_cache, progress))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken case must not cost the others their rows
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            skipped.append(f"{case.label}: failed ({type(exc).__name__}: {message})")
    return {
        "peak_flops": peak,
        "peaks": peaks,
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
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


def _target(row: dict[str, Any]) -> str:
    checks = []
    if row.get("target_ratio"):
        checks.append((f"≤ {row['target_ratio']:.1f}× BP", row["ratio_vs_bp"] <= row["target_ratio"]))
    if row.get("target_vs_reference"):
        checks.append((f"≤ {row['target_vs_reference']:.1f}× ref", row["ratio_vs_reference"] <= row["target_vs_reference"]))
    if row.get("target_epoch_s"):
        checks.append((f"≤ {row['target_epoch_s']:g} s", row["epoch_s"] <= row["target_epoch_s"]))
    return ", ".join(f"{text} {'✓' if ok else '✗'}" for text, ok in checks)


def _peak_rule(report: dict[str, Any]) -> str:
    tf32 = report.get("tf32") or {}
    if "tf32" not in report.get("peaks", {}):
        return f"fp32, **{report['peak_flops'] / 1e9:.1f} GFLOP/s**"
    conv = "TF32 (cuDNN allow_tf32)" if tf32.get("cudnn") else "fp32"
    matmul = "TF32" if tf32.get("matmul") else "fp32 (TF32 matmul off)"
    return f"convolution FLOPs at the {conv} peak, matmul FLOPs at the {matmul} peak, a mix at the harmonic blend"


def markdown(report: dict[str, Any], command: str) -> str:
    m = report["machine"]
    peaks = ", ".join(f"{name} {value / 1e12:.2f} TFLOP/s" for name, value in report.get("peaks", {}).items())
    peaks = peaks or f"fp32 {report['peak_flops'] / 1e12:.2f} TFLOP/s"
    lines = [
        f"### {m['gpu'] or m['cpu']} ({m['device']}, {m['threads']} threads), torch {m['torch']}, Python {m['python']}",
        "",
        f"Command: `{command}`  ",
        f"Dataset {report['dataset']}; median of {report['epochs']} timed epochs after one warm-up epoch. "
        f"Measured matmul peaks: {peaks}; % of peak is against each row's own peak: "
        f"{_peak_rule(report)}. Reference: plain PyTorch BP on the same model and batch"
        f"{' captured in one CUDA graph' if m['device'].startswith('cuda') else ' (eager)'}. "
        f"J/epoch and mean power: read per phase over one window of at least {ENERGY_WINDOW_S:g} s of back-to-back epochs.",
        "",
        "| case | model | batch | epoch s | samples/s | GFLOP/s | conv share | % of peak | vs BP | vs reference | target | "
        "eval samples/s | peak mem MiB | mean power W | J/epoch | data share of BP epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] else "—"
        power = f"{r['mean_power_w']:.0f}" if r.get("mean_power_w") is not None else "—"
        joules = f"{r['joules_per_epoch']:.1f}" if r.get("joules_per_epoch") is not None else "—"
        lines.append(
            f"| {r['label']} | {r['model']} | {r['batch_size']} | {r['epoch_s']:.3f} | {r['samples_per_s']:.0f} | "
            f"{r['flops_per_s'] / 1e9:.1f} | {100 * r.get('conv_flop_share', 0.0):.0f}% | {100 * r['peak_share']:.0f}% | {r['ratio_vs_bp']:.2f}× | "
            f"{r['ratio_vs_reference']:.2f}× | {_target(r)} | {r['eval_samples_per_s']:.0f} | {mem} | {power} | {joules} | "
            f"{100 * r['data_share_of_bp_epoch']:.1f}% |"
        )
    reasons = sorted({r["energy_reason"] for r in report["rows"] if r.get("energy_reason")})
    if reasons:
        lines.append(f"\nEnergy not measured: {'; '.join(escape.markdown(r) for r in reasons)}")
    for note in report["skipped"]:
        lines.append(f"\nSkipped: {escape.markdown(note)}")
    return "\n".join(lines) + "\n"


def write_benchmarks_md(path: Path, section: str, start: str = BENCH_START, end: str = BENCH_END) -> None:
    """Replace the generated block of BENCHMARKS.md (between the markers), keeping hand-written text."""
    text = read_bounded(path, MAX_MARKDOWN_BYTES).decode("utf-8") if path.exists() else "# Benchmarks\n\n" + start + "\n" + end + "\n"
    if start not in text:
        text += "\n" + start + "\n" + end + "\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(path, head + start + "\n" + section + end + tail)
