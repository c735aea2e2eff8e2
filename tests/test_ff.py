"""Forward-Forward (``--algorithm ff``): unit tests of each mechanism, then a real mnist5k run against BP."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bpfree.algorithms import get_algorithm
from bpfree.algorithms.base import TrainSettings
from bpfree.config import build_config
from bpfree.data import DataSpec
from bpfree.engine import Engine
from bpfree.errors import ConfigError
from bpfree.loop import epoch_clock
from bpfree.models import build_model

SPEC = DataSpec("toy", (1, 6, 6), 5, n_train=40, n_val=10, n_test=10, augment=False)
FF = get_algorithm("ff")


def make_ff(model="mlp:3x16", optimizer="adam", epochs=4, batch_size=8, seed=0, lr=1e-3, **params):
    torch.manual_seed(seed)
    net = build_model(model, SPEC)
    settings = TrainSettings(epochs, batch_size, lr, 0.0, optimizer)
    alg = FF(net, SPEC, settings, FF.Params.model_validate(params), torch.Generator().manual_seed(seed + 1))
    alg.begin_phase(alg.phases()[0])
    alg.train_mode()
    return alg


def toy_batch(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SPEC.input_shape, generator=g)
    y = torch.randint(0, SPEC.num_classes, (n,), generator=g)
    return x, y


def rms_normalise(z):
    return z / (z.pow(2).mean(dim=1, keepdim=True).sqrt() + 1e-8)


def overlay_reference(x, label):
    """Independent reference: first C entries = the image's min (off) / max (on), then RMS-normalise."""
    z = x.flatten(1).clone()
    low, high = z.min(dim=1).values, z.max(dim=1).values
    z[:, : SPEC.num_classes] = low[:, None]
    z[torch.arange(z.shape[0]), label] = high
    return rms_normalise(z)


def without_optimizer_step(alg):
    for opt in alg.optimizers.values():
        opt.step = lambda *a, **k: None
    return alg


# -- data: overlay and negatives ---------------------------------------------------------------
def test_negative_labels_are_wrong_and_cover_every_other_class():
    alg = make_ff()
    y = torch.arange(SPEC.num_classes).repeat(400)
    neg = alg._negative_labels(y)
    assert not (neg == y).any()
    assert neg.min() >= 0 and neg.max() < SPEC.num_classes
    for c in range(SPEC.num_classes):  # uniform over the C-1 wrong classes
        counts = torch.bincount(neg[y == c], minlength=SPEC.num_classes)
        assert counts[c] == 0
        wrong = torch.cat([counts[:c], counts[c + 1 :]]).float()
        assert wrong.min() > 0.6 * wrong.mean()


def test_positive_and_negative_overlays_carry_true_and_wrong_labels():
    alg = make_ff()
    x, y = toy_batch(64)
    seen = {}

    def spy(xf, labels, copies):
        seen["z"] = FF._overlay(alg, xf, labels, copies)
        return seen["z"]

    alg._overlay = spy
    alg.train_step(x, y)
    z = seen["z"]
    b = x.shape[0]
    assert z.shape == (2 * b, SPEC.input_dim)
    pos_label = z[:b, : SPEC.num_classes].argmax(dim=1)
    neg_label = z[b:, : SPEC.num_classes].argmax(dim=1)
    assert torch.equal(pos_label, y)
    assert not (neg_label == y).any()
    assert torch.allclose(z[:b], overlay_reference(x, y), atol=1e-6)
    assert torch.allclose(z[b:], overlay_reference(x, neg_label), atol=1e-6)
    assert torch.allclose(z[:b, SPEC.num_classes :] , z[b:, SPEC.num_classes :])  # same image


# -- inference ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mlp:3x16", "mlp:1x16"])
def test_batched_goodness_equals_loop_over_labels(model):
    alg = make_ff(model, inference="goodness")
    x, y = toy_batch(8)
    for _ in range(3):
        alg.train_step(x, y)
    alg.eval_mode()
    with torch.no_grad():
        scores = alg.predict(x)
        loop = torch.zeros(x.shape[0], SPEC.num_classes)
        linears = [b[0] for b in alg.model.blocks]
        read = range(1, len(linears)) if len(linears) > 1 else range(1)
        for c in range(SPEC.num_classes):
            z = overlay_reference(x, torch.full((x.shape[0],), c))
            for i, lin in enumerate(linears):
                h = F.relu(lin(z))
                if i in read:
                    loop[:, c] += h.pow(2).sum(dim=1)
                z = rms_normalise(h)
    assert scores.shape == (x.shape[0], SPEC.num_classes)
    torch.testing.assert_close(scores, loop, rtol=1e-5, atol=1e-4)


