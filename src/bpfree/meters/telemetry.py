"""Resources over time: a background sampler per run, writing ``telemetry.csv`` beside result.json.

Every ``interval_s`` (default 0.1 s) a daemon thread records one row: the time, what the run is
doing (``phase``: the algorithm's training phase, ``setup`` or ``final``; ``activity``: setup,
train, eval, checkpoint, test, end; ``epoch``: epochs completed), the process's RSS and CPU use
(psutil; ``os.times``), the CUDA caching allocator's allocated and reserved bytes, on NVIDIA GPUs the device's
memory in use, power, utilisation and clocks (NVML through nvidia-ml-py), and the CPU packages'
and DRAM's energy (RAPL) where readable. An empty cell means "not available here".

The sampler never touches the training step and never synchronises the device: the allocator
counters are host-side bookkeeping, NVML and RAPL are read outside CUDA, psutil reads /proc.
The engine only sets the current phase/activity/epoch (plain attribute writes) and wakes the
thread at transitions, so short stretches (an evaluation) get a row too. Rows are buffered and
appended (one ``O_APPEND`` write per flush) at least every ``flush_every_s`` seconds, at the
transitions the engine asks to flush (epoch and phase ends) and when the sampler stops; a kill can leave
the last line torn, which readers drop and a resumed run cuts off before appending. A resumed run
appends to the same file, its times and RAPL energy offset by the last row's, so both keep
increasing. Any failure (a counter, the disk) is reported once as a warning and stops the
sampler; it never fails the run.
"""

from __future__ import annotations

import csv
import io
import math
import os
import stat
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from bpfree.escape import csv_cell, plain
from bpfree.fileio import append_line, printable_path

TELEMETRY_FILE = "telemetry.csv"
COLUMNS = (
    "time_s",  # seconds since the run started (monotonic clock; a resume continues from the last row)
    "unix_time",
    "phase",
    "epoch",  # epochs completed
    "rss_bytes",
    "cpu_percent",  # this process, all cores: 100 = one core busy (empty right after another sample: too short to measure)
    "cuda_allocated_bytes",
    "cuda_reserved_bytes",
    "gpu_memory_used_bytes",  # the whole GPU's, every process on it
    "gpu_power_w",
    "gpu_sm_util_pct",  # NVML utilisation rate: share of the last sample period a kernel ran
    "gpu_sm_clock_mhz",
    "gpu_mem_clock_mhz",
    "rapl_energy_j",  # CPU packages + DRAM since the run started (whole sockets, not this process)
    "activity",
)
POWERCAP_ROOT = Path("/sys/class/powercap")
TAIL_BYTES = 64 * 1024  # a resumed run reads at most this much of the file's end


@dataclass
class RaplCounter:
    path: Path
    max_range_uj: int
    last_uj: int


class Rapl:
    """Cumulative energy of the RAPL package and DRAM zones, wrap-around of each counter corrected."""

    def __init__(self, root: Path = POWERCAP_ROOT) -> None:
        self.counters: list[RaplCounter] = []
        self.joules = 0.0
        for zone in sorted(root.glob("intel-rapl:*")):
            try:
                name = (zone / "name").read_text().strip()
                top_level = zone.name.count(":") == 1
                if not ((top_level and name.startswith("package")) or (not top_level and name == "dram")):
                    continue
                max_range = int((zone / "max_energy_range_uj").read_text())
                self.counters.append(RaplCounter(zone / "energy_uj", max_range, int((zone / "energy_uj").read_text())))
            except (OSError, ValueError):  # an unreadable zone (permissions): not counted
                continue

    @property
    def available(self) -> bool:
        return bool(self.counters)

    def read(self) -> float:
        """Joules since construction."""
        for counter in self.counters:
            now = int(counter.path.read_text())
            delta = now - counter.last_uj
            if delta < 0:  # the counter wrapped at max_energy_range_uj
                delta += counter.max_range_uj
            counter.last_uj = now
            self.joules += delta * 1e-6
        return self.joules


class Nvml:
    """One GPU's memory in use, power, utilisation and clocks through NVML; metrics it lacks stay None."""

    def __init__(self, device: torch.device) -> None:
        import pynvml  # optional dependency (nvidia-ml-py, installed with zeus); only on NVIDIA GPUs

        self.nvml = pynvml
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            text = str(uuid)
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
        else:
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        probes: dict[str, Callable[[], float]] = {
            "gpu_memory_used_bytes": lambda: pynvml.nvmlDeviceGetMemoryInfo(self.handle).used,
            "gpu_power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
            "gpu_sm_util_pct": lambda: pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu,
            "gpu_sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(self.handle, pynvml.NVML_CLOCK_SM),
            "gpu_mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(self.handle, pynvml.NVML_CLOCK_MEM),
        }
        self.metrics: dict[str, Callable[[], float]] = {}
        for name, probe in probes.items():
            try:
                probe()
                self.metrics[name] = probe
            except pynvml.NVMLError:  # not supported on this GPU: the column stays empty
                continue

    def read(self) -> dict[str, float]:
        return {name: probe() for name, probe in self.metrics.items()}

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a library that may already be gone
            pass


