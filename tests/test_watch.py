"""Runs you can watch: log lines when output is not a terminal, the live history, `bpfree status`,
live MLflow and TensorBoard tracking, and what every reader makes of a killed run."""

from __future__ import annotations

import fcntl
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bpfree import runner
from bpfree.cli import app
from bpfree.config import build_config
from bpfree.errors import UserError
from bpfree.history import HISTORY_FILE, RUN_LOCK_FILE, read_history
from bpfree.live import RunWatch, text_line
from bpfree.protocol.status import scan
from bpfree.results import CHECKPOINT_FILE, inspect_run, read_results
from bpfree.tracking import TrackingOptions, check_mlflow_uri, check_options

ROOT = Path(__file__).resolve().parents[1]
TINY = {"algorithm": "bp", "dataset": "mnist5k", "model": "mlp:1x16", "batch_size": 512, "patience": None, "device": "cpu"}


def _cli_process(output: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "bpfree.cli", "run", "-a", "bp", "-d", "mnist5k", "-m", "mlp:1x16", "--epochs", "5000",
               "--batch-size", "512", "--device", "cpu", "--set", "patience=null", "-o", str(output), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _lines(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue, matches, deadline: float) -> str:
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if matches(line):
            return line
    raise AssertionError("no such line before the deadline")


def _json_epoch_1(line: str) -> bool:
    if not line.startswith("{"):
        return False
    row = json.loads(line)
    return row["event"] == "epoch" and row["epochs_run"] == 1


def test_a_piped_run_logs_each_epoch_live_and_a_kill_reads_as_interrupted(tmp_path):
    """stdout and stderr piped: a line and a history row for epoch 1 while the run trains; after
    SIGKILL, `bpfree status` and every reader say interrupted at its last epoch, resumable."""
    out = tmp_path / "out"
    proc = _cli_process(out)
    try:
        deadline = time.time() + 240
        line = _wait_for(_lines(proc.stderr), lambda text: re.search(r" \| train epoch 1/5000 \| loss [0-9.]+ \| val [0-9.]+ \|", text), deadline)
        assert line.startswith(time.strftime("%Y-")) and "bp mlp:1x16 mnist5k s0" in line and "ETA" in line and "peak" in line
        [run_dir] = list(out.iterdir())
        history = read_history(run_dir)
        assert history is not None and history.epochs[0]["epochs_run"] == 1 and history.epochs[0]["curve"]["epoch"] == 1
        assert proc.poll() is None, "the run must still be training"
        while not (run_dir / CHECKPOINT_FILE).exists() and time.time() < deadline:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = read_history(run_dir).epochs[-1]["epochs_run"]
    assert (run_dir / RUN_LOCK_FILE).exists()  # the dead process's lock file stays: a stale lock
    shown = CliRunner().invoke(app, ["status", str(out), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    status = json.loads(shown.stdout)
    [row] = status["runs"]
    assert (row["state"], row["epoch"], row["total_epochs"], row["resumable"]) == ("interrupted", last, 5000, True)
    assert status["summary"]["left"] == 1
    [record] = read_results(out).records  # what report, export and load_results read
    assert (record["status"], record["epochs_run"], record["test_accuracy"], len(record["curves"])) == ("interrupted", last, None, last)


def test_status_and_readers_tell_running_failed_and_interrupted_runs_apart(tmp_path, one_thread):
    out = tmp_path / "runs"

    def stop_at_epoch_2(error: BaseException):
        def progress(info):
            if info["epochs_run"] == 2:
                raise error
        return progress

    with pytest.raises(KeyboardInterrupt):
        runner.execute(build_config({**TINY, "epochs": 4, "output": str(out)}), progress=stop_at_epoch_2(KeyboardInterrupt()))
    with pytest.raises(RuntimeError):
        runner.execute(build_config({**TINY, "epochs": 4, "seed": 1, "output": str(out), "checkpoint": False}),
                       progress=stop_at_epoch_2(RuntimeError("boom")))
    runner.execute(build_config({**TINY, "epochs": 2, "seed": 2, "output": str(out)}))
    interrupted, failed, completed = (next(out.glob(f"bp-*-s{seed}-*")) for seed in (0, 1, 2))
    with open(interrupted / HISTORY_FILE, "a") as handle:
        handle.write('{"event": "epoch", "epochs_run": 3, "cur')  # a kill mid-write tears the last line

    report = scan(out)
    rows = {row.run_id: row for row in report.rows}
    assert (rows[interrupted.name].state, rows[interrupted.name].epoch, rows[interrupted.name].resumable) == ("interrupted", 2, True)
    assert (rows[failed.name].state, rows[failed.name].resumable) == ("failed", False) and "RuntimeError: boom" in rows[failed.name].detail
    assert (rows[completed.name].state, rows[completed.name].epoch) == ("completed", 2) and rows[completed.name].test_accuracy is not None
    assert report.summary_line().startswith("3 runs: 1 done, 0 running, 1 failed, 1 left (1 interrupted)")

    with open(interrupted / RUN_LOCK_FILE, "a") as holder:  # a live process holding the lock: running
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert inspect_run(interrupted).state == "running"
        assert scan(out).summary_line().startswith("3 runs: 1 done, 1 running")
    assert inspect_run(interrupted).state == "interrupted"  # its holder gone: a stale lock

    from bpfree.export import tidy_tables
    from bpfree.report.aggregate import summarize
    from bpfree.report.render import runs_table

    found = read_results(out)  # what `bpfree report` and `bpfree.load_results` read
    assert sorted(r["status"] for r in found.records) == ["completed", "failed", "interrupted"] and not found.rejected
    tables = tidy_tables(out)
    assert sorted(tables["runs"]["status"]) == ["completed", "failed", "interrupted"]
    assert len(tables["curves"]) == 2 + 2 + 2
    summary = summarize(found.records)
    rows = {row[0]: row for row in runs_table(summary).rows}
    assert (rows[interrupted.name][3], rows[failed.name][3], rows[completed.name][3]) == ("interrupted", "failed", "completed")
    assert rows[interrupted.name][9].startswith("interrupted after epoch 2 of 4; `bpfree resume ")
    assert sorted((len(g.runs), len(g.completed)) for g in summary.groups) == [(1, 1), (2, 0)]  # statistics: completed runs only


def test_suite_logs_every_workers_epochs_from_their_histories(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"seeds": [0, 1], "configs": [{**TINY, "epochs": 2}]}))
    output = tmp_path / "out"
    command = ["suite", str(suite), "-o", str(output), "--jobs", "2", "--threads", "1", "--no-report", "--log-format", "json"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stderr.splitlines()]  # every log line is one JSON object
    assert rows[0]["event"] == "plan" and rows[0]["runs"] == 2
    for seed in (0, 1):
        label = f"bp mlp:1x16 mnist5k s{seed}"
        epochs = [row["epochs_run"] for row in rows if row.get("run") == label and row["event"] == "epoch"]
        ends = [row for row in rows if row.get("run") == label and row["event"] == "end"]
        assert epochs == [1, 2] and [(e["status"], e["epochs_run"]) for e in ends] == [("completed", 2)]
        assert all(0 <= row["curve"]["val_accuracy"] <= 1 for row in rows if row.get("run") == label and row["event"] == "epoch")
    shown = CliRunner().invoke(app, ["status", str(output), "--format", "markdown"])
    assert shown.exit_code == 0 and "2 runs: 2 done, 0 running, 0 failed, 0 left" in shown.stdout


def test_heartbeats_inside_a_long_epoch(tmp_path):
    watch = RunWatch(tmp_path, "r1", "mf mlp:1x8 mnist5k s0", checkpoint=False, heartbeat_s=0.05)
    seen: list[dict] = []
    watch.start(total_epochs=3, resumed=False, listeners=[seen.append])
    watch.on_step({"event": "step", "phase": "train", "step": 5, "steps": 10, "epochs_run": 0, "total_epochs": 3})
    time.sleep(0.3)
    watch.end("interrupted")
    beats = [row for row in seen if row["event"] == "heartbeat" and row["step"] == 5]
    assert beats and beats[0]["steps_per_s"] > 0 and beats[0]["eta_s"] > 0
    assert " | train epoch 1/3 in progress | step 5/10 | " in text_line(beats[0])
    rows = [json.loads(line) for line in (tmp_path / HISTORY_FILE).read_text().splitlines()]
    assert [row["event"] for row in rows] == [row["event"] for row in seen]  # every row on file before any listener


def test_log_lines_escape_what_the_run_names():
    row = {"event": "end", "time": 0, "run": "mf\x1b[31m red\nnext", "status": "failed", "reason": "bad\rline", "epochs_run": 1}
    line = text_line(row)
    assert "\x1b" not in line and "\n" not in line and "\r" not in line and "\\x1b[31m" in line


def test_mlflow_uri_refusals_are_one_line(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow not installed (the 'mlflow' extra)")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for empty in ("", "  "):
        with pytest.raises(UserError, match="empty tracking URI"):
            check_mlflow_uri(empty)
    with pytest.raises(UserError, match=r"maintenance mode.*sqlite:///mlflow.db"):
        check_mlflow_uri("file:./mlruns")
    with pytest.raises(UserError, match="in-memory"):
        check_mlflow_uri("sqlite:///:memory:")
    monkeypatch.chdir(tmp_path)
    assert check_mlflow_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"  # a resume elsewhere finds it
    result = CliRunner().invoke(app, ["run", "-a", "bp", "--mlflow", "", "-o", str(tmp_path / "out")])
    assert isinstance(result.exception, UserError) and "empty tracking URI" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_an_unreachable_mlflow_server_warns_once_and_the_run_goes_on(tmp_path, caplog, one_thread):
    pytest.importorskip("mlflow", reason="mlflow not installed (the 'mlflow' extra)")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level("WARNING")
    started = time.monotonic()
    run_dir, result = runner.execute(build_config({**TINY, "epochs": 2, "output": str(tmp_path)}),
                                     tracking=TrackingOptions(mlflow=f"http://127.0.0.1:{port}"))
    warnings = [r for r in caplog.records if r.name == "bpfree.tracking"]
    assert result["status"] == "completed" and len(warnings) == 1 and "MLflow tracking stopped" in warnings[0].getMessage()
    assert time.monotonic() - started < 120  # MLflow's own retries took 253 s before they were bounded


def test_mlflow_and_tensorboard_get_each_epoch_live_and_a_resume_continues_the_same_run(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("mlflow", reason="mlflow not installed (the 'mlflow' extra)")
    pytest.importorskip("tensorboard", reason="tensorboard not installed (the 'tensorboard' extra)")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts beside the database's default root
    options = check_options("sqlite:///mlflow.db", tmp_path / "tb")
    client = MlflowClient(options.mlflow)
    live: dict = {}

    def stop_at_epoch_2(info):
        if info["epochs_run"] == 2:
            run_dir = next((tmp_path / "out").iterdir())
            deadline = time.time() + 120
            while time.time() < deadline:  # epoch 1 reaches the store while the run is still going
                stored = json.loads((run_dir / "tracking.json").read_text()) if (run_dir / "tracking.json").exists() else {}
                if "mlflow" in stored:
                    steps = [m.step for m in client.get_metric_history(stored["mlflow"]["run_id"], "val_accuracy")]
                    if 1 in steps:
                        live["steps"] = steps
                        break
                time.sleep(0.2)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.execute(build_config({**TINY, "epochs": 3, "output": str(tmp_path / "out")}), progress=stop_at_epoch_2, tracking=options)
    assert 1 in live.get("steps", [])
    run_dir = next((tmp_path / "out").iterdir())
    mlflow_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    assert client.get_run(mlflow_id).info.status == "KILLED"

    _, result = runner.resume(run_dir)  # tracked where it was: the same MLflow run and TensorBoard folder
    assert result["status"] == "completed"
    run = client.get_run(mlflow_id)
    assert run.info.status == "FINISHED" and run.data.metrics["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert {m.step for m in client.get_metric_history(mlflow_id, "val_accuracy")} == {1, 2, 3}
    events = EventAccumulator(str(tmp_path / "tb" / run_dir.name))
    events.Reload()
    assert {e.step for e in events.Scalars("val_accuracy")} == {1, 2, 3}
