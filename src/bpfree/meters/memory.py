"""Peak memory: the CUDA caching allocator's peak on GPU, the process's peak RSS on CPU."""

from __future__ import annotations

from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _read_vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemoryMeter:
    """Peak memory over a window (reset at every ``begin``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = False
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif _read_vm_hwm() is not None:
            self.method = "process peak RSS (VmHWM)"
        else:
            self.method = "process peak RSS (ru_maxrss, whole process lifetime)"

    def begin(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0) so the peak covers this window only.
        try:
            _CLEAR_REFS.write_text("5")
            self.resettable = True
            self.method = "process peak RSS (VmHWM, reset at phase start)"
        except OSError:
            self.resettable = False

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        value = _read_vm_hwm()
        if value is not None:
            return value
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
