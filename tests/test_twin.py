"""One BP twin rule: compare plans the twin that the report later pairs with."""

from __future__ import annotations

from pathlib import Path

import yaml

from bpfree.config import build_config
from bpfree.protocol.compare import build_set
from bpfree.protocol.twin import bp_twin, config_identity, twin_score
from bpfree.report.aggregate import find_twin, group_results

TINY = {"dataset": "mnist5k", "model": "mlp:1x16", "epochs": 2, "batch_size": 256, "patience": 4, "device": "cpu"}


def _record(cfg, device: str = "cpu", seed: int = 0) -> dict:
    cfg = build_config({**cfg.model_dump(mode="json"), "seed": seed})
    return {"run_id": f"{cfg.algorithm}-{cfg.key()}", "algorithm": cfg.algorithm, "dataset": cfg.dataset, "model": cfg.model,
            "seed": seed, "status": "completed", "test_accuracy": 0.9, "config": cfg.resolved(), "environment": {"device": device}}


def test_compare_and_report_choose_the_same_twin(tmp_path: Path):
    (tmp_path / "mf.yaml").write_text(yaml.safe_dump({"algorithm": "mf", **TINY}))
    (tmp_path / "bp_long.yaml").write_text(yaml.safe_dump({"algorithm": "bp", **TINY, "epochs": 9}))
    (tmp_path / "bp_same.yaml").write_text(yaml.safe_dump({"algorithm": "bp", **TINY, "lr": 0.003}))
    cset = build_set([tmp_path])
    [planned] = cset.baselines
    assert planned.source.endswith("bp_same.yaml")  # the best budget match, not the first file

    alt = build_config(cset.alternatives[0].values)
    records = [_record(alt)] + [_record(build_config(path_values)) for path_values in
                                (yaml.safe_load((tmp_path / n).read_text()) for n in ("bp_long.yaml", "bp_same.yaml"))]
    groups = group_results(records)
    [alt_group] = [g for g in groups if g.algorithm == "mf"]
    assert find_twin(alt_group, groups).config["lr"] == 0.003


def test_a_twin_runs_on_the_same_device_type():
    alt = build_config({"algorithm": "mf", **TINY})
    twin = bp_twin(alt)
    assert twin.algorithm == "bp" and twin.params == {} and twin.epochs == alt.epochs and twin.model == alt.model
    assert twin_score(config_identity(alt), config_identity(twin)) == 5
    assert twin_score(config_identity(alt, "cpu"), config_identity(twin, "cuda")) is None
    groups = group_results([_record(alt, "cpu"), _record(twin, "cuda:0")])
    assert find_twin(groups[1] if groups[1].algorithm == "mf" else groups[0], groups) is None


def test_a_twin_of_an_algorithm_without_a_model_trains_its_native_network(tmp_path: Path):
    (tmp_path / "noprop.yaml").write_text(yaml.safe_dump({"algorithm": "noprop", "epochs": 1, "device": "cpu"}))
    [twin] = build_set([tmp_path]).baselines
    assert twin.values["model"] == "noprop" and twin.values["algorithm"] == "bp"
