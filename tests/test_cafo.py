"""Cascaded Forward (CaFo): sparsemax, closed-form MSE, aggregation, fixed BN, pure DFA, and
end-to-end accuracy on the embedded ``mnist5k`` against BP on the same cnn3."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfree.algorithms import get_algorithm
from bpfree.algorithms.base import TrainSettings
from bpfree.algorithms.cafo import CaFoParams, CascadedForward, ridge_solve, sparsemax, sparsemax_loss
from bpfree.config import build_config
from bpfree.data import DataSpec, Splits
from bpfree.engine import Engine
from bpfree.errors import UserError
from bpfree.loop import EpochOutcome, epoch_clock, train_epoch
from bpfree.models.cnn import CNN3

pytestmark = pytest.mark.usefixtures("one_thread")


TOY_SHAPE = (1, 8, 8)  # 8 -> 4 -> 2 -> 1
TOY_CLASSES = 3


def make_cafo(
    n_train: int = 64,
    batch_size: int = 32,
    optimizer: str = "sgd",
    lr: float = 1.0,
    channels: tuple[int, int, int] = (2, 4, 8),
    **params,
) -> CascadedForward:
    torch.manual_seed(0)
    model = CNN3(TOY_SHAPE, TOY_CLASSES, channels)
    spec = DataSpec("toy", TOY_SHAPE, TOY_CLASSES, n_train, 0, 0, augment=False)
    train = TrainSettings(epochs=1, batch_size=batch_size, lr=lr, weight_decay=0.0, optimizer=optimizer, momentum=0.0)
    return CascadedForward(model, spec, train, CaFoParams(**params), torch.Generator().manual_seed(1))


def toy_data(n: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *TOY_SHAPE, generator=g), torch.randint(0, TOY_CLASSES, (n,), generator=g)


def run_epoch(algo: CascadedForward, phase_name: str, x: torch.Tensor, y: torch.Tensor) -> EpochOutcome:
    """Drive one phase for one epoch through the engine's own loop (data in order: no shuffling needed)."""
    phase = next(p for p in algo.schedule() if p.name == phase_name)
    algo.begin_phase(phase)
    spec = DataSpec("toy", TOY_SHAPE, TOY_CLASSES, x.shape[0], 0, 0, augment=False)
    splits = Splits(spec, x, y, x[:0], y[:0], x[:0], y[:0])
    clock = epoch_clock(phase, 0, 0, x.shape[0], algo.settings.batch_size)
    return train_epoch(algo, splits, clock, torch.Generator().manual_seed(0))


