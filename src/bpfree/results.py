"""Result records: unique run ids, atomic writes, and reading a results directory back."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import torch

from bpfree.config import RunConfig
from bpfree.errors import UserError

RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
SCHEMA_VERSION = 1


def new_run_id(cfg: RunConfig) -> str:
    """algorithm-dataset-model-seed-key-time-random: unique across seeds, processes and machines."""
    model = cfg.model.replace(":", "").replace(",", "-")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{cfg.algorithm}-{cfg.dataset}-{model}-s{cfg.seed}-{cfg.key()[:8]}-{stamp}-{secrets.token_hex(3)}"


def _umask() -> int:
    try:  # Linux states it without changing it (os.umask would, for every thread, for a moment)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` through ``write(handle)`` so readers see the old file or the new one, never half.

    The new file gets the permissions an ordinary ``open`` would give it (0666 less the umask),
    not the 0600 of a temporary file, so colleagues on a shared cluster can read results.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_write_json(path: Path, data: Any) -> None:
    blob = json.dumps(data, indent=2, sort_keys=False, allow_nan=False).encode()
    atomic_write(path, lambda handle: handle.write(blob))


def atomic_torch_save(path: Path, obj: Any) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


def ensure_writable_dir(path: Path) -> Path:
    """Create the results directory or fail with one line saying why."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise UserError(f"output directory {path}: not writable ({exc.strerror or exc}); choose another with --output") from None
    return path


def iter_results(directory: Path) -> Iterator[dict[str, Any]]:
    """Every readable result.json under ``directory`` (unreadable ones are skipped, never rewritten)."""
    directory = Path(directory)
    for path in sorted(directory.glob(f"*/{RESULT_FILE}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and "run_id" in record:
            yield record


def load_results(directory: Path) -> list[dict[str, Any]]:
    return list(iter_results(directory))
