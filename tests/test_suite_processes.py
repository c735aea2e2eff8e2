"""Suite worker processes: a dead worker costs only its own run, and none outlives a killed suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bpfree.protocol.suite import executors, run_suite

TINY = {"dataset": "mnist5k", "model": "mlp:1x16", "epochs": 1, "patience": None, "batch_size": 512, "device": "cpu"}


def test_a_worker_that_dies_fails_only_its_own_run(tmp_path, monkeypatch):
    import worker_faults

    monkeypatch.setattr(executors, "run_task", worker_faults.run_or_die)
    suite = tmp_path / "suite.yaml"
    configs = [{"algorithm": "bp", **TINY, "epochs": 2, "name": "dies"}, {"algorithm": "bp", **TINY}, {"algorithm": "mf", **TINY}]
    suite.write_text(yaml.safe_dump({"seeds": [0], "configs": configs}))
    outcome = run_suite(suite, output=tmp_path / "out", jobs=2, threads=1)
    failed = [(task.label, o["error"]) for task, o in outcome.failed]
    assert len(outcome.outcomes) == 3 and len(failed) == 1, outcome.outcomes
    assert failed[0][1] == executors.WORKER_DIED
    statuses = [json.loads(p.read_text())["status"] for p in (tmp_path / "out").glob("*/result.json")]
    assert statuses == ["completed", "completed"]


def _session_processes(session: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux only")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_no_process_outlives_a_killed_suite(tmp_path, how):
    output = tmp_path / "out"
    suite = tmp_path / "suite.yaml"
    slow = {**TINY, "epochs": 500, "patience": 500}
    suite.write_text(yaml.safe_dump({"seeds": [0, 1], "configs": [{"algorithm": "bp", **slow}]}))
    command = [sys.executable, "-m", "bpfree.cli", "suite", str(suite), "-o", str(output), "--jobs", "1", "--no-report", "-q"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(output.glob("*/checkpoint.pt")):
            assert proc.poll() is None, "the suite ended before its first checkpoint"
            time.sleep(0.2)
        assert len(_session_processes(proc.pid)) >= 3  # the suite, the fork server, a worker (and the tracker)
        os.kill(proc.pid, how)
        proc.wait(timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline and _session_processes(proc.pid):
            time.sleep(0.2)
        left = _session_processes(proc.pid)
        assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
