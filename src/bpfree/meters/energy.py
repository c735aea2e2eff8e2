"""Energy from hardware counters through Zeus: NVML's total-energy counter on NVIDIA GPUs, RAPL on CPUs.

Energy is read only at window boundaries (phase/epoch), never inside a training step. Where no
counter can be read, the energy is ``None`` with the reason; it is never reported as 0. A meter
fault (library missing, permission denied, a counter that goes backwards) turns the value into
``None`` with the reason and never fails the run.

Short windows. NVML's total-energy counter is refreshed every 20-100 ms, so a window's reading is
off by up to one refresh period's energy (the counter is stale by up to a period at each edge): a
window of a few tens of milliseconds reads 0 J or one quantum. A window is therefore read only when
it spans at least ``WINDOW_PERIODS`` refresh periods of its slowest counter (NVML: 10 x 100 ms = 1 s,
error <= 10 %); a shorter window's energy is ``None`` with the reason, never 0 or a quantum. A
measurement made of k windows (an epoch split around its FLOP probes) needs k times that in all.
Captured GPU epochs of small networks are that short: their per-epoch energy is null, while the
run's total sums the raw readings of all its windows (:meth:`EnergyMeter.aggregate_too_short`:
independent edge errors average out), and ``bpfree bench`` measures J/epoch over one window of many
back-to-back epochs.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

NVML_REFRESH_S = 0.1  # NVML's total-energy counter is refreshed every 20-100 ms: the worst case
RAPL_REFRESH_S = 0.001  # RAPL energy status registers update about every millisecond
WINDOW_PERIODS = 10  # a window is read only when it spans this many refresh periods of its slowest counter


@dataclass
class EnergyReading:
    joules: float | None
    gpu_joules: float | None = None
    cpu_joules: float | None = None  # CPU packages plus DRAM (the two RAPL domains summed)
    reason: str | None = None
    dram_joules: float | None = None  # the DRAM part of cpu_joules, where RAPL exposes it
    seconds: float | None = None  # the window's length as the meter timed it

    def components(self) -> dict[str, float | None]:
        package = None if self.cpu_joules is None else self.cpu_joules - (self.dram_joules or 0.0)
        return {"gpu": self.gpu_joules, "cpu_package": package, "dram": self.dram_joules}


def merge_components(total: dict[str, float | None] | None, more: dict[str, float | None] | None) -> dict[str, float | None] | None:
    """Sum two per-component totals; a component unknown in either is unknown (None)."""
    if total is None or more is None:
        return more if total is None else total
    return {k: None if total.get(k) is None or more.get(k) is None else total[k] + more[k] for k in total}  # type: ignore[operator]


def add_components(total: dict[str, float | None] | None, reading: EnergyReading) -> dict[str, float | None]:
    """Accumulate a window's per-component energy; a component missing in any window stays None."""
    parts = reading.components()
    if total is None:
        return parts
    return {k: None if total.get(k) is None or parts[k] is None else total[k] + parts[k] for k in parts}  # type: ignore[operator]


RAPL_COUNTERS = "/sys/class/powercap/intel-rapl:*/energy_uj"


def cpu_energy_counter_readable() -> bool:
    """Whether a CPU package energy counter (RAPL) can be read by this process."""
    import glob

    for path in glob.glob(RAPL_COUNTERS):
        try:
            with open(path) as handle:
                handle.read()
            return True
        except OSError:
            continue
    return False


def _probe_zeus(device: torch.device) -> tuple[Any | None, str, str | None, float]:
    """Build a ZeusMonitor over the counters that exist; return (monitor, method, reason-if-none,
    the refresh period of its slowest counter in seconds)."""
    try:
        from zeus.device import get_cpus, get_gpus
        from zeus.monitor import ZeusMonitor
    except Exception as exc:  # ImportError, or a broken install
        return None, "", f"zeus unavailable ({type(exc).__name__}: {exc})", 0.0
    gpu_indices: list[int] = []
    cpu_indices: list[int] = []
    reasons = []
    if device.type == "cuda":
        try:
            gpus = get_gpus()
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index < len(gpus):
                gpu_indices = [index]
        except Exception as exc:
            reasons.append(f"GPU: {exc}")
    else:
        reasons.append("GPU: run is on CPU")
    try:
        cpus = get_cpus()
        cpu_indices = list(range(len(cpus)))
        if not cpu_indices:
            reasons.append("CPU: no RAPL package found")
    except Exception as exc:
        reasons.append(f"CPU: {str(exc).strip()} (no readable /sys/class/powercap)")
    if not gpu_indices and not cpu_indices:
        return None, "", "; ".join(reasons) or "no energy counter found", 0.0
    try:
        monitor = ZeusMonitor(gpu_indices=gpu_indices, cpu_indices=cpu_indices, sync_execution_with="torch")
    except Exception as exc:
        return None, "", f"zeus monitor failed to start ({type(exc).__name__}: {exc})", 0.0
    parts = []
    if gpu_indices:
        parts.append(f"NVML total-energy counter, GPU {gpu_indices[0]}")
    if cpu_indices:
        parts.append(f"RAPL, {len(cpu_indices)} CPU package(s)")
    return monitor, "zeus: " + " + ".join(parts), None, NVML_REFRESH_S if gpu_indices else RAPL_REFRESH_S


