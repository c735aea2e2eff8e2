"""The engine: phases, epochs, validation, early stopping, checkpoints; built by :mod:`bpfree.build`,
stepped by :mod:`bpfree.loop`, recorded by :mod:`bpfree.record`.

Per epoch the engine reads the device once for the training loss (to catch divergence) and once per
evaluation; meters are read only at window edges (see :mod:`bpfree.loop`).

Every evaluation point (each epoch's end, and with ``eval_every`` points inside epochs) appends a
curve row with the run's cost so far: training time, energy, FLOPs, optimiser steps and samples.
Each epoch row also holds the accuracy on a fixed sample of the training set (the same images
every epoch), measured outside every timed window and FLOP ledger. A background sampler
(:mod:`bpfree.meters.telemetry`) records resources over time beside the result.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bpfree.algorithms.base import Algorithm, Phase
from bpfree.build import build_run, derived_seeds
from bpfree.capture import CapturedStep
from bpfree.config import RunConfig, parse_eval_every
from bpfree.data.embedded import SPLIT_SEED
from bpfree.errors import UserError
from bpfree.loop import (
    EpochOutcome,
    EvalOutcome,
    IntervalPoint,
    RawEnergy,
    epoch_clock,
    evaluate,
    interval_points,
    layer_accuracy,
    sample_accuracy,
    train_epoch,
)
from bpfree.meters.cpu import flush_denormal_scope
from bpfree.meters.energy import EnergyMeter
from bpfree.meters.flops import FlopLedger
from bpfree.meters.memory import MemoryMeter
from bpfree.meters.telemetry import TELEMETRY_FILE, TelemetrySampler
from bpfree.record import result_record
from bpfree.results import CHECKPOINT_FILE, atomic_torch_save

CHECKPOINT_VERSION = 3
# The training-set sample whose accuracy every epoch row records: at most this many images, and no
# more than the validation set has (its evaluation costs at most a validation pass).
TRAIN_SAMPLE_MAX = 1000
ProgressCallback = Callable[[dict[str, Any]], None]
# A phase diverges when its epoch loss exceeds this multiple of its first step's loss (declared in
# the result as ``divergence_rule``), or when the loss is not finite.
DIVERGENCE_RULE = "training loss not finite, or above divergence_factor x the phase's first-step loss"


@dataclass
class Progress:
    """Everything that survives an interruption, saved in every checkpoint."""

    phase_index: int = 0
    epoch_in_phase: int = 0  # epochs completed in the current phase
    epochs_run: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int | None = None
    stale_epochs: int = 0
    best_monitored: float | None = None  # best value of the monitored metric in this phase
    monitored_epoch: int | None = None  # the epoch that set it
    monitored_val_accuracy: float | None = None  # validation accuracy at that epoch
    last_val_accuracy: float | None = None
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    probe_time_s: float = 0.0  # first steps of each kind, run under the FLOP counter outside the timed windows
    energy_j: float | None = 0.0
    eval_energy_j: float | None = 0.0
    energy_reason: str | None = None
    energy_components: dict[str, float | None] | None = None  # training energy by component
    # Raw counter readings of every training / evaluation window (energy_j and eval_energy_j are
    # their sums once the windows together are long enough for the counter: EnergyMeter.aggregate_too_short).
    train_energy_raw: dict[str, Any] = field(default_factory=lambda: asdict(RawEnergy()))
    eval_energy_raw: dict[str, Any] = field(default_factory=lambda: asdict(RawEnergy()))
    train_flops: int = 0
    eval_flops: int = 0
    flops_per_step: dict[str, int] = field(default_factory=dict)
    phase_train_time_s: float = 0.0  # the current phase's, kept across a resume
    phase_peak_memory_bytes: int | None = None
    phase_reference_loss: float | None = None  # the phase's first-step loss, for the divergence rule
    train_cpu_time_s: float = 0.0  # process CPU time inside the training windows
    steps_run: int = 0  # optimiser steps of every finished epoch
    samples_seen: int = 0  # training samples those steps saw
    train_accuracy_time_s: float = 0.0  # evaluating the fixed training sample: outside every cost total
    uncounted_ops: dict[str, int] = field(default_factory=dict)  # heavy ops met without a FLOP formula
    curves: list[dict[str, Any]] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"
    reason: str | None = None


def _add(total: float | None, joules: float | None) -> float | None:
    return None if total is None or joules is None else total + joules


def _max(a: int | None, b: int | None) -> int | None:
    values = [v for v in (a, b) if v is not None]
    return max(values) if values else None


def _numpy_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached"]))


class Engine:
    """Trains one run, resuming from ``run_dir``'s checkpoint if present."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path | None = None,
        progress: ProgressCallback | None = None,
        energy_meter: EnergyMeter | None = None,
        step_progress: ProgressCallback | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress_callback = progress or (lambda info: None)
        # Per-step events ({"event": "step", ...}) go to their own listener, so epoch listeners keep their contract.
        self.step_progress = step_progress
        self.parts = build_run(cfg)
        self.device = self.parts.device
        self.seeds = self.parts.seeds
        self.data = self.parts.data
        self.model = self.parts.model
        self.algorithm: Algorithm = self.parts.algorithm
        self.data_generator = self.parts.data_generator
        self.algorithm_generator = self.parts.algorithm_generator
        self.autocast = self.parts.autocast
        self.energy = energy_meter or EnergyMeter(self.device)
        self.memory = MemoryMeter(self.device)
        self.state = Progress()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.started_at = datetime.now(timezone.utc).isoformat()
        self.resumed_across_devices = False
        self.captured_step = CapturedStep.for_run(self.parts)
        self.test_accuracy_by_readout: dict[str, float] | None = None
        self.flush_denormal = False  # whether subnormals were flushed during the run (set by run)
        self.layer_accuracy: dict[str, dict[str, float]] | None = None
        self.eval_every = parse_eval_every(cfg.eval_every)
        self.train_sample_x, self.train_sample_y = self._train_sample()
        self.telemetry: TelemetrySampler | None = None

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_FILE if self.run_dir is not None else None

    def _checkpoint_key(self) -> str:
        """The run's key without where it runs: a checkpoint resumes on another device."""
        return self.cfg.key(device_type="any")

    def _save_checkpoint(self) -> None:
        if not self.cfg.checkpoint or self.checkpoint_path is None:
            return
        self._mark("checkpoint")
        # Only tensors and plain containers of numbers and strings: loadable with weights_only=True.
        payload = {
            "version": CHECKPOINT_VERSION,
            "config_key": self._checkpoint_key(),
            "device_type": self.device.type,
            "progress": asdict(self.state),
            "algorithm": self.algorithm.state_dict(),
            "best_weights": self.best_weights,
            "data_generator": self.data_generator.get_state(),
            "algorithm_generator": self.algorithm_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "python_rng": random.getstate(),
            "numpy_rng": _numpy_rng_state(),
            "started_at": self.started_at,
        }
        atomic_torch_save(self.checkpoint_path, payload)

    def _load_checkpoint(self) -> bool:
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        try:
            # weights_only: a checkpoint can hold tensors and plain data, never code to run.
            payload = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:
            raise UserError(
                f"checkpoint {path}: unreadable or not a bpfree checkpoint ({type(exc).__name__}); delete it to start over"
            ) from None
        if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION or payload.get("config_key") != self._checkpoint_key():
            raise UserError(
                f"checkpoint {path}: written by a different config or version; resume with the run's own "
                f"config.json, or delete the checkpoint to start over"
            )
        self.state = Progress(**payload["progress"])
        phases = self.algorithm.schedule()
        if self.state.epoch_in_phase > 0:  # mid-phase: rebuild the phase's optimisers before loading them
            self.algorithm.begin_phase(phases[self.state.phase_index])
        self.algorithm.load_state_dict(payload["algorithm"])
        self.best_weights = payload["best_weights"]
        torch.set_rng_state(payload["torch_rng"].cpu())
        random.setstate(payload["python_rng"])
        _set_numpy_rng_state(payload["numpy_rng"])
        if payload.get("device_type") == self.device.type:
            self.data_generator.set_state(payload["data_generator"].cpu())
            self.algorithm_generator.set_state(payload["algorithm_generator"].cpu())
            if payload["cuda_rng"] is not None:
                torch.cuda.set_rng_state_all([s.cpu() for s in payload["cuda_rng"]])
        else:
            # A generator's state is device-specific: continue with streams derived from the seed and
            # the epochs run, so the data order stays a function of the run (recorded in the result).
            self.resumed_across_devices = True
            offset = 7_919 * self.state.epochs_run
            seeds = derived_seeds(self.cfg.seed)
            self.data_generator.manual_seed(seeds["data_order"] + offset)
            self.algorithm_generator.manual_seed(seeds["algorithm"] + offset)
        self.started_at = payload.get("started_at", self.started_at)
        return True

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        # Subnormal flushing (cfg.flush_denormal) holds for the run only: it is process-wide CPU state.
        with flush_denormal_scope(self.cfg.flush_denormal) as flushing, self._telemetry_scope():
            self.flush_denormal = flushing
            result = self._run()
        result["telemetry"] = self.telemetry.summary() if self.telemetry is not None else None
        return result

    @contextlib.contextmanager
    def _telemetry_scope(self) -> Iterator[None]:
        """The run's background sampler (``telemetry_interval_s``), stopped however the run ends."""
        interval = self.cfg.telemetry_interval_s
        if interval is None or self.run_dir is None:
            yield
            return
        self.telemetry = TelemetrySampler(self.run_dir / TELEMETRY_FILE, self.device, interval)
        with self.telemetry:
            yield

    def _mark(self, activity: str, phase: str | None = None, flush: bool = False) -> None:
        """Tell the telemetry sampler what the run does now (``flush``: write the rows so far)."""
        if self.telemetry is not None:
            self.telemetry.mark(activity, phase, self.state.epochs_run, flush)

    def _train_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed sample of the training set: drawn with the splits' own seed, so the same images every
        epoch and for every run seed (sorted, so it is read in the data's order)."""
        data = self.data
        n_train = data.train_x.shape[0]
        size = min(n_train, data.val_x.shape[0], TRAIN_SAMPLE_MAX)
        index = torch.randperm(n_train, generator=torch.Generator().manual_seed(SPLIT_SEED))[:size].sort().values
        index = index.to(data.device)
        return data.train_x.index_select(0, index), data.train_y.index_select(0, index)

    def _run(self) -> dict[str, Any]:
        self._mark("setup", "setup")
        resumed = self._load_checkpoint()
        st = self.state
        # Both ledgers record heavy operators without a formula into the progress's one dict.
        train_flops = FlopLedger(st.train_flops, st.flops_per_step, st.uncounted_ops)
        eval_flops = FlopLedger(st.eval_flops, uncounted_ops=st.uncounted_ops)
        phases = self.algorithm.schedule()
        total_epochs = sum(p.epochs for p in phases)

        while st.phase_index < len(phases) and st.status == "running":
            phase = phases[st.phase_index]
            if st.epoch_in_phase == 0:
                self.algorithm.begin_phase(phase)
                st.best_val_accuracy, st.best_epoch, st.stale_epochs = -1.0, None, 0
                st.best_monitored = st.monitored_epoch = st.monitored_val_accuracy = st.last_val_accuracy = None
                st.phase_train_time_s, st.phase_peak_memory_bytes, st.phase_reference_loss = 0.0, None, None
                self.best_weights = None
            if self.captured_step is not None:
                self.captured_step.begin_phase(phase.name)
            while st.epoch_in_phase < phase.epochs:
                self._mark("train", phase.name, flush=True)  # the rows of the epoch before reach the file
                stop = self._epoch(phase, train_flops, eval_flops, total_epochs)
                if stop:
                    break
                if st.epoch_in_phase < phase.epochs:
                    self._save_checkpoint()
            if st.status != "running":
                break
            restored_epoch: int | None = st.epoch_in_phase
            final_val_accuracy = st.last_val_accuracy
            if phase.early_stopping and self.best_weights is not None:
                self.algorithm.load_weights_state(self.best_weights)
                if self.cfg.restore == "best":
                    restored_epoch, final_val_accuracy = st.monitored_epoch, st.monitored_val_accuracy
                else:
                    restored_epoch, final_val_accuracy = st.best_epoch, st.best_val_accuracy
            st.phases.append(
                {
                    "name": phase.name,
                    "epochs": st.epoch_in_phase,
                    "best_epoch": st.best_epoch,
                    "best_val_accuracy": st.best_val_accuracy,
                    "monitored_best_epoch": st.monitored_epoch,
                    "monitored_best": st.best_monitored,
                    # the epoch whose weights the phase ends with, and their validation accuracy
                    "restored_epoch": restored_epoch,
                    "final_val_accuracy": final_val_accuracy,
                    "train_time_s": st.phase_train_time_s,
                    "peak_memory_bytes": st.phase_peak_memory_bytes,
                }
            )
            st.phase_index += 1
            st.epoch_in_phase = 0
            self.best_weights = None
            self._save_checkpoint()

        return self._finish(resumed, train_flops, eval_flops)

    def _epoch(self, phase: Phase, train_flops: FlopLedger, eval_flops: FlopLedger, total_epochs: int) -> bool:
        """One training epoch and its validation; returns True when the phase stops early."""
        st, cfg = self.state, self.cfg
        clock = epoch_clock(phase, st.epoch_in_phase, st.epochs_run, self.data.train_x.shape[0], cfg.batch_size, cfg.drop_last)
        on_step = None
        step_listener = self.step_progress
        if step_listener is not None:
            def on_step(done: int, steps: int) -> None:  # host-side counts only: no device sync
                step_listener({"event": "step", "phase": phase.name, "step": done, "steps": steps,
                               "epochs_run": st.epochs_run, "total_epochs": total_epochs})

        def on_point(point: IntervalPoint) -> None:  # between two steps, the training window paused
            val = self._validate(eval_flops)
            st.curves.append(self._curve_row(phase.name, point, val, train_flops.total, clock.steps, samples=min(clock.n_train, point.steps * clock.batch_size)))
            self._mark("train")

        outcome = train_epoch(
            self.algorithm, self.data, clock, self.data_generator,
            flops=train_flops, energy=self.energy, memory=self.memory, autocast=self.autocast,
            step=self.captured_step, on_step=on_step, drop_last=cfg.drop_last,
            points=interval_points(self.eval_every, clock.steps, st.steps_run), on_point=on_point,
        )
        self._account_training(outcome, clock.samples)
        st.epoch_in_phase += 1
        st.epochs_run += 1
        st.train_flops, st.flops_per_step = train_flops.total, train_flops.per_kind
        if st.phase_reference_loss is None:
            st.phase_reference_loss = outcome.first_step_loss
        diverged = self._divergence(outcome.loss)
        if diverged is not None:
            st.status, st.reason = "diverged", f"{diverged} in epoch {st.epoch_in_phase} of phase {phase.name}"
            st.curves.append(self._curve_row(phase.name, outcome, None, train_flops.total, clock.steps))
            return True

        val = self._validate(eval_flops)
        train_accuracy = self._train_accuracy()
        st.curves.append(self._curve_row(phase.name, outcome, val, train_flops.total, clock.steps, train_accuracy=train_accuracy))

        self._track_stopping(phase, val.accuracy, val.loss)
        self.progress_callback(
            {
                "event": "epoch",
                "phase": phase.name,
                "epoch": st.epoch_in_phase,
                "epochs_run": st.epochs_run,
                "total_epochs": total_epochs,
                "train_loss": outcome.loss,
                "val_accuracy": val.accuracy,
                "peak_memory_bytes": outcome.peak_memory_bytes,
                "curve": st.curves[-1],  # the row just appended, for listeners (history file, logs, MLflow)
            }
        )
        return phase.early_stopping and cfg.patience is not None and st.stale_epochs >= cfg.patience

    def _validate(self, eval_flops: FlopLedger) -> EvalOutcome:
        """Validation accuracy and loss in their own measured window; time, energy and FLOPs go to evaluation."""
        st = self.state
        self._mark("eval")
        val = evaluate(
            self.algorithm, self.data.val_x, self.data.val_y, self.cfg.eval_batch_size,
            kind="val", flops=eval_flops, energy=self.energy, autocast=self.autocast,
        )
        st.eval_time_s += val.seconds
        st.probe_time_s += val.probe_s
        self._account_evaluation(val)
        st.eval_flops = eval_flops.total
        return val

    def _run_energy(self, raw: RawEnergy) -> tuple[float | None, str | None]:
        """A run's energy from the raw readings of all its windows, or None with the reason."""
        if raw.joules is None:
            return None, None
        short = self.energy.aggregate_too_short(raw.seconds, raw.windows)
        return (None, short) if short is not None else (raw.joules, None)

    def _account_evaluation(self, outcome: EvalOutcome) -> None:
        raw = RawEnergy(**self.state.eval_energy_raw) + outcome.raw_energy
        self.state.eval_energy_raw = asdict(raw)
        self.state.eval_energy_j = self._run_energy(raw)[0]

    def _train_accuracy(self) -> float:
        """Accuracy on the fixed training sample: no FLOP ledger, no energy window, and its time is
        ``train_accuracy_time_s``, in neither training nor evaluation time (a record for the reader)."""
        start = time.perf_counter()
        accuracy = sample_accuracy(self.algorithm, self.train_sample_x, self.train_sample_y, self.cfg.eval_batch_size, self.autocast)
        self.state.train_accuracy_time_s += time.perf_counter() - start  # sample_accuracy ends on a host sync
        return accuracy

    def _track_stopping(self, phase: Phase, accuracy: float, loss: float) -> None:
        """The stopping rule (``monitor``, ``min_delta``, ``restore``): stale epochs and the weights to restore."""
        st, cfg = self.state, self.cfg
        st.last_val_accuracy = accuracy
        if accuracy > st.best_val_accuracy:
            st.best_val_accuracy, st.best_epoch = accuracy, st.epoch_in_phase
            if phase.early_stopping and cfg.restore == "best_accuracy":
                self.best_weights = self.algorithm.weights_state()
        if cfg.monitor == "val_accuracy":
            value = accuracy
            improved = st.best_monitored is None or value > st.best_monitored + cfg.min_delta
        else:  # val_loss, local_loss: the validation cross-entropy of the phase's read-out
            value = loss
            improved = math.isfinite(value) and (st.best_monitored is None or value < st.best_monitored - cfg.min_delta)
        if improved:
            st.best_monitored, st.monitored_epoch, st.monitored_val_accuracy = value, st.epoch_in_phase, accuracy
            st.stale_epochs = 0
            if phase.early_stopping and cfg.restore == "best":
                self.best_weights = self.algorithm.weights_state()
        else:
            st.stale_epochs += 1

    def _account_training(self, outcome: EpochOutcome, samples: int) -> None:
        st = self.state
        st.steps_run += outcome.steps
        st.samples_seen += samples
        st.train_time_s += outcome.seconds
        st.train_cpu_time_s += outcome.cpu_seconds
        st.phase_train_time_s += outcome.seconds
        st.probe_time_s += outcome.probe_s
        raw = RawEnergy(**st.train_energy_raw) + outcome.raw_energy
        st.train_energy_raw = asdict(raw)
        st.energy_j, short = self._run_energy(raw)
        st.energy_components = raw.components if st.energy_j is not None else None
        st.energy_reason = short or st.energy_reason or outcome.energy_reason
        st.phase_peak_memory_bytes = _max(st.phase_peak_memory_bytes, outcome.peak_memory_bytes)

    def _divergence(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"training loss became {loss}"
        factor, reference = self.cfg.divergence_factor, self.state.phase_reference_loss
        if factor is not None and reference is not None and reference > 0 and loss > factor * reference:
            return f"training loss {loss:.4g} exceeded {factor:g} x the phase's first-step loss {reference:.4g}"
        return None

    def _curve_row(
        self,
        phase: str,
        span: EpochOutcome | IntervalPoint,
        val: EvalOutcome | None,
        train_flops: int,
        steps_in_epoch: int,
        *,
        samples: int = 0,
        train_accuracy: float | None = None,
    ) -> dict[str, Any]:
        """One evaluation point. An epoch's cost is already in the run's totals (``span`` is the epoch);
        an interval point adds its epoch so far (``span`` is the paused window: time, energy, ``samples``)."""
        st = self.state
        interval = isinstance(span, IntervalPoint)
        return {
            "phase": phase,
            "epoch": st.epochs_run + 1 if interval else st.epochs_run,  # the epoch the point falls in, from 1
            "train_loss": span.loss if math.isfinite(span.loss) else None,
            "val_accuracy": val.accuracy if val is not None else None,
            "val_loss": val.loss if val is not None and math.isfinite(val.loss) else None,
            "epoch_time_s": span.seconds,
            "epoch_cpu_time_s": span.cpu_seconds,
            "load_average": span.load_average,
            "eval_time_s": val.seconds if val is not None else 0.0,
            "energy_j": span.joules,
            "cumulative_train_time_s": st.train_time_s + span.seconds if interval else st.train_time_s,
            "cumulative_energy_j": _add(st.energy_j, span.joules) if interval else st.energy_j,
            "point": "interval" if interval else "epoch",
            "epoch_progress": st.epochs_run + span.steps / steps_in_epoch if interval else float(st.epochs_run),
            "cumulative_train_flops": train_flops,
            "cumulative_steps": st.steps_run + span.steps if interval else st.steps_run,
            "cumulative_samples": st.samples_seen + samples if interval else st.samples_seen,
            "train_accuracy": train_accuracy,
            "peak_memory_bytes": span.peak_memory_bytes,
        }

    def _layer_accuracy(self) -> dict[str, dict[str, float]] | None:
        """{read-out name: {"val": accuracy, "test": accuracy}} for every layer-local read-out, or None."""
        bs, data = self.cfg.eval_batch_size, self.data
        val = layer_accuracy(self.algorithm, data.val_x, data.val_y, bs)
        if not val:
            return None
        test = layer_accuracy(self.algorithm, data.test_x, data.test_y, bs)
        return {name: {"val": val[name], "test": test[name]} for name in val}

    def _other_readouts(self, headline: float) -> dict[str, float] | None:
        """Test accuracy under every read-out rule the model offers (the headline is the configured one).

        Outside every measured window and FLOP ledger: a record for the reader, not part of the run's cost.
        """
        model: Any = self.algorithm.model
        if not hasattr(model, "READOUTS"):
            return None
        configured: str = model.readout
        scores: dict[str, float] = {configured: headline}
        try:
            for rule in model.READOUTS:
                if rule != configured:
                    model.readout = rule
                    scores[rule] = evaluate(
                        self.algorithm, self.data.test_x, self.data.test_y, self.cfg.eval_batch_size,
                        kind="test", autocast=self.autocast,
                    ).accuracy
        finally:
            model.readout = configured
        return scores

    def _finish(self, resumed: bool, train_flops: FlopLedger, eval_flops: FlopLedger) -> dict[str, Any]:
        st = self.state
        self._mark("test", "final", flush=True)
        self.algorithm.end_training()
        test_accuracy = None
        if st.status == "running":
            test = evaluate(
                self.algorithm, self.data.test_x, self.data.test_y, self.cfg.eval_batch_size,
                kind="test", flops=eval_flops, energy=self.energy, autocast=self.autocast,
            )
            test_accuracy = test.accuracy
            self.test_accuracy_by_readout = self._other_readouts(test_accuracy)
            self.layer_accuracy = self._layer_accuracy()
            st.eval_time_s += test.seconds
            st.probe_time_s += test.probe_s
            self._account_evaluation(test)
            st.status = "completed"
            if self.run_dir is not None:
                from bpfree.weights import WEIGHTS_FILE, save_weights

                save_weights(self.run_dir / WEIGHTS_FILE, self.algorithm, {"config_key": self.cfg.key(device_type=self.device.type)})
        return result_record(self, resumed, train_flops, eval_flops, test_accuracy)
