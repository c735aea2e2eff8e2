"""The training loop: phases, epochs, validation, early stopping, checkpoints and meter windows.

One loop serves every algorithm. Per epoch the loop synchronises with the device exactly once for
the training loss (to catch divergence) and once per evaluation; meters are read only at epoch
and phase boundaries.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bpfree.algorithms import get_algorithm
from bpfree.algorithms.base import Algorithm, TrainSettings
from bpfree.config import RunConfig
from bpfree.data import Splits, eval_batches, load_dataset, num_batches, train_batches
from bpfree.errors import UserError
from bpfree.meters.energy import EnergyMeter
from bpfree.meters.environment import environment
from bpfree.meters.flops import FlopLedger
from bpfree.meters.memory import MemoryMeter
from bpfree.meters.timer import Stopwatch
from bpfree.models import build_model, parse_model_spec
from bpfree.results import CHECKPOINT_FILE, SCHEMA_VERSION, atomic_torch_save

CHECKPOINT_VERSION = 1
ProgressCallback = Callable[[dict[str, Any]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("field 'device': cuda requested but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def derived_seeds(seed: int) -> dict[str, int]:
    """Independent streams: weights, data order/augmentation, and the algorithm's own noise."""
    return {"model_init": seed, "data_order": seed + 1_000_003, "algorithm": seed + 2_000_006}


@dataclass
class Progress:
    """Everything that survives an interruption, saved in every checkpoint."""

    phase_index: int = 0
    epoch_in_phase: int = 0  # epochs completed in the current phase
    epochs_run: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int | None = None
    stale_epochs: int = 0
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    energy_j: float | None = 0.0
    eval_energy_j: float | None = 0.0
    energy_reason: str | None = None
    train_flops: int = 0
    eval_flops: int = 0
    flops_per_step: dict[str, int] = field(default_factory=dict)
    curves: list[dict[str, Any]] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"
    reason: str | None = None


def _add_energy(total: float | None, reading) -> float | None:
    if total is None or reading.joules is None:
        return None
    return total + reading.joules


