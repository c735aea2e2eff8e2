"""Training steps captured in CUDA graphs: one replay per step instead of hundreds of kernel launches.

On a GPU an eager step of a small network waits on Python and kernel launches, so an epoch measures
the host, not the algorithm. :class:`CapturedStep` records an algorithm's whole ``train_step``
(forward, local losses, backward/VJPs, fused optimiser step) once per kind (phase x batch size) on
static batch buffers, then replays it: the last, smaller batch of an epoch gets its own graph.

A kind also carries the algorithm's ``capture_key()`` where an epoch picks what a step computes
(NoProp's paper loop trains one block per epoch: one graph per block).

Per kind: the first steps run eagerly on the process's one warm-up stream (optimiser state and
library workspaces are created there), the next one is captured on that same stream and replayed;
all of these run in the loop's excluded stretch (``probe_s``), outside the timed window. One
persistent stream matters: cuBLAS keeps a workspace per stream for the life of the process, and the
caching allocator counts it in ``max_memory_allocated``, so a fresh stream per warm-up would make
peak memory drift upward from run to run.

A phase whose step must read a tensor on the host declares it (``Algorithm.uncapturable_reason``):
its steps run eagerly and the reason is recorded (``eager_kinds``); capture is never attempted.
An undeclared step that fails to capture stops the run with :class:`CaptureError`. There is no
fallback: a failed capture leaves the capture stream current, the caching allocator routing
allocations to the graph's pool and every registered generator in capture mode (torch's own
``CUDAGraph.reset`` documents that these states cannot be repaired), so any later eager step that
draws random numbers would fail or compute something else. Graphs are dropped at every phase start
(new optimisers, other frozen layers).
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
Step = Callable[[], dict[str, torch.Tensor]]


class CaptureError(RuntimeError):
    """A step that was not declared uncapturable failed to capture: the run cannot go on in this process."""


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


_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """The process's one side stream per GPU for warm-up steps and captures (see the module docstring)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _WARMUP_STREAMS.get(index)
    if stream is None:
        stream = _WARMUP_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def _label(kind: Kind) -> str:
    return "/".join(str(part) for part in kind if part is not None)


@dataclass
class _Graph:
    replay: Callable[[], None]
    x: torch.Tensor
    y: torch.Tensor
    out: dict[str, torch.Tensor]


@dataclass
class CapturedStep:
    """A drop-in for ``algorithm.train_step`` on CUDA (see the module docstring).

    The device-specific parts are :meth:`_warm_up` and :meth:`_record`; everything else (kinds,
    warm-up counts, declarations, static buffers, phase resets) is plain bookkeeping.
    """

    algorithm: Algorithm
    generators: tuple[torch.Generator, ...] = ()
    graphs: dict[Kind, _Graph] = field(default_factory=dict)
    warm_up_steps: dict[Kind, int] = field(default_factory=dict)  # warm-up steps taken per kind
    eager: dict[Kind, str] = field(default_factory=dict)  # kinds declared uncapturable, and why
    captured: set[str] = field(default_factory=set)  # every kind captured in the run, as labels
    _phase: str = "train"

    def begin_phase(self, name: str) -> None:
        self.graphs.clear()
        self.warm_up_steps.clear()
        self._phase = name
        make_capturable(self.algorithm.optimizers, self.algorithm.device)

    def _kind(self, x: torch.Tensor) -> Kind:
        return (self._phase, x.shape[0], self.algorithm.capture_key())

    def _declared_eager(self, kind: Kind) -> bool:
        if kind not in self.eager:
            reason = self.algorithm.uncapturable_reason()
            if reason is None:
                return False
            self.eager[kind] = reason
        return True

    def is_warm(self, x: torch.Tensor) -> bool:
        """Whether this batch's step runs at its steady pace (replayed, or declared eager)."""
        kind = self._kind(x)
        return kind in self.graphs or self._declared_eager(kind)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        kind = self._kind(x)
        graph = self.graphs.get(kind)
        if graph is not None:
            graph.x.copy_(x)
            graph.y.copy_(y)
            graph.replay()
            return graph.out
        if self._declared_eager(kind):
            return self.algorithm.train_step(x, y)
        done = self.warm_up_steps.get(kind, 0)
        if done < WARMUP_STEPS:
            self.warm_up_steps[kind] = done + 1
            return self._warm_up(lambda: self.algorithm.train_step(x, y))
        return self._capture(kind, x, y)

    def _capture(self, kind: Kind, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        static_x, static_y = x.clone(), y.clone()
        try:
            replay, out = self._record(lambda: self.algorithm.train_step(static_x, static_y))
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CaptureError(
                f"CUDA graph capture of the {self.algorithm.name} step {_label(kind)} failed "
                f"({type(exc).__name__}: {message}). A failed capture leaves this process's CUDA generators and "
                "allocator in capture mode, so the run stops here. Run it with `cuda_graphs: false`, or make the "
                "step capturable (no host reads), or declare it with Algorithm.uncapturable_reason."
            ) from exc
        self.graphs[kind] = _Graph(replay, static_x, static_y, out)
        self.captured.add(_label(kind))
        replay()  # capture records without running: this batch's step happens now
        return out

    # -- the device-specific parts ----------------------------------------------------------------
    def _warm_up(self, step: Step) -> dict[str, torch.Tensor]:
        stream = warmup_stream(self.algorithm.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = step()
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _record(self, step: Step) -> tuple[Callable[[], None], dict[str, torch.Tensor]]:
        """Capture ``step`` into a graph on the warm-up stream; returns (replay, the step's static outputs)."""
        graph = torch.cuda.CUDAGraph()
        register = getattr(graph, "register_generator_state", None)  # torch >= 2.5; the default generator is always registered
        for generator in self.generators:
            if register is not None and generator.device.type == "cuda":
                register(generator)
        previous = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, stream=warmup_stream(self.algorithm.device)):
                out = step()
        except BaseException:
            torch.cuda.set_stream(previous)  # a failed capture_end leaves the capture stream current
            raise
        return graph.replay, out

    @classmethod
    def for_run(cls, parts: RunParts) -> CapturedStep | None:
        """The run's captured step: on CUDA unless the config switches it off (``cuda_graphs: false``)."""
        if parts.device.type != "cuda" or not parts.cfg.cuda_graphs:
            return None
        return cls(parts.algorithm, (parts.algorithm_generator,))

    def summary(self) -> dict[str, Any]:
        return {"captured_kinds": sorted(self.captured), "eager_kinds": {_label(k): why for k, why in self.eager.items()}}
