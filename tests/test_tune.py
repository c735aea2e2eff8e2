"""Tuning: one budget for every algorithm, validation-only objective, resumable storage, new YAML out."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from bpfree.config import load_config
from bpfree.errors import UserError
from bpfree.protocol import tune as tune_module
from bpfree.protocol.tune import objective_value, tune

TINY = {"dataset": "mnist5k", "model": "mlp:1x16", "epochs": 40, "batch_size": 256, "patience": 2, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("one_thread")
TEST_KEYS = ("test_accuracy",)


class ValidationOnly(dict):
    """A result record that fails the test if anything reads its test-set fields."""

    def _check(self, key):
        assert key not in TEST_KEYS, f"the tuning objective read {key!r}"

    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._check(key)
        return super().get(key, default)

    def items(self):
        raise AssertionError("the tuning objective iterated over the whole result")

    values = items


@pytest.fixture
def guarded(monkeypatch):
    seen = []
    real = tune_module._train

    def train(cfg):
        seen.append(cfg)
        return ValidationOnly(real(cfg))

    monkeypatch.setattr(tune_module, "_train", train)
    return seen


def _config(tmp_path: Path, algorithm: str) -> Path:
    path = tmp_path / f"{algorithm}_tiny.yaml"
    path.write_text(yaml.safe_dump({"algorithm": algorithm, **TINY}, sort_keys=False))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bp_and_alternative_get_the_same_budget_and_only_validation(tmp_path, guarded):
    outcomes = {}
    for algorithm in ("bp", "mf"):
        config = _config(tmp_path, algorithm)
        before = _digest(config)
        outcomes[algorithm] = tune(config, trials=3, epochs=2, output=tmp_path / "tune", seed=7)
        assert _digest(config) == before  # the input is never edited
    # Same number of trials and the same epochs per trial, whatever the algorithm or its config says.
    by_algorithm = {}
    for cfg in guarded:
        by_algorithm.setdefault(cfg.algorithm, []).append(cfg.epochs)
    assert by_algorithm == {"bp": [2, 2, 2], "mf": [2, 2, 2]}
    for algorithm, outcome in outcomes.items():
        assert outcome.completed == 3 and outcome.epochs == 2
        runs = [json.loads(p.read_text()) for p in outcome.trials_dir.glob("*/result.json")]
        assert len(runs) == 3 and all(r["config"]["epochs"] == 2 and r["epochs_run"] <= 2 for r in runs)
        best = max(runs, key=lambda r: objective_value(r))
        assert outcome.best_value == pytest.approx(best["best_val_accuracy"])
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'tune' / 'optuna.db'}")
        study = optuna.load_study(study_name=outcome.study_name, storage=storage)
        assert study.user_attrs["bpfree_trials"] == 3 and study.user_attrs["bpfree_epochs_per_trial"] == 2
        assert study.user_attrs["bpfree_objective"] == "best_val_accuracy"
        # The tuned file is new, loads, and carries the best trial's values (and the original epochs).
        assert outcome.tuned_path.name == f"{algorithm}_tiny.tuned.yaml"
        tuned = load_config(outcome.tuned_path)
        assert tuned.lr == pytest.approx(outcome.best_params["lr"])
        assert tuned.epochs == TINY["epochs"] and tuned.algorithm == algorithm
        assert "test accuracy is never read" in outcome.tuned_path.read_text()


def test_objective_is_validation_accuracy_and_diverged_is_zero():
    assert objective_value(ValidationOnly(status="completed", best_val_accuracy=0.75, test_accuracy=0.99)) == 0.75
    assert objective_value(ValidationOnly(status="diverged", best_val_accuracy=None, test_accuracy=None)) == 0.0


def test_tuning_resumes_and_refuses_a_changed_budget(tmp_path):
    config = _config(tmp_path, "bp")
    first = tune(config, trials=2, epochs=1, output=tmp_path / "t", storage=f"journal:{tmp_path / 't' / 'journal.log'}")
    again = tune(config, trials=2, epochs=1, output=tmp_path / "t", storage=f"journal:{tmp_path / 't' / 'journal.log'}")
    assert again.completed == 2 and again.best_trial == first.best_trial
    assert len(list(first.trials_dir.glob("*/result.json"))) == 2  # no trial ran twice
    with pytest.raises(UserError, match="was started with trials=2"):
        tune(config, trials=3, epochs=1, output=tmp_path / "t", storage=f"journal:{tmp_path / 't' / 'journal.log'}",
             study_name=first.study_name)


def test_tuning_never_overwrites_its_input(tmp_path):
    config = _config(tmp_path, "bp")
    with pytest.raises(UserError, match="never edits its input"):
        tune(config, trials=1, epochs=1, output=tmp_path / "t", out=config)


def test_bad_storage_url_is_one_line(tmp_path):
    config = _config(tmp_path, "bp")
    with pytest.raises(UserError, match="--storage"):
        tune(config, trials=1, epochs=1, output=tmp_path / "t", storage="not-a-url")


def test_two_workers_share_one_sqlite_study_and_stop_at_the_budget(tmp_path):
    config = _config(tmp_path, "bp")
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "bpfree.cli", "tune", str(config), "--trials", "4", "--epochs", "1", "-o", str(out),
           "--study-name", "shared", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{out / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 4 <= len(complete) <= 5  # both workers may start the last trial; only the first 4 count
    assert load_config(out / "bp_tiny.tuned.yaml").algorithm == "bp"