class Engine:
    """Builds the pieces of one run and trains it, resuming from ``run_dir``'s checkpoint if present."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path | None = None,
        progress: ProgressCallback | None = None,
        energy_meter: EnergyMeter | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress_callback = progress or (lambda info: None)
        self.device = resolve_device(cfg.device)
        self.seeds = derived_seeds(cfg.seed)
        family, _ = parse_model_spec(cfg.model)
        algorithm_cls = get_algorithm(cfg.algorithm)
        if "*" not in algorithm_cls.model_families and family.prefix not in algorithm_cls.model_families:
            raise UserError(
                f"field 'model': algorithm {cfg.algorithm} trains {', '.join(algorithm_cls.model_families)} models, "
                f"not {cfg.model!r}"
            )
        self._seed_everything()
        self.data: Splits = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.val_fraction).to(self.device)
        torch.manual_seed(self.seeds["model_init"])
        self.model = build_model(cfg.model, self.data.spec).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.data = self.data.with_images(lambda x: x.contiguous(memory_format=torch.channels_last))
        if cfg.compile:
            for block in self.model.blocks:
                block.compile()
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp)
        self.data_generator = torch.Generator(device=self.device).manual_seed(self.seeds["data_order"])
        self.algorithm_generator = torch.Generator(device=self.device).manual_seed(self.seeds["algorithm"])
        settings = TrainSettings(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.optimizer, cfg.momentum)
        self.algorithm: Algorithm = algorithm_cls(
            self.model, self.data.spec, settings, cfg.algorithm_params(), self.algorithm_generator
        )
        self.energy = energy_meter or EnergyMeter(self.device)
        self.memory = MemoryMeter(self.device)
        self.state = Progress()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.started_at = datetime.now(timezone.utc).isoformat()

    def _seed_everything(self) -> None:
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed % 2**32)
        torch.manual_seed(self.cfg.seed)

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_FILE if self.run_dir is not None else None

    def _save_checkpoint(self) -> None:
        if not self.cfg.checkpoint or self.checkpoint_path is None:
            return
        payload = {
            "version": CHECKPOINT_VERSION,
            "config_key": self.cfg.key(),
            "progress": asdict(self.state),
            "algorithm": self.algorithm.state_dict(),
            "best_weights": self.best_weights,
            "data_generator": self.data_generator.get_state(),
            "algorithm_generator": self.algorithm_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "started_at": self.started_at,
        }
        atomic_torch_save(self.checkpoint_path, payload)

    def _load_checkpoint(self) -> bool:
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        try:
            payload = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:
            raise UserError(f"checkpoint {path}: unreadable ({type(exc).__name__}); delete it to start over") from None
        if payload.get("version") != CHECKPOINT_VERSION or payload.get("config_key") != self.cfg.key():
            raise UserError(
                f"checkpoint {path}: written by a different config or version; resume with the run's own "
                f"config.json, or delete the checkpoint to start over"
            )
        self.state = Progress(**payload["progress"])
        phases = self.algorithm.phases()
        if self.state.epoch_in_phase > 0:  # mid-phase: rebuild the phase's optimisers before loading them
            self.algorithm.begin_phase(phases[self.state.phase_index])
        self.algorithm.load_state_dict(payload["algorithm"])
        self.best_weights = payload["best_weights"]
        self.data_generator.set_state(payload["data_generator"])
        self.algorithm_generator.set_state(payload["algorithm_generator"])
        torch.set_rng_state(payload["torch_rng"])
        if payload["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
        random.setstate(payload["python_rng"])
        np.random.set_state(payload["numpy_rng"])
        self.started_at = payload.get("started_at", self.started_at)
        return True

    # -- evaluation -----------------------------------------------------------------------------
    def _accuracy(self, x: torch.Tensor, y: torch.Tensor, flops: FlopLedger, kind: str) -> float:
        self.algorithm.eval_mode()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        bs = self.cfg.eval_batch_size
        with torch.no_grad():
            for xb, yb in eval_batches(x, y, bs):
                with self.autocast:
                    scores = flops.run((kind, self._phase_name(), xb.shape[0]), lambda xb=xb: self.algorithm.predict(xb))
                correct += (scores.argmax(dim=1) == yb).sum()
        return correct.item() / max(1, x.shape[0])

    def _phase_name(self) -> str:
        return self.algorithm.phase.name if self.algorithm.phase is not None else "final"

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        resumed = self._load_checkpoint()
        st = self.state
        train_flops = FlopLedger(st.train_flops, st.flops_per_step)
        eval_flops = FlopLedger(st.eval_flops)
        phases = self.algorithm.phases()
        total_epochs = sum(p.epochs for p in phases)
        n_train = self.data.train_x.shape[0]
        steps_per_epoch = num_batches(n_train, self.cfg.batch_size)
        patience = self.cfg.patience

        while st.phase_index < len(phases) and st.status == "running":
            phase = phases[st.phase_index]
            if st.epoch_in_phase == 0:
                self.algorithm.begin_phase(phase)
                st.best_val_accuracy, st.best_epoch, st.stale_epochs = -1.0, None, 0
                self.best_weights = None
            self.memory.begin()
            phase_train_time = Stopwatch(self.device)
            while st.epoch_in_phase < phase.epochs:
                self.algorithm.train_mode()
                loss_sum = torch.zeros((), device=self.device)
                timer = Stopwatch(self.device)
                self.energy.begin()
                timer.begin()
                for step, (xb, yb) in enumerate(train_batches(self.data, self.cfg.batch_size, self.data_generator)):
                    kind = (phase.name, xb.shape[0], self.algorithm.flop_key())
                    with self.autocast:
                        out = train_flops.run(kind, lambda xb=xb, yb=yb: self.algorithm.train_step(xb, yb))
                    loss_sum += out["loss"]
                train_s = timer.end()
                energy = self.energy.end()
                phase_train_time.total_s += train_s
                st.train_time_s += train_s
                st.energy_j = _add_energy(st.energy_j, energy)
                st.energy_reason = st.energy_reason or energy.reason
                train_loss = (loss_sum / steps_per_epoch).item()  # the epoch's one sync for training

                st.epoch_in_phase += 1
                st.epochs_run += 1
                if not math.isfinite(train_loss):
                    st.status = "diverged"
                    st.reason = f"training loss became {train_loss} in epoch {st.epoch_in_phase} of phase {phase.name}"
                    st.curves.append(self._curve_row(phase.name, train_loss, None, train_s, 0.0, energy.joules))
                    break

                eval_timer = Stopwatch(self.device)
                self.energy.begin()
                eval_timer.begin()
                val_accuracy = self._accuracy(self.data.val_x, self.data.val_y, eval_flops, "val")
                eval_s = eval_timer.end()
                st.eval_energy_j = _add_energy(st.eval_energy_j, self.energy.end())
                st.eval_time_s += eval_s
                st.curves.append(self._curve_row(phase.name, train_loss, val_accuracy, train_s, eval_s, energy.joules))

                improved = val_accuracy > st.best_val_accuracy
                if improved:
                    st.best_val_accuracy, st.best_epoch, st.stale_epochs = val_accuracy, st.epoch_in_phase, 0
                    if phase.early_stopping:
                        self.best_weights = self.algorithm.weights_state()
                else:
                    st.stale_epochs += 1
                self.progress_callback(
                    {
                        "phase": phase.name,
                        "epoch": st.epoch_in_phase,
                        "epochs_run": st.epochs_run,
                        "total_epochs": total_epochs,
                        "train_loss": train_loss,
                        "val_accuracy": val_accuracy,
                    }
                )
                stop = phase.early_stopping and patience is not None and st.stale_epochs >= patience
                st.train_flops, st.eval_flops = train_flops.total, eval_flops.total
                st.flops_per_step = train_flops.per_kind
                if stop:
                    break
                if st.epoch_in_phase < phase.epochs:
                    self._save_checkpoint()

            if st.status != "running":
                break
            if phase.early_stopping and self.best_weights is not None:
                self.algorithm.load_weights_state(self.best_weights)
            st.phases.append(
                {
                    "name": phase.name,
                    "epochs": st.epoch_in_phase,
                    "best_epoch": st.best_epoch,
                    "best_val_accuracy": st.best_val_accuracy,
                    "train_time_s": phase_train_time.total_s,
                    "peak_memory_bytes": self.memory.peak(),
                }
            )
            st.phase_index += 1
            st.epoch_in_phase = 0
            self.best_weights = None
            self._save_checkpoint()

        return self._finish(resumed, train_flops, eval_flops)

    def _curve_row(self, phase, train_loss, val_accuracy, train_s, eval_s, energy_j) -> dict[str, Any]:
        st = self.state
        return {
            "phase": phase,
            "epoch": st.epochs_run,
            "train_loss": train_loss if math.isfinite(train_loss) else None,
            "val_accuracy": val_accuracy,
            "epoch_time_s": train_s,
            "eval_time_s": eval_s,
            "energy_j": energy_j,
            "cumulative_train_time_s": st.train_time_s,
            "cumulative_energy_j": st.energy_j,
        }

    def _finish(self, resumed: bool, train_flops: FlopLedger, eval_flops: FlopLedger) -> dict[str, Any]:
        st = self.state
        self.algorithm.end_training()
        test_accuracy = None
        inference_flops_per_sample = None
        if st.status == "running":
            timer = Stopwatch(self.device)
            self.energy.begin()
            timer.begin()
            test_accuracy = self._accuracy(self.data.test_x, self.data.test_y, eval_flops, "test")
            st.eval_time_s += timer.end()
            st.eval_energy_j = _add_energy(st.eval_energy_j, self.energy.end())
            probe = FlopLedger()
            sample = self.data.test_x[: min(64, self.data.test_x.shape[0])]
            self.algorithm.eval_mode()
            with torch.no_grad():
                probe.run("probe", lambda: self.algorithm.predict(sample))
            inference_flops_per_sample = probe.total / sample.shape[0]
            st.status = "completed"
        peaks = [p["peak_memory_bytes"] for p in st.phases if p.get("peak_memory_bytes") is not None]
        if st.status == "diverged":
            peaks.append(self.memory.peak())
        energy_j = st.energy_j if self.energy.available else None
        return {
            "schema_version": SCHEMA_VERSION,
            "status": st.status,
            "reason": st.reason,
            "algorithm": self.cfg.algorithm,
            "dataset": self.cfg.dataset,
            "model": self.cfg.model,
            "seed": self.cfg.seed,
            "seeds": self.seeds,
            "config_key": self.cfg.key(),
            "config": self.cfg.resolved(),
            "paper": self.algorithm.paper,
            "deviations": list(self.algorithm.deviations),
            "test_accuracy": test_accuracy,
            # The final model's validation accuracy: the last phase's best (its weights are the ones tested).
            "best_val_accuracy": st.phases[-1]["best_val_accuracy"] if st.phases else None,
            "epochs_run": st.epochs_run,
            "curves": st.curves,
            "phases": st.phases,
            "train_time_s": st.train_time_s,
            "eval_time_s": st.eval_time_s,
            "train_flops": train_flops.total,
            "eval_flops": eval_flops.total,
            "flops_per_step": train_flops.per_kind,
            "inference_flops_per_sample": inference_flops_per_sample,
            "flops_method": "torch.utils.flop_counter.FlopCounterMode on every step kind actually run",
            "peak_memory_bytes": max(peaks) if peaks else None,
            "memory_method": self.memory.method,
            "energy_j": energy_j,
            "eval_energy_j": st.eval_energy_j if self.energy.available else None,
            "energy_method": self.energy.method if energy_j is not None else None,
            "energy_reason": None if energy_j is not None else (self.energy.reason or st.energy_reason),
            **self.algorithm.parameter_counts(),
            "data": {
                "n_train": self.data.spec.n_train,
                "n_val": self.data.spec.n_val,
                "n_test": self.data.spec.n_test,
                "input_shape": list(self.data.spec.input_shape),
                "num_classes": self.data.spec.num_classes,
            },
            "resumed": resumed,
            "started_at": self.started_at,
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "environment": environment(self.device),
        }
