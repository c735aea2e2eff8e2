"""The cost of a run at every evaluation point (``eval_every``), training accuracy on a fixed sample,
and the resource sampler's telemetry.csv (rows, markers, resume, torn files, failures)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

import bpfree
from bpfree.capture import CapturedStep
from bpfree.config import build_config, identity
from bpfree.engine import Engine
from bpfree.errors import ConfigError
from bpfree.loop import interval_points
from bpfree.meters.telemetry import COLUMNS, TELEMETRY_FILE, Rapl, TelemetrySampler
from bpfree.results import check_record, read_telemetry
from bpfree.runner import execute, resume

N_TRAIN, BATCH = 3500, 128  # mnist5k's training split; 27 full batches and one of 44
STEPS = math.ceil(N_TRAIN / BATCH)


def tiny(tmp_path, **fields):
    values = {"algorithm": "bp", "model": "mlp:1x16", "epochs": 2, "batch_size": BATCH, "patience": None, "seed": 1,
              "device": "cpu", "output": str(tmp_path), "telemetry_interval_s": 0.02}
    return build_config({**values, **fields})


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bpfree-telemetry"]


def test_every_evaluation_point_records_the_cost_so_far(tmp_path, one_thread):
    events = []
    run_dir, result = execute(tiny(tmp_path, eval_every="0.25 epoch"), progress=events.append)
    rows = result["curves"]
    assert [r["point"] for r in rows] == ["interval"] * 3 + ["epoch"] + ["interval"] * 3 + ["epoch"]
    assert [r["epoch_progress"] for r in rows] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert [r["epoch"] for r in rows] == [1] * 4 + [2] * 4
    # steps and samples by arithmetic: points after round(k/4 x 28) = 7, 14, 21 steps of each epoch
    steps = [7, 14, 21, 28, 35, 42, 49, 56]
    assert [r["cumulative_steps"] for r in rows] == steps
    assert [r["cumulative_samples"] for r in rows] == [896, 1792, 2688, 3500, 4396, 5292, 6188, 7000]
    # FLOPs from the ledger: steps run x FLOPs of their kind (the last, smaller batch is its own kind)
    full, last = result["flops_per_step"]["train/128"], result["flops_per_step"]["train/44"]
    epoch_flops = (STEPS - 1) * full + last
    assert [r["cumulative_train_flops"] for r in rows] == [7 * full, 14 * full, 21 * full, epoch_flops,
                                                           epoch_flops + 7 * full, epoch_flops + 14 * full, epoch_flops + 21 * full, 2 * epoch_flops]
    assert rows[-1]["cumulative_train_flops"] == result["train_flops"]
    assert rows[-1]["cumulative_steps"] == result["train_steps"] == 2 * STEPS and result["train_samples_seen"] == 2 * N_TRAIN
    for field in ("cumulative_train_time_s", "cumulative_train_flops", "cumulative_steps", "cumulative_samples", "epoch_progress"):
        values = [r[field] for r in rows]
        assert all(a < b for a, b in zip(values, values[1:])), (field, values)
    assert rows[-1]["cumulative_train_time_s"] == result["train_time_s"]
    assert rows[-1]["cumulative_energy_j"] is None and result["energy_j"] is None  # no counters here: null, never 0
    # training accuracy: epoch rows only, on min(n_train, n_val, 1000) fixed images, outside the costs
    assert result["train_accuracy_samples"] == 500 and result["train_accuracy_time_s"] > 0
    for r in rows:
        assert (r["train_accuracy"] is None) == (r["point"] == "interval")
        assert r["train_accuracy"] is None or 0 <= r["train_accuracy"] <= 1
        assert 0 <= r["val_accuracy"] <= 1 and r["peak_memory_bytes"] > 0
    assert rows[-1]["train_accuracy"] > 0.5
    # the epoch event carries the epoch's curve row
    epoch_events = [e for e in events if e.get("event") == "epoch"]
    assert [e["curve"] for e in epoch_events] == [rows[3], rows[7]]

    # telemetry: monotonic time, the engine's markers, RSS, no thread left, and reachable from the API
    frame = read_telemetry(run_dir)
    assert frame is not None and tuple(frame.columns) == COLUMNS and len(frame) == result["telemetry"]["rows"] >= 5
    assert frame["time_s"].is_monotonic_increasing and (frame["rss_bytes"] > 0).all()
    assert {"setup", "train", "eval", "test", "end"} <= set(frame["activity"]) and {"train", "final"} <= set(frame["phase"])
    assert frame["epoch"].iloc[-1] == 2 and frame["cuda_allocated_bytes"].isna().all()
    assert not sampler_threads()
    telemetry = bpfree.load_results(tmp_path, table="telemetry")
    assert len(telemetry) == len(frame) and set(telemetry["run_id"]) == {run_dir.name}
    curves = bpfree.load_results(tmp_path, table="curves")
    assert list(curves["cumulative_steps"]) == steps and set(curves["point"]) == {"epoch", "interval"}
    result_model = bpfree.Result.from_run_dir(run_dir)
    assert result_model.curves[0].point == "interval" and result_model.curves[3].cumulative_train_flops == epoch_flops
    # a record written before these fields existed still checks and loads
    old_curve = ("phase", "epoch", "train_loss", "val_accuracy", "epoch_time_s", "eval_time_s", "energy_j",
                 "cumulative_train_time_s", "cumulative_energy_j")
    new_fields = ("train_steps", "train_samples_seen", "train_accuracy_samples", "train_accuracy_time_s", "telemetry")
    old = {k: v for k, v in result.items() if k not in new_fields}
    old["curves"] = [{k: r[k] for k in old_curve} for r in rows if r["point"] == "epoch"]
    assert check_record(old) is None and bpfree.Result.model_validate(old).curves[1].point is None


def test_resumed_run_appends_telemetry_after_a_torn_line_and_off_writes_none(tmp_path, one_thread):
    class Interrupt(Exception):
        pass

    def stop_once_checkpointed(info: dict) -> None:
        if any(tmp_path.glob("*/checkpoint.pt")):
            raise Interrupt

    with pytest.raises(Interrupt):
        execute(tiny(tmp_path, eval_every="10 steps"), progress=stop_once_checkpointed)
    assert not sampler_threads()  # stopped although the run failed
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    path = run_dir / TELEMETRY_FILE
    before = read_telemetry(run_dir)
    with open(path, "ab") as handle:  # a kill in the middle of a write
        handle.write(b"12.5,1790000000.1,tra")
    assert len(read_telemetry(run_dir)) == len(before)  # the torn line is dropped
    _, result = resume(run_dir)
    frame = read_telemetry(run_dir)
    assert len(frame) == len(before) + result["telemetry"]["rows"]
    assert frame["time_s"].is_monotonic_increasing and frame["time_s"].is_unique
    assert list(frame["activity"]).count("setup") >= 2 and frame["activity"].iloc[-1] == "end"
    # "10 steps" counts the run's steps across epochs and the resume: 28 steps per epoch
    assert [r["cumulative_steps"] for r in result["curves"]] == [10, 20, 28, 30, 40, 50, 56]

    off_dir, off = execute(tiny(tmp_path / "off", telemetry_interval_s=None, epochs=1))
    assert read_telemetry(off_dir) is None and not (off_dir / TELEMETRY_FILE).exists() and off["telemetry"] is None
    assert [r["point"] for r in off["curves"]] == ["epoch"] and off["curves"][0]["cumulative_steps"] == STEPS
    assert bpfree.load_results(tmp_path / "off", table="telemetry").empty


def test_a_failing_sampler_warns_once_and_stops(tmp_path, monkeypatch):
    sampler = TelemetrySampler(tmp_path / TELEMETRY_FILE, torch.device("cpu"), interval_s=0.01)

    def broken_counter() -> None:
        raise OSError("counter vanished")

    monkeypatch.setattr(sampler, "_sample", broken_counter)
    with pytest.warns(RuntimeWarning, match="telemetry stopped.*counter vanished"):
        with sampler:
            sampler.mark("train", "train", 0)
            for _ in range(200):
                if sampler.problem is not None:
                    break
                threading.Event().wait(0.01)
    assert sampler.summary()["problem"] == "OSError: counter vanished" and not sampler_threads()
    (tmp_path / "taken").write_text("a file where the run directory should be")
    with pytest.warns(RuntimeWarning, match="telemetry stopped"):  # an unwritable place: no thread at all
        TelemetrySampler(tmp_path / "taken" / TELEMETRY_FILE, torch.device("cpu")).start().stop()
    assert not sampler_threads()


def test_rapl_energy_survives_a_counter_wrap(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("900000\n")
    (tmp_path / "intel-rapl:0:1").mkdir()  # a core subzone: inside the package, never counted twice
    (tmp_path / "intel-rapl:0:1" / "name").write_text("core\n")
    rapl = Rapl(tmp_path)
    (zone / "energy_uj").write_text("950000\n")
    assert rapl.read() == pytest.approx(0.05)
    (zone / "energy_uj").write_text("100000\n")  # wrapped at 1 J
    assert rapl.read() == pytest.approx(0.05 + 0.15)  # 950000 -> 1000000 -> 100000 µJ
    assert not Rapl(tmp_path / "none").available


def test_eval_every_forms_and_grid():
    assert build_config({"eval_every": "0.25epochs"}).eval_every == "0.25 epoch"
    assert build_config({"eval_every": " 200 step"}).eval_every == "200 steps"
    assert build_config({"eval_every": "1 epoch"}).eval_every is None  # the default grid
    for bad in (0.5, 100, "2 epochs", "0 steps", "1.5 steps", "every epoch", True):
        with pytest.raises(ConfigError, match="field 'eval_every'") as caught:
            build_config({"eval_every": bad})
        assert "\n" not in str(caught.value)
    # at its default the field stays out of the identity, so earlier records keep their keys and groups
    assert "eval_every" not in identity(build_config({}).resolved(), "cpu")
    assert identity(build_config({"eval_every": "0.5 epoch"}).resolved(), "cpu")["eval_every"] == "0.5 epoch"
    assert build_config({"telemetry_interval_s": None}).key() == build_config({}).key()
    assert interval_points(("epoch", 0.25), 28, 0) == {7, 14, 21}
    assert interval_points(("epoch", 0.3), 10, 0) == {3, 6, 9}
    assert interval_points(("steps", 10), 28, 25) == {5, 15, 25}  # the run's 30th, 40th and 50th steps
    assert interval_points(("steps", 28), 28, 0) == set() and interval_points(None, 28, 0) == set()



class EmulatedCapture(CapturedStep):
    """A captured step on CPU: "recording" defers the step and each replay runs it on the static buffers,
    writing into the same output tensors, as a CUDA graph replay does (the capture bookkeeping is real)."""

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


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (BPFREE_GPU_TESTS=1 keeps it visible)")


@pytest.mark.parametrize("device,algorithm", [("cpu", "bp"), *[pytest.param("cuda", a, marks=[pytest.mark.gpu, CUDA]) for a in ("bp", "ff")]])
def test_points_between_captured_steps_leave_training_alone(device, algorithm, tmp_path, one_thread):
    def captured_run(out, **fields):
        engine = Engine(tiny(tmp_path / out, algorithm=algorithm, model="mlp:1x32", device=device, **fields), run_dir=tmp_path / out / "run")
        if engine.captured_step is None:  # CPU: the same bookkeeping around an emulated graph
            engine.captured_step = EmulatedCapture(engine.algorithm, (engine.algorithm_generator,))
        return engine.run()

    # every 5 steps: points fall between warm-up, capture and replayed steps of both batch kinds
    fine, plain_run = captured_run("fine", eval_every="5 steps"), captured_run("plain")
    assert fine["cuda_graphs"]["captured_kinds"] == plain_run["cuda_graphs"]["captured_kinds"] != []
    assert fine["train_flops"] == plain_run["train_flops"] and len(fine["curves"]) > len(plain_run["curves"])
    epoch_rows = [r for r in fine["curves"] if r["point"] == "epoch"]
    tolerance = 1e-4 if device == "cuda" else 1e-9
    for a, b in zip(epoch_rows, plain_run["curves"], strict=True):
        assert a["cumulative_steps"] == b["cumulative_steps"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=tolerance)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=0.004 if device == "cuda" else 0.0)
    frame = read_telemetry(tmp_path / "fine" / "run")
    assert frame["time_s"].is_monotonic_increasing and not sampler_threads()
    if device == "cuda":
        assert (frame["cuda_reserved_bytes"] > 0).any()
        if "nvml" in fine["telemetry"]["sources"]:
            assert frame["gpu_memory_used_bytes"].notna().all() and frame["gpu_power_w"].notna().any()
