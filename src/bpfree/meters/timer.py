"""Wall-clock timing at boundaries only, after synchronising the device."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates time over begin/end windows; each read synchronises the device first."""

    def __init__(self, device: torch.device, total_s: float = 0.0) -> None:
        self.device = device
        self.total_s = total_s
        self._start: float | None = None

    def begin(self) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def end(self) -> float:
        synchronize(self.device)
        assert self._start is not None, "end() without begin()"
        elapsed = time.perf_counter() - self._start
        self._start = None
        self.total_s += elapsed
        return elapsed
