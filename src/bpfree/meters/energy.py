"""Energy from hardware counters through Zeus: NVML's total-energy counter on NVIDIA GPUs, RAPL on CPUs.

Energy is read only at window boundaries (phase/epoch), never inside a training step. Where no
counter can be read, the energy is ``None`` with the reason; it is never reported as 0. A meter
fault (library missing, permission denied, a counter that goes backwards) turns the value into
``None`` with the reason and never fails the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class EnergyReading:
    joules: float | None
    gpu_joules: float | None = None
    cpu_joules: float | None = None  # CPU packages plus DRAM (the two RAPL domains summed)
    reason: str | None = None
    dram_joules: float | None = None  # the DRAM part of cpu_joules, where RAPL exposes it

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


def _probe_zeus(device: torch.device) -> tuple[Any | None, str, str | None]:
    """Build a ZeusMonitor over the counters that exist; return (monitor, method, reason-if-none)."""
    try:
        from zeus.device import get_cpus, get_gpus
        from zeus.monitor import ZeusMonitor
    except Exception as exc:  # ImportError, or a broken install
        return None, "", f"zeus unavailable ({type(exc).__name__}: {exc})"
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
        return None, "", "; ".join(reasons) or "no energy counter found"
    try:
        monitor = ZeusMonitor(gpu_indices=gpu_indices, cpu_indices=cpu_indices, sync_execution_with="torch")
    except Exception as exc:
        return None, "", f"zeus monitor failed to start ({type(exc).__name__}: {exc})"
    parts = []
    if gpu_indices:
        parts.append(f"NVML total-energy counter, GPU {gpu_indices[0]}")
    if cpu_indices:
        parts.append(f"RAPL, {len(cpu_indices)} CPU package(s)")
    return monitor, "zeus: " + " + ".join(parts), None


class EnergyMeter:
    """Energy over begin/end windows. ``monitor_factory`` exists so tests can inject fake counters."""

    def __init__(
        self,
        device: torch.device,
        monitor_factory: Callable[[torch.device], tuple[Any | None, str, str | None]] = _probe_zeus,
    ) -> None:
        self.monitor, self.method, self.reason = monitor_factory(device)
        self._window = 0
        self._open: str | None = None

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
        except Exception as exc:
            self._fail(f"energy counter failed at window start ({type(exc).__name__}: {exc})")

    def end(self) -> EnergyReading:
        if self.monitor is None or self._open is None:
            return EnergyReading(None, reason=self.reason)
        key, self._open = self._open, None
        try:
            measurement = self.monitor.end_window(key, sync_execution=True)
        except Exception as exc:
            self._fail(f"energy counter failed at window end ({type(exc).__name__}: {exc})")
            return EnergyReading(None, reason=self.reason)
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
        return EnergyReading(float(sum(values)), gpu, cpu, dram_joules=dram)

    def _fail(self, reason: str) -> None:
        self.monitor = None
        self.reason = reason
