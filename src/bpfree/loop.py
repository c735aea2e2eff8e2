"""One training epoch, one evaluation and one measured window: the loop that the engine, ``bpfree
bench`` and the tests share.

A :class:`MeasuredWindow` reads the clock, the energy counters and the peak-memory meter at its
edges only (after synchronising the device), never inside a step. The first step of every kind
(phase x batch size) runs under the FLOP counter; that step is real training, but the counter's
own overhead would inflate the epoch time, so it runs in an *excluded* stretch of the window and
its time is reported apart (``probe_s``).

Evaluation points inside an epoch (``eval_every``) *pause* the window between two steps: the
caller evaluates outside it, and the window reopens for the next step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bpfree.algorithms.base import Algorithm, EpochClock
from bpfree.capture import CapturedStep
from bpfree.data import Splits, eval_batches, num_batches, train_batches
from bpfree.meters.cpu import load_average
from bpfree.meters.energy import EnergyMeter, EnergyReading, add_components, merge_components
from bpfree.meters.flops import FlopLedger, run_counted
from bpfree.meters.memory import MemoryMeter
from bpfree.meters.timer import synchronize

StepCallback = Callable[[int, int], None]  # (steps done, steps in the epoch); no tensor values


def _max(a: int | None, b: int | None) -> int | None:
    values = [v for v in (a, b) if v is not None]
    return max(values) if values else None


class MeasuredWindow:
    """Wall time, energy and peak memory over one window; :meth:`excluded` carves a stretch out.

    Energy is ``None`` when no counter is readable (``reason`` says why), when any part of the
    window failed to read, or when its parts are too short for the counter's refresh period
    (``EnergyMeter.too_short``: an epoch split around FLOP probes is judged as the sum of its parts);
    it is never 0 for "unknown".
    """

    def __init__(self, device: torch.device, energy: EnergyMeter | None = None, memory: MemoryMeter | None = None) -> None:
        self.device = device
        self.energy = energy
        self.memory = memory
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # this process's CPU time inside the window (contention: << seconds x threads)
        self.excluded_s = 0.0
        self.joules: float | None = 0.0 if energy is not None and energy.available else None
        self.reason: str | None = None if energy is not None and energy.available else (
            energy.reason if energy is not None else "no energy meter"
        )
        self.peak_memory_bytes: int | None = None
        self.components: dict[str, float | None] | None = None  # energy by component (gpu, cpu_package, dram)
        self._start: float | None = None
        self._energy_windows = 0  # counter windows read (one per stretch between excluded ones)
        self._energy_seconds = 0.0  # their total length as the meter timed them
        # The counters' differences as read, before the window is judged: a run sums these over its windows.
        self.raw_energy = RawEnergy(0.0 if self.joules is not None else None)
        self._peak_before_pause: int | None = None  # the peak of the stretches before a pause

    def __enter__(self) -> MeasuredWindow:
        if self.memory is not None:
            self.memory.begin()
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()
        if self.memory is not None:
            self.peak_memory_bytes = _max(self._peak_before_pause, self.memory.peak())
        if self.energy is not None and self.joules is not None:
            short = self.energy.too_short(self._energy_seconds, self._energy_windows)
            if short is not None:
                self.joules, self.components, self.reason = None, None, short

    def _open(self) -> None:
        if self.energy is not None:
            self.energy.begin()
        synchronize(self.device)
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def _close(self) -> None:
        synchronize(self.device)
        assert self._start is not None, "window closed before it was opened"
        self.seconds += time.perf_counter() - self._start
        self.cpu_seconds += time.process_time() - self._cpu_start
        self._start = None
        if self.energy is not None:
            reading = self.energy.end(raw=True)  # judged as a whole in __exit__
            self._energy_windows += 1
            self._energy_seconds += reading.seconds or 0.0
            self.raw_energy = self.raw_energy.plus(reading)
            self.components = add_components(self.components, reading) if reading.joules is not None else self.components
            if reading.joules is None:
                self.joules, self.reason = None, self.reason or reading.reason
            elif self.joules is not None:
                self.joules += reading.joules

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Run a stretch outside the window (FLOP probes, warm-up); its wall time goes to ``excluded_s``."""
        self._close()
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.excluded_s += time.perf_counter() - start
            self._open()

    def peak_so_far(self) -> int | None:
        """The window's peak memory up to now (read while paused)."""
        return _max(self._peak_before_pause, self.memory.peak()) if self.memory is not None else None

    def joules_so_far(self) -> float | None:
        """The window's energy up to now (read while paused), judged as the whole window is at its end."""
        if self.energy is None or self.joules is None or self.energy.too_short(self._energy_seconds, self._energy_windows):
            return None
        return self.joules

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Close the window for a stretch that is none of its business (a mid-epoch evaluation, timed by
        the caller): its time, energy and memory peak stay out of the window's totals."""
        self._close()
        if self.memory is not None:
            self._peak_before_pause = self.peak_so_far()
        try:
            yield
        finally:
            if self.memory is not None:
                self.memory.begin()
            self._open()


