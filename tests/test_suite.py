"""Suites: every run of configs x seeds exactly once, resumable, through local processes or submitit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import yaml

from bpfree.config import build_config
from bpfree.errors import UserError
from bpfree.protocol.suite import SlurmOptions, expand, load_suite, make_plan, run_suite
from bpfree.runner import execute

TINY = {"dataset": "mnist5k", "model": "mlp:1x16", "epochs": 2, "patience": None, "batch_size": 256}


pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    """Stands in for a kill: raised from the progress callback after a checkpoint exists."""


def _write_suite(path: Path, output: Path, seeds=(0, 1)) -> Path:
    (path.parent / "mf_tiny.yaml").write_text(yaml.safe_dump({"algorithm": "mf", **TINY}))
    suite = {
        "output": str(output),
        "seeds": list(seeds),
        "overrides": {"device": "cpu"},
        "configs": ["mf_tiny.yaml", {"algorithm": "bp", **TINY}],
    }
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def _results(output: Path) -> dict[str, Path]:
    found = {}
    for path in output.glob("*/result.json"):
        key = json.loads(path.read_text())["config_key"]
        assert key not in found, f"run {key} executed twice"
        found[key] = path
    return found


def _interrupt_after_first_checkpoint(cfg):
    def progress(info):
        if info["epochs_run"] >= 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        execute(cfg, progress=progress)
    [run_dir] = [p for p in cfg.output.iterdir() if p.is_dir() and not (p / "result.json").exists()]
    assert (run_dir / "config.json").exists() and (run_dir / "checkpoint.pt").exists()
    return run_dir


def test_suite_resumes_interrupted_run_and_runs_everything_once(tmp_path):
    output = tmp_path / "out"
    suite_path = _write_suite(tmp_path / "suite.yaml", output)
    configs = expand(load_suite(suite_path).entries, [0, 1], output)
    assert len(configs) == 4 and len({c.key() for c in configs}) == 4

    # One run finished before the suite starts, one was killed after its first checkpoint.
    done_cfg = next(c for c in configs if c.algorithm == "bp" and c.seed == 0)
    done_dir, _ = execute(done_cfg)
    done_mtime = (done_dir / "result.json").stat().st_mtime_ns
    cut_cfg = next(c for c in configs if c.algorithm == "mf" and c.seed == 1)
    cut_dir = _interrupt_after_first_checkpoint(cut_cfg)

    plan = make_plan(configs, output)
    assert {t.action for t in plan.tasks} == {"new", "resume"}
    assert [t.run_dir for t in plan.tasks if t.action == "resume"] == [cut_dir]
    assert [d for _, d in plan.skipped] == [done_dir]

    outcome = run_suite(suite_path, executor="local", jobs=2)
    assert not outcome.failed, outcome.failed
    assert len(outcome.outcomes) == 3  # the finished run is not executed again
    results = _results(output)
    assert set(results) == {c.key() for c in configs}
    assert len(list(output.glob("*/result.json"))) == 4
    assert len([p for p in output.iterdir() if p.is_dir()]) == 4  # the resumed run kept its directory
    assert (done_dir / "result.json").stat().st_mtime_ns == done_mtime
    resumed = json.loads((cut_dir / "result.json").read_text())
    assert resumed["resumed"] is True and resumed["status"] == "completed" and resumed["epochs_run"] == 2
    assert not (cut_dir / "checkpoint.pt").exists()

    # A second invocation has nothing to do and touches nothing.
    mtimes = {k: p.stat().st_mtime_ns for k, p in results.items()}
    again = run_suite(suite_path, executor="local", jobs=2)
    assert again.outcomes == [] and len(again.plan.skipped) == 4
    assert {k: p.stat().st_mtime_ns for k, p in _results(output).items()} == mtimes


def test_seeds_are_distinct_runs_with_distinct_seeds(tmp_path):
    suite_path = _write_suite(tmp_path / "suite.yaml", tmp_path / "out", seeds=(3, 4, 5))
    configs = expand(load_suite(suite_path).entries, load_suite(suite_path).seeds, tmp_path / "out")
    assert sorted(c.seed for c in configs if c.algorithm == "mf") == [3, 4, 5]
    assert all(str(c.output) == str(tmp_path / "out") for c in configs)


@pytest.mark.parametrize("executor", ["debug", "submitit-local"])
def test_submitit_executors_run_the_suite(tmp_path, executor):
    output = tmp_path / "out"
    suite_path = tmp_path / "suite.yaml"
    seeds = [0, 1] if executor == "debug" else [0]
    suite_path.write_text(yaml.safe_dump({"seeds": seeds, "configs": [{"algorithm": "bp", **TINY, "epochs": 1}]}))
    outcome = run_suite(suite_path, output=output, executor=executor, slurm=SlurmOptions(time_min=10, cpus=1))
    assert not outcome.failed, outcome.failed
    assert len(outcome.job_ids) == len(seeds)
    assert len(_results(output)) == len(seeds)
    again = run_suite(suite_path, output=output, executor=executor)
    assert again.outcomes == [] and len(again.plan.skipped) == len(seeds)


def test_slurm_options_are_valid_submitit_parameters(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")  # submitit only checks srun exists
    options = SlurmOptions(partition="gpu", account="proj", gpus=1, time_min=90, cpus=8, mem_gb=32)
    executor = submitit.AutoExecutor(folder=tmp_path / "sub", cluster="slurm")
    executor.update_parameters(**options.parameters())  # raises on any unknown name
    params = executor._executor.parameters
    assert params["partition"] == "gpu" and params["account"] == "proj"
    assert params["time"] == 90 and params["cpus_per_task"] == 8 and params["mem"] == "32GB"
    assert params["gpus_per_node"] == 1


def test_slurm_without_a_cluster_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun anywhere
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(yaml.safe_dump({"configs": [{"algorithm": "bp", **TINY}]}))
    with pytest.raises(UserError, match="slurm"):
        run_suite(suite_path, output=tmp_path / "out", executor="slurm")


@pytest.mark.parametrize(
    "content, needle",
    [
        ("configs: [\n", "invalid YAML"),
        ("- a.yaml\n", "expected a mapping"),
        ("configs: []\n", "'configs' must be a non-empty list"),
        ("configs: [missing.yaml]\n", "configs[0]: config file missing.yaml not found"),
        ("configs: [{algorithm: bp}]\nseeds: [1, 1]\n", "duplicates"),
        ("configs: [{algorithm: bp}]\nsteeds: [1]\n", "unknown key(s) 'steeds'"),
        ("configs: [{algorithm: backprop}]\n", "unknown algorithm 'backprop'"),
        ("configs: [{path: x.yaml, extra: 1}]\n", "unknown key(s) 'extra'"),
        ("configs: [3]\n", "expected a config path or an inline config"),
    ],
)
def test_bad_suite_file_is_one_line(tmp_path, content, needle):
    path = tmp_path / "suite.yaml"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        entries = load_suite(path)
        expand(entries.entries, entries.seeds, tmp_path / "out")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_suite_file_on_the_command_line(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text("configs: [nowhere.yaml]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bpfree.cli", "suite", str(path), "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nowhere.yaml not found" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_plans_without_running(tmp_path):
    suite_path = _write_suite(tmp_path / "suite.yaml", tmp_path / "out")
    outcome = run_suite(suite_path, dry_run=True)
    assert len(outcome.plan.tasks) == 4 and outcome.outcomes == []
    assert not list((tmp_path / "out").glob("*/result.json"))


def test_inline_config_is_validated_like_a_file(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"configs": [{"algorithm": "bp", "epochs": 0}]}))
    with pytest.raises(UserError, match="field 'epochs'"):
        s = load_suite(suite)
        expand(s.entries, s.seeds, tmp_path)
    assert build_config({"algorithm": "bp"}).seed == 0


def test_suite_killed_mid_way_completes_every_run_exactly_once(tmp_path):
    """SIGKILL the whole `bpfree suite` process group after its first result, then run it again."""
    import signal
    import time

    output = tmp_path / "out"
    suite_path = _write_suite(tmp_path / "suite.yaml", output, seeds=(0, 1, 2))
    command = [sys.executable, "-m", "bpfree.cli", "suite", str(suite_path), "--jobs", "1", "--no-report"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(output.glob("*/result.json")):
        time.sleep(0.1)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)  # the suite and every run it started
    proc.wait()
    first = {p.parent.name: p.stat().st_mtime_ns for p in output.glob("*/result.json")}
    assert first, "the suite produced no result before the deadline"

    subprocess.run(command, check=True, capture_output=True, timeout=600)
    results = _results(output)  # fails if any run produced two results
    assert len(results) == 6
    assert all((output / name / "result.json").stat().st_mtime_ns == t for name, t in first.items())
    for path in results.values():
        assert json.loads(path.read_text())["status"] == "completed"
