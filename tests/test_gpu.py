"""The GPU path of every algorithm: captured steps compute what eager steps compute, nothing is captured
that must not be, a failed capture stops the run, checkpoints resume across devices, FLOPs do not depend
on the device, energy is never read from windows shorter than the counter's refresh, and peak memory
does not drift from run to run.

Each test runs on every device it can. The ``cpu`` variants run everywhere (CI included); the ``cuda``
variants are marked ``gpu`` and run on a GPU machine: ``BPFREE_GPU_TESTS=1 pytest -m gpu tests/test_gpu.py``.
On CPU a captured step is emulated (:class:`EmulatedCapture`: a warm-up runs the step, a "replay" runs
it again on the static buffers and writes its outputs into the static output tensors, as a graph
replay does), so the capture bookkeeping (kinds, warm-up, declarations, static buffers, phase resets,
failures) is exercised on every machine; real graphs only on CUDA.

Budget on an H200, estimated from step counts: mnist5k has 3,500 training images, so a tiny network's
captured epoch is 28 replays (a few ms); each CUDA run costs about 1.5 s (data to the device, cuBLAS and
cuDNN set-up, the FLOP probe, warm-up and capture, evaluation). About 35 CUDA runs (50 s), the 4 CPU
twins of the FLOP test (10 s), one subprocess (CUDA start, 10-15 s), 4 s of energy windows and
pytest's start: about 90 s.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bpfree import bench
from bpfree.bench import BenchCase, conv_flop_share, measure, row_peak
from bpfree.build import build_run
from bpfree.capture import CapturedStep, CaptureError, warmup_stream
from bpfree.config import build_config
from bpfree.data import train_batches
from bpfree.engine import Engine
from bpfree.fileio import atomic_write_json
from bpfree.loop import MeasuredWindow, RawEnergy, epoch_clock, train_epoch
from bpfree.meters.energy import EnergyMeter

ROOT = Path(__file__).resolve().parents[1]
CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (BPFREE_GPU_TESTS=1 keeps it visible)")],
)
DEVICES = ["cpu", CUDA]

CASES = {
    "bp": {"algorithm": "bp", "model": "mlp:2x128"},
    "mf": {"algorithm": "mf", "model": "mlp:2x128"},
    "mf-layerwise": {"algorithm": "mf", "model": "mlp:2x128", "params": {"schedule": "layerwise"}},
    # 4 epochs: the linear lr cooldown changes the factor in epoch 4 (0.5), after the steps were captured
    "ff": {"algorithm": "ff", "model": "mlp:2x64", "lr": 0.003, "epochs": 4},
    "cafo-rand": {"algorithm": "cafo", "model": "cnn3:4,8,16", "epochs": 1},
    "cafo-dfa": {"algorithm": "cafo", "model": "cnn3:4,8,16", "params": {"variant": "dfa", "dfa_epochs": 1}},
    "cafo-mse": {"algorithm": "cafo", "model": "cnn3:4,8,16", "params": {"loss": "mse"}},
    "noprop": {"algorithm": "noprop", "model": "noprop:3,c4,h64", "params": {"parallel": True}},
    "noprop-sequential": {"algorithm": "noprop", "model": "noprop:3,c4,h64"},
    "noprop-paper": {"algorithm": "noprop", "model": "noprop:3,c4,h64", "epochs": 6, "params": {"loop": "paper"}},
    "noprop-paper-small": {"algorithm": "noprop", "model": "noprop:2,c2,h16", "batch_size": 512, "params": {"loop": "paper"}},
}
# Cases whose (emulated) captured run is cheap enough for CI's CPU: the bookkeeping they exercise
# covers the rest (two batch sizes, epoch-level lr changes, calibration and phases, capture keys).
CPU_CASES = ("bp", "ff", "cafo-rand", "noprop-paper-small")
# Step kinds an algorithm declares uncapturable (Algorithm.uncapturable_reason): none of the built-in ones.
DECLARED_EAGER: dict[str, dict[str, str]] = {}


def config(case: str, device: str, **fields):
    return build_config(
        {"dataset": "mnist5k", "epochs": 2, "patience": None, "checkpoint": False, "seed": 0, "device": device,
         **CASES[case], **fields}
    )


def by_device(cuda_cases, cpu_cases=()):
    """(device, case) parameters: ``cpu_cases`` on CPU, ``cuda_cases`` on CUDA."""
    params = [pytest.param("cpu", case, id=f"cpu-{case}") for case in cpu_cases]
    params += [pytest.param("cuda", case, id=f"cuda-{case}", marks=CUDA.marks) for case in cuda_cases]
    return params


class EmulatedCapture(CapturedStep):
    """The captured step on CPU: a warm-up runs the step; "recording" defers it, and each replay runs it on
    the static buffers and writes its outputs into the same static tensors, as a CUDA graph replay does."""

    def _warm_up(self, step):
        return step()

    def _record(self, step):
        out: dict[str, torch.Tensor] = {}

        def replay() -> None:
            fresh = step()
            if not out:
                out.update({k: v.detach().clone() for k, v in fresh.items()})
            for k, v in fresh.items():
                out[k].copy_(v)

        return replay, out


def captured_step(algorithm, generator):
    if algorithm.device.type == "cuda":
        return CapturedStep(algorithm, (generator,))
    return EmulatedCapture(algorithm, (generator,))


def engine_for(cfg, **kwargs) -> Engine:
    """The engine with the run's captured step (emulated on CPU)."""
    engine = Engine(cfg, **kwargs)
    if cfg.cuda_graphs and engine.captured_step is None:
        engine.captured_step = EmulatedCapture(engine.algorithm, (engine.algorithm_generator,))
    return engine