@dataclass(frozen=True)
class RawEnergy:
    """Counter readings summed as read (not judged against the counter's refresh period), with how
    many windows and seconds they span; ``joules`` is None once any window could not be read."""

    joules: float | None = 0.0
    components: dict[str, float | None] | None = None
    windows: int = 0
    seconds: float = 0.0

    def plus(self, reading: EnergyReading) -> RawEnergy:
        joules = None if self.joules is None or reading.joules is None else self.joules + reading.joules
        components = add_components(self.components, reading) if joules is not None else None
        return RawEnergy(joules, components, self.windows + 1, self.seconds + (reading.seconds or 0.0))

    def __add__(self, other: RawEnergy) -> RawEnergy:
        joules = None if self.joules is None or other.joules is None else self.joules + other.joules
        components = merge_components(self.components, other.components) if joules is not None else None
        return RawEnergy(joules, components, self.windows + other.windows, self.seconds + other.seconds)


@dataclass
class EpochOutcome:
    """What one training epoch produced; ``loss`` is read once, after the window closed."""

    loss: float
    first_step_loss: float | None  # the scale the divergence rule compares against
    steps: int
    seconds: float
    probe_s: float
    joules: float | None
    energy_reason: str | None
    peak_memory_bytes: int | None
    closing: dict[str, float] = field(default_factory=dict)  # what end_epoch reported, as floats
    energy_components: dict[str, float | None] | None = None
    cpu_seconds: float = 0.0  # process CPU time inside the window
    load_average: float | None = None  # the machine's 1-minute load average at the epoch's end
    raw_energy: RawEnergy = field(default_factory=RawEnergy)  # the window's readings before judging


@dataclass
class IntervalPoint:
    """The epoch so far at a mid-epoch evaluation point: the window's totals up to its pause."""

    steps: int  # steps run in this epoch
    loss: float  # mean training loss of those steps
    seconds: float
    joules: float | None
    peak_memory_bytes: int | None
    cpu_seconds: float
    load_average: float | None


IntervalCallback = Callable[[IntervalPoint], None]


def interval_points(eval_every: tuple[str, float] | None, steps_in_epoch: int, steps_before: int) -> frozenset[int]:
    """Steps of an epoch (counted from 1) after which an evaluation point falls, the epoch's end excluded.

    ``("epoch", f)``: after round(k x f x steps) steps, k = 1, 2, ...; ``("steps", n)``: wherever the
    run's step count (``steps_before`` + steps done) is a multiple of n.
    """
    if eval_every is None or steps_in_epoch < 2:
        return frozenset()
    unit, every = eval_every
    if unit == "steps":
        n = int(every)
        first = n - steps_before % n
        return frozenset(range(first, steps_in_epoch, n))
    count = math.ceil(1 / every - 1e-9)  # points per epoch, the end included
    return frozenset(p for k in range(1, count) if 0 < (p := round(k * every * steps_in_epoch)) < steps_in_epoch)


