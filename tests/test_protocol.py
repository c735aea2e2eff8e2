"""Comparison protocol: BP twins, the default comparison set, every shipped config, the compare command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bpfree.algorithms import algorithm_names, get_algorithm
from bpfree.config import load_config, read_yaml_mapping
from bpfree.errors import UserError
from bpfree.models import parse_model_spec
from bpfree.protocol.budget import twin_epochs
from bpfree.protocol.compare import build_set, derive_twin
from bpfree.protocol.suite import expand, load_suite

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "bpfree" / "configs"
TINY = {"dataset": "mnist5k", "model": "mlp:1x16", "epochs": 1, "batch_size": 256, "patience": 4, "device": "cpu"}


def _yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def test_bp_twin_copies_architecture_and_budget_but_not_the_recipe():
    alternative = {"algorithm": "mf", "dataset": "mnist5k", "model": "mlp:2x64", "epochs": 7, "batch_size": 64,
                   "eval_batch_size": 500, "patience": 3, "seed": 4, "val_fraction": 0.2, "lr": 0.05, "optimizer": "sgd",
                   "weight_decay": 0.01, "params": {"schedule": "layerwise"}, "name": "mf_x"}
    twin = derive_twin(alternative, {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9})
    for field in ("dataset", "model", "batch_size", "eval_batch_size", "patience", "seed", "val_fraction"):
        assert twin[field] == alternative[field]
    assert twin["epochs"] == 2 * 7  # layerwise on 2 layers: as many passes over the data as the alternative
    assert twin["algorithm"] == "bp" and twin["params"] == {} and "name" not in twin
    assert (twin["optimizer"], twin["lr"], twin["weight_decay"]) == ("adam", 1e-3, 0.0)


def test_alternatives_on_one_network_share_one_bp_twin(tmp_path):
    _yaml(tmp_path / "mf_a.yaml", {"algorithm": "mf", **TINY})
    _yaml(tmp_path / "mf_b.yaml", {"algorithm": "mf", **TINY, "params": {"schedule": "layerwise"}})
    cset = build_set([tmp_path])
    configs = expand(cset.entries, [0, 1], tmp_path / "out")
    assert sorted(c.algorithm for c in configs) == ["bp", "bp", "mf", "mf", "mf", "mf"]  # twins deduplicated by key


def test_explicit_bp_config_is_the_twin_and_bp_config_sets_the_recipe(tmp_path):
    _yaml(tmp_path / "mf.yaml", {"algorithm": "mf", **TINY})
    _yaml(tmp_path / "bp.yaml", {"algorithm": "bp", **TINY, "lr": 0.0042})
    [twin] = build_set([tmp_path]).baselines
    assert twin.values["lr"] == 0.0042 and twin.source.endswith("bp.yaml")
    tuned = _yaml(tmp_path.parent / "bp.tuned.yaml", {"algorithm": "bp", "lr": 0.0077, "optimizer": "adamw"})
    [derived] = build_set([tmp_path / "mf.yaml"], bp_config=tuned).baselines
    assert derived.values["lr"] == 0.0077 and derived.values["optimizer"] == "adamw" and derived.values["epochs"] == 1


def test_selection_options(tmp_path):
    _yaml(tmp_path / "mf.yaml", {"algorithm": "mf", **TINY})
    _yaml(tmp_path / "later.yaml", {"algorithm": "not_written_yet", **TINY})
    cset = build_set([tmp_path], datasets=["mnist5k", "fashion_mnist"], epochs=3, assignments=["batch_size=64"])
    assert [e.values["dataset"] for e in cset.alternatives] == ["mnist5k", "fashion_mnist"]
    assert all(e.values["epochs"] == 3 and e.values["batch_size"] == 64 for e in cset.entries)
    assert cset.notes == ["skipped later.yaml: algorithm 'not_written_yet' is not registered in this installation"]
    with pytest.raises(UserError, match="not registered"):
        build_set([tmp_path], algorithms=["nope"])
    with pytest.raises(UserError, match="nothing to compare"):
        build_set([tmp_path / "later.yaml"])


def _yaml_files() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml")) if CONFIGS.is_dir() else []


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    data = read_yaml_mapping(path)
    if "configs" in data:  # a suite file
        suite = load_suite(path)
        missing = [e.values.get("algorithm", "bp") for e in suite.entries if e.values.get("algorithm", "bp") not in algorithm_names()]
        if missing:
            pytest.skip(f"algorithm(s) {sorted(set(missing))} not registered yet")
        configs = expand(suite.entries, suite.seeds, Path("unused"))
        assert len(configs) == len(suite.entries) * len(suite.seeds or [0])
        assert suite.seeds is None or len(set(suite.seeds)) == len(suite.seeds) >= 3
        return
    algorithm = data.get("algorithm", "bp")
    if algorithm not in algorithm_names():
        pytest.skip(f"algorithm {algorithm!r} not registered yet")
    cfg = load_config(path)
    family, _ = parse_model_spec(cfg.model)
    families = get_algorithm(cfg.algorithm).model_families
    assert "*" in families or family.prefix in families


def test_default_comparison_pairs_each_native_architecture_with_bp():
    quick = CONFIGS / "quick"
    if not quick.is_dir():
        pytest.skip("configs/quick not present")
    cset = build_set([quick])
    assert cset.alternatives, "no alternative in configs/quick"
    twins = {(e.values.get("dataset", "mnist5k"), e.values["model"], e.values.get("epochs"), e.values.get("batch_size"), e.values.get("patience")) for e in cset.baselines}
    for entry in cset.alternatives:
        values = entry.values
        assert values.get("dataset", "mnist5k") == "mnist5k"
        passes = twin_epochs(values)  # the twin may pass over the data as often as the alternative
        assert (values.get("dataset", "mnist5k"), values["model"], passes, values.get("batch_size"), values.get("patience")) in twins
        native = get_algorithm(values["algorithm"]).model_families
        assert parse_model_spec(values["model"])[0].prefix in native
    missing = ({"mf", "ff", "cafo", "noprop"} & set(algorithm_names())) - {e.values["algorithm"] for e in cset.alternatives}
    if missing:
        pytest.skip(f"registered but without a configs/quick file yet: {sorted(missing)}")


def test_compare_command_end_to_end(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    _yaml(configs / "mf_tiny.yaml", {"algorithm": "mf", **TINY})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bpfree.cli", "compare", "-c", str(configs), "--seeds", "1", "--executor", "inline", "-o", str(out), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Against the BP twin" in proc.stdout and "n/a (n<2)" in proc.stdout.replace("\n", " ") or "n/a" in proc.stdout
    assert len(list(out.glob("*/result.json"))) == 2
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # resumable: nothing re-runs
    assert again.returncode == 0 and len(list(out.glob("*/result.json"))) == 2


def test_compare_with_an_unknown_algorithm_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bpfree.cli", "compare", "-a", "nope", "-o", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--algorithm nope" in lines[0]
