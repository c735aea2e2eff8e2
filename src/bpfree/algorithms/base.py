"""The algorithm interface shared by BP and every BP-free method.

An algorithm owns its learning rule: local losses, auxiliary modules, optimisers, phases. It knows
nothing of timing, energy, logging or files; the engine drives it and the meters watch the engine.

Contract for implementers:
- ``phases()`` returns the training schedule; the engine runs each phase for up to ``epochs``
  epochs with early stopping on validation accuracy (as reported by ``predict`` in that phase)
  and restores the phase's best weights at its end.
- ``begin_epoch(clock)`` is called before every training epoch with the engine's :class:`EpochClock`
  (phase, epoch, steps); epoch-level schedules (LR cooldown, which block trains) are set here, never
  inferred from step counters. ``end_epoch()`` runs after the epoch's last step, inside the timed and
  FLOP-counted training window; work that closes an epoch (a closed-form solve) belongs there.
- ``train_step(x, y)`` does one update and returns detached scalar tensors, at least ``loss``.
  No ``.item()``, no host sync, no Python branching on tensor values or step counts, so the step
  can be captured (CUDA graphs, torch.compile): every step of an epoch runs the same operators.
  A phase whose step cannot avoid a host read declares it (``uncapturable_reason``).
- ``predict(x)`` returns class scores (argmax is the prediction) under ``torch.no_grad`` in eval
  mode and never changes weights. While a phase runs it reflects that phase (e.g. the layer being
  trained); after training (``phase is None``) it is the final inference rule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from bpfree.data import DataSpec


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Phase:
    """A stretch of training with one objective (BP: one; greedy layer-wise methods: one per layer)."""

    name: str
    epochs: int
    early_stopping: bool = True  # stop and restore weights by the run's stopping rule (monitor, restore)
    index: int = 0  # position in the schedule (set by Algorithm.schedule)


@dataclass(frozen=True)
class EpochClock:
    """Where the engine is, handed to the algorithm at the start of every training epoch."""

    phase: Phase
    epoch: int  # 0-based epoch within the phase
    epochs_run: int  # epochs completed before this one, all phases together
    steps: int  # training steps in this epoch
    n_train: int
    batch_size: int

    @property
    def samples(self) -> int:
        """Training samples this epoch's steps see (fewer than n_train when a last partial batch is dropped)."""
        return min(self.n_train, self.steps * self.batch_size)


@dataclass(frozen=True)
class TrainSettings:
    """The generic optimisation settings from the run config, shared by every algorithm."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str  # adam | adamw | sgd
    momentum: float = 0.9


@dataclass(frozen=True)
class SearchDim:
    """One tunable hyperparameter: a dotted config key and its range."""

    key: str  # "lr", "weight_decay" or "params.<name>"
    kind: str  # "log" | "float" | "int" | "choice"
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group's ``initial_lr`` by ``factor`` (in place when lr is a tensor, as captured steps need)."""
    for group in optimizer.param_groups:
        base = group.setdefault("initial_lr", float(group["lr"]))
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(base * factor)
        else:
            group["lr"] = base * factor


