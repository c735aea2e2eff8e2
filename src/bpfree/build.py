"""Build the parts of one run from its config: device, seeds, data, model, algorithm, generators.

Everything that can fail on user input is built here, before the engine creates a run directory.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from bpfree.algorithms import get_algorithm
from bpfree.algorithms.base import Algorithm, TrainSettings
from bpfree.config import RunConfig
from bpfree.data import Splits, load_dataset
from bpfree.errors import UserError
from bpfree.models import build_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("field 'device': cuda requested but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def derived_seeds(seed: int) -> dict[str, int]:
    """Independent streams: weights, data order/augmentation, and the algorithm's own noise."""
    return {"model_init": seed, "data_order": seed + 1_000_003, "algorithm": seed + 2_000_006}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Bytes per parameter while training in fp32: weights + gradients + optimiser state.
_OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1}


def training_bytes(cfg: RunConfig, data: Splits) -> int | None:
    """Weights, gradients and optimiser state of the model, counted on the meta device (no memory used).

    A lower bound: activations and an algorithm's own parts come on top. None if the model cannot
    be built on the meta device (then no estimate is made).
    """
    try:
        with torch.device("meta"):
            model = build_model(cfg.model, data.spec)
    except Exception:  # noqa: BLE001 - an estimate only; the real build reports real errors
        return None
    parameters = sum(p.numel() for p in model.parameters())
    return parameters * 4 * (2 + _OPTIMIZER_STATES.get(cfg.optimizer, 2))


def available_bytes(device: torch.device) -> int | None:
    """Memory a run can still take: free GPU memory, or the kernel's MemAvailable on the host."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(cfg: RunConfig, data: Splits, device: torch.device) -> None:
    """Refuse a model whose weights and optimiser state alone exceed the free memory (before allocating)."""
    need, free = training_bytes(cfg, data), available_bytes(device)
    if need is not None and free is not None and need > free:
        raise UserError(
            f"field 'model': {cfg.model} needs at least {need / 2**30:.1f} GiB on {device.type} for weights, gradients and "
            f"{cfg.optimizer} state, but only {free / 2**30:.1f} GiB is free; choose a smaller model"
        )


@dataclass
class RunParts:
    """The live objects of one run; the engine trains them, ``bench`` and the tests drive them directly."""

    cfg: RunConfig
    device: torch.device
    seeds: dict[str, int]
    data: Splits
    algorithm: Algorithm
    data_generator: torch.Generator
    algorithm_generator: torch.Generator
    autocast: contextlib.AbstractContextManager

    @property
    def model(self) -> torch.nn.Module:
        return self.algorithm.model


def build_run(cfg: RunConfig) -> RunParts:
    device = resolve_device(cfg.device)
    seeds = derived_seeds(cfg.seed)
    algorithm_cls = get_algorithm(cfg.algorithm)  # RunConfig has judged the algorithm x model pair
    seed_everything(cfg.seed)
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.val_fraction, cfg.verify_checksums).to(device)
    check_memory(cfg, data, device)
    torch.manual_seed(seeds["model_init"])
    model = build_model(cfg.model, data.spec, cfg.init, cfg.algorithm).to(device)
    if hasattr(model, "READOUTS"):  # one test-time read-out rule, the same for an algorithm and its BP twin
        model.readout, model.readout_seed = cfg.readout, seeds["algorithm"] + 7_919
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        data = data.with_images(lambda x: x.contiguous(memory_format=torch.channels_last))
    if cfg.compile:
        for block in model.blocks:
            block.compile()
    data_generator = torch.Generator(device=device).manual_seed(seeds["data_order"])
    algorithm_generator = torch.Generator(device=device).manual_seed(seeds["algorithm"])
    settings = TrainSettings(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.optimizer, cfg.momentum)
    algorithm = algorithm_cls(model, data.spec, settings, cfg.algorithm_params(), algorithm_generator)
    # Parts an algorithm builds beside the model (projections, predictors, feedback) join it on the
    # run's device; parameters keep their identity, so optimisers built in __init__ still hold them.
    algorithm.modules().to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)
    return RunParts(cfg, device, seeds, data, algorithm, data_generator, algorithm_generator, autocast)
