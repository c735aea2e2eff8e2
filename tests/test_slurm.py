"""The Slurm executor against a real single-node Slurm (tests/slurm/start-slurm.sh starts one; skipped without it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from bpfree.protocol.suite import SlurmOptions, run_suite
from bpfree.report.render import write_report


def _slurm_problem() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no Slurm client here (run tests/slurm/start-slurm.sh as root)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed: {exc}"
    if proc.returncode != 0 or not any(s in proc.stdout for s in ("idle", "mix", "alloc")):
        return f"no Slurm node available: {(proc.stderr or proc.stdout).strip()[:200]}"
    return None


pytestmark = pytest.mark.skipif(_slurm_problem() is not None, reason=str(_slurm_problem()))

TINY = {"algorithm": "bp", "dataset": "mnist5k", "model": "mlp:1x16", "epochs": 1, "patience": None, "batch_size": 512, "device": "cpu"}
OPTIONS = SlurmOptions(cpus=1, time_min=10)


def _suite(tmp_path: Path) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"seeds": [0, 1], "configs": [TINY]}))
    return path


def _results(output: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in output.glob("*/result.json")]


def _wait_until_gone(job_ids: list[str], seconds: float = 240) -> None:
    parents = sorted({j.split("_")[0] for j in job_ids})
    deadline = time.time() + seconds
    while time.time() < deadline:
        proc = subprocess.run(["squeue", "-h", "-j", ",".join(parents)], capture_output=True, text=True, check=False)
        if proc.returncode == 0 and not proc.stdout.strip() or "Invalid job id" in proc.stderr:
            return
        time.sleep(1)
    raise AssertionError(f"jobs {job_ids} still queued after {seconds} s")


def test_suite_runs_through_slurm_and_waits(tmp_path):
    output = tmp_path / "out"
    outcome = run_suite(_suite(tmp_path), output=output, executor="slurm", slurm=OPTIONS, threads=1)
    assert not outcome.failed, outcome.failed
    assert len(outcome.job_ids) == 2 and sorted(r["seed"] for r in _results(output)) == [0, 1]


def test_no_wait_twice_never_submits_a_run_again(tmp_path):
    output = tmp_path / "out"
    held = SlurmOptions(cpus=1, time_min=10, extra={"additional_parameters": {"hold": True}})  # queued until released
    first = run_suite(_suite(tmp_path), output=output, executor="slurm", slurm=held, wait=False)
    assert len(first.job_ids) == 2
    try:
        again = run_suite(_suite(tmp_path), output=output, executor="slurm", slurm=held, wait=False)
        assert again.job_ids == [] and again.plan.tasks == [] and len(again.plan.in_flight) == 2
        assert len([p for p in output.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2
    finally:
        subprocess.run(["scontrol", "release", first.job_ids[0].split("_")[0]], check=False, capture_output=True)
    _wait_until_gone(first.job_ids)
    third = run_suite(_suite(tmp_path), output=output, executor="slurm", slurm=OPTIONS, wait=False)
    assert third.job_ids == [] and len(third.plan.skipped) == 2
    results = _results(output)
    assert sorted(r["seed"] for r in results) == [0, 1] and all(r["status"] == "completed" for r in results)
    report = write_report(output)
    assert [len(g.runs) for g in report.summary.groups] == [2]
