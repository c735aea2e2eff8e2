"""NoProp-DT: schedule, posterior update, KL, block independence, parallel = sequential, FLOPs,
state handling, and an end-to-end run on the embedded MNIST subset next to its BP twin."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bpfree.algorithms import get_algorithm
from bpfree.algorithms.base import TrainSettings
from bpfree.algorithms.noprop import NoProp, kl_to_standard_normal
from bpfree.config import build_config
from bpfree.data import DataSpec
from bpfree.loop import epoch_clock
from bpfree.meters.flops import count_flops
from bpfree.models import build_model, parse_model_spec
from bpfree.models.noprop_net import NoPropNet, alpha_bar_schedule, posterior_coefficients, snr

SPEC = DataSpec("toy", (1, 12, 12), 5, n_train=40, n_val=8, n_test=8, augment=False)
SETTINGS = TrainSettings(epochs=1, batch_size=16, lr=1e-3, weight_decay=1e-3, optimizer="adamw")


def make(model_spec: str = "noprop:3,c2,h8", dtype=torch.float32, seed: int = 0, **params) -> NoProp:
    torch.manual_seed(seed)
    model = build_model(model_spec, SPEC).to(dtype)
    algorithm = NoProp(model, SPEC, SETTINGS, NoProp.Params(**params), torch.Generator().manual_seed(seed + 1))
    algorithm.train_mode()
    return algorithm


def batch(n: int = 16, dtype=torch.float32, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SPEC.input_shape, generator=g, dtype=dtype)
    return x, torch.randint(0, SPEC.num_classes, (n,), generator=g)


# -- model family -----------------------------------------------------------------------------------
def test_model_spec_and_structure():
    family, shape = parse_model_spec("noprop:4,c3,h16,d7,p0.1,linear")
    assert family.prefix == "noprop"
    got = (shape.T, shape.channels, shape.hidden, shape.embed_dim, shape.dropout, shape.schedule)
    assert got == (4, 3, 16, 7, 0.1, "linear")
    assert parse_model_spec("noprop")[1].T == 10
    for bad in ("noprop:0", "noprop:3,x4", "noprop:3,p1.5", "noprop:3,c0"):
        with pytest.raises(ValueError):
            parse_model_spec(bad)
    model = build_model("noprop:4,c2,h8", SPEC)
    assert isinstance(model, NoPropNet) and len(model.blocks) == 4
    assert model.head.in_features == SPEC.num_classes and model.head.out_features == SPEC.num_classes
    assert torch.equal(model.embed, torch.eye(5)) and "embed" not in dict(model.named_parameters())  # one-hot: fixed
    assert torch.equal(model.head.weight, model.embed)  # head starts as the nearest-embedding read-out
    learned = build_model("noprop:4,c2,h8,d7", SPEC)
    assert learned.embed.requires_grad and learned.embed.shape == (5, 7)
    assert torch.allclose(learned.embed @ learned.embed.T, torch.eye(5), atol=1e-5)  # orthogonal rows
    # Each block has its own image embedding: T times one block's parameters.
    one = sum(p.numel() for p in model.blocks[0].parameters())
    assert sum(p.numel() for p in model.blocks.parameters()) == 4 * one
    x, _ = batch(6)
    model.train()
    assert model(x).shape == (6, 5)  # BP twin: sampled chain
    model.eval()
    assert torch.equal(model(x), model(x))  # eval: deterministic mean path


def test_bp_trains_the_noprop_family():
    assert "*" in get_algorithm("bp").model_families
    assert get_algorithm("noprop").model_families == ("noprop",)
    cfg = build_config({"algorithm": "noprop", "model": "noprop:3", "params": {"loop": "paper", "parallel": False}})
    assert cfg.algorithm_params().loop == "paper"


# -- schedule, posterior, KL ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("T", [1, 3, 10, 50])
def test_schedule_monotone_and_snr_increasing(kind, T):
    ab = alpha_bar_schedule(T, kind)
    assert ab.shape == (T + 1,)
    assert torch.all(ab[1:] > ab[:-1])  # increasing towards the clean label
    assert ab[0] <= 0.01 and ab[-1] >= 0.99
    s = snr(ab)
    assert torch.all(s[1:] > s[:-1]) and torch.all(s > 0)
    a, b, c = posterior_coefficients(ab)
    assert torch.all(a > 0) and torch.all(b >= 0) and torch.all(c > 0)


def test_cosine_schedule_values():
    ab = alpha_bar_schedule(10, "cosine")
    expected = torch.cos(0.5 * math.pi * (1 - torch.arange(11, dtype=torch.float64) / 10)) ** 2
    assert torch.allclose(ab, 1e-3 + (1 - 2e-3) * expected)
    assert ab[0] == pytest.approx(1e-3) and ab[-1] == pytest.approx(1 - 1e-3)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_posterior_update_maps_marginals(kind):
    """With û = u_y, z_t = a_t u_y + b_t z_{t-1} + √c_t ε carries q(z_{t-1}|y) onto q(z_t|y)."""
    T = 10
    ab = alpha_bar_schedule(T, kind)
    a, b, c = posterior_coefficients(ab)
    # Exact moment identities.
    assert torch.allclose(a + b * ab[:-1].sqrt(), ab[1:].sqrt(), atol=1e-12)
    assert torch.allclose(b**2 * (1 - ab[:-1]) + c, 1 - ab[1:], atol=1e-12)
    # And numerically, by sampling.
    g = torch.Generator().manual_seed(0)
    u = torch.tensor([0.8, -1.5, 0.3, 2.0], dtype=torch.float64)
    n = 200_000
    for t in range(1, T + 1):
        z_prev = ab[t - 1].sqrt() * u + (1 - ab[t - 1]).sqrt() * torch.randn(n, 4, generator=g, dtype=torch.float64)
        z = a[t - 1] * u + b[t - 1] * z_prev + c[t - 1].sqrt() * torch.randn(n, 4, generator=g, dtype=torch.float64)
        assert torch.allclose(z.mean(0), ab[t].sqrt() * u, atol=0.01)
        assert torch.allclose(z.var(0), (1 - ab[t]).expand(4), rtol=0.02, atol=2e-4)


@pytest.mark.parametrize("alpha_bar_0", [1e-3, 0.2, 0.7])
def test_kl_closed_form_matches_monte_carlo(alpha_bar_0):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(3, 6, generator=g, dtype=torch.float64)
    closed = kl_to_standard_normal(u, alpha_bar_0)
    n = 400_000
    mean, var = math.sqrt(alpha_bar_0) * u, 1 - alpha_bar_0
    for i in range(3):
        z = mean[i] + math.sqrt(var) * torch.randn(n, 6, generator=g, dtype=torch.float64)
        log_q = -0.5 * ((z - mean[i]) ** 2 / var + math.log(2 * math.pi * var)).sum(-1)
        log_p = -0.5 * (z**2 + math.log(2 * math.pi)).sum(-1)
        mc = (log_q - log_p).mean()
        stderr = (log_q - log_p).std() / math.sqrt(n)
        assert abs(mc - closed[i]) < 5 * stderr + 1e-6
    assert torch.allclose(kl_to_standard_normal(torch.zeros(1, 6), 0.0), torch.zeros(1))


# -- learning rule ----------------------------------------------------------------------------------
def test_block_loss_gives_no_gradient_to_other_blocks():
    alg = make("noprop:4,c2,h8,d6", parallel=False)
    x, y = batch()
    eps, _, masks = alg._draw(alg.T, x.shape[0], x)
    for t in range(1, alg.T + 1):
        alg.model.zero_grad(set_to_none=True)
        weighted, _ = alg._block_loss(t, x, y, eps[t - 1], tuple(m[t - 1] for m in masks))
        weighted.backward()
        for k, block in enumerate(alg.model.blocks, start=1):
            grads = [p.grad for p in block.parameters()]
            if k == t:
                assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None for g in grads)
        assert alg.model.head.weight.grad is None  # the L2 term does not touch the classifier
        assert alg.model.embed.grad is not None  # ... but does reach a learned W_Embed


def test_parallel_block_loss_gradients_stay_in_their_slice():
    alg = make("noprop:4,c2,h8", parallel=True)
    x, y = batch()
    eps, _, masks = alg._draw(alg.T, x.shape[0], x)
    weighted, _ = alg._parallel_block_losses(x, y, eps, masks, alg.model.embed)
    stacked = list(alg._stacked.values())
    for t in range(alg.T):
        grads = torch.autograd.grad(weighted[t], stacked, retain_graph=True, allow_unused=True)
        for g in grads:
            if g is None:
                continue
            others = torch.cat([g[:t].flatten(), g[t + 1 :].flatten()])
            assert torch.count_nonzero(others) == 0
        assert any(g is not None and g[t].abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("model_spec", ["noprop:3,c2,h8", "noprop:3,c2,h8,d6"])
def test_parallel_equals_sequential(model_spec):
    """Same seed: same losses and same parameters after N steps (float64, so the tolerance is tight)."""
    runs = {}
    for parallel in (False, True):
        alg = make(model_spec, dtype=torch.float64, parallel=parallel)
        losses = []
        for step in range(4):
            x, y = batch(dtype=torch.float64, seed=10 + step)
            out = alg.train_step(x, y)
            losses.append(torch.stack([out[k] for k in ("loss", "l2", "mse", "ce", "kl")]))
        runs[parallel] = (torch.stack(losses), {k: v.clone() for k, v in alg.model.state_dict().items()})
    (loss_s, state_s), (loss_p, state_p) = runs[False], runs[True]
    assert torch.allclose(loss_s, loss_p, rtol=1e-9, atol=1e-12)
    assert state_s.keys() == state_p.keys()
    initial = make(model_spec, dtype=torch.float64).model.state_dict()
    moved = 0
    for k in state_s:
        assert torch.allclose(state_s[k], state_p[k], rtol=1e-7, atol=1e-10), k
        moved += int(not torch.equal(state_s[k], initial[k]))
    assert moved > 0.5 * len(state_s)  # the steps did train


def test_parallel_equals_sequential_float32():
    runs = {}
    for parallel in (False, True):
        alg = make("noprop:3,c2,h8", parallel=parallel)
        losses = [alg.train_step(*batch(seed=20 + s))["loss"] for s in range(3)]
        runs[parallel] = (torch.stack(losses), torch.cat([p.detach().flatten() for p in alg.model.parameters()]))
    assert torch.allclose(runs[False][0], runs[True][0], rtol=1e-5)
    assert torch.allclose(runs[False][1], runs[True][1], atol=1e-4)


def test_stacked_storage_follows_weight_restore():
    """Best-weight restore and checkpoint loads write into the blocks; the stacked tensors must see it."""
    alg = make("noprop:3,c2,h8", parallel=True)
    saved = alg.weights_state()
    alg.train_step(*batch())
    name = next(iter(alg._stacked))
    assert not torch.equal(alg._stacked[name][0], saved[f"model.blocks.0.{name}"])
    alg.load_weights_state(saved)
    for t in range(3):
        assert torch.equal(alg._stacked[name][t], saved[f"model.blocks.{t}.{name}"])
        assert alg.model.blocks[t].get_parameter(name).data_ptr() == alg._stacked[name][t].data_ptr()


@pytest.mark.parametrize("parallel", [False, True])
def test_checkpoint_round_trip_continues_identically(parallel):
    a = make("noprop:3,c2,h8,d6", parallel=parallel)
    for s in range(2):
        a.train_step(*batch(seed=30 + s))
    state, gen_state = copy.deepcopy(a.state_dict()), a.generator.get_state()  # as a checkpoint file would
    b = make("noprop:3,c2,h8,d6", seed=99, parallel=parallel)
    b.load_state_dict(state)
    b.generator.set_state(gen_state)
    out_a, out_b = a.train_step(*batch(seed=40)), b.train_step(*batch(seed=40))
    assert torch.equal(out_a["loss"], out_b["loss"])
    for (ka, va), (_, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_paper_loop_trains_one_block_and_leaves_the_others():
    alg = make("noprop:3,c2,h8", loop="paper")
    phase = alg.schedule()[0]
    alg.begin_phase(phase)
    alg.begin_epoch(epoch_clock(phase, 0, 0, 40, 16))  # first engine epoch: block 1 only
    before = [torch.cat([p.detach().flatten().clone() for p in b.parameters()]) for b in alg.model.blocks]
    for s in range(3):
        assert alg.current_block() == 1
        alg.train_step(*batch(seed=50 + s))
    after = [torch.cat([p.detach().flatten() for p in b.parameters()]) for b in alg.model.blocks]
    assert not torch.equal(before[0], after[0])
    assert torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])  # AdamW decay did not move them
    alg.begin_epoch(epoch_clock(phase, 1, 1, 40, 16))
    assert alg.current_block() == 2
    alg.begin_epoch(epoch_clock(phase, 3, 3, 40, 16))
    assert alg.current_block() == 1  # T engine epochs = one paper epoch, then around again


def test_predict_is_deterministic_and_leaves_training_randomness_alone():
    alg = make("noprop:3,c2,h8")
    alg.model.readout = "sampled"
    x, _ = batch(10)
    state = alg.generator.get_state()
    alg.eval_mode()
    s1, s2 = alg.predict(x), alg.predict(x)
    assert s1.shape == (10, 5) and torch.equal(s1, s2)
    assert torch.equal(alg.generator.get_state(), state)
    alg.model.readout = "mean"
    mean = alg.predict(x)
    assert torch.allclose(mean, alg.model.head(alg.model.chain(x, torch.zeros(10, 5), noise=False)))
    assert not torch.allclose(mean, s1)


@pytest.mark.parametrize("parallel", [False, True])
def test_train_flops_count_all_blocks(parallel):
    alg = make("noprop:4,c2,h8", parallel=parallel)
    x, y = batch()
    step = count_flops(lambda: alg.train_step(x, y))
    block = alg.model.blocks[0]
    z = torch.randn(16, 5)
    single = count_flops(lambda: F.mse_loss(block(x, z), z).backward())
    assert 0.98 * 4 * single <= step <= 1.1 * 4 * single, (step, single)


def test_train_flops_equal_in_both_modes():
    """The vmap'd step runs the same work as T block steps (grouped convolutions, batched matmuls)."""
    x, y = batch()
    seq = count_flops(lambda: make("noprop:4,c2,h8", parallel=False).train_step(x, y))
    par = count_flops(lambda: make("noprop:4,c2,h8", parallel=True).train_step(x, y))
    assert seq == pytest.approx(par, rel=0.01)


