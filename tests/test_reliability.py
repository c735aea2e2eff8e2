"""Nothing lost under interruption, divergence, concurrency or bad input; meters never fail a run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfree.config import RunConfig, build_config, load_config
from bpfree.engine import Engine
from bpfree.errors import ConfigError, UserError
from bpfree.meters.energy import EnergyMeter
from bpfree.runner import execute, resume

CURVE_METRICS = ("train_loss", "val_accuracy")


def _metrics(result: dict) -> dict:
    return {
        "test_accuracy": result["test_accuracy"],
        "best_val_accuracy": result["best_val_accuracy"],
        "epochs_run": result["epochs_run"],
        "curves": [{k: row[k] for k in CURVE_METRICS} for row in result["curves"]],
        "train_flops": result["train_flops"],
    }


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bpfree.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_run_resumes_to_the_same_result(tmp_path):
    fields = {"algorithm": "mf", "model": "mlp:2x512", "epochs": 8, "patience": None, "seed": 5}
    reference = Engine(build_config(fields)).run()

    out = tmp_path / "out"
    args = ["run", "-a", "mf", "-m", "mlp:2x512", "--epochs", "8", "--seed", "5", "--set", "patience=null", "-q", "-o", str(out)]
    proc = _cli(*args)
    deadline = time.time() + 240
    checkpoint = None
    while time.time() < deadline and proc.poll() is None:
        found = list(out.glob("*/checkpoint.pt"))
        if found:
            state = torch.load(found[0], weights_only=True)
            if state["progress"]["epochs_run"] >= 2:
                checkpoint = found[0]
                break
        time.sleep(0.2)
    assert checkpoint is not None, "the run finished or never checkpointed before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = checkpoint.parent
    assert not (run_dir / "result.json").exists()

    _, result = resume(run_dir)
    assert result["resumed"] is True
    assert _metrics(result) == _metrics(reference)
    assert json.loads((run_dir / "result.json").read_text())["run_id"] == run_dir.name
    with pytest.raises(UserError, match="already complete"):
        resume(run_dir)


def test_resume_with_a_different_config_is_refused(tmp_path):
    cfg = build_config({"algorithm": "bp", "model": "mlp:1x32", "epochs": 3, "output": str(tmp_path), "seed": 1})
    engine = Engine(cfg, run_dir=tmp_path / "run")
    engine._save_checkpoint()  # a checkpoint as written after any epoch
    changed = build_config({**cfg.model_dump(), "lr": 0.5})
    with pytest.raises(UserError, match="different config"):
        Engine(changed, run_dir=tmp_path / "run").run()


def test_same_seed_gives_bit_identical_metrics():
    fields = {"algorithm": "bp", "model": "mlp:2x128", "epochs": 3, "seed": 11, "checkpoint": False}
    a, b = Engine(build_config(fields)).run(), Engine(build_config(fields)).run()
    assert _metrics(a) == _metrics(b)
    assert a["seeds"] == b["seeds"] and set(a["seeds"]) == {"model_init", "data_order", "algorithm"}
    c = Engine(build_config({**fields, "seed": 12})).run()
    assert _metrics(c) != _metrics(a)


def test_divergence_is_stored_not_dropped(tmp_results):
    cfg = build_config(
        {"algorithm": "bp", "model": "mlp:2x256", "optimizer": "sgd", "lr": 10.0, "epochs": 5, "output": str(tmp_results)}
    )
    run_dir, result = execute(cfg)
    assert result["status"] == "diverged"
    assert "epoch 1" in result["reason"] and "loss became" in result["reason"]
    assert result["epochs_run"] == 1 and result["test_accuracy"] is None
    stored = json.loads((run_dir / "result.json").read_text())  # valid JSON: no NaN literals
    assert stored["status"] == "diverged" and stored["curves"][0]["train_loss"] is None


class FakeMonitor:
    """Stands in for zeus.monitor.ZeusMonitor: begin_window/end_window returning a Measurement."""

    def __init__(self, energies, fail_at=None):
        self.energies = list(energies)
        self.fail_at = fail_at
        self.calls = 0

    def begin_window(self, key, sync_execution=True):
        if self.fail_at == "begin":
            raise PermissionError("Insufficient Permissions")

    def end_window(self, key, sync_execution=True):
        self.calls += 1
        if self.fail_at == "end":
            raise RuntimeError("NVML_ERROR_UNKNOWN")
        value = self.energies.pop(0) if self.energies else 1.0
        return SimpleNamespace(time=1.0, gpu_energy={0: value}, cpu_energy=None, dram_energy=None)


def _meter(monitor, method="fake NVML counter", reason=None):
    return EnergyMeter(torch.device("cpu"), monitor_factory=lambda device: (monitor, method, reason))


class PowerMonitor:
    """A fake counter that draws a constant 100 W: a window's energy is 100 x its duration."""

    def __init__(self):
        self.open = {}

    def begin_window(self, key, sync_execution=True):
        self.open[key] = time.perf_counter()

    def end_window(self, key, sync_execution=True):
        seconds = time.perf_counter() - self.open.pop(key)
        return SimpleNamespace(time=seconds, gpu_energy={0: 100.0 * seconds}, cpu_energy=None, dram_energy=None)


