"""Readers of result.json (report, the last step of compare and suite) skip and name malformed records."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfree.config import build_config
from bpfree.errors import UserError
from bpfree.report.aggregate import summarize
from bpfree.report.render import build_tables, write_report
from bpfree.results import check_record, read_results
from bpfree.runner import execute

TINY = {"dataset": "mnist5k", "model": "mlp:1x16", "epochs": 1, "batch_size": 512, "patience": None, "device": "cpu", "checkpoint": False}


@pytest.fixture(scope="module")
def good_record(tmp_path_factory) -> dict:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, result = execute(build_config({"algorithm": "bp", **TINY, "output": str(tmp_path_factory.mktemp("good"))}))
    finally:
        torch.set_num_threads(before)
    assert check_record(result) is None
    return result


def _write(directory: Path, name: str, record) -> Path:
    path = directory / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record) if not isinstance(record, bytes) else "", encoding="utf-8")
    if isinstance(record, bytes):
        path.write_bytes(record)
    return path


MALFORMED = {
    "null seed": ("seed", None),
    "integer run_id": ("run_id", 7),
    "null train_time_s": ("train_time_s", None),
    "string accuracy": ("test_accuracy", "0.9"),
    "string config": ("config", "bp"),
    "string epochs in config": ("config", {"epochs": "2"}),
    "curve of strings": ("curves", ["epoch 1"]),
}


def test_report_skips_and_names_every_malformed_record(tmp_path, good_record):
    results = tmp_path / os.fsdecode(b"results-\xff")  # a directory name that is not UTF-8
    _write(results, "good", good_record)
    for i, (field, value) in enumerate(MALFORMED.values()):
        _write(results, f"bad{i}", {**good_record, field: value, "run_id": good_record["run_id"] if field != "run_id" else value})
    _write(results, "not-json", b"\xff\xfe{")
    report = write_report(results)
    assert len(report.summary.results) == 1
    note = next(n for n in report.notes if n.startswith("skipped"))
    assert f"skipped {len(MALFORMED) + 1} malformed" in note
    assert "seed" in note and "bad0" in note and "not-json" in note
    assert "\\xff" in report.markdown.read_text(encoding="utf-8")


def test_report_of_only_malformed_records_is_one_line(tmp_path, good_record):
    _write(tmp_path, "bad", {**good_record, "seed": None})
    with pytest.raises(UserError, match="no valid result.json.*skipped 1 malformed"):
        write_report(tmp_path)


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=5),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just("\udc80"), st.just([{"val_accuracy": "x"}]), st.just({"epochs": None, "params": []}),
)
_FIELDS = st.sampled_from(
    ["seed", "run_id", "train_time_s", "test_accuracy", "config", "status", "curves", "algorithm", "model",
     "epochs_run", "environment", "energy_j", "peak_memory_bytes", "deviations", "best_val_accuracy", "resumed"]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(_FIELDS, _VALUES), min_size=1, max_size=3))
def test_malformed_records_never_break_the_readers(tmp_path_factory, good_record, changes):
    directory = tmp_path_factory.mktemp("fuzz")
    _write(directory, "good", good_record)
    bad = copy.deepcopy(good_record)
    for field, value in changes:
        bad[field] = value
    _write(directory, "changed", bad)
    found = read_results(directory)
    assert good_record in found.records
    assert len(found.records) + len(found.rejected) == 2
    summary = summarize(found.records)  # whatever was accepted must aggregate and render
    for table in build_tables(summary):
        for row in table.rows:
            assert all(isinstance(cell, str) for cell in row)
    if found.rejected:
        assert found.rejected_note().isprintable()


def test_report_out_that_cannot_be_written_names_out(tmp_path, good_record):
    _write(tmp_path / "results", "good", good_record)
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # nothing can be created below a file, even as root (unlike a read-only folder)
    proc = subprocess.run(
        [sys.executable, "-m", "bpfree.cli", "report", str(tmp_path / "results"), "--out", str(blocker / "r")],
        capture_output=True, text=True, timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--out" in lines[0] and "--output" not in lines[0], proc.stderr


def test_full_disk_while_writing_figures_is_one_line_and_keeps_the_old_figures(tmp_path, good_record, monkeypatch):
    results = tmp_path / "results"
    _write(results, "good", good_record)
    first = write_report(results)
    before = {p.name: p.read_bytes() for p in first.figures}
    import bpfree.fileio as results_module

    real_replace = os.replace

    def full_disk(src, dst):
        if str(dst).endswith(".png") and "pareto" in str(dst):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(results_module.os, "replace", full_disk)
    with pytest.raises(UserError, match="cannot write \\(No space left on device\\)"):
        write_report(results)
    after = {p.name: p.read_bytes() for p in (results / "figures").glob("*.png")}
    assert after["pareto.png"] == before["pareto.png"]
    assert not list((results / "figures").glob(".*.tmp"))