@dataclass
class Resumed:
    """Where an existing telemetry file ends: the offsets a resumed run continues from."""

    time_s: float = 0.0
    rapl_energy_j: float = 0.0
    needs_header: bool = True


def prepare_file(path: Path) -> Resumed:
    """Read the end of an existing telemetry file (bounded), cutting off a torn last line.

    Raises ValueError when the file is not a bpfree telemetry table (it is then left alone).
    """
    try:
        # never through a link: a torn tail is cut off, and only in the run's own file
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return Resumed()
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size == 0:
            return Resumed()
        header = os.pread(fd, 4096, 0).split(b"\n", 1)[0].decode("utf-8", "replace")
        if tuple(header.split(",")) != COLUMNS:
            raise ValueError("its header is not bpfree's telemetry columns")
        start = max(0, info.st_size - TAIL_BYTES)
        tail = os.pread(fd, info.st_size - start, start)
        if not tail.endswith(b"\n"):  # a kill tore the last row: cut it off before appending
            cut = tail.rfind(b"\n")
            if cut < 0:
                raise ValueError(f"its last {TAIL_BYTES} bytes hold no complete row")
            os.ftruncate(fd, start + cut + 1)
            tail = tail[: cut + 1]
        lines = tail.rstrip(b"\n").split(b"\n")
        last = next(csv.reader([lines[-1].decode("utf-8", "replace")]))
        if len(lines) == 1 and start == 0:  # the header alone
            return Resumed(needs_header=False)
        row = dict(zip(COLUMNS, last))
        return Resumed(_number(row.get("time_s")) or 0.0, _number(row.get("rapl_energy_j")) or 0.0, needs_header=False)
    finally:
        os.close(fd)


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