def test_energy_from_a_counter_is_summed_over_the_timed_windows():
    cfg = build_config({"algorithm": "bp", "model": "mlp:1x32", "epochs": 2, "patience": None, "checkpoint": False})
    result = Engine(cfg, energy_meter=_meter(PowerMonitor())).run()
    # Energy covers exactly the timed training (resp. evaluation) windows: FLOP probes are outside both.
    assert result["energy_j"] == pytest.approx(100 * result["train_time_s"], rel=0.05, abs=0.05)
    assert result["eval_energy_j"] == pytest.approx(100 * result["eval_time_s"], rel=0.05, abs=0.05)
    assert result["energy_method"] == "fake NVML counter" and result["energy_reason"] is None
    for row in result["curves"]:
        assert row["energy_j"] == pytest.approx(100 * row["epoch_time_s"], rel=0.05, abs=0.05)
    assert result["curves"][1]["cumulative_energy_j"] == pytest.approx(result["energy_j"])


@pytest.mark.parametrize(
    "meter,reason",
    [
        (lambda: _meter(None, "", "NVML and AMDSMI unavailable"), "NVML and AMDSMI unavailable"),
        (lambda: _meter(FakeMonitor([], fail_at="begin")), "Insufficient Permissions"),
        (lambda: _meter(FakeMonitor([], fail_at="end")), "NVML_ERROR_UNKNOWN"),
        (lambda: _meter(FakeMonitor([5.0, 1.0, -4.0e6, 1.0, 1.0])), "went backwards"),
    ],
)
def test_meter_faults_give_null_energy_with_a_reason(meter, reason):
    cfg = build_config({"algorithm": "bp", "model": "mlp:1x32", "epochs": 2, "patience": None, "checkpoint": False})
    result = Engine(cfg, energy_meter=meter()).run()
    assert result["status"] == "completed"
    assert result["energy_j"] is None and result["energy_method"] is None
    assert reason in result["energy_reason"]


def test_cpu_without_counters_reports_why():
    meter = EnergyMeter(torch.device("cpu"))
    if meter.available:
        pytest.skip("this machine has readable RAPL counters")
    assert meter.end().joules is None and "CPU" in meter.reason


def test_unwritable_output_is_one_line_and_writes_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    p = _cli("run", "-a", "bp", "-m", "mlp:1x8", "--epochs", "1", "-o", str(blocker / "results"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "output directory" in err and "not writable" in err and "Traceback" not in err
    assert blocker.read_text() == "not a directory"


def test_missing_data_root_is_one_line(tmp_path):
    p = _cli("run", "-a", "bp", "-d", "mnist", "--data-root", str(tmp_path / "none"), "-o", str(tmp_path / "out"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "dataset mnist: not found" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_wrong_model_for_algorithm_is_one_line(tmp_path):
    p = _cli("run", "-a", "mf", "-m", "cnn3", "-o", str(tmp_path / "out"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "field 'model'" in err and "Traceback" not in err


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
field_names = st.sampled_from(sorted(RunConfig.model_fields)) | st.text(max_size=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(field_names, yaml_values, max_size=6))
def test_config_loader_fuzz_accepts_or_explains(values):
    try:
        cfg = build_config(values)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("config: field '")
    else:
        assert isinstance(cfg, RunConfig)
        cfg.key()  # a valid config always hashes


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_config_file_fuzz_never_crashes(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(blob)
    try:
        load_config(path)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)


class _OpensAFile:
    """A pickle payload that creates a file when unpickled: what a crafted checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_runs_no_code_on_resume(tmp_path):
    marker = tmp_path / "code-ran"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"version": 2, "progress": _OpensAFile(marker)}, run_dir / "checkpoint.pt")
    cfg = build_config({"algorithm": "bp", "model": "mlp:1x32", "epochs": 1, "output": str(tmp_path)})
    with pytest.raises(UserError, match="not a bpfree checkpoint") as error:
        Engine(cfg, run_dir=run_dir).run()
    assert not marker.exists()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("algorithm", ["mf", "ff"])
def test_finite_exploding_loss_is_a_divergence(algorithm, one_thread):
    cfg = build_config({"algorithm": algorithm, "model": "mlp:2x100", "lr": 10.0, "epochs": 3, "checkpoint": False})
    result = Engine(cfg).run()
    assert result["status"] == "diverged" and "exceeded" in result["reason"]
    assert result["divergence_rule"]["divergence_factor"] == 1000.0
    assert all(row["train_loss"] is None or row["train_loss"] < float("inf") for row in result["curves"])
    relaxed = Engine(build_config({**cfg.model_dump(), "divergence_factor": None})).run()
    assert relaxed["status"] == "completed"  # the rule is declared and can be switched off


class _StopAfter(Exception):
    pass


def test_resumed_phase_keeps_the_time_before_the_interruption(tmp_path, one_thread):
    cfg = build_config({"algorithm": "mf", "model": "mlp:2x100", "epochs": 3, "patience": None, "output": str(tmp_path)})

    def stop_after_two(info):
        if info["epochs_run"] == 2:
            raise _StopAfter

    with pytest.raises(_StopAfter):
        Engine(cfg, run_dir=tmp_path / "run", progress=stop_after_two).run()
    result = Engine(cfg, run_dir=tmp_path / "run").run()
    assert result["resumed"] and result["epochs_run"] == 3
    epochs = [row["epoch_time_s"] for row in result["curves"]]
    assert len(epochs) == 3
    assert result["phases"][0]["train_time_s"] == pytest.approx(sum(epochs))
    assert result["train_time_s"] == pytest.approx(sum(epochs))
