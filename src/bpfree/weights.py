"""Final weights of a completed run as ``weights.safetensors`` (tensors only, never pickle).

The file holds every weight and buffer of the algorithm's modules (model and auxiliary parts:
projections, heads, feedback); the run's config.json rebuilds the same modules to load them into.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bpfree.algorithms.base import Algorithm
from bpfree.errors import UserError
from bpfree.fileio import atomic_write_bytes

WEIGHTS_FILE = "weights.safetensors"


def save_weights(path: Path, algorithm: Algorithm, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    # Own contiguous copies: safetensors refuses tensors that share storage (tied or viewed weights).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in algorithm.modules().state_dict().items()}
    atomic_write_bytes(Path(path), save(tensors, metadata={"format": "pt", **(metadata or {})}))


def load_weights(path: Path, algorithm: Algorithm) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; weights are saved with every run completed by this version of bpfree")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    modules = algorithm.modules()
    expected = modules.state_dict()
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise UserError(f"{path}: weights do not match the model its config.json builds")
    with torch.no_grad():
        modules.load_state_dict(tensors)
