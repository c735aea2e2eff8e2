"""Training steps captured in CUDA graphs: one replay per step instead of hundreds of kernel launches.

On a GPU an eager step of a small network waits on Python and kernel launches, so an epoch measures
the host, not the algorithm. :class:`CapturedStep` records an algorithm's whole ``train_step``
(forward, local losses, backward/VJPs, fused optimiser step) once per kind (phase x batch size) on
static batch buffers, then replays it: the last, smaller batch of an epoch gets its own graph.

A kind also carries the algorithm's ``capture_key()`` where an epoch picks what a step computes
(NoProp's paper loop trains one block per epoch: one graph per block).

Per kind: the first steps run eagerly on a side stream (optimiser state and library workspaces are
created there), the next one is captured and replayed; all of these run in the loop's excluded
stretch (``probe_s``), outside the timed window. A step that cannot be captured (one that reads a
tensor on the host, e.g. BatchNorm's cumulative average) keeps running eagerly, and the reason is
recorded. Graphs are dropped at every phase start (new optimisers, other frozen layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bpfree.algorithms.base import Algorithm
from bpfree.build import RunParts

WARMUP_STEPS = 2
Kind = tuple[str, int, Any]  # phase, batch size, the algorithm's capture_key()


def make_capturable(optimizers: dict[str, torch.optim.Optimizer], device: torch.device) -> None:
    """Turn the optimisers' step into one a graph can hold: step counts and lr as device tensors."""
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
            # A float lr would be baked into the graph; a device tensor is read at every replay, so
            # epoch-level schedules (FF's cooldown through set_lr) still apply. Capturable and fused
            # steps take a tensor lr without a host sync.
            if not isinstance(group.get("lr"), torch.Tensor) and ("capturable" in group or group.get("fused")):
                group.setdefault("initial_lr", float(group["lr"]))
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        for state in optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.device != device:
                state["step"] = step.to(device)


def _label(kind: Kind) -> str:
    return "/".join(str(part) for part in kind if part is not None)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    y: torch.Tensor
    out: dict[str, torch.Tensor]


@dataclass
class CapturedStep:
    """A drop-in for ``algorithm.train_step`` on CUDA (see the module docstring)."""

    algorithm: Algorithm
    generators: tuple[torch.Generator, ...] = ()
    graphs: dict[Kind, _Graph] = field(default_factory=dict)
    eager_steps: dict[Kind, int] = field(default_factory=dict)  # warm-up steps taken per kind
    failures: dict[Kind, str] = field(default_factory=dict)  # kinds that run eagerly, and why
    captured: set[str] = field(default_factory=set)  # every kind captured in the run, as labels
    _phase: str = "train"

    def begin_phase(self, name: str) -> None:
        self.graphs.clear()
        self.eager_steps.clear()
        self._phase = name
        make_capturable(self.algorithm.optimizers, self.algorithm.device)

    def _kind(self, x: torch.Tensor) -> Kind:
        return (self._phase, x.shape[0], self.algorithm.capture_key())

    def is_warm(self, x: torch.Tensor) -> bool:
        kind = self._kind(x)
        return kind in self.graphs or kind in self.failures

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        kind = self._kind(x)
        graph = self.graphs.get(kind)
        if graph is not None:
            graph.x.copy_(x)
            graph.y.copy_(y)
            graph.graph.replay()
            return graph.out
        if kind in self.failures:
            return self.algorithm.train_step(x, y)
        done = self.eager_steps.get(kind, 0)
        if done < WARMUP_STEPS:
            self.eager_steps[kind] = done + 1
            return self._side_stream(lambda: self.algorithm.train_step(x, y))
        return self._capture(kind, x, y)

    def _side_stream(self, fn: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _capture(self, kind: Kind, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            register = getattr(graph, "register_generator_state", None)
            if register is not None and generator.device.type == "cuda":
                register(generator)
        try:
            with torch.cuda.graph(graph):
                out = self.algorithm.train_step(static_x, static_y)
        except Exception as exc:  # not capturable: this kind keeps its eager step
            torch.cuda.synchronize()
            self.failures[kind] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return self.algorithm.train_step(x, y)
        self.graphs[kind] = _Graph(graph, static_x, static_y, out)
        self.captured.add(_label(kind))
        graph.replay()  # capture records without running: this batch's step happens now
        return out

    @classmethod
    def for_run(cls, parts: RunParts) -> CapturedStep | None:
        """The run's captured step: on CUDA unless the config switches it off (``cuda_graphs: false``)."""
        if parts.device.type != "cuda" or not parts.cfg.cuda_graphs:
            return None
        return cls(parts.algorithm, (parts.algorithm_generator,))

    def summary(self) -> dict[str, Any]:
        return {"captured_kinds": sorted(self.captured), "eager_kinds": {_label(k): why for k, why in self.failures.items()}}
