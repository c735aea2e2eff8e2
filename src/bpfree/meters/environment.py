"""Hardware and software fingerprint stored with every result."""

from __future__ import annotations

import math
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

import bpfree


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs granted by the cgroup quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def allocated_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask (Slurm, taskset) capped by the cgroup quota.

    Not ``os.cpu_count()``, which is the node's: on a 4-CPU slice of a 64-core node it would
    start 16 runs or give each run 16 threads.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)


def torch_build_summary() -> dict[str, object]:
    """The fields of ``torch.utils.collect_env`` that describe this process, read in-process.

    collect_env itself shells out (pip, conda, nvidia-smi, lscpu) for seconds; these are the
    same facts without a subprocess, so every run can afford them.
    """
    parallel = [line.strip() for line in torch.__config__.parallel_info().splitlines() if line and not line.startswith("\t")]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "torch_version": torch.__version__,
        "is_debug_build": bool(torch.version.debug),
        "cuda_compiled_version": torch.version.cuda,
        "hip_compiled_version": getattr(torch.version, "hip", None),
        "cudnn_version": cudnn,
        "is_cuda_available": torch.cuda.is_available(),
        "nvidia_gpu_models": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        "python_platform": platform.platform(),
        "libc_version": "-".join(platform.libc_ver()) or None,
        "is_xnnpack_available": bool(getattr(getattr(torch.backends, "xnnpack", None), "enabled", False)),
        "caching_allocator_config": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "parallel": parallel,
    }


def _gpu_uuid(device: torch.device) -> str | None:
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is not None:
        text = str(uuid)
        return text if text.startswith("GPU-") else f"GPU-{text}"
    return None


def _git_revision() -> dict[str, object]:
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            return {"git_sha": sha.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_sha": None, "git_dirty": None}


def environment(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "bpfree_version": bpfree.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_allocated": allocated_cpus(),
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": None,
        "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if torch.cuda.is_available() else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["gpu_uuid"] = _gpu_uuid(device)
        try:
            import pynvml  # noqa: PLC0415 - optional, shipped with zeus

            pynvml.nvmlInit()
            info["gpu_driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            info["gpu_driver"] = None
    info["collect_env"] = torch_build_summary()
    info.update(_git_revision())
    return info