def test_layerwise_predict_reflects_the_phase():
    alg = make_ff(schedule="layerwise", inference="goodness")
    assert [p.name for p in alg.phases()] == ["layer1", "layer2", "layer3"]
    x, _ = toy_batch(8)
    alg.eval_mode()
    with torch.no_grad():
        in_phase1 = alg.predict(x)
        assert torch.equal(in_phase1, alg.goodness_scores(x, top=0))  # layer 1 only
        alg.model.blocks[1][0].weight.mul_(3.0)  # layers above the phase do not matter
        assert torch.equal(alg.predict(x), in_phase1)
        alg.end_training()
        assert not torch.allclose(alg.predict(x), in_phase1)


# -- learning -----------------------------------------------------------------------------------
@pytest.mark.parametrize("full_grad_relu", [True, False])
def test_no_gradient_crosses_layers(full_grad_relu):
    """Layer 1's gradient in the 3-layer net equals its gradient when layer 1 is the whole net."""
    x, y = toy_batch(16)
    deep = without_optimizer_step(make_ff("mlp:3x16", full_grad_relu=full_grad_relu, seed=5))
    shallow = without_optimizer_step(make_ff("mlp:1x16", full_grad_relu=full_grad_relu, seed=7))
    with torch.no_grad():
        shallow.model.blocks[0][0].weight.copy_(deep.model.blocks[0][0].weight)
        shallow.model.blocks[0][0].bias.copy_(deep.model.blocks[0][0].bias)
    shallow.generator.set_state(deep.generator.get_state())  # same negatives
    deep.train_step(x, y)
    shallow.train_step(x, y)
    deep_grad = deep.model.blocks[0][0].weight.grad
    assert deep_grad is not None and deep.model.blocks[2][0].weight.grad is not None
    torch.testing.assert_close(deep_grad, shallow.model.blocks[0][0].weight.grad)
    torch.testing.assert_close(deep.model.blocks[0][0].bias.grad, shallow.model.blocks[0][0].bias.grad)


def test_softmax_head_adds_no_gradient_to_the_layers():
    x, y = toy_batch(16)
    plain = without_optimizer_step(make_ff(seed=2, inference="goodness"))
    headed = without_optimizer_step(make_ff(seed=2, inference="softmax"))
    headed.generator.set_state(plain.generator.get_state())
    plain_out = plain.train_step(x, y)
    out = headed.train_step(x, y)
    assert "head_loss" in out and "head_loss" not in plain_out
    for a, b in zip(plain.model.blocks, headed.model.blocks):
        torch.testing.assert_close(a[0].weight.grad, b[0].weight.grad)


def test_softmax_head_sees_no_label():
    alg = without_optimizer_step(make_ff(inference="softmax"))
    x, y = toy_batch(16)
    features = alg.head_features(x.flatten(1), top=2)  # takes no label at all
    # the label entries of the neutral input are equal: nothing marks a class
    neutral = alg._neutral(x.flatten(1))
    assert torch.allclose(neutral[:, : SPEC.num_classes], neutral[:, :1].expand(-1, SPEC.num_classes))
    # and training uses exactly those features: the head's gradient is CE on them, whatever y is
    for labels in (y, (y + 1) % SPEC.num_classes):
        alg.train_step(x, labels)
        weight = alg.aux["head"].weight.detach().clone().requires_grad_(True)
        F.cross_entropy(F.linear(features, weight), labels).backward()
        torch.testing.assert_close(alg.aux["head"].weight.grad, weight.grad)
    assert features.shape == (16, 32)  # layers 2..3 of mlp:3x16
    # labelled inputs would give other features: the test above would notice a leak
    layer1, layer2 = alg.model.blocks[0][0], alg.model.blocks[1][0]
    positive = rms_normalise(F.relu(layer2(rms_normalise(F.relu(layer1(overlay_reference(x, y)))))))
    assert not torch.allclose(positive, features[:, :16])


