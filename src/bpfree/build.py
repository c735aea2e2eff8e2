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
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.val_fraction).to(device)
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