class TelemetrySampler:
    """The background sampler of one run (see the module docstring); a context manager."""

    def __init__(
        self,
        path: Path,
        device: torch.device,
        interval_s: float = 0.1,
        flush_every_s: float = 2.0,
        powercap_root: Path = POWERCAP_ROOT,
    ) -> None:
        self.path = Path(path)
        self.device = device
        self.interval_s = interval_s
        self.flush_every_s = flush_every_s
        self.powercap_root = powercap_root
        self.rows = 0  # rows written by this process
        self.problem: str | None = None  # why the sampler stopped early, if it did
        self.sources: list[str] = []
        # What the run is doing: one tuple, replaced whole by the engine (an atomic write under the GIL).
        self.state: tuple[str, str, int] = ("setup", "setup", 0)
        self._buffer: list[str] = []
        self._wake = threading.Event()
        self._stopping = False
        self._flush_now = False
        self._thread: threading.Thread | None = None
        self._process: psutil.Process | None = None
        self._cuda_index: int | None = None
        self._nvml: Nvml | None = None
        self._rapl: Rapl | None = None
        self._resumed = Resumed()
        self._clock_start = 0.0
        self._cpu_since: tuple[float, float] = (0.0, 0.0)  # (monotonic time, process CPU seconds) of the CPU baseline
        self._cells: dict[str, str] = {}  # phase and activity names as CSV cells

    # -- the engine's side ------------------------------------------------------------------------
    def start(self) -> TelemetrySampler:
        """Open the sources and start the thread; a failure here warns and leaves the run unsampled."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # as the run's first checkpoint would
            self._resumed = prepare_file(self.path)
            self._open_sources()
            if self._resumed.needs_header:
                append_line(self.path, ",".join(COLUMNS))
            self._clock_start = time.monotonic()
            self._thread = threading.Thread(target=self._loop, name="bpfree-telemetry", daemon=True)
            self._thread.start()
        except Exception as exc:  # noqa: BLE001 - telemetry must never fail a run
            self._fail(exc)
            self._close_sources()
        return self

    def mark(self, activity: str, phase: str | None = None, epoch: int | None = None, flush: bool = False) -> None:
        """What the run does from now on; wakes the thread for a row (and a flush); no I/O here."""
        old_activity, old_phase, old_epoch = self.state
        self.state = (activity, old_phase if phase is None else phase, old_epoch if epoch is None else epoch)
        self._flush_now = self._flush_now or flush
        self._wake.set()

    def stop(self) -> None:
        """Take a last row, flush and fsync, join the thread; never raises."""
        thread = self._thread
        if thread is None:
            return
        self.state = ("end", self.state[1], self.state[2])
        self._stopping = True
        self._wake.set()
        thread.join(timeout=max(10.0, 5 * self.interval_s))
        if thread.is_alive():  # a file system that hangs: give up on it rather than on the run
            self._fail(TimeoutError("the sampler thread did not stop within 10 s"))
        self._thread = None

    def summary(self) -> dict[str, Any]:
        """The result record's note on the sampler."""
        return {
            "file": TELEMETRY_FILE,
            "interval_s": self.interval_s,
            "rows": self.rows,
            "sources": list(self.sources),
            "problem": self.problem,
        }

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the thread's side ------------------------------------------------------------------------
    def _open_sources(self) -> None:
        self._process = psutil.Process()
        self._cpu_since = (time.monotonic(), self._cpu_seconds())
        self.sources = ["psutil"]
        if self.device.type == "cuda":
            # An explicit index: torch then reads the allocator's counters without any CUDA call.
            self._cuda_index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.sources.append("torch.cuda allocator")
            try:
                self._nvml = Nvml(self.device)
                self.sources.append("nvml")
            except Exception:  # noqa: BLE001 - no NVML library or driver: those columns stay empty
                self._nvml = None
        rapl = Rapl(self.powercap_root)
        if rapl.available:
            self._rapl = rapl
            self.sources.append("rapl")

    def _close_sources(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    def _loop(self) -> None:
        try:
            next_sample = time.monotonic()
            next_flush = next_sample + self.flush_every_s
            while True:
                self._sample()
                now = time.monotonic()
                if self._stopping:
                    self._flush(sync=True)
                    return
                if self._flush_now or now >= next_flush:
                    self._flush(sync=self._flush_now)
                    next_flush = now + self.flush_every_s
                next_sample = max(next_sample + self.interval_s, now)  # a late sample never queues more
                self._wake.wait(max(0.0, next_sample - now))
                self._wake.clear()
        except Exception as exc:  # noqa: BLE001 - telemetry must never fail a run
            self._fail(exc)
            try:
                self._flush(sync=True)
            except Exception:  # noqa: BLE001 - the disk failed too: the rows are lost, the run is not
                pass
        finally:
            self._close_sources()

    def _sample(self) -> None:
        """One row into the buffer. Kept lean: the thread holds the GIL while it runs Python, and the
        training thread needs the GIL between its operators."""
        activity, phase, epoch = self.state
        assert self._process is not None
        now = time.monotonic()
        row: dict[str, Any] = {
            "time_s": f"{self._resumed.time_s + now - self._clock_start:.6f}",
            "unix_time": f"{time.time():.3f}",
            "phase": self._text_cell(phase),
            "epoch": epoch,
            "rss_bytes": self._process.memory_info().rss,
            "cpu_percent": self._cpu_percent(now),
            "activity": self._text_cell(activity),
        }
        if self._cuda_index is not None:
            # One read of the allocator's counters (memory_allocated and memory_reserved would each
            # flatten and sort every statistic).
            stats = torch.cuda.memory_stats_as_nested_dict(self._cuda_index)
            row["cuda_allocated_bytes"] = stats["allocated_bytes"]["all"]["current"]
            row["cuda_reserved_bytes"] = stats["reserved_bytes"]["all"]["current"]
        if self._nvml is not None:
            row.update(self._nvml.read())
        if self._rapl is not None:
            row["rapl_energy_j"] = f"{self._resumed.rapl_energy_j + self._rapl.read():.3f}"
        self._buffer.append(",".join("" if (value := row.get(c)) is None else str(value) for c in COLUMNS))

    def _text_cell(self, text: str) -> str:
        """A text value as a CSV cell (escaped for spreadsheets, quoted where needed), computed once per value."""
        cell = self._cells.get(text)
        if cell is None:
            line = io.StringIO()
            csv.writer(line, lineterminator="").writerow([csv_cell(plain(text, one_line=True))])
            cell = self._cells[text] = line.getvalue()
        return cell

    @staticmethod
    def _cpu_seconds() -> float:
        # The process's user + system time, all threads: os.times is one syscall (a few µs), where
        # psutil's cpu_times parses /proc (about 100 µs, part of it holding the GIL).
        times = os.times()
        return times.user + times.system

    def _cpu_percent(self, now: float) -> str | None:
        """The process's CPU use since the baseline; None when the baseline is under half an interval old
        (CPU time advances in clock ticks, so a few milliseconds say nothing)."""
        since, cpu_before = self._cpu_since
        if now - since < self.interval_s / 2:
            return None
        cpu = self._cpu_seconds()
        self._cpu_since = (now, cpu)
        return f"{100.0 * (cpu - cpu_before) / (now - since):.1f}"

    def _flush(self, sync: bool) -> None:
        self._flush_now = False
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        append_line(self.path, "\n".join(lines), sync=sync)
        self.rows += len(lines)

    def _fail(self, exc: BaseException) -> None:
        if self.problem is None:
            self.problem = plain(f"{type(exc).__name__}: {exc}", one_line=True)
            warnings.warn(f"telemetry stopped ({printable_path(self.path)}): {self.problem}", RuntimeWarning, stacklevel=2)


__all__ = ["COLUMNS", "TELEMETRY_FILE", "Nvml", "Rapl", "Resumed", "TelemetrySampler", "prepare_file"]