def test_engine_flop_counter_counts_parallel_steps_like_sequential():
    x, y = batch()
    seq = count_flops(lambda: make("noprop:4,c2,h8", parallel=False).train_step(x, y))
    par = count_flops(lambda: make("noprop:4,c2,h8", parallel=True).train_step(x, y))
    assert seq == pytest.approx(par, rel=0.01)


# -- end to end -------------------------------------------------------------------------------------


def _run(algorithm: str, epochs: int, params: dict | None = None) -> dict:
    from bpfree.engine import Engine

    cfg = build_config(
        {
            "algorithm": algorithm,
            "dataset": "mnist5k",
            "model": "noprop:10,c4,h64",
            "epochs": epochs,
            "batch_size": 128,
            "optimizer": "adamw",
            "lr": 1e-3,
            "weight_decay": 1e-3,
            "device": "cpu",
            "checkpoint": False,
            "seed": 0,
            "params": params or {},
        }
    )
    return Engine(cfg).run()


@pytest.mark.slow
def test_noprop_dt_learns_mnist5k_next_to_bp_twin(one_thread):
    epochs = 12
    noprop = _run("noprop", epochs)
    bp = _run("bp", epochs)
    gap = noprop["test_accuracy"] - bp["test_accuracy"]
    print(
        f"\nNoProp-DT test {noprop['test_accuracy']:.3f} ({noprop['epochs_run']} ep, {noprop['train_time_s']:.0f} s), "
        f"BP twin {bp['test_accuracy']:.3f} ({bp['epochs_run']} ep, {bp['train_time_s']:.0f} s), gap {gap:+.3f}"
    )
    assert noprop["status"] == "completed" and bp["status"] == "completed"
    assert noprop["test_accuracy"] >= 0.90
    assert bp["test_accuracy"] >= 0.85
    # The FLOP counter saw every block: a NoProp step costs about as much as a BP step on the same network
    # (both run T blocks forward and backward), far more than one block.
    key = "train/128"
    assert 0.8 <= noprop["flops_per_step"][key] / bp["flops_per_step"][key] <= 1.3
    assert noprop["inference_flops_per_sample"] == pytest.approx(bp["inference_flops_per_sample"], rel=0.05)