def block_features(model: CNN3, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()  # frozen blocks: fixed BN statistics
    feats, h = [], x
    with torch.no_grad():
        for block in model.blocks:
            h = block(h)
            feats.append(h.flatten(1))
    return feats


# -- sparsemax -------------------------------------------------------------------------------------


def sparsemax_by_bisection(z: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """Euclidean projection onto the simplex by bisection on tau (an independent method)."""
    lo = z.min(dim=-1, keepdim=True).values - 1
    hi = z.max(dim=-1, keepdim=True).values
    for _ in range(iters):
        mid = (lo + hi) / 2
        too_low = torch.clamp(z - mid, min=0).sum(-1, keepdim=True) > 1
        lo = torch.where(too_low, mid, lo)
        hi = torch.where(too_low, hi, mid)
    return torch.clamp(z - (lo + hi) / 2, min=0)


def test_sparsemax_known_case_and_sparsity():
    p = sparsemax(torch.tensor([[1.0, 0.5, -1.0], [3.0, 0.0, 0.0], [0.2, 0.2, 0.2]]))
    expected = torch.tensor([[0.75, 0.25, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(p, expected)
    assert (p[:2] == 0).sum() == 3  # exact zeros, unlike softmax


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=12),
    st.floats(-5, 5, allow_nan=False),
)
def test_sparsemax_is_simplex_projection(values, shift):
    z = torch.tensor(values, dtype=torch.float64).unsqueeze(0)
    p = sparsemax(z)
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(p, sparsemax_by_bisection(z), atol=1e-9, rtol=0)
    torch.testing.assert_close(sparsemax(z + shift), p, atol=1e-9, rtol=0)  # shift invariance


def test_sparsemax_loss_value_and_gradient():
    z = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.arange(16) % 5
    z.requires_grad_(True)
    loss = sparsemax_loss(z, y)
    loss.backward()
    target = F.one_hot(y, 5).double()
    p = sparsemax(z.detach())
    torch.testing.assert_close(z.grad, (p - target) / 16)  # h (sparsemax(z) - y)^T up to the 1/B mean
    # the textbook formula: -z_y + 1/2 sum_{j in S} (z_j^2 - tau^2) + 1/2, tau from the support
    zd = z.detach()
    support = p > 0
    tau = ((zd * support).sum(-1) - 1) / support.sum(-1)
    per_sample = -(zd * target).sum(-1) + 0.5 * ((zd**2 - tau[:, None] ** 2) * support).sum(-1) + 0.5
    torch.testing.assert_close(loss.detach(), per_sample.mean())
    assert torch.all(per_sample >= -1e-12)
    # zero loss once the true class wins by a margin of 1
    assert sparsemax_loss(torch.tensor([[2.0, 0.5, 1.0]]), torch.tensor([0])).abs() < 1e-7
    assert torch.autograd.gradcheck(lambda t: sparsemax_loss(t, y), (z.detach().clone().requires_grad_(True),))


# -- closed-form MSE -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_train", [200, 20])  # over- and under-determined (then: minimum-norm solution)
def test_closed_form_mse_equals_lstsq(n_train):
    algo = make_cafo(n_train=n_train, batch_size=64, loss="mse", schedule="simultaneous", rand_bn="identity")
    phases = algo.phases()
    assert [p.name for p in phases] == ["predictors"] and phases[0].epochs == 1
    x, y = toy_data(n_train)
    outcome = run_epoch(algo, "predictors", x, y)
    assert "train_mse" in outcome.closing  # the solve ran in end_epoch, inside the training window
    feats = block_features(algo.model, x)
    target = F.one_hot(y, TOY_CLASSES).double()
    total_mse = 0.0
    for k, h in enumerate(feats):
        h = h.double()
        expected = torch.linalg.pinv(h) @ target  # min-norm least squares
        if n_train > h.shape[1]:
            torch.testing.assert_close(expected, torch.linalg.lstsq(h, target).solution)
        w = algo.aux["predictors"][k].weight.detach().double().T
        torch.testing.assert_close(w, expected, atol=2e-4, rtol=1e-3)
        total_mse += 0.5 * ((h @ expected - target) ** 2).sum().item() / n_train
    # end_epoch reports the training MSE of the solved predictors as the epoch's loss
    assert outcome.loss == pytest.approx(total_mse, rel=1e-3, abs=1e-5)


def test_ridge_solve_matches_formula():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(30, 12, dtype=torch.float64, generator=g)
    t = torch.randn(30, 4, dtype=torch.float64, generator=g)
    w = ridge_solve(h.T @ h, h.T @ t, 0.7)
    torch.testing.assert_close(w, torch.linalg.solve(h.T @ h + 0.7 * torch.eye(12, dtype=torch.float64), h.T @ t))


def test_closed_form_greedy_with_bias_uses_one_epoch_per_predictor():
    algo = make_cafo(n_train=96, batch_size=32, loss="mse", predictor_bias=True, rand_bn="identity")
    assert [(p.name, p.epochs) for p in algo.phases()] == [("predictor1", 1), ("predictor2", 1), ("predictor3", 1)]
    x, y = toy_data(96)
    for k in range(3):
        run_epoch(algo, f"predictor{k + 1}", x, y)
    h = torch.cat([block_features(algo.model, x)[2].double(), torch.ones(96, 1, dtype=torch.float64)], 1)
    expected = torch.linalg.lstsq(h, F.one_hot(y, TOY_CLASSES).double()).solution
    pred = algo.aux["predictors"][2]
    torch.testing.assert_close(pred.weight.detach().double().T, expected[:-1], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(pred.bias.detach().double(), expected[-1], atol=2e-4, rtol=1e-3)


# -- prediction rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss,aggregation,score",
    [
        ("ce", "probs", lambda z: torch.softmax(z, -1)),
        ("mse", "probs", lambda z: torch.softmax(z, -1)),
        ("sl", "probs", sparsemax),
        ("ce", "logits", lambda z: z),
    ],
)
def test_predict_sums_per_block_scores(loss, aggregation, score):
    algo = make_cafo(loss=loss, aggregation=aggregation, rand_bn="identity")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for pred in algo.aux["predictors"]:
            pred.weight.copy_(torch.randn(pred.weight.shape, generator=g) * 3)
    x, _ = toy_data(10)
    algo.end_training()
    algo.eval_mode()
    with torch.no_grad():
        got = algo.predict(x)
    feats = block_features(algo.model, x)
    expected = sum(score(pred(h)) for pred, h in zip(algo.aux["predictors"], feats))
    torch.testing.assert_close(got, expected)


def test_greedy_phase_readout():
    algo = make_cafo(rand_bn="identity")
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for pred in algo.aux["predictors"]:
            pred.weight.copy_(torch.randn(pred.weight.shape, generator=g))
    x, _ = toy_data(7)
    feats = block_features(algo.model, x)
    probs = [torch.softmax(p(h), -1) for p, h in zip(algo.aux["predictors"], feats)]
    algo.begin_phase(algo.phases()[1])  # predictor2
    algo.eval_mode()
    with torch.no_grad():
        torch.testing.assert_close(algo.predict(x), probs[0] + probs[1])
    own = make_cafo(rand_bn="identity", phase_readout="own")
    own.aux.load_state_dict(algo.aux.state_dict())
    own.begin_phase(own.phases()[1])
    own.eval_mode()
    with torch.no_grad():
        torch.testing.assert_close(own.predict(x), probs[1])


def test_predictor_phase_trains_only_its_predictor():
    algo = make_cafo(optimizer="adam", lr=1e-2, rand_bn="identity")
    before = copy.deepcopy(algo.modules().state_dict())
    x, y = toy_data(64)
    run_epoch(algo, "predictor2", x, y)
    after = algo.modules().state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"aux.predictors.1.weight"}


# -- BatchNorm statistics in Rand ------------------------------------------------------------------


def test_rand_calibration_fixes_bn_statistics():
    algo = make_cafo(n_train=64, batch_size=64)  # rand_bn=calibrated by default
    assert [p.name for p in algo.phases()][0] == "bn_calibration"
    x, y = toy_data(64)
    run_epoch(algo, "bn_calibration", x, y)
    bn1 = algo.model.blocks[0][3]
    pre = algo.model.blocks[0][:3](x)  # conv -> relu -> pool: the BN input
    torch.testing.assert_close(bn1.running_mean, pre.mean(dim=(0, 2, 3)).detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bn1.running_var, pre.var(dim=(0, 2, 3)).detach(), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(bn1.running_var, torch.ones_like(bn1.running_var))
    stats = {k: v.clone() for k, v in algo.model.state_dict().items()}
    # predictor phases keep the blocks in eval mode: statistics stay fixed
    run_epoch(algo, "predictor3", x, y)
    assert all(not m.training for m in algo.model.blocks.modules())
    for k, v in algo.model.state_dict().items():
        assert torch.equal(v, stats[k]), k
    # a sample's prediction does not depend on the rest of its batch
    algo.end_training()
    algo.eval_mode()
    other, _ = toy_data(9, seed=9)
    with torch.no_grad():
        alone = algo.predict(x[:1])
        with_batch = algo.predict(torch.cat([x[:1], other * 5 + 3]))[:1]
    torch.testing.assert_close(alone, with_batch)


def test_rand_identity_bn_keeps_initial_statistics():
    algo = make_cafo(rand_bn="identity")
    assert "bn_calibration" not in [p.name for p in algo.phases()]
    x, y = toy_data(64)
    run_epoch(algo, "predictor3", x, y)
    for m in algo.model.blocks.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))


# -- DFA -------------------------------------------------------------------------------------------


def hand_dfa_gradients(algo: CascadedForward, x: torch.Tensor, y: torch.Tensor, last_by_bp: bool):
    """Gradients of DFA computed independently: block k gets VJP(h_k, theta_k; e B_k)."""
    blocks = copy.deepcopy(algo.model.blocks).train()
    head = copy.deepcopy(algo.aux["dfa_head"])
    outs, h = [], x
    for block in blocks:
        h = block(h.detach())
        outs.append(h)
    q = head(outs[-1].flatten(1))
    e = ((torch.softmax(q, -1) - F.one_hot(y, TOY_CLASSES).float()) / x.shape[0]).detach()
    grads = []
    for k, (block, out) in enumerate(zip(blocks, outs)):
        params = list(block.parameters())
        if last_by_bp and k == len(blocks) - 1:
            grads.append(torch.autograd.grad(F.cross_entropy(q, y), params, retain_graph=True))
        else:
            signal = (e @ algo.aux["feedback"][k]).view_as(out)
            grads.append(torch.autograd.grad(out, params, signal, retain_graph=True))
    head_grads = torch.autograd.grad(F.cross_entropy(q, y), list(head.parameters()))
    return grads, head_grads


def bp_gradients(algo: CascadedForward, x: torch.Tensor, y: torch.Tensor):
    blocks = copy.deepcopy(algo.model.blocks).train()
    head = copy.deepcopy(algo.aux["dfa_head"])
    h = x
    for block in blocks:
        h = block(h)
    return torch.autograd.grad(F.cross_entropy(head(h.flatten(1)), y), list(blocks[0].parameters()))


@pytest.mark.parametrize("last_block", ["dfa", "bp"])
def test_dfa_updates_are_local_vjps_of_fixed_feedback(last_block):
    algo = make_cafo(variant="dfa", dfa_epochs=1, dfa_last_block=last_block, optimizer="sgd", lr=1.0)
    assert [p.name for p in algo.phases()] == ["dfa", "predictor1", "predictor2", "predictor3"]
    feedback = algo.aux["feedback"]
    for k, dim in enumerate(algo.model.block_dims):
        assert feedback[k].shape == (TOY_CLASSES, dim)
        torch.testing.assert_close(feedback[k].norm(dim=1), torch.ones(TOY_CLASSES))
    x, y = toy_data(6)
    algo.begin_phase(algo.phases()[0])
    algo.train_mode()
    expected, head_expected = hand_dfa_gradients(algo, x, y, last_by_bp=last_block == "bp")
    bp_block1 = bp_gradients(algo, x, y)
    before = [[p.detach().clone() for p in b.parameters()] for b in algo.model.blocks]
    head_before = [p.detach().clone() for p in algo.aux["dfa_head"].parameters()]
    feedback_before = [feedback[k].clone() for k in range(3)]
    algo.train_step(x, y)  # SGD, lr 1, no momentum: the update is minus the gradient
    for k, block in enumerate(algo.model.blocks):
        for p0, p1, g in zip(before[k], block.parameters(), expected[k]):
            torch.testing.assert_close(p0 - p1.detach(), g, atol=1e-6, rtol=1e-4)
    for p0, p1, g in zip(head_before, algo.aux["dfa_head"].parameters(), head_expected):
        torch.testing.assert_close(p0 - p1.detach(), g, atol=1e-6, rtol=1e-4)
    # block 1's DFA update is not the backpropagated gradient
    assert not torch.allclose(before[0][0] - algo.model.blocks[0][0].weight.detach(), bp_block1[0], atol=1e-6)
    for k in range(3):  # the feedback is fixed
        assert torch.equal(feedback[k], feedback_before[k])


def test_dfa_phase_reads_out_the_aux_head_then_freezes_blocks():
    algo = make_cafo(variant="dfa", optimizer="adam", lr=1e-2)
    x, y = toy_data(64)
    run_epoch(algo, "dfa", x, y)
    assert all(m.training for m in algo.model.blocks.modules())
    algo.eval_mode()
    with torch.no_grad():
        h = x
        for block in algo.model.blocks:
            h = block(h)
        torch.testing.assert_close(algo.predict(x), algo.aux["dfa_head"](h.flatten(1)))
    stats = {k: v.clone() for k, v in algo.model.state_dict().items()}
    run_epoch(algo, "predictor1", x, y)
    assert all(not m.training for m in algo.model.blocks.modules())
    for k, v in algo.model.state_dict().items():
        assert torch.equal(v, stats[k]), k


# -- engine integration ----------------------------------------------------------------------------


def quick_config(**overrides):
    values = {
        "algorithm": "cafo",
        "dataset": "mnist5k",
        "model": "cnn3:4,8,16",
        "epochs": 1,
        "batch_size": 128,
        "lr": 1e-3,
        "device": "cpu",
        "checkpoint": False,
    }
    values.update(overrides)
    return build_config(values)


def test_registered_with_declared_deviations():
    cls = get_algorithm("cafo")
    assert cls is CascadedForward and cls.model_families == ("cnn3",)
    assert len(cls.deviations) >= 5
    with pytest.raises(Exception):
        quick_config(params={"variant": "hebb"})
    with pytest.raises(Exception):
        quick_config(params={"unknown": 1})
    with pytest.raises(UserError, match="cnn3"):
        Engine(quick_config(model="mlp:2x100"))


def test_engine_records_a_separate_dfa_phase():
    result = Engine(quick_config(params={"variant": "dfa", "dfa_epochs": 1})).run()
    assert result["status"] == "completed"
    names = [p["name"] for p in result["phases"]]
    assert names == ["dfa", "predictor1", "predictor2", "predictor3"]
    dfa = result["phases"][0]
    assert dfa["epochs"] == 1 and dfa["train_time_s"] > 0
    assert any(key.startswith("dfa/") for key in result["flops_per_step"])
    assert result["test_accuracy"] > 0.5
    assert result["aux_params"] > 0


def test_engine_closed_form_mse_and_simultaneous_schedule():
    result = Engine(quick_config(epochs=3, params={"loss": "mse", "schedule": "simultaneous"})).run()
    assert [(p["name"], p["epochs"]) for p in result["phases"]] == [("bn_calibration", 1), ("predictors", 1)]
    assert result["flops_per_step"]["predictors/end_epoch"] > 0  # the closed-form solve is counted
    assert result["test_accuracy"] > 0.8


class Interrupt(Exception):
    pass


def test_dfa_run_resumes_mid_phase_to_the_same_result(tmp_path):
    cfg = quick_config(model="cnn3:2,4,8", checkpoint=True, params={"variant": "dfa", "dfa_epochs": 3})

    def interrupt(info):
        if info["phase"] == "dfa" and info["epoch"] == 2:
            raise Interrupt  # the checkpoint after dfa epoch 1 is on disk

    with pytest.raises(Interrupt):
        Engine(cfg, run_dir=tmp_path, progress=interrupt).run()
    resumed = Engine(cfg, run_dir=tmp_path).run()
    straight = Engine(cfg).run()
    assert resumed["resumed"] and resumed["test_accuracy"] == straight["test_accuracy"]
    assert [p["best_val_accuracy"] for p in resumed["phases"]] == [p["best_val_accuracy"] for p in straight["phases"]]


# -- accuracy on mnist5k against BP on the same cnn3 ---------------------------------------------

# The shared budget: every phase (BP's one, each CaFo predictor, DFA) gets at most EPOCHS epochs.
BUDGET = {"dataset": "mnist5k", "model": "cnn3", "epochs": 2, "batch_size": 128, "lr": 1e-3, "optimizer": "adam"}


def run_budget(algorithm: str, params: dict) -> dict:
    cfg = build_config({**BUDGET, "algorithm": algorithm, "device": "cpu", "checkpoint": False, "params": params})
    return Engine(cfg).run()


@pytest.fixture(scope="module")
def bp_result():
    return run_budget("bp", {})


def report(name: str, result: dict, bp: dict) -> None:
    print(
        f"\n{name}: test {result['test_accuracy']:.4f} ({result['epochs_run']} epochs, {result['train_time_s']:.1f} s); "
        f"BP cnn3: test {bp['test_accuracy']:.4f} ({bp['epochs_run']} epochs, {bp['train_time_s']:.1f} s)"
    )


@pytest.mark.slow
def test_cafo_rand_reaches_90_percent_on_mnist5k(bp_result):
    result = run_budget("cafo", {"variant": "rand"})
    report("CaFo-Rand-CE", result, bp_result)
    assert result["test_accuracy"] >= 0.90
    assert bp_result["test_accuracy"] >= 0.90  # BP on the same cnn3 and budget


@pytest.mark.slow
def test_cafo_dfa_reaches_93_percent_on_mnist5k(bp_result):
    result = run_budget("cafo", {"variant": "dfa", "dfa_epochs": BUDGET["epochs"]})
    report("CaFo-DFA-CE", result, bp_result)
    assert [p["name"] for p in result["phases"]][0] == "dfa"
    assert result["test_accuracy"] >= 0.93
    assert bp_result["test_accuracy"] >= 0.90
