"""The run config as the one judge, the registries, and the shared helpers (seeds, dotted keys, atomic writes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bpfree.config import (
    MAX_SEEDS,
    apply_assignments,
    build_config,
    load_config,
    parse_seeds,
    read_yaml_mapping,
    run_label,
    set_dotted,
)
from bpfree.errors import ConfigError, UserError
from bpfree.registry import DuplicateNameError, Registry, UnknownNameError

SRC = Path(__file__).resolve().parents[1] / "src"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bpfree.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# -- registry ------------------------------------------------------------------------------------
def test_registry_refuses_duplicates_and_names_the_choices():
    things: Registry[int] = Registry("widget")
    things.add("a", 1)

    @things.register("b")
    def b() -> None: ...

    assert things.names() == ["a", "b"] and "a" in things and len(things) == 2
    with pytest.raises(DuplicateNameError, match="widget 'a' is already registered"):
        things.add("a", 2)
    with pytest.raises(UnknownNameError) as info:
        things.get("zz")
    assert str(info.value) == "unknown widget 'zz'; choose one of a, b"
    assert isinstance(info.value, ConfigError) and isinstance(info.value, KeyError)


def test_public_registries_keep_their_names_and_refuse_overwrites():
    from bpfree.algorithms import algorithm_names, get_algorithm, register
    from bpfree.data import dataset_names, load_dataset, register_dataset
    from bpfree.models import model_family_names, register_model

    assert {"bp", "mf", "ff", "cafo", "noprop"} <= set(algorithm_names())
    assert {"mlp", "cnn3", "noprop"} <= set(model_family_names()) and "mnist5k" in dataset_names()
    with pytest.raises(DuplicateNameError):
        register(type("Fake", (get_algorithm("bp"),), {"name": "bp"}))
    with pytest.raises(DuplicateNameError):
        register_dataset("mnist5k")(lambda root, download, val: None)
    with pytest.raises(DuplicateNameError):
        register_model("mlp", str, lambda a, d: None, "mlp:x")
    with pytest.raises(UserError, match="unknown algorithm 'nope'; choose one of .*bp"):
        get_algorithm("nope")
    with pytest.raises(UserError, match="unknown dataset 'nope'; choose one of .*mnist5k"):
        load_dataset("nope")


# -- the judge -----------------------------------------------------------------------------------
def test_without_a_model_an_algorithm_trains_its_native_architecture():
    assert load_config(None, {"algorithm": "noprop"}).model == "noprop"
    assert load_config(None, {"algorithm": "cafo"}).model == "cnn3"
    assert load_config(None, {"algorithm": "ff"}).model == "mlp:2x1000"
    assert load_config(None, {"algorithm": "bp"}).model == "mlp:2x1000"


def test_a_model_the_algorithm_cannot_train_is_refused_at_validation():
    with pytest.raises(ConfigError, match="field 'model': algorithm noprop trains noprop models, not 'mlp:2x10'"):
        build_config({"algorithm": "noprop", "model": "mlp:2x10"})
    with pytest.raises(ConfigError, match="field 'model': algorithm cafo trains cnn3"):
        build_config({"algorithm": "cafo", "model": "mlp:1x8"})


@pytest.mark.parametrize(
    "assignment,needle",
    [
        ("params.threshold=.inf", "field 'params.threshold': must be a finite number"),
        ("params.threshold=.nan", "field 'params.threshold': must be a finite number"),
        ("params.threshold=inf", "field 'params.threshold': must be a finite number"),  # text read as a float
        ("lr=.nan", "field 'lr'"),
        ("momentum=-.inf", "field 'momentum'"),
    ],
)
def test_non_finite_numbers_are_refused_everywhere(assignment, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, {"algorithm": "ff"}, [assignment])


def test_set_values_are_yaml_1_2_not_1_1():
    assert load_config(None, None, ["seed=010"]).seed == 10  # YAML 1.1: 8
    with pytest.raises(ConfigError, match="field 'seed'"):
        load_config(None, None, ["seed=1:20"])  # YAML 1.1: 80
    with pytest.raises(ConfigError, match="field 'download'"):
        load_config(None, None, ["download=yes"])  # YAML 1.1: true
    assert load_config(None, None, ["lr=1e-3"]).lr == 1e-3


@pytest.mark.parametrize("text", ["epochs: true\n", "seed: false\n", "batch_size: 12.0\n", "amp: 1\n", "checkpoint: 'no'\n"])
def test_types_are_exact(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)


def test_a_boolean_is_not_a_number_in_algorithm_params():
    with pytest.raises(ConfigError, match="field 'params.threshold': expected .*got a boolean"):
        build_config({"algorithm": "ff", "params": {"threshold": True}})


def test_alias_bomb_is_refused_with_one_line(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert len(path.read_bytes()) < 400
    with pytest.raises(ConfigError, match="refused: expands to more than"):
        read_yaml_mapping(path)
    (tmp_path / "loop.yaml").write_text("a: &a [*a]\n")
    with pytest.raises(ConfigError, match="recursive"):
        read_yaml_mapping(tmp_path / "loop.yaml")
    assert _one_line(_cli("run", str(path), "-o", str(tmp_path / "out"), cwd=tmp_path)).startswith("error: config file")
    assert not (tmp_path / "out").exists()


def test_ordinary_aliases_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {epochs: 3}\nother:\n  <<: *b\n  seed: 1\n")
    assert read_yaml_mapping(path)["other"] == {"epochs": 3, "seed": 1}


def test_bad_inputs_on_the_command_line_are_one_line(tmp_path):
    assert "field 'params.threshold'" in _one_line(_cli("run", "-a", "ff", "--set", "params.threshold=.inf", "-o", "out", cwd=tmp_path))
    assert "--seeds" in _one_line(_cli("compare", "--seeds", "1000000000", "-o", "out", cwd=tmp_path))
    assert not (tmp_path / "out").exists()


# -- identity ------------------------------------------------------------------------------------
def test_run_key_ignores_storage_fields_and_names_the_device_type(tmp_path):
    base = build_config({"algorithm": "mf", "model": "mlp:1x8", "device": "cpu"})
    for change in ({"checkpoint": False}, {"output": str(tmp_path)}, {"name": "x"}, {"data_root": str(tmp_path)}, {"download": True}):
        assert build_config({**base.model_dump(), **change}).key() == base.key(), change
    assert build_config({**base.model_dump(), "seed": 1}).key() != base.key()
    auto = build_config({**base.model_dump(), "device": "auto"})
    assert auto.key(device_type="cpu") == base.key()  # the device that ran, not "auto"
    assert auto.key(device_type="cuda") != auto.key(device_type="cpu")


# -- helpers -------------------------------------------------------------------------------------
def test_seed_parsing_is_one_bounded_helper():
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("4,2") == [4, 2] and parse_seeds(2, first=5) == [5, 6]
    assert parse_seeds([1, 2]) == [1, 2] and parse_seeds(None) is None
    for bad in ("1000000000", str(MAX_SEEDS + 1), "0", "-1", "1,1", "a", "", "1,,x", True, [0.5], [-1], list(range(MAX_SEEDS + 1))):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    with pytest.raises(ConfigError):
        parse_seeds(2, first=2**31 - 1)


def test_dotted_assignment_is_one_helper():
    values = {"params": {"a": 1}, "lr": 0.1}
    assert set_dotted(values, {"params.b": 2, "lr": 0.2}) == {"params": {"a": 1, "b": 2}, "lr": 0.2}
    assert apply_assignments(values, ["params.b=2", "lr=0.2"]) == set_dotted(values, {"params.b": 2, "lr": 0.2})
    assert values == {"params": {"a": 1}, "lr": 0.1}  # the input is never changed
    assert run_label(build_config({"algorithm": "mf", "model": "mlp:1x8", "seed": 2})) == "mf mlp:1x8 mnist5k s2"


def test_atomic_writes_respect_the_umask(tmp_path):
    from bpfree.fileio import atomic_write_json, atomic_write_text

    previous = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
        atomic_write_text(tmp_path / "r.md", "x")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.md", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "r.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.md").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