# -- captured steps -------------------------------------------------------------------------------


CUDA_AGREE = ("bp", "mf-layerwise", "ff", "cafo-rand", "cafo-dfa", "cafo-mse", "noprop", "noprop-sequential", "noprop-paper")


def misplaced(engine: Engine, device: str) -> dict[str, str]:
    return {k: str(v.device) for k, v in engine.algorithm.owned_tensors().items() if v.device.type != device}


@pytest.mark.parametrize("device,case", by_device(CUDA_AGREE, CPU_CASES))
def test_captured_steps_compute_what_eager_steps_compute(device, case, one_thread):
    # the last, smaller batch: a FLOP probe in epoch 1, warm-ups in epochs 2 and 3, captured in epoch 4
    epochs = {"epochs": 4} if case == "bp" else {}
    captured_engine = engine_for(config(case, device, **epochs))
    assert not misplaced(captured_engine, device) and captured_engine.algorithm_generator.device.type == device
    captured = captured_engine.run()
    assert not misplaced(captured_engine, device)  # optimiser state created during training too
    eager = Engine(config(case, device, cuda_graphs=False, **epochs)).run()
    graphs = captured["cuda_graphs"]
    assert graphs["enabled"] and not eager["cuda_graphs"]["enabled"]
    assert graphs["eager_kinds"] == DECLARED_EAGER.get(case, {}), graphs
    phases = {phase["name"] for phase in captured["phases"]}
    assert {kind.split("/")[0] for kind in graphs["captured_kinds"]} == phases, graphs  # every phase replays graphs
    if case == "bp":  # 3,500 images in batches of 128: a full-batch graph and one for the last 44
        assert graphs["captured_kinds"] == ["train/128", "train/44"]
    # Same device, seed and Philox streams: the same numbers, epoch by epoch (on CUDA up to the
    # run-to-run noise of atomics in cuBLAS/cuDNN reductions, far below what a wrong lr, a stale
    # buffer or another random stream would change).
    assert [(r["phase"], r["epoch"]) for r in captured["curves"]] == [(r["phase"], r["epoch"]) for r in eager["curves"]]
    tolerance = 1e-3 if device == "cuda" else 1e-6
    for got, want in zip(captured["curves"], eager["curves"]):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=tolerance, abs=1e-6), (got, want)
    assert captured["test_accuracy"] == pytest.approx(eager["test_accuracy"], abs=0.01 if device == "cuda" else 1e-9)
    assert all(v > 0 for v in captured["flops_per_step"].values())
    if case != "noprop-paper-small":  # two epochs of a 2-block chain, one block each: near chance
        assert captured["test_accuracy"] > 0.5
    if case == "ff":  # the cooldown reached the captured step: lr is a device tensor at half its base
        group = captured_engine.algorithm.optimizers["ff"].param_groups[0]
        assert isinstance(group["lr"], torch.Tensor) and group["lr"].device.type == device
        assert float(group["lr"]) == pytest.approx(0.5 * group["initial_lr"])