def make_optimizer(
    parameters: Any, settings: TrainSettings, lr: float | None = None, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """The run's optimiser; the fused kernels (one pass over all parameters) where torch has them.

    Fused kernels matter when BP and a local method are compared per epoch (see BENCHMARKS.md).
    """
    lr = settings.lr if lr is None else lr
    wd = settings.weight_decay if weight_decay is None else weight_decay
    parameters = list(parameters)
    kinds = {
        "adam": (torch.optim.Adam, {}),
        "adamw": (torch.optim.AdamW, {}),
        "sgd": (torch.optim.SGD, {"momentum": settings.momentum}),
    }
    if settings.optimizer not in kinds:
        raise ValueError(f"unknown optimizer {settings.optimizer!r}")
    cls, extra = kinds[settings.optimizer]
    try:
        return cls(parameters, lr=lr, weight_decay=wd, fused=True, **extra)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
        return cls(parameters, lr=lr, weight_decay=wd, **extra)


class Algorithm(ABC):
    """Base class; subclasses set ``name``, ``paper``, ``Params`` and implement the abstract methods."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    # Deliberate differences from the paper, each with the parameter that switches it (if any).
    deviations: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type[BaseModel]] = NoParams
    # Hyperparameters Optuna tunes; every algorithm gets the same number of trials and epochs.
    search_space: ClassVar[tuple[SearchDim, ...]] = (
        SearchDim("lr", "log", 1e-5, 1e-2),
        SearchDim("weight_decay", "log", 1e-7, 1e-3),
    )
    # False where the algorithm reads out through its own auxiliary parts and never trains the model's head.
    uses_model_head: ClassVar[bool] = True
    # Model families this algorithm can train (prefixes of model specs).
    model_families: ClassVar[tuple[str, ...]] = ("mlp", "cnn3")

    def __init__(
        self,
        model: nn.Module,
        spec: DataSpec,
        settings: TrainSettings,
        params: BaseModel,
        generator: torch.Generator,
    ) -> None:
        self.model = model
        self.spec = spec
        self.settings = settings
        self.params = params
        self.generator = generator  # the algorithm's own randomness (negatives, noise), seeded by the engine
        self.aux = nn.ModuleDict()  # auxiliary parts attached beside the model
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.phase: Phase | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- schedule -------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        return [Phase("train", self.settings.epochs)]

    def schedule(self) -> list[Phase]:
        """``phases()`` with each phase's index set; the engine runs this list."""
        return [replace(phase, index=i) for i, phase in enumerate(self.phases())]

    def begin_phase(self, phase: Phase) -> None:
        self.phase = phase

    def begin_epoch(self, clock: EpochClock) -> None:
        """Epoch-level schedule (override): called before the epoch's first step."""
        del clock

    def capture_key(self) -> Any:
        """Steps with different keys (within a phase and batch size) run different operators, so a
        captured step needs one graph per key (override where an epoch picks what a step does)."""
        return None

    def uncapturable_reason(self) -> str | None:
        """Why the current phase's ``train_step`` cannot be captured in a CUDA graph, or None (override).

        A step that must read a tensor on the host (an adaptive solver's step size) says so here: it
        then runs eagerly and the reason is recorded. An undeclared step that fails to capture stops
        the run, since a failed capture leaves the process's CUDA state unusable.
        """
        return None

    def end_epoch(self) -> dict[str, torch.Tensor]:
        """Work that closes the epoch (override); a returned ``loss`` is the epoch's training loss."""
        return {}

    def layer_scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class scores (B x C) of each layer-local read-out of the trained model, by name (override).

        Layer-local algorithms expose one read-out per layer (MF projection, FF layer, CaFo predictor,
        NoProp block); the engine records their validation and test accuracy. Empty: none.
        """
        del x
        return {}

    def end_training(self) -> None:
        """Switch ``predict`` to the final inference rule."""
        self.phase = None

    # -- learning -------------------------------------------------------------------------------
    @abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def predict(self, x: torch.Tensor) -> torch.Tensor: ...

    # -- modes and state ------------------------------------------------------------------------
    def modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"model": self.model, "aux": self.aux})

    def train_mode(self) -> None:
        self.modules().train()

    def eval_mode(self) -> None:
        self.modules().eval()

    def owned_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this algorithm owns: weights, buffers, optimiser state, and its attributes'
        tensors (schedules, accumulators); all of them must live on the run's device."""
        owned = {f"module.{k}": v for k, v in self.modules().state_dict().items()}
        for key, optimizer in self.optimizers.items():
            # torch keeps an eager (neither fused nor capturable) optimiser's step count on the host by design
            host_steps = not any(group.get("capturable") or group.get("fused") for group in optimizer.param_groups)
            for i, state in enumerate(optimizer.state.values()):
                for name, value in state.items():
                    if isinstance(value, torch.Tensor) and not (name == "step" and host_steps):
                        owned[f"optimizer.{key}.{i}.{name}"] = value
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                owned[f"attr.{name}"] = value
            elif isinstance(value, dict):
                owned.update({f"attr.{name}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
        return owned

    def weights_state(self) -> dict[str, torch.Tensor]:
        """A detached copy of every weight and buffer, for best-epoch restore."""
        return {k: v.detach().clone() for k, v in self.modules().state_dict().items()}

    def load_weights_state(self, state: dict[str, torch.Tensor]) -> None:
        self.modules().load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": self.modules().state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.modules().load_state_dict(state["weights"])
        for key, opt_state in state["optimizers"].items():
            if key in self.optimizers:  # optimisers of a finished phase are not rebuilt
                self.optimizers[key].load_state_dict(opt_state)
        self.load_extra_state(state.get("extra", {}))

    def extra_state(self) -> dict[str, Any]:
        """Non-tensor state beyond weights and optimisers (override if any)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        del state

    def parameter_counts(self) -> dict[str, int]:
        """Parameters this algorithm trains: the model's (its head only if used) and its auxiliary parts."""
        head = self.model.head if not self.uses_model_head and hasattr(self.model, "head") else None
        skip = {id(p) for p in head.parameters()} if head is not None else set()
        model = sum(p.numel() for p in self.model.parameters() if id(p) not in skip)
        aux = sum(p.numel() for p in self.aux.parameters())
        return {"model_params": model, "aux_params": aux, "trained_params": model + aux}
