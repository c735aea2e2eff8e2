"""Failures end in one line and leave nothing half-written; runs keep their identity across resumes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bpfree import runner
from bpfree.cli import app
from bpfree.config import build_config
from bpfree.errors import UserError
from bpfree.fileio import WriteError
from bpfree.protocol.tune import tune
from bpfree.results import CHECKPOINT_FILE, RESULT_FILE, new_run_id

TINY = {"dataset": "mnist5k", "model": "mlp:1x16", "epochs": 1, "batch_size": 512, "patience": None, "device": "cpu"}


def _interrupted_run(tmp_path: Path, **extra) -> Path:
    """A run directory as a kill leaves it: config.json, no result.json."""
    run_dir, _ = runner.execute(build_config({"algorithm": "bp", **TINY, **extra, "output": str(tmp_path / "out")}))
    (run_dir / RESULT_FILE).unlink()
    return run_dir


def test_resume_dot_records_the_real_run_id(tmp_path, monkeypatch, one_thread):
    run_dir = _interrupted_run(tmp_path)
    monkeypatch.chdir(run_dir)
    path, result = runner.resume(Path("."))
    assert result["run_id"] == run_dir.name and path == run_dir
    assert json.loads((run_dir / RESULT_FILE).read_text())["run_id"] == run_dir.name


def test_a_run_directory_is_trained_by_one_process_at_a_time(tmp_path, one_thread):
    run_dir = _interrupted_run(tmp_path)
    with open(run_dir / runner.RUN_LOCK_FILE, "a") as holder:  # another process training it
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another bpfree process is training it"):
            runner.resume(run_dir)
    assert not (run_dir / RESULT_FILE).exists()
    runner.resume(run_dir)  # the lock died with its holder: free again
    assert (run_dir / RESULT_FILE).exists()


def test_resume_removes_a_checkpoint_write_that_a_kill_interrupted(tmp_path, one_thread):
    run_dir = _interrupted_run(tmp_path)
    stale = run_dir / f".{CHECKPOINT_FILE}.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    runner.resume(run_dir)
    assert not stale.exists()


def test_home_in_output_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = build_config({"output": "~/runs", "data_root": "~/data"})
    assert cfg.output == tmp_path / "runs" and cfg.data_root == tmp_path / "data"


def test_model_specs_are_normalised_and_run_ids_bounded(tmp_path):
    assert build_config({"model": " MLP:2x16\n"}).model == "mlp:2x16"
    long = build_config({"model": "mlp:" + ",".join(["99999"] * 64)})
    run_id = new_run_id(long)
    assert len(run_id) < 120 and all(c.isalnum() or c in "-=." for c in run_id)
    (tmp_path / run_id).mkdir()  # no Errno 36
    other = build_config({"model": "mlp:" + ",".join(["99999"] * 63)})
    assert new_run_id(other).split("-s0-")[0] != run_id.split("-s0-")[0]  # the hash tells them apart


def _full_disk_for(monkeypatch, name: str) -> None:
    import bpfree.fileio as results_module

    real = os.replace

    def replace(src, dst):
        if Path(dst).name == name:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(results_module.os, "replace", replace)


def test_full_disk_during_a_checkpoint_write_is_one_line(tmp_path, monkeypatch, one_thread):
    _full_disk_for(monkeypatch, CHECKPOINT_FILE)
    with pytest.raises(WriteError, match=r"checkpoint.pt: cannot write \(No space left on device\)") as info:
        runner.execute(build_config({"algorithm": "bp", **TINY, "epochs": 2, "output": str(tmp_path / "out")}))
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "out").glob("*/.*.tmp"))


def test_full_disk_during_the_result_write_keeps_the_trained_result(tmp_path, monkeypatch, capsys, one_thread):
    _full_disk_for(monkeypatch, RESULT_FILE)
    with pytest.raises(WriteError, match="printed to stdout as JSON"):
        runner.execute(build_config({"algorithm": "bp", **TINY, "checkpoint": False, "output": str(tmp_path / "out")}))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["status"] == "completed" and printed["test_accuracy"] is not None
    assert not list((tmp_path / "out").glob(f"*/{RESULT_FILE}"))


def _tune_config(tmp_path: Path) -> Path:
    path = tmp_path / "bp.yaml"
    path.write_text(yaml.safe_dump({"algorithm": "bp", **TINY}))
    return path


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"storage": "journal:"}, "missing the journal file path"),
        ({"storage": "journal:{blocker}/j.log"}, "cannot write the journal file"),
        ({"study_name": "../../escaped"}, "--study-name '../../escaped'"),
        ({"output": "{blocker}/out"}, "not writable"),
    ],
)
def test_tune_storage_and_names_are_checked_first(tmp_path, kwargs, needle):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    kwargs = {k: v.format(blocker=blocker) for k, v in kwargs.items()}
    output = Path(kwargs.pop("output", tmp_path / "tune" / "deep"))
    with pytest.raises(UserError, match=needle.replace("(", r"\(")) as info:
        tune(_tune_config(tmp_path), trials=1, epochs=1, output=output, **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "tune" / "escaped").exists()


def test_bench_checks_device_and_write_target_before_measuring(tmp_path):
    cli = CliRunner()
    result = cli.invoke(app, ["bench", "--device", "tpu"])
    assert isinstance(result.exception, UserError) and "--device 'tpu'" in str(result.exception)
    target = tmp_path / "BENCH.md"
    target.write_text("# B\n<!-- bench:start -->\nold\n")
    start = time.perf_counter()
    result = cli.invoke(app, ["bench", "--write", str(target)])
    assert isinstance(result.exception, UserError) and "1 start and 0 end markers" in str(result.exception)
    assert time.perf_counter() - start < 5 and target.read_text() == "# B\n<!-- bench:start -->\nold\n"


def _wait_for(path: Path, needle: str, proc: subprocess.Popen, seconds: float = 120) -> str:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} never appeared: {path.read_text(errors='replace') if path.exists() else ''}")


def test_ctrl_c_during_a_run_names_the_resume_command(tmp_path):
    err = tmp_path / "stderr"
    command = [sys.executable, "-m", "bpfree.cli", "run", "-a", "bp", "-d", "mnist5k", "-m", "mlp:1x16", "--epochs", "1000",
               "--batch-size", "512", "--patience", "1000", "--device", "cpu", "-o", str(tmp_path / "out"), "-q"]
    with open(err, "w") as handle:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        text = _wait_for(err, "run directory:", proc)
        run_dir = Path(text.split("run directory:", 1)[1].split()[0])
        deadline = time.time() + 60
        while not (run_dir / CHECKPOINT_FILE).exists() and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in err.read_text().splitlines() if line.strip()]
    assert proc.returncode == 130 and "Traceback" not in err.read_text()
    assert lines[-1] == f"interrupted; continue with `bpfree resume {run_dir}`"


def test_ctrl_c_during_tune_is_one_line_and_stops(tmp_path):
    err = tmp_path / "stderr"
    config = _tune_config(tmp_path)
    command = [sys.executable, "-m", "bpfree.cli", "tune", str(config), "--trials", "200", "--epochs", "3", "-o", str(tmp_path / "tune")]
    with open(err, "w") as handle:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for(err, "trial 0:", proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    progress = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d .* \| ")  # the trials' epoch lines (stderr is not a terminal)
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("trial ") and not progress.match(line)]
    assert proc.returncode == 130 and "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert len(lines) == 1 and lines[0].startswith("interrupted; rerun the same command"), text


def test_a_model_too_large_for_memory_is_refused_before_anything_is_allocated(tmp_path):
    cfg = build_config({"algorithm": "bp", **TINY, "model": "mlp:64x100000", "output": str(tmp_path / "out")})
    with pytest.raises(UserError, match=r"mlp:64x100000 needs at least .* GiB on cpu .* free; choose a smaller model"):
        runner.execute(cfg)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_compare_where_every_run_fails_says_so_and_why(tmp_path):
    from bpfree.protocol.compare import compare

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "mf.yaml").write_text(yaml.safe_dump({"algorithm": "mf", **TINY}))
    with pytest.raises(UserError) as info:
        compare([configs], output=tmp_path / "out", seeds=[0], datasets=["mnist"], executor="inline",
                common={"data_root": str(tmp_path / "nowhere")})
    message = str(info.value)
    assert message.startswith("every run failed (2 of 2): 2x dataset mnist: not found") and "\n" not in message


def test_a_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils as tv_utils

    from bpfree.data import load_dataset
    from bpfree.errors import DataError

    def unreachable(url, *args, **kwargs):
        print(f"Downloading {url}\nFailed to download (trying next):\n<urlopen error [Errno -3] Temporary failure>")
        raise RuntimeError(f"Error downloading {url}:\nTried 1 mirror.\nurlopen error [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", unreachable)
    with pytest.raises(DataError, match=r"dataset cifar10: download failed \(urlopen error") as info:
        load_dataset("cifar10", tmp_path, download=True)
    assert "\n" not in str(info.value)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