@pytest.mark.parametrize("device", DEVICES)
def test_a_declared_uncapturable_step_runs_eagerly_and_is_never_captured(device, one_thread):
    engine = engine_for(config("bp", device))
    engine.algorithm.uncapturable_reason = lambda: "reads the loss on the host"  # type: ignore[method-assign]

    def never(step):
        raise AssertionError("capture attempted for a step declared uncapturable")

    engine.captured_step._record = never  # type: ignore[union-attr]
    result = engine.run()
    assert result["status"] == "completed"
    assert result["cuda_graphs"]["captured_kinds"] == []
    assert result["cuda_graphs"]["eager_kinds"] == {"train/128": "reads the loss on the host", "train/44": "reads the loss on the host"}
    # declared-eager steps never warm up: they run at their steady pace, inside the timed window
    assert engine.captured_step.warm_up_steps == {}  # type: ignore[union-attr]


def test_an_undeclared_capture_failure_stops_the_run_with_a_clear_error(one_thread):
    engine = engine_for(config("bp", "cpu"))

    def fails(step):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    engine.captured_step._record = fails  # type: ignore[union-attr]
    with pytest.raises(CaptureError, match=r"bp step train/128 failed \(RuntimeError: CUDA error: operation not permitted") as info:
        engine.run()
    assert "cuda_graphs: false" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (BPFREE_GPU_TESTS=1 keeps it visible)")