def test_head_not_built_or_trained_unless_needed():
    alg = make_ff(inference="goodness")
    assert "head" not in alg.aux and len(alg.optimizers["ff"].param_groups) == 1
    assert "head" in make_ff(inference="goodness", train_head=True).aux
    assert "head" in make_ff().aux  # softmax inference is the default
    with pytest.raises(ConfigError, match="train_head"):
        build_config({"algorithm": "ff", "model": "mlp:2x16", "params": {"inference": "softmax", "train_head": False}})
    with pytest.raises(ConfigError, match="unknown algorithm parameter"):
        build_config({"algorithm": "ff", "model": "mlp:2x16", "params": {"thresold": 2.0}})


def test_layerwise_trains_only_the_phase_layer():
    alg = make_ff(schedule="layerwise", inference="softmax")
    x, y = toy_batch(8)
    phases = alg.phases()
    assert len(phases) == 3
    alg.begin_phase(phases[1])
    before = [copy.deepcopy(b.state_dict()) for b in alg.model.blocks]
    head_before = alg.aux["head"].weight.detach().clone()
    alg.train_step(x, y)
    after = [b.state_dict() for b in alg.model.blocks]
    assert torch.equal(before[0]["0.weight"], after[0]["0.weight"])  # frozen below
    assert not torch.equal(before[1]["0.weight"], after[1]["0.weight"])  # the phase's layer learns
    assert torch.equal(before[2]["0.weight"], after[2]["0.weight"])  # untouched above
    head_after = alg.aux["head"].weight.detach()
    assert not torch.equal(head_before[:, :16], head_after[:, :16])  # head reads layer 2 ...
    assert torch.equal(head_after[:, 16:], torch.zeros_like(head_after[:, 16:]))  # ... not yet layer 3


