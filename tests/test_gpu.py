"""Every algorithm on CUDA: placement, captured steps, resume across devices, FLOPs, energy, accuracy.

Run on a GPU machine with ``BPFREE_GPU_TESTS=1 pytest -m gpu``; skipped where CUDA is absent.
"""

from __future__ import annotations

import pytest
import torch

from bpfree.config import build_config
from bpfree.engine import Engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (BPFREE_GPU_TESTS=1 keeps it visible)"),
]

CASES = {
    "bp": {"algorithm": "bp", "model": "mlp:2x256"},
    "mf": {"algorithm": "mf", "model": "mlp:2x256"},
    "mf-layerwise": {"algorithm": "mf", "model": "mlp:2x256", "params": {"schedule": "layerwise"}},
    "ff": {"algorithm": "ff", "model": "mlp:2x256", "lr": 0.003},
    "cafo-rand": {"algorithm": "cafo", "model": "cnn3"},
    "cafo-dfa": {"algorithm": "cafo", "model": "cnn3", "params": {"variant": "dfa", "dfa_epochs": 1}},
    "cafo-mse": {"algorithm": "cafo", "model": "cnn3", "params": {"loss": "mse"}},
    "noprop": {"algorithm": "noprop", "model": "noprop", "params": {"parallel": True}},
    "noprop-sequential": {"algorithm": "noprop", "model": "noprop"},
    "noprop-paper": {"algorithm": "noprop", "model": "noprop:3,c4,h64", "epochs": 6, "params": {"loop": "paper"}},
}


def config(case: str, device: str, **fields):
    return build_config(
        {"dataset": "mnist5k", "epochs": 2, "patience": None, "checkpoint": False, "seed": 0, "device": device,
         **CASES[case], **fields}
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_trains_on_cuda_with_everything_on_the_device(case):
    engine = Engine(config(case, "cuda"))
    misplaced = {k: str(v.device) for k, v in engine.algorithm.owned_tensors().items() if v.device.type != "cuda"}
    assert not misplaced
    assert engine.algorithm_generator.device.type == "cuda" and engine.data.train_x.device.type == "cuda"
    result = engine.run()
    assert result["status"] == "completed"
    misplaced = {k: str(v.device) for k, v in engine.algorithm.owned_tensors().items() if v.device.type != "cuda"}
    assert not misplaced  # optimiser state created during training too
    assert result["device_type"] == "cuda" and result["cuda_graphs"]["enabled"]
    assert result["test_accuracy"] > 0.5
    assert all(v > 0 for v in result["flops_per_step"].values())


@pytest.mark.parametrize("case", ["bp", "mf", "ff", "cafo-dfa", "noprop"])
def test_cuda_matches_cpu_flops_and_accuracy(case):
    gpu = Engine(config(case, "cuda")).run()
    cpu = Engine(config(case, "cpu")).run()
    assert gpu["train_flops"] == cpu["train_flops"] and gpu["flops_per_step"] == cpu["flops_per_step"]
    assert abs(gpu["test_accuracy"] - cpu["test_accuracy"]) <= 0.03


@pytest.mark.parametrize("case", ["bp", "mf", "mf-layerwise", "ff", "cafo-rand", "cafo-mse", "noprop", "noprop-paper"])
def test_captured_steps_replay_and_agree_with_eager(case):
    captured = Engine(config(case, "cuda")).run()
    eager = Engine(config(case, "cuda", cuda_graphs=False)).run()
    assert captured["cuda_graphs"]["captured_kinds"], captured["cuda_graphs"]
    assert not eager["cuda_graphs"]["enabled"]
    assert abs(captured["test_accuracy"] - eager["test_accuracy"]) <= 0.03


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("first,second", [("cpu", "cuda"), ("cuda", "cpu")])
def test_checkpoint_resumes_across_devices(tmp_path, first, second):
    def stop_after_first_epoch(info):
        if info["epochs_run"] == 1:
            raise Interrupt

    values = {"algorithm": "mf", "model": "mlp:2x256", "epochs": 3, "patience": None, "dataset": "mnist5k"}
    with pytest.raises(Interrupt):
        Engine(build_config({**values, "device": first}), run_dir=tmp_path, progress=stop_after_first_epoch).run()
    result = Engine(build_config({**values, "device": second}), run_dir=tmp_path).run()
    assert result["status"] == "completed" and result["resumed"] and result["resumed_across_devices"]
    assert result["epochs_run"] == 3 and result["test_accuracy"] > 0.5


def test_energy_is_read_from_nvml():
    result = Engine(config("bp", "cuda")).run()
    assert result["energy_j"] is not None and result["energy_j"] > 0, result["energy_reason"]
    assert "NVML" in result["energy_method"]
