"""Training budgets in passes over the training data, so a comparison can give BP the same number.

An algorithm with several phases (CaFo's DFA pre-training and greedy predictors, MF or FF trained
layer by layer) runs ``epochs`` per phase: CaFo greedy on 3 blocks with ``dfa_epochs`` 5 and
``epochs`` 10 may pass over the data 5 + 3 x 10 = 35 times. Its BP twin, trained for ``epochs`` 10,
would get less than a third of that. :func:`total_epochs` is the sum of the phases' epoch caps,
read from the algorithm's own ``phases()`` (the single source of its schedule) on a model built on
the ``meta`` device, which allocates nothing.

A pass counts whatever share of the network it trains: NoProp with ``loop: paper`` trains one block
per pass, so its T passes are one paper epoch, and a twin given its total trains BP T times as
long as the paper's epoch count; give such a comparison ``budget: epochs`` or an explicit BP config.
"""

from __future__ import annotations

from typing import Any

import torch

from bpfree.config import RunConfig, build_config

BUDGET_RULES = ("passes", "epochs")  # passes: the twin gets the alternative's total epochs; epochs: the same `epochs`
_PROBE_SHAPE = (3, 32, 32)  # phases depend on the network's depth, never on the input's size


def phase_epochs(cfg: RunConfig) -> list[tuple[str, int]]:
    """Each phase of ``cfg``'s algorithm with its epoch cap, in training order."""
    from bpfree.algorithms import get_algorithm
    from bpfree.algorithms.base import TrainSettings
    from bpfree.data import DataSpec
    from bpfree.models import build_model

    spec = DataSpec("budget-probe", _PROBE_SHAPE, 10, n_train=1, n_val=1, n_test=1, augment=False)
    settings = TrainSettings(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.optimizer, cfg.momentum)

    def build(device: str):
        with torch.device(device):
            model = build_model(cfg.model, spec)
            generator = torch.Generator(device="cpu")
            return get_algorithm(cfg.algorithm)(model, spec, settings, cfg.algorithm_params(), generator)

    try:
        algorithm = build("meta")
    except (NotImplementedError, RuntimeError):  # a model that reads its own tensors while being built
        algorithm = build("cpu")
    return [(phase.name, phase.epochs) for phase in algorithm.phases()]


def total_epochs(cfg: RunConfig | dict[str, Any]) -> int:
    """The most passes over the training data ``cfg`` may make: its phases' epoch caps summed."""
    if not isinstance(cfg, RunConfig):
        cfg = build_config(cfg)
    return sum(epochs for _, epochs in phase_epochs(cfg))


def twin_epochs(alternative: RunConfig | dict[str, Any], rule: str = "passes") -> int:
    """The epoch cap of an alternative's BP twin under ``rule`` (see :data:`BUDGET_RULES`)."""
    if rule not in BUDGET_RULES:
        raise ValueError(f"unknown budget rule {rule!r}; choose one of {', '.join(BUDGET_RULES)}")
    if not isinstance(alternative, RunConfig):
        alternative = build_config(alternative)
    return total_epochs(alternative) if rule == "passes" else alternative.epochs