def epoch_clock(
    algorithm_phase, epoch: int, epochs_run: int, n_train: int, batch_size: int, drop_last: bool = False
) -> EpochClock:
    return EpochClock(algorithm_phase, epoch, epochs_run, num_batches(n_train, batch_size, drop_last), n_train, batch_size)


def train_epoch(
    algorithm: Algorithm,
    data: Splits,
    clock: EpochClock,
    generator: torch.Generator,
    *,
    flops: FlopLedger | None = None,
    energy: EnergyMeter | None = None,
    memory: MemoryMeter | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    step: CapturedStep | None = None,
    on_step: StepCallback | None = None,
    drop_last: bool = False,
    points: Collection[int] = (),
    on_point: IntervalCallback | None = None,
) -> EpochOutcome:
    """Run one epoch: ``begin_epoch``, every step, ``end_epoch``; all of it inside one measured window.

    After each step whose count is in ``points`` the window pauses and ``on_point`` gets the epoch so
    far (it evaluates, outside the window); training mode is restored before the next step.

    ``step`` replaces ``algorithm.train_step`` (its CUDA-graph version); its warm-up and capture run
    in the window's excluded stretch, as does the first step of each kind, which the FLOP counter
    watches on the algorithm's own eager step. The epoch's loss is the mean of the steps' ``loss``,
    unless ``end_epoch`` reports one (e.g. the closed-form solve's training MSE).
    """
    device = data.device
    autocast = autocast or contextlib.nullcontext()
    run_step = step or algorithm.train_step
    algorithm.train_mode()
    algorithm.begin_epoch(clock)
    loss_sum = torch.zeros((), device=device)
    first_loss: torch.Tensor | None = None
    steps = 0
    with MeasuredWindow(device, energy, memory) as window:
        for xb, yb in train_batches(data, clock.batch_size, generator, drop_last):
            kind = (clock.phase.name, xb.shape[0])
            if flops is not None and not flops.knows(kind):
                with window.excluded(), autocast:
                    out = flops.run(kind, lambda xb=xb, yb=yb: algorithm.train_step(xb, yb))
            else:
                warming_up = step is not None and not step.is_warm(xb)  # warm-up and capture: outside the window
                with window.excluded() if warming_up else contextlib.nullcontext(), autocast:
                    out = run_step(xb, yb)
                if flops is not None:
                    flops.add(kind)
            loss_sum += out["loss"]
            if first_loss is None:
                first_loss = out["loss"].detach().clone()
            steps += 1
            if on_step is not None:
                on_step(steps, clock.steps)
            if on_point is not None and steps in points:
                with window.paused():  # between two steps: its synchronisation is not inside a step
                    on_point(IntervalPoint(
                        steps, float(loss_sum / steps), window.seconds, window.joules_so_far(), window.peak_so_far(),
                        window.cpu_seconds, load_average(),
                    ))
                    algorithm.train_mode()
        with autocast:
            if flops is not None:
                closing, closing_flops = run_counted(algorithm.end_epoch, flops.uncounted_ops)
                if closing_flops:
                    flops.add_counted((clock.phase.name, "end_epoch"), closing_flops)
            else:
                closing = algorithm.end_epoch()
    values = {k: float(v) for k, v in closing.items()}  # after the window: its syncs are not timed
    loss = values["loss"] if "loss" in values else float(loss_sum / max(1, steps))
    return EpochOutcome(
        loss=loss,
        first_step_loss=float(first_loss) if first_loss is not None else None,
        steps=steps,
        seconds=window.seconds,
        probe_s=window.excluded_s,
        joules=window.joules,
        energy_reason=window.reason,
        peak_memory_bytes=window.peak_memory_bytes,
        closing=values,
        energy_components=window.components if window.joules is not None else None,
        cpu_seconds=window.cpu_seconds,
        load_average=load_average(),
        raw_energy=window.raw_energy,
    )


