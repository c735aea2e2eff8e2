"""The result record of one run: what it reached, what it cost, how it was measured, where it ran."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch

from bpfree.loop import inference_flops_per_sample
from bpfree.meters.cpu import CpuReading, load_average
from bpfree.meters.environment import allocated_cpus, environment
from bpfree.meters.flops import FlopLedger
from bpfree.results import SCHEMA_VERSION

if TYPE_CHECKING:
    from bpfree.engine import Engine

FLOPS_METHOD = "torch.utils.flop_counter.FlopCounterMode on every step kind actually run"


def result_record(
    engine: Engine, resumed: bool, train_flops: FlopLedger, eval_flops: FlopLedger, test_accuracy: float | None
) -> dict[str, Any]:
    from bpfree.engine import DIVERGENCE_RULE

    st, cfg, data, algorithm = engine.state, engine.cfg, engine.data, engine.algorithm
    inference_flops = None
    if st.status == "completed":
        sample = data.test_x[: min(64, data.test_x.shape[0])]
        inference_flops = inference_flops_per_sample(algorithm, sample, st.uncounted_ops)
    peaks = [p["peak_memory_bytes"] for p in st.phases if p.get("peak_memory_bytes") is not None]
    if st.status == "diverged" and st.phase_peak_memory_bytes is not None:
        peaks.append(st.phase_peak_memory_bytes)
    energy_available = engine.energy.available
    energy_j = st.energy_j if energy_available else None
    return {
        "schema_version": SCHEMA_VERSION,
        "status": st.status,
        "reason": st.reason,
        "algorithm": cfg.algorithm,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "seed": cfg.seed,
        "seeds": engine.seeds,
        "config_key": cfg.key(device_type=engine.device.type),
        "config": cfg.resolved(),
        "paper": algorithm.paper,
        "deviations": list(algorithm.deviations),
        "test_accuracy": test_accuracy,
        # models with several test-time read-outs (NoProp): the accuracy under each; the headline is cfg.readout
        "test_accuracy_by_readout": engine.test_accuracy_by_readout,
        # each layer-local read-out of the trained model (MF projection, FF layer, CaFo predictor, NoProp block)
        "layer_accuracy": engine.layer_accuracy,
        # each epoch row's train_accuracy is on this fixed training sample; evaluating it took
        # train_accuracy_time_s, in neither train_time_s nor eval_time_s, and no FLOP total counts it
        "train_accuracy_samples": int(engine.train_sample_y.shape[0]),
        "train_accuracy_time_s": st.train_accuracy_time_s,
        # The last phase's best validation accuracy (the tested weights' own: final_val_accuracy).
        "best_val_accuracy": st.phases[-1]["best_val_accuracy"] if st.phases else None,
        # validation accuracy of the weights tested (differs from the best under restore: last)
        "final_val_accuracy": st.phases[-1].get("final_val_accuracy") if st.phases else None,
        "stopping_rule": {"monitor": cfg.monitor, "restore": cfg.restore, "min_delta": cfg.min_delta, "patience": cfg.patience},
        "epochs_run": st.epochs_run,
        "curves": st.curves,
        "phases": st.phases,
        "train_time_s": st.train_time_s,
        "eval_time_s": st.eval_time_s,
        # The first step of each kind ran under the FLOP counter, timed apart from train/eval time.
        "probe_time_s": st.probe_time_s,
        "train_flops": train_flops.total,
        # optimiser steps and training samples of the finished epochs (the last curve row's cumulative_*)
        "train_steps": st.steps_run,
        "train_samples_seen": st.samples_seen,
        "eval_flops": eval_flops.total,
        "flops_per_step": train_flops.per_kind,
        "inference_flops_per_sample": inference_flops,
        "flops_method": FLOPS_METHOD,
        # compute-heavy operators met without a FLOP formula (calls in the instrumented steps): not in the totals
        "uncounted_ops": dict(sorted(st.uncounted_ops.items())),
        "peak_memory_bytes": max(peaks) if peaks else None,
        "memory_method": engine.memory.method,
        "energy_j": energy_j,
        "eval_energy_j": st.eval_energy_j if energy_available else None,
        "energy_method": engine.energy.method if energy_j is not None else None,
        "energy_reason": None if energy_j is not None else (engine.energy.reason or st.energy_reason),
        # Training energy by counter (gpu, cpu_package, dram) and whether the CPU counters saw more than this job.
        "energy_components_j": st.energy_components if energy_j is not None else None,
        "energy_scope_note": engine.energy.scope_note(engine.device, allocated_cpus(), os.cpu_count()) if energy_j is not None else None,
        **algorithm.parameter_counts(),
        "data": {
            "n_train": data.spec.n_train,
            "n_val": data.spec.n_val,
            "n_test": data.spec.n_test,
            "input_shape": list(data.spec.input_shape),
            "num_classes": data.spec.num_classes,
        },
        "device_type": engine.device.type,
        "cuda_graphs": {
            "enabled": engine.captured_step is not None,
            **(engine.captured_step.summary() if engine.captured_step is not None else {}),
        },
        "divergence_rule": {"rule": DIVERGENCE_RULE, "divergence_factor": cfg.divergence_factor},
        "resumed": resumed,
        "resumed_across_devices": engine.resumed_across_devices,
        "started_at": engine.started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "environment": environment(engine.device),
        "torch_threads": torch.get_num_threads(),
        "flush_denormal": engine.flush_denormal,
        **training_cpu_share(st.train_time_s, st.train_cpu_time_s, torch.get_num_threads(), engine.device.type),
    }


def training_cpu_share(wall_s: float, cpu_s: float, threads: int, device_type: str) -> dict[str, Any]:
    """Training's process CPU time and CPU share; a CPU run that waited for its cores is ``contended``."""
    reading = CpuReading(wall_s, cpu_s, threads, load_average())
    return {
        "train_cpu_time_s": cpu_s,
        "cpu_share": reading.cpu_share,
        "load_average_end": reading.load_average,
        # GPU runs wait on the device, not on cores: their CPU share says nothing about contention
        "contended": bool(device_type == "cpu" and reading.contended),
    }
