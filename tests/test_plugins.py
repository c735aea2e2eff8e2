"""Plugins: another package's algorithm, model family and dataset, found through entry points.

The plugin is a real distribution on sys.path (a package plus its ``.dist-info`` with
``entry_points.txt``, as pip leaves it), handed to child processes through PYTHONPATH; the shared
environment is never modified.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

SRC = Path(__file__).resolve().parents[1] / "src"

PLUGIN = '''
import torch
import torch.nn as nn

from bpfree.algorithms.bp import Backprop
from bpfree.data import DataSpec, Splits, register_dataset
from bpfree.models import register_model


class TinyBackprop(Backprop):
    """BP under another name: enough to prove the lookup, not a new method."""

    name = "tinybp"
    paper = "a plugin test"


def _parse(args):
    if args:
        raise ValueError("takes no arguments")
    return None


def _build(args, spec):
    return nn.Sequential(nn.Flatten(), nn.Linear(spec.input_dim, spec.num_classes))


register_model("lin", _parse, _build, "lin (a single linear layer)")


@register_dataset("tinyblobs")
def load(data_root, download, val_fraction):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 1, 4, 4, generator=g) * 0.3 + y.view(-1, 1, 1, 1).float()
    spec = DataSpec("tinyblobs", (1, 4, 4), 3, 200, 50, 50, augment=False)
    return Splits(spec, x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:])
'''

RUN = {"algorithm": "tinybp", "dataset": "tinyblobs", "model": "lin", "epochs": 5, "batch_size": 50, "lr": 0.05, "device": "cpu", "patience": None}


@pytest.fixture()
def plugin_env(tmp_path) -> dict[str, str]:
    site = tmp_path / "site"
    (site / "tinyplug").mkdir(parents=True)
    (site / "tinyplug" / "__init__.py").write_text("")
    (site / "tinyplug" / "algo.py").write_text(PLUGIN)
    info = site / "tinyplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[bpfree.algorithms]\ntinybp = tinyplug.algo:TinyBackprop\nbroken = tinyplug.missing_module\n\n"
        "[bpfree.models]\nlin = tinyplug.algo\n\n[bpfree.datasets]\ntinyblobs = tinyplug.algo\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(SRC)]), OMP_NUM_THREADS="1")
    return env


def test_plugin_algorithm_model_and_dataset_in_a_notebook_process(plugin_env, tmp_path):
    script = textwrap.dedent(f"""
        import json, warnings
        warnings.simplefilter("always")
        import bpfree
        from bpfree.algorithms import algorithm_names
        from bpfree.data import dataset_names
        from bpfree.models import model_names
        from bpfree.plugins import plugin_errors
        result = bpfree.run({RUN!r}, output={str(tmp_path / "out")!r})
        print(json.dumps({{"algorithms": algorithm_names(), "datasets": dataset_names(), "models": model_names(),
                          "status": result.status, "acc": result.test_accuracy, "errors": plugin_errors()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=plugin_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "tinybp" in seen["algorithms"] and "bp" in seen["algorithms"]  # built-ins still there
    assert "tinyblobs" in seen["datasets"] and any(m.startswith("lin") for m in seen["models"])
    assert seen["status"] == "completed" and seen["acc"] > 0.5
    # The broken entry point is reported once, by name, and does not stop the others.
    assert len(seen["errors"]) == 1 and "'broken'" in seen["errors"][0] and "missing_module" in seen["errors"][0]
    assert "failed to load" in proc.stderr


@pytest.mark.parametrize("executor", ["local", "submitit-local"])
def test_plugin_algorithm_in_suite_workers_and_submitit_jobs(plugin_env, tmp_path, executor):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"seeds": [0], "configs": [RUN]}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bpfree.cli", "suite", str(suite), "-o", str(out), "--executor", executor, "--no-report", "-q"]
    proc = subprocess.run(cmd, env=plugin_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [record] = [json.loads(p.read_text()) for p in out.glob("*/result.json")]
    assert record["algorithm"] == "tinybp" and record["status"] == "completed" and record["paper"] == "a plugin test"


def test_without_the_plugin_the_name_is_unknown(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run(
        [sys.executable, "-m", "bpfree.cli", "run", "-a", "tinybp", "-o", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "tinybp" in proc.stderr