@dataclass
class EvalOutcome:
    accuracy: float
    loss: float  # mean cross-entropy of predict's scores read as logits
    seconds: float
    probe_s: float
    joules: float | None
    energy_reason: str | None
    raw_energy: RawEnergy = field(default_factory=RawEnergy)  # the window's readings before judging


def evaluate(
    algorithm: Algorithm,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    kind: str = "val",
    flops: FlopLedger | None = None,
    energy: EnergyMeter | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> EvalOutcome:
    """Accuracy of ``algorithm.predict`` on (x, y) in eval mode, in one measured window (one host sync)."""
    autocast = autocast or contextlib.nullcontext()
    phase = algorithm.phase.name if algorithm.phase is not None else "final"
    algorithm.eval_mode()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    with MeasuredWindow(x.device, energy) as window, torch.no_grad():
        for xb, yb in eval_batches(x, y, batch_size):
            step_kind = (kind, phase, xb.shape[0])
            if flops is not None and not flops.knows(step_kind):
                with window.excluded(), autocast:
                    scores = flops.run(step_kind, lambda xb=xb: algorithm.predict(xb))
            else:
                with autocast:
                    scores = algorithm.predict(xb)
                if flops is not None:
                    flops.add(step_kind)
            correct += (scores.argmax(dim=1) == yb).sum()
            loss_sum += F.cross_entropy(scores.float(), yb, reduction="sum").double()
    totals = torch.stack([correct.double(), loss_sum]).tolist()  # one host sync for both
    return EvalOutcome(
        accuracy=totals[0] / max(1, x.shape[0]),
        loss=totals[1] / max(1, x.shape[0]),
        seconds=window.seconds,
        probe_s=window.excluded_s,
        joules=window.joules,
        energy_reason=window.reason,
        raw_energy=window.raw_energy,
    )


def sample_accuracy(
    algorithm: Algorithm, x: torch.Tensor, y: torch.Tensor, batch_size: int, autocast: contextlib.AbstractContextManager | None = None
) -> float:
    """Accuracy of ``algorithm.predict`` on (x, y) in eval mode, unmeasured: no window, no FLOP ledger,
    no energy (a record for the reader, not part of the method's cost); one host sync."""
    autocast = autocast or contextlib.nullcontext()
    algorithm.eval_mode()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    with torch.no_grad():
        for xb, yb in eval_batches(x, y, batch_size):
            with autocast:
                scores = algorithm.predict(xb)
            correct += (scores.argmax(dim=1) == yb).sum()
    return int(correct) / max(1, x.shape[0])


def layer_accuracy(algorithm: Algorithm, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Accuracy of every layer-local read-out (``Algorithm.layer_scores``); empty when it has none.

    Not timed and not FLOP-counted: a record for the reader, not part of the method's cost.
    """
    algorithm.eval_mode()
    correct: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for xb, yb in eval_batches(x, y, batch_size):
            for name, scores in algorithm.layer_scores(xb).items():
                correct[name] = correct.get(name, 0) + (scores.argmax(dim=1) == yb).sum()
    if not correct:
        return {}
    names = list(correct)
    counts = torch.stack([torch.as_tensor(correct[n]) for n in names]).tolist()  # one host sync
    return {name: count / max(1, x.shape[0]) for name, count in zip(names, counts)}


def inference_flops_per_sample(algorithm: Algorithm, sample: torch.Tensor, uncounted: dict[str, int] | None = None) -> float:
    """FLOPs of the final inference rule per sample, counted on a small batch."""
    algorithm.eval_mode()
    with torch.no_grad():
        _, total = run_counted(lambda: algorithm.predict(sample), uncounted)
    return total / max(1, sample.shape[0])


__all__ = [
    "EpochOutcome",
    "EvalOutcome",
    "IntervalCallback",
    "IntervalPoint",
    "MeasuredWindow",
    "StepCallback",
    "epoch_clock",
    "evaluate",
    "inference_flops_per_sample",
    "interval_points",
    "sample_accuracy",
    "train_epoch",
]
