"""NoProp-CT and NoProp-FM: the t-conditioned model and its solver (against torchdiffeq), the learned
schedule, the CT ODE's transport of the noising marginals, the learning rules, the BP twin through the
solver, learning on real digits next to that twin, and `bpfree compare` end to end."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bpfree.algorithms import get_algorithm
from bpfree.algorithms.base import TrainSettings
from bpfree.config import build_config, load_config
from bpfree.data import DataSpec
from bpfree.engine import Engine
from bpfree.meters.flops import count_flops
from bpfree.models import build_model, parse_model_spec
from bpfree.models.noprop_parts import kl_to_standard_normal
from bpfree.models.noprop_time import LearnedSchedule, NoPropTimeNet
from bpfree.protocol.twin import bp_twin
from bpfree.results import load_results

ROOT = Path(__file__).resolve().parents[1]
EXTRA = ROOT / "src" / "bpfree" / "configs" / "extra"
SPEC = DataSpec("toy", (1, 12, 12), 5, n_train=40, n_val=8, n_test=8, augment=False)
SETTINGS = TrainSettings(epochs=1, batch_size=16, lr=1e-3, weight_decay=1e-3, optimizer="adam")


def make(name: str, model_spec: str, dtype=torch.float32, seed: int = 0, **params):
    torch.manual_seed(seed)
    model = build_model(model_spec, SPEC).to(dtype)
    cls = get_algorithm(name)
    algorithm = cls(model, SPEC, SETTINGS, cls.Params(**params), torch.Generator().manual_seed(seed + 1))
    algorithm.train_mode()
    return algorithm


def batch(n: int = 16, dtype=torch.float32, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SPEC.input_shape, generator=g, dtype=dtype), torch.randint(0, SPEC.num_classes, (n,), generator=g)


# -- model family -----------------------------------------------------------------------------------
def test_model_specs_and_structure():
    family, shape = parse_model_spec("noprop-ct:c3,h16,d7,p0.1,euler,s25,g4,rhead")
    assert family.prefix == "noprop-ct"
    assert (shape.kind, shape.channels, shape.hidden, shape.embed_dim, shape.dropout) == ("ct", 3, 16, 7, 0.1)
    assert (shape.solver, shape.steps, shape.gamma, shape.head_init) == ("euler", 25, 4.0, "random")
    assert parse_model_spec("noprop-fm")[1].kind == "fm"
    for bad in ("noprop-ct:s0", "noprop-ct:x4", "noprop-ct:p1.5", "noprop-fm:g3", "noprop-ct:g0.1", "noprop-fm:rk4"):
        with pytest.raises(ValueError):
            parse_model_spec(bad)
    ct = build_model("noprop-ct:c2,h8,s6", SPEC)
    fm = build_model("noprop-fm:c2,h8,d7", SPEC)
    assert isinstance(ct, NoPropTimeNet) and len(ct.blocks) == 1  # ONE network for every t
    assert ct.net.out.out_features == 5 and fm.net.out.out_features == 7  # CT: C logits; FM: a d-dim field
    assert ct.schedule is not None and fm.schedule is None
    assert not any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.LayerNorm)) for m in ct.modules())  # Fig. 6 CT/FM: no norms
    assert torch.equal(ct.head.weight, ct.embed) and "embed" not in dict(ct.named_parameters())
    assert "grid" not in ct.state_dict() and torch.allclose(ct.grid, torch.linspace(0, 1, 7))
    x, _ = batch(6)
    ct.train()
    assert ct(x).shape == (6, 5)
    ct.eval()
    assert torch.equal(ct(x), ct(x))  # eval: deterministic read-out


def test_fusion_by_column_blocks_is_the_concatenated_linear_map():
    net = build_model("noprop-fm:c2,h8", SPEC).net
    net.eval()
    x, _ = batch(4)
    z, t = torch.randn(4, 5), torch.rand(4)
    image = torch.relu(net.image_features(x))
    angles = t.unsqueeze(-1) * net.freqs
    time = torch.relu(net.time_fc(torch.cat([angles.sin(), angles.cos()], -1)))
    fused = torch.relu(net.fuse_fc1(torch.cat([image, torch.relu(net.z_fc(z)), time], -1)))
    assert torch.allclose(net(x, z, t), net.out(torch.relu(net.fuse_fc2(fused))), atol=1e-6)


# -- learned schedule --------------------------------------------------------------------------------
def test_learned_schedule_is_monotone_with_exact_ends_and_closed_form_rate():
    torch.manual_seed(0)
    sched = LearnedSchedule().double()
    with torch.no_grad():  # a shape far from the initial near-linear one
        sched.slopes.mul_(4.0)
        sched.weights.add_(4.0)
    t = torch.linspace(0, 1, 201, dtype=torch.float64, requires_grad=True)
    bar = sched.gamma_bar(t)
    assert bar[0].item() == pytest.approx(0.0, abs=1e-12) and bar[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert torch.all(bar[1:] > bar[:-1])
    gamma, rate = sched.gamma_and_rate(t)
    clean, noisy = sched.endpoints()
    assert gamma[0].item() == pytest.approx(noisy.item()) and gamma[-1].item() == pytest.approx(clean.item())
    (autograd_rate,) = torch.autograd.grad(gamma.sum(), t, retain_graph=True)
    assert torch.allclose(rate, autograd_rate, rtol=1e-9, atol=1e-12)
    snr = torch.exp(-gamma)
    (snr_rate,) = torch.autograd.grad(snr.sum(), t)
    assert torch.all(snr[1:] > snr[:-1]) and torch.allclose(snr_rate, -rate * snr, rtol=1e-9)  # SNR' = -γ' SNR > 0
    with torch.no_grad():  # γ1 - γ0 stays positive whatever the optimiser does to the span
        sched.span.fill_(-30.0)
    assert (sched.endpoints()[1] - sched.endpoints()[0]).item() > 0


def test_ct_ode_carries_the_noising_marginals_when_the_prediction_is_exact(one_thread):
    """With û = u_y, dz/dt = (-γ'/2)(√ᾱ û - ᾱ z) maps q(z_0 | y) onto q(z_1 | y) (the DDIM ODE)."""
    model = build_model("noprop-ct:c2,h8,g4,heun,s50", SPEC).double().eval()
    u = torch.tensor([0.8, -1.5, 0.3, 2.0, -0.4], dtype=torch.float64)
    model._output = lambda image, z, time: u.expand_as(z)  # a perfect denoiser
    alpha = model.schedule.alpha_bar(torch.tensor([0.0, 1.0], dtype=torch.float64)).detach()
    g = torch.Generator().manual_seed(0)
    n = 20_000
    z0 = alpha[0].sqrt() * u + (1 - alpha[0]).sqrt() * torch.randn(n, 5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        z1 = model.chain(torch.zeros(1, *SPEC.input_shape, dtype=torch.float64), z0)  # the image is not read
    assert torch.allclose(z1.mean(0), alpha[1].sqrt() * u, atol=0.01)
    assert torch.allclose(z1.var(0), (1 - alpha[1]).expand(5), rtol=0.04)


@pytest.mark.parametrize("kind", ["ct", "fm"])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_solver_matches_torchdiffeq(kind, solver):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    model = build_model(f"noprop-{kind}:c2,h8,d6,{solver},s7", SPEC).double().eval()
    x, _ = batch(5, dtype=torch.float64)
    z0 = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.chain(x, z0)
        image = model.net.image_term(x)
        method = {"euler": "euler", "heun": "heun2"}[solver]
        ref = torchdiffeq.odeint(lambda t, z: model.velocity(image, z, t), z0, model.grid, method=method)[-1]
    # The grid buffer is built in float32 (its points differ from k/N by ~1e-8), the step is 1/N.
    assert torch.allclose(ours, ref, rtol=0, atol=1e-7)
    assert not torch.allclose(ours, z0, atol=1e-3)


# -- learning rules ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,spec", [("noprop-ct", "noprop-ct:c2,h8,d6"), ("noprop-fm", "noprop-fm:c2,h8,d6")])
def test_step_draws_from_the_algorithm_generator_only(name, spec):
    a, b = make(name, spec), make(name, spec)
    x, y = batch()
    global_state = torch.get_rng_state()
    out_a, out_b = a.train_step(x, y), b.train_step(x, y)
    assert torch.equal(torch.get_rng_state(), global_state)  # t, noise and dropout masks: self.generator
    assert torch.equal(out_a["loss"], out_b["loss"])
    c = make(name, spec)
    c.generator.manual_seed(12345)
    assert not torch.equal(c.train_step(x, y)["loss"], out_a["loss"])


def test_ct_step_trains_network_head_embeddings_and_schedule_together():
    alg = make("noprop-ct", "noprop-ct:c2,h8,d6")
    before = {k: v.clone() for k, v in alg.model.state_dict().items()}
    out = alg.train_step(*batch())
    assert set(out) == {"loss", "l2", "mse", "ce", "kl"} and all(v.dim() == 0 and not v.requires_grad for v in out.values())
    moved = {k.split(".")[0] for k, v in alg.model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"embed", "blocks", "schedule", "head"}
    assert torch.isclose(out["loss"], out["l2"] + out["ce"] + out["kl"])


def test_fm_classification_term_follows_the_embeddings():
    onehot = make("noprop-fm", "noprop-fm:c2,h8")
    out = onehot.train_step(*batch())
    assert "ce" not in out and onehot.model.head.weight.grad is None  # the head stays at the embeddings
    assert torch.equal(onehot.model.head.weight, torch.eye(5))
    learned = make("noprop-fm", "noprop-fm:c2,h8,d6")
    out = learned.train_step(*batch())
    assert "ce" in out and learned.model.head.weight.grad is not None and learned.model.embed.grad is not None
    assert make("noprop-fm", "noprop-fm:c2,h8,rhead").classify and make("noprop-fm", "noprop-fm:c2,h8", classify="on").classify


@pytest.mark.parametrize("name", ["noprop-ct", "noprop-fm"])
def test_training_step_costs_one_network_evaluation_and_the_twin_pays_for_every_solver_step(name):
    """NoProp trains the network at one t per example; BP runs the image path once and the rest per step."""
    spec = f"{name}:c2,h8,heun,s8"
    x, y = batch()
    noprop = count_flops(lambda: make(name, spec).train_step(x, y))
    bp = count_flops(lambda: make("bp", spec).train_step(x, y))
    model = make(name, spec).model
    image = count_flops(lambda: model.net.image_term(x).sum().backward())
    assert noprop < 1.5 * bp
    assert bp > image * 1.2  # and the twin's 16 evaluations of z path and fusion come on top


# -- the BP twin -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["noprop-ct", "noprop-fm"])
def test_compare_twin_trains_the_same_solver_with_the_same_read_out(name):
    cfg = load_config(EXTRA / f"{name.replace('-', '_')}_mnist5k.yaml")
    twin = bp_twin(cfg)
    assert twin.algorithm == "bp" and twin.model == cfg.model and twin.readout == cfg.readout and twin.params == {}
    assert (twin.epochs, twin.batch_size, twin.patience) == (cfg.epochs, cfg.batch_size, cfg.patience)
    noprop = make(name, "noprop-ct:c2,h8,s3" if name == "noprop-ct" else "noprop-fm:c2,h8,s3")
    bp = make("bp", "noprop-ct:c2,h8,s3" if name == "noprop-ct" else "noprop-fm:c2,h8,s3")
    bp.model.load_state_dict(noprop.model.state_dict())
    x, _ = batch(7)
    for readout in ("mean", "sampled"):
        noprop.model.readout = bp.model.readout = readout
        noprop.eval_mode(), bp.eval_mode()
        with torch.no_grad():
            assert torch.equal(noprop.predict(x), bp.predict(x))
    assert any("unrolled fixed-step heun solver (3 steps" in d for d in bp.deviations)
    assert not get_algorithm("bp").deviations  # the note is the model's, not every BP run's


# -- end to end --------------------------------------------------------------------------------------
def _pair(name: str, model: str, epochs: int, lr: float) -> tuple[dict, dict]:
    """NoProp-CT/FM by its quick config on a smaller network and budget, and the compare twin of that config."""
    values = load_config(EXTRA / f"{name.replace('-', '_')}_mnist5k.yaml").model_dump(mode="json")
    values.update(model=model, epochs=epochs, batch_size=32, lr=lr, device="cpu", checkpoint=False, seed=0)
    cfg = build_config(values)
    return Engine(cfg).run(), Engine(bp_twin(cfg)).run()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,model,floor,bp_floor",
    [("noprop-ct", "noprop-ct:c3,h32,p0,euler,s2", 0.60, 0.45), ("noprop-fm", "noprop-fm:c3,h32,p0,euler,s2", 0.65, 0.60)],
)
def test_learns_real_digits_next_to_its_bp_twin(name, model, floor, bp_floor, one_thread):
    epochs = 2
    noprop, bp = _pair(name, model, epochs, lr=3e-3)
    said = (
        f"{name} test {noprop['test_accuracy']:.3f}, its BP twin (backprop through the solver, BP's own recipe) "
        f"{bp['test_accuracy']:.3f}, {epochs} epochs of mnist5k at batch 32 on {model}"
    )
    print("\n" + said)
    assert noprop["status"] == "completed" and bp["status"] == "completed", said
    assert noprop["test_accuracy"] >= floor, said
    assert bp["test_accuracy"] >= bp_floor, said
    assert noprop["model"] == bp["model"] and noprop["config"]["readout"] == bp["config"]["readout"]
    # Both read out through the very same solver: equal inference cost; training NoProp skips the solver.
    assert noprop["inference_flops_per_sample"] == pytest.approx(bp["inference_flops_per_sample"], rel=0.01)
    assert noprop["flops_per_step"]["train/32"] < bp["flops_per_step"]["train/32"]
    assert set(noprop["test_accuracy_by_readout"]) == {"mean", "sampled"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (BPFREE_GPU_TESTS=1 keeps it visible)")
@pytest.mark.parametrize(
    "algorithm,model",
    [("noprop-ct", "noprop-ct:c3,h32,euler,s2"), ("noprop-fm", "noprop-fm:c3,h32,d8,heun,s2"),
     ("bp", "noprop-ct:c3,h32,heun,s2"), ("bp", "noprop-fm:c3,h32,d8,euler,s2")],
)
def test_every_step_is_captured_in_a_cuda_graph(algorithm, model):
    """No host read in the steps: NoProp-CT/FM (t, noise and masks from the CUDA generator) and the BP twin
    through the solver replay from CUDA graphs; a failed capture would stop the run with CaptureError.
    (Captured and eager runs are not compared number by number: the capturable optimiser step rounds
    differently, and these trainings amplify last-bit differences within an epoch.)"""
    cfg = build_config({"algorithm": algorithm, "dataset": "mnist5k", "model": model, "epochs": 2, "batch_size": 32,
                        "drop_last": True, "lr": 3e-3, "patience": None, "checkpoint": False, "seed": 0, "device": "cuda"})
    result = Engine(cfg).run()
    graphs = result["cuda_graphs"]
    assert result["status"] == "completed" and graphs["enabled"], result.get("reason")
    assert graphs["captured_kinds"] == ["train/32"] and graphs["eager_kinds"] == {}, graphs
    assert result["test_accuracy"] > 0.5


@pytest.mark.slow
def test_compare_runs_noprop_ct_and_fm_with_their_twins_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "bpfree.cli", "compare", "-c", str(EXTRA), "-a", "noprop-ct", "-a", "noprop-fm",
        "--seeds", "1", "--epochs", "1", "--executor", "inline", "--device", "cpu", "--threads", "1", "-o", str(out), "-q",
        "--set", "batch_size=256",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    results = load_results(out)
    assert sorted(r["algorithm"] for r in results) == ["bp", "bp", "noprop-ct", "noprop-fm"]
    models = {r["algorithm"]: r["model"] for r in results if r["algorithm"] != "bp"}
    assert sorted(r["model"] for r in results if r["algorithm"] == "bp") == sorted(models.values())
    assert all(r["status"] == "completed" and r["test_accuracy"] is not None for r in results)
    assert (out / "report.md").is_file() and "noprop-ct" in proc.stdout and "noprop-fm" in proc.stdout


def test_kl_with_a_learned_noise_level_matches_the_number_form():
    u = torch.randn(3, 6, dtype=torch.float64)
    for a in (1e-3, 0.2, 0.7):
        assert torch.allclose(kl_to_standard_normal(u, torch.tensor(a, dtype=torch.float64)), kl_to_standard_normal(u, a))
    assert math.isclose(float(kl_to_standard_normal(torch.zeros(1, 4), torch.tensor(0.0))), 0.0, abs_tol=1e-7)
