"""CPU timing you can trust: subnormal flushing, process CPU time, load average and contention.

Subnormal floats (|x| < 1.2e-38 in float32) take a slow path on x86 CPUs: late in training, when
many weights and activations decay towards zero, epoch times can double for BP and FF alike, so a
time comparison would depend on how long each run trained. ``flush_denormal`` (on by default)
treats them as zero on CPU; the GPU has its own flush-to-zero behaviour and is not affected.

On a shared machine the same epoch can take several times longer when other processes hold the
cores. A process that runs ``threads`` threads for ``wall`` seconds can use at most
``threads x wall`` CPU seconds; when it gets much less than that (its *CPU share*), it waited for
the cores, and its wall time says more about the machine than about the algorithm.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# A CPU run whose process got less than this share of its threads' wall time was contended.
CONTENTION_SHARE = 0.7


def apply_flush_denormal(enabled: bool) -> bool:
    """Set subnormal flushing for this process; True when the setting is in force (CPU supports it)."""
    supported = torch.set_flush_denormal(enabled)
    return bool(enabled and supported)


def subnormals_flushed() -> bool:
    """Whether this process currently flushes subnormals (torch has no getter: probe one)."""
    return torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() == 0.0


@contextlib.contextmanager
def flush_denormal_scope(enabled: bool) -> Iterator[bool]:
    """Flush subnormals (or not) inside the block, restoring the process's previous setting after it.

    The setting is process-wide CPU state; a run must not leave it changed for the code that follows.
    """
    previous = subnormals_flushed()
    try:
        yield apply_flush_denormal(enabled)
    finally:
        torch.set_flush_denormal(previous)


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


@dataclass(frozen=True)
class CpuReading:
    wall_s: float
    cpu_s: float  # user + system CPU time of this process
    threads: int
    load_average: float | None  # at the end of the window

    @property
    def cpu_share(self) -> float | None:
        """CPU seconds used per second of wall time per thread (1.0: never waited for a core)."""
        if self.wall_s <= 0 or self.threads < 1:
            return None
        return self.cpu_s / (self.wall_s * self.threads)

    @property
    def contended(self) -> bool:
        share = self.cpu_share
        return share is not None and share < CONTENTION_SHARE


class CpuClock:
    """Process CPU time and wall time over a window (``begin`` ... ``end``)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or torch.get_num_threads()
        self._wall = self._cpu = 0.0

    def begin(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def end(self) -> CpuReading:
        return CpuReading(time.perf_counter() - self._wall, time.process_time() - self._cpu, self.threads, load_average())