def test_a_step_that_reads_the_host_fails_capture_with_the_error_on_cuda(tmp_path):
    # A failed capture leaves the process's CUDA state unusable, so it runs in a process of its own.
    script = tmp_path / "host_read.py"
    script.write_text(textwrap.dedent("""
        from bpfree.capture import CaptureError
        from bpfree.config import build_config
        from bpfree.engine import Engine

        engine = Engine(build_config({"algorithm": "bp", "model": "mlp:1x32", "epochs": 1, "patience": None,
                                      "checkpoint": False, "device": "cuda"}))
        step = engine.algorithm.train_step

        def host_read(x, y):
            out = step(x, y)
            out["loss"].item()  # a host sync: not capturable
            return out

        engine.algorithm.train_step = host_read
        try:
            engine.run()
        except CaptureError as exc:
            print("CAPTURE-ERROR", exc, flush=True)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert "CAPTURE-ERROR" in done.stdout and "cuda_graphs: false" in done.stdout, done.stdout + done.stderr[-2000:]


# -- CaFo's BatchNorm calibration: on the device, capturable, torch's cumulative average ----------


@pytest.mark.parametrize("device", DEVICES)
def test_cafo_calibration_is_captured_and_equals_the_cumulative_average(device, one_thread):
    # batch 512 over 3,500 images: 6 full batches (2 warm-ups, a capture, 3 replays) and a last one of 428
    cfg = build_config({"algorithm": "cafo", "model": "cnn3:4,8,16", "batch_size": 512, "device": device, "checkpoint": False})
    parts = build_run(cfg)
    algo, data = parts.algorithm, parts.data
    reference = copy.deepcopy(algo.model.blocks)
    phase = algo.schedule()[0]
    assert phase.name == "bn_calibration"
    algo.begin_phase(phase)
    step = captured_step(algo, parts.algorithm_generator)
    step.begin_phase(phase.name)
    order = parts.data_generator.get_state()
    clock = epoch_clock(phase, 0, 0, data.train_x.shape[0], cfg.batch_size)
    train_epoch(algo, data, clock, parts.data_generator, step=step)
    assert sorted(step.captured) == ["bn_calibration/512"] and not step.eager

    # torch's own rule: momentum=None, the same batches in train mode
    norms = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    reference.train()
    generator = torch.Generator(device=parts.data_generator.device)
    generator.set_state(order)
    with torch.no_grad():
        for xb, _ in train_batches(data, cfg.batch_size, generator):
            h = xb
            for block in reference:
                h = block(h)
    calibrated = [m for m in algo.model.blocks.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for mine, torchs in zip(calibrated, norms):
        torch.testing.assert_close(mine.running_mean, torchs.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.running_var, torchs.running_var, rtol=1e-5, atol=1e-6)
        assert int(mine.num_batches_tracked) == int(torchs.num_batches_tracked) == 7
    # the next phase freezes them: the momentum is restored and the pre-hooks are gone
    algo.begin_phase(algo.schedule()[1])
    assert all(bn.momentum == 0.1 and not bn._forward_pre_hooks for bn in calibrated)


# -- placement, FLOPs and resume across devices -------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (BPFREE_GPU_TESTS=1 keeps it visible)")
@pytest.mark.parametrize("case", sorted(set(CASES) - set(CUDA_AGREE) - {"noprop-paper-small"}))
def test_trains_on_cuda_with_everything_on_the_device(case):
    # The cases the agreement test does not run (it checks placement too). CUDA only: on a CPU-only
    # machine every tensor is on the CPU by construction (tests/test_conformance.py).
    engine = Engine(config(case, "cuda"))
    assert not misplaced(engine, "cuda")
    assert engine.algorithm_generator.device.type == "cuda" and engine.data.train_x.device.type == "cuda"
    result = engine.run()
    assert result["status"] == "completed"
    assert not misplaced(engine, "cuda")  # optimiser state created during training too
    assert result["device_type"] == "cuda" and result["cuda_graphs"]["enabled"]
    assert result["cuda_graphs"]["eager_kinds"] == DECLARED_EAGER.get(case, {})
    assert result["test_accuracy"] > 0.5
    assert all(v > 0 for v in result["flops_per_step"].values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (BPFREE_GPU_TESTS=1 keeps it visible)")
@pytest.mark.parametrize("case", ["bp", "ff", "cafo-dfa", "noprop"])
def test_cuda_counts_the_flops_cpu_counts(case):
    # FLOPs only: accuracies after two epochs sit on the steep part of the curve, where CPU and GPU
    # numerics (and their different random streams) legitimately differ.
    gpu = Engine(config(case, "cuda")).run()
    cpu = Engine(config(case, "cpu")).run()
    assert gpu["train_flops"] == cpu["train_flops"] and gpu["flops_per_step"] == cpu["flops_per_step"]
    assert gpu["test_accuracy"] > 0.5 and cpu["test_accuracy"] > 0.5


class Interrupt(Exception):
    pass


RESUME_PAIRS = [pytest.param("cpu", "cpu", id="cpu-cpu")] + [
    pytest.param(first, second, id=f"{first}-{second}", marks=CUDA.marks) for first, second in [("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda")]
]


@pytest.mark.parametrize("first,second", RESUME_PAIRS)
def test_checkpoint_resumes_across_devices(tmp_path, first, second, one_thread):
    def stop_in_the_second_epoch(event):  # the first epoch's checkpoint exists by then
        if event["epochs_run"] == 1:
            raise Interrupt

    values = {"algorithm": "mf", "model": "mlp:2x128", "epochs": 3, "patience": None, "dataset": "mnist5k", "seed": 0}
    with pytest.raises(Interrupt):
        engine_for(build_config({**values, "device": first}), run_dir=tmp_path, step_progress=stop_in_the_second_epoch).run()
    assert (tmp_path / "checkpoint.pt").is_file()
    result = engine_for(build_config({**values, "device": second}), run_dir=tmp_path).run()
    assert result["status"] == "completed" and result["resumed"]
    assert result["resumed_across_devices"] == (first != second)
    assert result["epochs_run"] == 3 and [r["epoch"] for r in result["curves"]] == [1, 2, 3]
    assert result["test_accuracy"] > 0.5
    if first == second:  # generator states restored: the same numbers as a run never interrupted
        whole = engine_for(build_config({**values, "device": first, "checkpoint": False})).run()
        tolerance = 1e-3 if first == "cuda" else 1e-6
        assert [r["train_loss"] for r in result["curves"]] == pytest.approx([r["train_loss"] for r in whole["curves"]], rel=tolerance)


# -- energy on short windows ---------------------------------------------------------------------------


class RefreshingCounter:
    """A fake NVML total-energy counter: a constant 100 W, published only every 100 ms (NVML: 20-100 ms)."""

    watts = 100.0

    def __init__(self, period: float = 0.1):
        self.period = period
        self.open = {}

    def _counter(self) -> float:
        now = time.perf_counter()
        return self.watts * (now - now % self.period)

    def begin_window(self, key, sync_execution=True):
        self.open[key] = (time.perf_counter(), self._counter())

    def end_window(self, key, sync_execution=True):
        started, counter = self.open.pop(key)
        return SimpleNamespace(time=time.perf_counter() - started, gpu_energy={0: self._counter() - counter}, cpu_energy=None, dram_energy=None)


def energy_meter(device: str) -> EnergyMeter:
    if device == "cpu":
        return EnergyMeter(torch.device("cpu"), monitor_factory=lambda d: (RefreshingCounter(0.1), "fake NVML counter", None, 0.1))
    meter = EnergyMeter(torch.device("cuda"))
    assert meter.available, meter.reason  # the session packs zeus and its NVML bindings
    return meter


def busy(device: str, seconds: float) -> None:
    a = torch.randn(1024, 1024, device=device)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        a = torch.tanh(a @ a)
        if device == "cuda":
            torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_windows_shorter_than_the_counter_refresh_are_never_read_as_zero(device, one_thread):
    meter = energy_meter(device)
    assert meter.min_window_s == pytest.approx(1.0)
    result = engine_for(config("bp", device), energy_meter=meter).run()  # epochs of a few ms
    for row in result["curves"]:
        assert row["energy_j"] is None or row["epoch_time_s"] >= meter.min_window_s, row
    assert result["energy_j"] is None and "not read" in result["energy_reason"] and "refreshed only every 100 ms" in result["energy_reason"]
    meter.begin()
    busy(device, 1.2)
    reading = meter.end()
    assert reading.joules is not None and reading.reason is None
    if device == "cpu":
        assert reading.joules == pytest.approx(120, abs=15)  # 100 W x 1.2 s, one refresh period of slack
    else:
        assert 20 * 1.2 < reading.joules < 2000 * 1.2  # a plausible board power


def test_a_window_split_around_excluded_stretches_needs_a_minimum_window_per_part():
    counter = RefreshingCounter(0.01)  # minimum window 0.1 s
    meter = EnergyMeter(torch.device("cpu"), monitor_factory=lambda d: (counter, "fake NVML counter", None, 0.01))

    def window(before: float, after: float) -> MeasuredWindow:
        with MeasuredWindow(torch.device("cpu"), meter) as measured:
            time.sleep(before)
            with measured.excluded():
                time.sleep(0.05)
            time.sleep(after)
        return measured

    short = window(0.15, 0.02)  # 0.17 s in two parts: less than 2 x 0.1 s
    assert short.joules is None and short.components is None and " ms in 2)" in short.reason
    long = window(0.2, 0.1)  # 0.3 s in two parts: read, off by at most one refresh (1 J) per part
    assert long.joules == pytest.approx(100 * long.seconds, abs=2.5) and long.reason is None


def test_a_run_sums_the_raw_readings_of_windows_too_short_to_read_alone():
    """Each window is shorter than the counter's minimum window, so each alone is null; their sum is
    the run's energy once the windows together span sqrt(k) minimum windows (edge errors average out)."""
    counter = RefreshingCounter(0.005)  # minimum window 0.05 s
    meter = EnergyMeter(torch.device("cpu"), monitor_factory=lambda d: (counter, "fake NVML counter", None, 0.005))
    total = RawEnergy()
    for _ in range(20):
        with MeasuredWindow(torch.device("cpu"), meter) as measured:
            time.sleep(0.03)
        assert measured.joules is None and "not read" in measured.reason
        total = total + measured.raw_energy
    assert total.windows == 20 and meter.aggregate_too_short(total.seconds, total.windows) is None
    assert total.joules == pytest.approx(100 * total.seconds, abs=5.0)  # 100 W; 20 edges of <= 0.5 J, averaging out
    assert meter.aggregate_too_short(0.2, 20) is not None  # 20 windows need sqrt(20) x 0.05 s = 0.22 s


@pytest.mark.parametrize("device", DEVICES)
def test_bench_reads_energy_per_epoch_over_a_long_window(device, one_thread):
    row = measure(BenchCase("BP", "bp", "mlp:1x32", 512), "mnist5k", 1, device, energy=energy_meter(device))
    assert row["energy_window_s"] >= 2.0 and row["energy_epochs"] >= 2
    assert row["joules_per_epoch"] is not None and row["energy_reason"] is None
    if device == "cpu":  # 100 W over the window, spread over its epochs
        assert row["joules_per_epoch"] == pytest.approx(100 * row["energy_window_s"] / row["energy_epochs"], rel=0.1)
        assert row["mean_power_w"] == pytest.approx(100, rel=0.1)


# -- peak memory and % of peak -------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (BPFREE_GPU_TESTS=1 keeps it visible)")
def test_warm_up_uses_one_stream_so_peak_memory_does_not_drift():
    device = torch.device("cuda")
    assert warmup_stream(device) is warmup_stream(device)
    case = BenchCase("BP", "bp", "mlp:2x128", 128)
    first = measure(case, "mnist5k", 1, "cuda", measure_energy=False)
    second = measure(case, "mnist5k", 1, "cuda", measure_energy=False)
    assert first["cuda_graphs"]["captured_kinds"] and second["peak_memory_bytes"] <= first["peak_memory_bytes"] + 2**20


def test_percent_of_peak_judges_convolutions_against_tf32_where_cudnn_uses_it(one_thread):
    peaks = {"fp32": 50e12, "tf32": 400e12}
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert row_peak(peaks, 0.0, cuda) == pytest.approx(400e12 if torch.backends.cuda.matmul.allow_tf32 else 50e12)
    assert torch.backends.cudnn.allow_tf32  # torch's default: cuDNN convolutions run in TF32
    assert row_peak(peaks, 1.0, cuda) == pytest.approx(400e12)
    if not torch.backends.cuda.matmul.allow_tf32:  # half the FLOPs at each peak: 1 / (0.5/400 + 0.5/50) TFLOP/s
        assert row_peak(peaks, 0.5, cuda) == pytest.approx(1 / (0.5 / 400e12 + 0.5 / 50e12))
    assert row_peak({"fp32": 1e11}, 1.0, cpu) == 1e11
    for model, conv in (("cnn3:4,8,16", True), ("mlp:1x32", False)):
        parts = build_run(build_config({"algorithm": "bp", "model": model, "device": "cpu"}))
        xb, yb = parts.data.train_x[:64], parts.data.train_y[:64]
        share = conv_flop_share(parts.algorithm, xb, yb)
        assert (share > 0.5) if conv else share == 0.0


# -- the device session's scripts ----------------------------------------------------------------------


def test_a_paper_config_past_its_budget_is_reported_as_its_first_epochs(tmp_path, monkeypatch, one_thread):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    session, tables = importlib.import_module("gpu_session"), importlib.import_module("gpu_tables")
    budget = dataclasses.replace(session.REHEARSAL, paper_config_s=0.0, max_epochs=3)  # spent after the first epoch
    record = session.run_paper_config("mf_mnist_mlp_2x1000", "cpu", budget, tmp_path)
    assert record["status"] == "stopped at budget" and record["test_accuracy"] is None
    assert record["epochs_run"] == 1 and record["max_epochs"] == 6 and len(record["epochs"]) == 1
    assert record["epochs"][0]["epoch_time_s"] > 0 and 0 <= record["epochs"][0]["val_accuracy"] <= 1
    summary = {"call": "sweep-paper", "rehearsal": True, "machine": {"torch": torch.__version__}, "steps": [],
               "paper": {"configs": [record], "budget_per_config_s": 0.0, "not_run": ["bp_mnist_cnn3"]}}
    atomic_write_json(tmp_path / "summary-sweep-paper.json", summary)
    text = tables.render(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| mf\\_mnist\\_mlp\\_2x1000"))
    assert "first 1 epoch \\(budget\\)" in row and "| 1 (6) |" in row and "98.14 ± 0.02" in row  # beside prior-study §4.2
    assert "Not run within the call's time limit: bp\\_mnist\\_cnn3" in text and "NoProp-DT depth sweep: no result" in text


def test_a_failing_bench_case_costs_only_its_own_row(monkeypatch, one_thread):
    real = bench.measure

    def measure_or_fail(case, *args, **kwargs):
        if case.algorithm == "mf":
            raise CaptureError("CUDA graph capture of the mf step train/512 failed (RuntimeError: boom)")
        return real(case, *args, **kwargs)

    monkeypatch.setattr(bench, "measure", measure_or_fail)
    monkeypatch.setattr(bench, "matmul_peaks", lambda device: {"fp32": 1e11})  # not under test here
    cases = (BenchCase("MF", "mf", "mlp:1x16", 512), BenchCase("BP", "bp", "mlp:1x16", 512))
    report = bench.run_bench(cases, "mnist5k", 1, "cpu")
    assert [row["label"] for row in report["rows"]] == ["BP"]
    assert report["skipped"] == ["MF: failed (CaptureError: CUDA graph capture of the mf step train/512 failed (RuntimeError: boom))"]
    assert "Skipped: MF: failed" in bench.markdown(report, "bpfree bench")