class EnergyMeter:
    """Energy over begin/end windows. ``monitor_factory`` exists so tests can inject fake counters.

    The factory returns (monitor, method, reason-if-none) and optionally, fourth, the refresh period
    of the monitor's slowest counter in seconds (0 or absent: every window is read).
    """

    def __init__(
        self,
        device: torch.device,
        monitor_factory: Callable[[torch.device], tuple[Any, ...]] = _probe_zeus,
    ) -> None:
        probe = monitor_factory(device)
        self.monitor, self.method, self.reason = probe[0], probe[1], probe[2]
        self.refresh_s = float(probe[3]) if len(probe) > 3 else 0.0
        self._window = 0
        self._open: str | None = None
        self._opened_at = 0.0

    @property
    def min_window_s(self) -> float:
        """The shortest window whose energy is read (``WINDOW_PERIODS`` refresh periods of the slowest counter)."""
        return WINDOW_PERIODS * self.refresh_s

    @property
    def available(self) -> bool:
        return self.monitor is not None

    @property
    def cpu_counters(self) -> bool:
        return "RAPL" in (self.method or "")

    def scope_note(self, device: torch.device, job_cpus: int, node_cpus: int | None) -> str | None:
        """Why the CPU energy covers more than this job, or None when it does not.

        RAPL counts whole CPU packages and their DRAM: everything the node runs, not this process.
        """
        if self.monitor is None or not self.cpu_counters:
            return None
        if device.type == "cuda":
            return "CPU package and DRAM energy (RAPL) is the whole node's, added to this job's GPU energy"
        if node_cpus is not None and job_cpus < node_cpus:
            return f"CPU package and DRAM energy (RAPL) is the whole node's ({node_cpus} CPUs); this job had {job_cpus}"
        return None

    def begin(self) -> None:
        if self.monitor is None:
            return
        self._window += 1
        key = f"bpfree-{self._window}"
        try:
            self.monitor.begin_window(key, sync_execution=True)
            self._open = key
            self._opened_at = time.perf_counter()
        except Exception as exc:
            self._fail(f"energy counter failed at window start ({type(exc).__name__}: {exc})")

    def too_short(self, seconds: float, windows: int = 1) -> str | None:
        """Why readings of ``windows`` windows lasting ``seconds`` in all are not energy, or None when they are.

        Each window's reading may be off by one refresh period's energy, so k windows need k minimum windows.
        """
        if seconds >= windows * self.min_window_s:
            return None
        return (
            f"energy not read: windows shorter than {self.min_window_s:g} s each (here {1000 * seconds:.0f} ms in {windows}), "
            f"and the energy counter is refreshed only every {1000 * self.refresh_s:g} ms"
        )

    def aggregate_too_short(self, seconds: float, windows: int) -> str | None:
        """Why the sum of ``windows`` separate windows lasting ``seconds`` in all is not a run's energy, or None.

        A single window's reading is judged by :meth:`too_short` (worst case: off by a refresh
        period's energy at each edge). Over many windows those edge errors are independent of one
        another and zero on average (the counter's staleness does not depend on where a window
        starts), so the sum's error grows like sqrt(k) quanta, not k: the sum is kept once it spans
        sqrt(k) minimum windows, its standard error then below about 4% of the total.
        """
        if windows == 0 or seconds >= math.sqrt(windows) * self.min_window_s:
            return None
        return (
            f"energy not read: {windows} measured windows of {seconds:.3g} s in all, too little for a counter "
            f"refreshed only every {1000 * self.refresh_s:g} ms (needs {math.sqrt(windows) * self.min_window_s:.3g} s)"
        )

    def end(self, raw: bool = False) -> EnergyReading:
        """The window's energy; ``None`` with the reason when it is shorter than ``min_window_s`` (unless
        ``raw``: then the counters' difference as read, for a caller that judges several windows together)."""
        if self.monitor is None or self._open is None:
            return EnergyReading(None, reason=self.reason)
        key, self._open = self._open, None
        try:
            with warnings.catch_warnings():  # Zeus warns of 0 J windows; short windows are handled below
                warnings.filterwarnings("ignore", message="The energy consumption of one or more GPUs was measured as zero")
                measurement = self.monitor.end_window(key, sync_execution=True)
        except Exception as exc:
            self._fail(f"energy counter failed at window end ({type(exc).__name__}: {exc})")
            return EnergyReading(None, reason=self.reason)
        seconds = time.perf_counter() - self._opened_at
        short = None if raw else self.too_short(seconds)
        if short is not None:
            return EnergyReading(None, reason=short, seconds=seconds)
        gpu = sum(measurement.gpu_energy.values()) if measurement.gpu_energy else None
        cpu_parts = [v for v in (measurement.cpu_energy or {}).values() if v is not None]
        dram_parts = [v for v in (getattr(measurement, "dram_energy", None) or {}).values() if v is not None]
        cpu = sum(cpu_parts) + sum(dram_parts) if cpu_parts else None
        dram = float(sum(dram_parts)) if cpu_parts and dram_parts else None
        values = [v for v in (gpu, cpu) if v is not None]
        if not values:
            return EnergyReading(None, reason="counters returned no energy for this window")
        if any(v < 0 for v in values):
            # A wrapped counter that the backend did not correct: the window's value is unknown.
            return EnergyReading(None, gpu, cpu, reason="energy counter went backwards (wrap-around not corrected)", dram_joules=dram)
        return EnergyReading(float(sum(values)), gpu, cpu, dram_joules=dram, seconds=seconds)

    def _fail(self, reason: str) -> None:
        self.monitor = None
        self.reason = reason
