"""Every registered algorithm keeps the contract the engine and the comparison rely on.

Parametrized over the algorithm registry, so an algorithm added later (or a plugin) is checked
without a line changed here: it learns above chance on mnist5k in a tiny budget, an interrupted
run resumes to identical metrics, everything it owns lives on the run's device, ``predict``
leaves every weight unchanged, and every kind of step it runs has a FLOP count.
"""

from __future__ import annotations

import pytest
import torch

from bpfree.algorithms import algorithm_names, get_algorithm
from bpfree.config import NATIVE_MODELS, build_config
from bpfree.engine import Engine
from bpfree.loop import epoch_clock
from bpfree.runner import execute, resume

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A small member of each family: seconds per run on one CPU thread.
SMALL_MODELS = {
    "mlp": "mlp:1x128", "cnn3": "cnn3:8,16,32", "noprop": "noprop:2,c2,h16", "*": "mlp:1x128",
    "noprop-ct": "noprop-ct:c3,h32,p0,euler,s2", "noprop-fm": "noprop-fm:c3,h32,p0,euler,s2",
}
# NoProp-CT/FM train their one network at a single time per example: 2 epochs at batch 128 leave them at
# chance (measured), so their tiny budget takes more, smaller steps.
SMALL_BUDGETS = {"noprop-ct": {"batch_size": 32, "lr": 3e-3}, "noprop-fm": {"batch_size": 32, "lr": 3e-3}}
ALGORITHMS = algorithm_names()


def tiny_config(algorithm: str, **fields):
    family = get_algorithm(algorithm).model_families[0]
    model = SMALL_MODELS.get(family, NATIVE_MODELS.get(family, family))
    values = {"algorithm": algorithm, "model": model, "epochs": 2, "batch_size": 128, "patience": None, "seed": 3, "device": DEVICE}
    return build_config({**values, **SMALL_BUDGETS.get(family, {}), **fields})


def _metrics(result: dict) -> dict:
    return {
        "test_accuracy": result["test_accuracy"],
        "best_val_accuracy": result["best_val_accuracy"],
        "epochs_run": result["epochs_run"],
        "curves": [{k: row[k] for k in ("train_loss", "val_accuracy")} for row in result["curves"]],
        "train_flops": result["train_flops"],
    }


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_learns_resumes_and_counts_every_step(algorithm, tmp_path, one_thread):
    cfg = tiny_config(algorithm, output=str(tmp_path / "whole"))
    _, whole = execute(cfg)
    assert whole["status"] == "completed"
    assert whole["test_accuracy"] > 0.3, f"{algorithm}: {whole['test_accuracy']:.3f} is near chance (0.1)"
    assert whole["flops_per_step"] and all(v > 0 for v in whole["flops_per_step"].values()), whole["flops_per_step"]
    assert whole["train_flops"] > 0 and whole["inference_flops_per_sample"] > 0

    def stop_once_checkpointed(info: dict) -> None:
        if any((tmp_path / "cut").glob("*/checkpoint.pt")):
            raise Interrupt

    interrupted = tiny_config(algorithm, output=str(tmp_path / "cut"))
    with pytest.raises(Interrupt):
        execute(interrupted, progress=stop_once_checkpointed)
    [run_dir] = list((tmp_path / "cut").iterdir())
    _, resumed = resume(run_dir)
    assert resumed["resumed"] is True
    assert _metrics(resumed) == _metrics(whole)


def _tensors(value, where: str):
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{where}[{i}]")


def _owned(engine: Engine):
    algo = engine.algorithm
    yield from _tensors(algo.modules().state_dict(), "weights")
    for name, optimizer in algo.optimizers.items():
        yield from _tensors(optimizer.state_dict()["state"], f"optimizer {name}")
    for name, value in vars(algo).items():
        if isinstance(value, torch.Tensor):
            yield f"attribute {name}", value
        elif isinstance(value, torch.Generator):
            yield f"generator {name}", torch.empty(0, device=value.device)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_everything_owned_is_on_the_run_device_and_predict_changes_nothing(algorithm, one_thread):
    engine = Engine(tiny_config(algorithm, epochs=1, checkpoint=False))
    algo, data = engine.algorithm, engine.data
    device = torch.device(DEVICE)
    x, y = data.train_x[:64], data.train_y[:64]
    epochs_run = 0
    for phase in algo.schedule():
        algo.begin_phase(phase)
        algo.train_mode()
        algo.begin_epoch(epoch_clock(phase, 0, epochs_run, 128, 64))  # an epoch of two steps
        algo.train_step(x, y)
        algo.train_step(data.train_x[64:128], data.train_y[64:128])
        algo.end_epoch()
        epochs_run += 1
        for where, tensor in _owned(engine):
            if where.endswith(".step") and tensor.dim() == 0 and tensor.device.type == "cpu":
                continue  # optimisers keep their step counter on the host by design
            assert tensor.device.type == device.type, f"{algorithm}: {where} is on {tensor.device}, the run on {device}"
        before = {k: v.clone() for k, v in algo.modules().state_dict().items()}
        algo.eval_mode()
        with torch.no_grad():
            algo.predict(data.val_x[:32])
        after = algo.modules().state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, f"{algorithm}: predict in phase {phase.name} changed {changed[:3]}"
    algo.end_training()
    before = {k: v.clone() for k, v in algo.modules().state_dict().items()}
    with torch.no_grad():
        algo.predict(data.val_x[:32])
    assert all(torch.equal(before[k], v) for k, v in algo.modules().state_dict().items())