def test_lr_cooldown_follows_the_linear_schedule():
    alg = make_ff(epochs=4, batch_size=8)  # 40 samples: 5 steps per epoch
    x, y = toy_batch(8)
    phase = alg.schedule()[0]
    lrs = []
    for epoch in range(4):
        alg.begin_epoch(epoch_clock(phase, epoch, epoch, 40, 8))  # the engine's epoch clock sets the lr
        for _ in range(5):
            alg.train_step(x, y)
            lrs.append(alg.optimizers["ff"].param_groups[0]["lr"])
    per_epoch = [lrs[5 * e] for e in range(4)]
    assert per_epoch == pytest.approx([1e-3, 1e-3, 1e-3 * 2 * 2 / 4, 1e-3 * 2 * 1 / 4])
    assert all(lr == lrs[5 * (i // 5)] for i, lr in enumerate(lrs))  # constant within an epoch
    flat = make_ff(epochs=4, batch_size=8, lr_cooldown=False)
    for epoch in range(4):
        flat.begin_epoch(epoch_clock(phase, epoch, epoch, 40, 8))
        flat.train_step(x, y)
    assert flat.optimizers["ff"].param_groups[0]["lr"] == 1e-3


def test_peer_normalisation_state_is_restored_with_the_weights():
    alg = make_ff()
    x, y = toy_batch(8)
    state = alg.weights_state()
    alg.train_step(x, y)
    running = alg.aux["peer"].get(0)
    assert not torch.allclose(running, torch.full_like(running, 0.5))
    alg.load_weights_state(state)
    assert torch.allclose(alg.aux["peer"].get(0), torch.full_like(running, 0.5))
    assert "peer" not in make_ff(peer_norm_weight=0.0).aux


def test_state_round_trip_keeps_the_cooldown_lr_and_peer_means():
    alg = make_ff(schedule="layerwise", epochs=4)
    phase = alg.schedule()[2]
    alg.begin_phase(phase)
    alg.begin_epoch(epoch_clock(phase, 3, 11, 40, 8))  # last epoch of the phase: cooled-down lr
    x, y = toy_batch(8)
    for _ in range(7):
        alg.train_step(x, y)
    state = alg.state_dict()
    fresh = make_ff(schedule="layerwise", seed=9)
    fresh.begin_phase(fresh.phases()[2])  # what the engine does before loading a mid-phase checkpoint
    fresh.load_state_dict(state)
    assert fresh._layer == 2
    assert torch.equal(fresh.aux["peer"].get(2), alg.aux["peer"].get(2))
    group = fresh.optimizers["layer3"].param_groups[0]
    assert group["initial_lr"] == 1e-3 and group["lr"] == pytest.approx(1e-3 * 2 * 1 / 4)


# -- through the engine -------------------------------------------------------------------------
def run(**overrides):
    values = {"algorithm": "ff", "dataset": "mnist5k", "model": "mlp:2x32", "epochs": 1, "batch_size": 100,
              "device": "cpu", "checkpoint": False, "patience": None}
    values.update(overrides)
    return Engine(build_config(values)).run()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sgd_and_adamw_train(optimizer):
    result = run(optimizer=optimizer, lr=1e-3, weight_decay=1e-4, params={"inference": "softmax"})
    assert result["status"] == "completed"
    assert all(c["train_loss"] is not None for c in result["curves"])
    assert 0.0 <= result["test_accuracy"] <= 1.0


def test_layerwise_run_has_one_phase_per_layer():
    result = run(model="mlp:3x16", params={"schedule": "layerwise"})
    assert [p["name"] for p in result["phases"]] == ["layer1", "layer2", "layer3"]
    assert result["status"] == "completed"


@pytest.mark.parametrize("inference", ["goodness", "softmax"])
def test_flops_count_positive_and_negative_rows(inference):
    """Every FF step runs the 2B stacked pos+neg rows forward and backward (weight grads only)."""
    widths, b, c, d = [32, 24], 100, 10, 784
    result = run(model="mlp:32,24", batch_size=b, params={"inference": inference})
    macs = d * widths[0] + widths[0] * widths[1]  # per row, per forward
    expected = 2 * (2 * b) * macs * 2  # forward + weight gradient, on 2B rows
    per_sample_inference = c * 2 * macs  # one pass per candidate label
    if inference == "softmax":
        expected += 2 * b * macs + 2 * 2 * b * widths[1] * c  # neutral no-grad pass + head fwd/grad
        per_sample_inference = 2 * macs + 2 * widths[1] * c
    assert result["flops_per_step"] == {f"train/{b}": expected}
    assert result["inference_flops_per_sample"] == per_sample_inference


# -- the real thing -----------------------------------------------------------------------------
@pytest.mark.slow
def test_ff_reaches_90_percent_on_mnist5k_next_to_bp():
    """FF and BP train the same mlp:3x1000 on real MNIST digits with the same epoch budget."""
    common = {"dataset": "mnist5k", "model": "mlp:3x1000", "epochs": 15, "device": "cpu", "checkpoint": False}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: on a shared 2-core box two threads thrash (5x slower)
    try:
        ff = Engine(build_config({**common, **FF_MNIST5K})).run()
        bp = Engine(build_config({**common, **BP_MNIST5K})).run()
    finally:
        torch.set_num_threads(threads)
    gap = bp["test_accuracy"] - ff["test_accuracy"]
    print(
        f"\nmnist5k mlp:3x1000 -- FF test {ff['test_accuracy']:.4f} ({ff['epochs_run']} epochs, "
        f"{ff['train_time_s']:.1f} s) | BP test {bp['test_accuracy']:.4f} ({bp['epochs_run']} epochs, "
        f"{bp['train_time_s']:.1f} s) | gap BP-FF {gap * 100:+.2f} pp | per-epoch time FF/BP "
        f"{(ff['train_time_s'] / ff['epochs_run']) / (bp['train_time_s'] / bp['epochs_run']):.2f}"
    )
    assert ff["status"] == bp["status"] == "completed"
    assert ff["test_accuracy"] >= 0.90
    assert bp["test_accuracy"] >= 0.90
    assert ff["epochs_run"] <= 30 and bp["epochs_run"] <= 30


# The FF settings of configs/quick/ff_mnist5k.yaml (15 epochs: the LR cooldown covers epochs 8..15);
# BP gets the same model, epochs, batch size, optimiser and patience, with Adam's usual lr.
FF_MNIST5K = {"algorithm": "ff", "batch_size": 50, "lr": 3e-3, "optimizer": "adam", "patience": 5,
              "params": {"inference": "softmax"}}
BP_MNIST5K = {"algorithm": "bp", "batch_size": 50, "lr": 1e-3, "optimizer": "adam", "patience": 5}
