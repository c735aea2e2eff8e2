"""Fair-comparison options: initialisation schemes, FLOPs of linear-algebra ops, budgets, statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from bpfree.data import DataSpec
from bpfree.models import build_model


def _spec(shape=(1, 28, 28), classes=10) -> DataSpec:
    return DataSpec("t", shape, classes, n_train=10, n_val=10, n_test=10, augment=False)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.mark.parametrize("spec", ["mlp:3x400", "cnn3"])
def test_prior_init_matches_the_prior_studys_scheme_per_layer(spec):
    torch.manual_seed(0)
    model = build_model(spec, _spec(), init="prior")
    layers = [m for m in model.blocks.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers
    for layer in layers:
        fan_in = layer.weight[0].numel()
        # Kaiming-uniform with the ReLU gain: U(+-sqrt(6/fan_in)), std sqrt(2/fan_in).
        assert _rel(layer.weight.std().item(), math.sqrt(2 / fan_in)) < 0.05, (layer, layer.weight.std())
        assert layer.weight.abs().max().item() <= math.sqrt(6 / fan_in) + 1e-6
        if layer.bias is not None:
            assert torch.count_nonzero(layer.bias) == 0
    # BP head: N(0, 0.01), zero bias.
    assert _rel(model.head.weight.std().item(), 0.01) < 0.1
    assert torch.count_nonzero(model.head.bias) == 0


def test_default_init_is_pytorchs_and_differs_from_prior():
    torch.manual_seed(0)
    model = build_model("mlp:2x500", _spec(), init="default")
    first = model.blocks[0][0]
    # PyTorch default: U(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in); biases non-zero.
    assert _rel(first.weight.std().item(), 1 / math.sqrt(3 * 784)) < 0.05
    assert torch.count_nonzero(first.bias) > 0
    assert _rel(model.head.weight.std().item(), 1 / math.sqrt(3 * 500)) < 0.1


def test_prior_init_keeps_noprops_embedding_head():
    torch.manual_seed(0)
    model = build_model("noprop:2,c4,h16", _spec(), init="prior")
    assert torch.equal(model.head.weight, model.embed.to(model.head.weight.dtype))
    conv = model.blocks[0].conv1
    assert _rel(conv.weight.std().item(), math.sqrt(2 / conv.weight[0].numel())) < 0.25
    assert torch.count_nonzero(conv.bias) == 0


def test_init_field_is_validated_and_enters_the_run_key():
    from bpfree.config import build_config
    from bpfree.errors import ConfigError

    assert build_config({"init": "prior"}).key() != build_config({}).key()
    with pytest.raises(ConfigError, match="init"):
        build_config({"init": "xavier"})


def test_prior_init_for_ff_uses_its_normal_scheme():
    torch.manual_seed(0)
    model = build_model("mlp:2x400", _spec(), init="prior", algorithm="ff")
    for block in model.blocks:
        layer = block[0]
        assert _rel(layer.weight.std().item(), 1 / math.sqrt(400)) < 0.05
        assert torch.count_nonzero(layer.bias) == 0


# -- FLOPs of dense linear algebra ---------------------------------------------------------------
from bpfree.meters.flops import FlopLedger, count_flops, count_flops_detailed, eigh_flops  # noqa: E402


def _spd(n: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    a = torch.randn(*batch, n, n, dtype=torch.float64)
    return a @ a.transpose(-1, -2) + n * torch.eye(n, dtype=torch.float64)


def test_flops_of_an_eigh_equal_the_golub_van_loan_count():
    n = 40
    assert count_flops(lambda: torch.linalg.eigh(_spd(n))) == 9 * n**3 + 2 * n**3  # eigh + the a @ a.T
    a = _spd(n)
    assert count_flops(lambda: torch.linalg.eigh(a)) == eigh_flops(n) == 9 * n**3
    # eigenvalues only (eigvalsh itself asks for vectors while any dispatch mode is active)
    assert count_flops(lambda: torch.ops.aten._linalg_eigh(a, "L", False)) == round(4 * n**3 / 3)
    assert count_flops(lambda: torch.linalg.eigh(_spd(8, (3,)).clone())) >= 3 * 9 * 8**3


def test_flops_of_cholesky_and_solves():
    n, k = 30, 4
    a, b = _spd(n), torch.randn(n, k, dtype=torch.float64)
    low = torch.linalg.cholesky(a)
    assert count_flops(lambda: torch.linalg.cholesky(a)) == round(n**3 / 3)
    assert count_flops(lambda: torch.cholesky_solve(b, low)) == 2 * n * n * k
    assert count_flops(lambda: torch.linalg.solve(a, b)) == round(2 * n**3 / 3) + 2 * n * n * k
    assert count_flops(lambda: torch.linalg.solve_triangular(low, b, upper=False)) == n * n * k
    assert count_flops(lambda: torch.linalg.inv(a)) == 2 * n**3


def test_ops_without_a_formula_are_listed_not_silently_zero():
    a, v = torch.randn(20, 20), torch.randn(20)
    flops, uncounted = count_flops_detailed(lambda: (torch.mv(a, v), torch.linalg.qr(a), (a * 2).relu().sum()))
    assert flops == 0
    assert set(uncounted) == {"aten.mv", "aten.linalg_qr"}, uncounted
    ledger = FlopLedger()
    ledger.run("k", lambda: torch.mv(a, v))
    ledger.run("k", lambda: torch.mv(a, v))  # repeated kinds are not re-instrumented
    assert ledger.uncounted_ops == {"aten.mv": 1}
    _, none = count_flops_detailed(lambda: torch.linalg.eigh(a @ a.T))
    assert none == {}


# -- budgets in passes over the data ---------------------------------------------------------------
from bpfree.config import build_config  # noqa: E402
from bpfree.protocol.budget import total_epochs, twin_epochs  # noqa: E402


def test_total_epochs_sum_every_phase():
    cafo = {"algorithm": "cafo", "model": "cnn3", "epochs": 4, "params": {"variant": "dfa", "dfa_epochs": 5}}
    assert total_epochs(cafo) == 5 + 3 * 4
    assert total_epochs({"algorithm": "mf", "model": "mlp:3x8", "epochs": 7, "params": {"schedule": "layerwise"}}) == 21
    assert total_epochs({"algorithm": "mf", "model": "mlp:3x8", "epochs": 7}) == 7
    assert total_epochs({"algorithm": "bp", "model": "mlp:3x8", "epochs": 7}) == 7
    assert twin_epochs(cafo, "passes") == 17 and twin_epochs(cafo, "epochs") == 4


def test_compare_gives_the_bp_twin_the_alternatives_passes(tmp_path):
    import yaml

    from bpfree.protocol.compare import build_set

    alt = {"algorithm": "mf", "dataset": "mnist5k", "model": "mlp:2x8", "epochs": 3, "params": {"schedule": "layerwise"}}
    (tmp_path / "mf.yaml").write_text(yaml.safe_dump(alt))
    [twin] = build_set([tmp_path]).baselines
    assert twin.values["algorithm"] == "bp" and twin.values["epochs"] == 6
    [same] = build_set([tmp_path], budget="epochs").baselines
    assert same.values["epochs"] == 3


# -- report statistics -----------------------------------------------------------------------------
from bpfree.report.aggregate import holm, paired_effect_size, summarize  # noqa: E402


def _record(algorithm: str, seed: int, acc: float, run_id: str, model: str = "mlp:1x8") -> dict:
    config = build_config({"algorithm": algorithm, "model": model, "seed": seed}).resolved()
    return {"run_id": run_id, "algorithm": algorithm, "dataset": "mnist5k", "model": model, "seed": seed,
            "status": "completed", "test_accuracy": acc, "train_time_s": 1.0 + seed, "config": config}


def test_holm_adjustment_matches_the_step_down_rule():
    # m = 3: 3 x 0.01, then max(0.03, 2 x 0.03), then max(0.06, 1 x 0.04)
    assert holm([0.01, 0.04, None, 0.03]) == [pytest.approx(0.03), pytest.approx(0.06), None, pytest.approx(0.06)]
    assert holm([0.5, 0.9]) == [pytest.approx(1.0), pytest.approx(1.0)]


def test_paired_effect_size_is_cohens_dz():
    diffs = [1.0, 2.0, 3.0]
    d, low, high = paired_effect_size(diffs)
    assert d == pytest.approx(2.0 / 1.0)
    assert low < d < high
    assert paired_effect_size([1.0]) == (None, None, None)


def test_duplicate_seeds_are_counted_once_and_flagged():
    runs = [_record("bp", s, 0.90 + 0.01 * s, f"bp{s}") for s in (0, 1, 2)]
    runs += [_record("mf", 0, 0.80, "mf0a"), _record("mf", 0, 0.80, "mf0b"), _record("mf", 1, 0.82, "mf1")]
    summary = summarize(runs)
    mf = next(g for g in summary.groups if g.algorithm == "mf")
    assert mf.duplicate_seeds == [0]
    assert len(mf.completed) == 2 and mf.stat("test_accuracy").n == 2
    delta = summary.deltas[mf.key]
    assert delta.paired_n == 2
    from bpfree.report.render import runs_cell

    assert "DUPLICATE SEEDS 0" in runs_cell(mf)


def test_bootstrap_ci_and_holm_in_the_summary():
    runs = [_record("bp", s, 0.90 + 0.01 * s, f"bp{s}") for s in range(4)]
    runs += [_record("mf", s, 0.85 + 0.02 * s + 0.003 * (s % 2), f"mf{s}") for s in range(4)]
    runs += [_record("ff", s, 0.80 + 0.005 * s * s, f"ff{s}") for s in range(4)]
    t = summarize(runs)
    boot = summarize(runs, ci="bootstrap")
    for key, delta in t.deltas.items():
        other = boot.deltas[key]
        assert other.ci_method == "bootstrap" and delta.ci_method == "t"
        assert other.paired_low_pp <= other.paired_mean_pp <= other.paired_high_pp
        assert delta.holm_p_value >= delta.p_value
    ps = sorted(d.p_value for d in t.deltas.values())
    assert sorted(d.holm_p_value for d in t.deltas.values())[0] == pytest.approx(min(1.0, 2 * ps[0]))


# -- timing you can trust --------------------------------------------------------------------------
def test_cpu_clock_flags_a_process_that_waited_for_its_cores(one_thread):
    import time

    from bpfree.meters.cpu import CpuClock, CpuReading
    from bpfree.record import training_cpu_share
    from bpfree.report.render import run_note

    clock = CpuClock(threads=1)
    clock.begin()
    time.sleep(0.2)  # wall time passes, no CPU time is used: as if the cores were taken
    idle = clock.end()
    assert idle.cpu_share < 0.5 and idle.contended
    busy = CpuReading(wall_s=1.0, cpu_s=0.95, threads=1, load_average=1.0)
    assert not busy.contended
    record = training_cpu_share(idle.wall_s, idle.cpu_s, 1, "cpu")
    assert record["contended"] and record["cpu_share"] < 0.5
    assert "CONTENDED" in run_note(record)
    assert not training_cpu_share(idle.wall_s, idle.cpu_s, 1, "cuda")["contended"]  # GPU runs wait on the device


def test_flush_denormal_switch_flushes_subnormals():
    from bpfree.meters.cpu import apply_flush_denormal

    try:
        if not apply_flush_denormal(True):
            pytest.skip("this CPU cannot flush subnormals")
        assert torch.tensor([1e-40], dtype=torch.float32).item() == 0.0
        assert apply_flush_denormal(False) is False
        assert torch.tensor([1e-40], dtype=torch.float32).item() != 0.0
    finally:
        torch.set_flush_denormal(False)


def test_a_run_records_init_flushing_cpu_time_and_uncounted_ops(one_thread):
    from bpfree.engine import Engine

    cfg = build_config({"algorithm": "bp", "dataset": "mnist5k", "model": "mlp:1x16", "epochs": 1, "init": "prior",
                        "checkpoint": False, "device": "cpu"})
    engine = Engine(cfg)
    head = engine.model.head.weight
    assert _rel(head.std().item(), 0.01) < 0.3  # built with the prior study's init
    r = engine.run()
    assert r["config"]["init"] == "prior" and r["config"]["flush_denormal"] is True
    assert isinstance(r["flush_denormal"], bool)
    from bpfree.meters.cpu import subnormals_flushed

    assert not subnormals_flushed()  # the run's setting does not outlive the run (process-wide state)
    assert r["uncounted_ops"] == {}  # BP on an MLP: every heavy op has a formula
    assert r["train_cpu_time_s"] > 0 and r["cpu_share"] is not None and isinstance(r["contended"], bool)
    row = r["curves"][0]
    assert row["epoch_cpu_time_s"] > 0 and "load_average" in row


# -- stopping rules --------------------------------------------------------------------------------
def _scripted_engine(monkeypatch, values, **fields):
    """An engine whose validation returns scripted (accuracy, loss) pairs, one per epoch."""
    import bpfree.engine as engine_module
    from bpfree.loop import EvalOutcome

    script = iter(values)

    def fake_evaluate(algorithm, x, y, batch_size, **kwargs):
        if kwargs.get("kind") == "test":
            return EvalOutcome(0.5, 1.0, 0.0, 0.0, None, None)
        accuracy, loss = next(script)
        return EvalOutcome(accuracy, loss, 0.0, 0.0, None, None)

    monkeypatch.setattr(engine_module, "evaluate", fake_evaluate)
    cfg = build_config({"algorithm": "bp", "dataset": "mnist5k", "model": "mlp:1x4", "epochs": 10, "checkpoint": False,
                        "device": "cpu", "batch_size": 1000, **fields})
    return engine_module.Engine(cfg)


SCRIPT = [(0.50, 1.00), (0.60, 0.90), (0.70, 0.8999), (0.65, 0.95), (0.66, 0.97), (0.9, 0.1)]


def test_stopping_on_val_loss_with_min_delta_stops_at_the_right_epoch(monkeypatch, one_thread):
    # 0.8999 is not an improvement over 0.90 by more than min_delta 0.01: stale from epoch 3, stop after epoch 4
    r = _scripted_engine(monkeypatch, SCRIPT, monitor="val_loss", min_delta=0.01, patience=2, restore="last").run()
    [phase] = r["phases"]
    assert r["epochs_run"] == 4 and phase["epochs"] == 4
    assert phase["monitored_best_epoch"] == 2 and phase["monitored_best"] == pytest.approx(0.90)
    assert phase["restored_epoch"] == 4 and phase["final_val_accuracy"] == pytest.approx(0.65)  # last epoch kept
    assert phase["best_epoch"] == 3 and phase["best_val_accuracy"] == pytest.approx(0.70)
    assert r["stopping_rule"] == {"monitor": "val_loss", "restore": "last", "min_delta": 0.01, "patience": 2}
    assert [row["val_loss"] for row in r["curves"]] == pytest.approx([1.0, 0.9, 0.8999, 0.95])


def test_restore_best_and_best_accuracy_pick_their_epochs(monkeypatch, one_thread):
    r = _scripted_engine(monkeypatch, SCRIPT, monitor="val_loss", patience=2, restore="best").run()
    [phase] = r["phases"]
    assert r["epochs_run"] == 5  # min_delta 0: 0.8999 improves; stale at epochs 4, 5
    assert phase["restored_epoch"] == 3 and phase["final_val_accuracy"] == pytest.approx(0.70)
    r = _scripted_engine(monkeypatch, SCRIPT, monitor="val_accuracy", min_delta=0.06, patience=2, restore="best_accuracy").run()
    [phase] = r["phases"]
    # 0.60 > 0.50 + 0.06 and 0.70 > 0.60 + 0.06 improve; 0.65, 0.66 are stale
    assert r["epochs_run"] == 5 and phase["restored_epoch"] == 3


def test_default_rule_is_bpfrees(monkeypatch, one_thread):
    r = _scripted_engine(monkeypatch, SCRIPT, patience=2).run()
    assert r["stopping_rule"]["monitor"] == "val_accuracy" and r["stopping_rule"]["restore"] == "best"
    assert r["epochs_run"] == 5 and r["phases"][0]["restored_epoch"] == 3


# -- one read-out rule for NoProp and its BP twin --------------------------------------------------
def test_noprop_and_its_twin_read_out_by_the_same_rule():
    from bpfree.algorithms.base import TrainSettings
    from bpfree.algorithms.noprop import NoProp

    torch.manual_seed(0)
    spec = _spec((1, 12, 12), 5)
    model = build_model("noprop:3,c2,h8", spec)
    alg = NoProp(model, spec, TrainSettings(1, 8, 1e-3, 0.0, "adam"), NoProp.Params(), torch.Generator().manual_seed(1))
    x = torch.randn(6, 1, 12, 12)
    alg.eval_mode()
    for rule in ("mean", "sampled"):
        model.readout = rule
        with torch.no_grad():
            twin_scores = model(x)  # what BP's predict computes in eval mode
        assert torch.equal(alg.predict(x), twin_scores), rule
    model.readout = "mean"
    mean = alg.predict(x)
    model.readout = "sampled"
    assert not torch.allclose(mean, alg.predict(x))


def test_a_noprop_run_records_both_readouts_and_the_config_rule(one_thread):
    from bpfree.engine import Engine

    common = {"dataset": "mnist5k", "model": "noprop:2,c2,h8", "epochs": 1, "checkpoint": False, "device": "cpu",
              "batch_size": 500, "readout": "sampled"}
    r = Engine(build_config({"algorithm": "noprop", **common})).run()
    assert set(r["test_accuracy_by_readout"]) == {"mean", "sampled"}
    assert r["test_accuracy_by_readout"]["sampled"] == r["test_accuracy"] and r["config"]["readout"] == "sampled"
    twin = build_config({"algorithm": "bp", **common})
    from bpfree.protocol.compare import derive_twin

    assert derive_twin({"algorithm": "noprop", **common}, {})["readout"] == "sampled"  # the twin copies the rule
    assert twin.readout == "sampled"


# -- the prior study's smaller settings as options -----------------------------------------------
def test_ff_prior_overlay_writes_one_and_zero():
    from bpfree.algorithms.base import TrainSettings
    from bpfree.algorithms.ff import ForwardForward

    spec = _spec((1, 28, 28), 10)
    settings = TrainSettings(1, 8, 1e-3, 0.0, "adam")
    x = torch.randn(4, 784) * 2 + 0.5
    for overlay, on, off in (("prior", 1.0, 0.0), ("sample_range", x.max(1).values, x.min(1).values)):
        torch.manual_seed(0)
        ff = ForwardForward(build_model("mlp:2x16", spec), spec, settings, ForwardForward.Params(overlay=overlay),
                            torch.Generator().manual_seed(0))
        low, span = ff._label_levels(x)
        assert torch.allclose(low.squeeze(1), torch.as_tensor(off, dtype=x.dtype).expand(4))
        assert torch.allclose((low + span).squeeze(1), torch.as_tensor(on, dtype=x.dtype).expand(4))


def test_drop_last_drops_the_partial_batch():
    from bpfree.data import DataSpec, Splits, num_batches, train_batches

    x, y = torch.randn(10, 1, 2, 2), torch.arange(10)
    splits = Splits(DataSpec("t", (1, 2, 2), 10, 10, 0, 0, False), x, y, x[:0], y[:0], x[:0], y[:0])
    kept = [b.shape[0] for b, _ in train_batches(splits, 4, torch.Generator().manual_seed(0))]
    dropped = [b.shape[0] for b, _ in train_batches(splits, 4, torch.Generator().manual_seed(0), drop_last=True)]
    assert kept == [4, 4, 2] and dropped == [4, 4]
    assert num_batches(10, 4) == 3 and num_batches(10, 4, drop_last=True) == 2 and num_batches(3, 4, drop_last=True) == 1


@pytest.mark.parametrize("updates", [1, 2])
def test_dfa_bn_updates_count_of_the_prior_study(updates, one_thread):
    from bpfree.algorithms.base import TrainSettings
    from bpfree.algorithms.cafo import CaFoParams, CascadedForward
    from bpfree.models.cnn import CNN3

    torch.manual_seed(0)
    spec = _spec((1, 8, 8), 3)
    model = CNN3((1, 8, 8), 3, (2, 4, 8))
    algo = CascadedForward(model, spec, TrainSettings(1, 16, 0.1, 0.0, "sgd"),
                           CaFoParams(variant="dfa", dfa_last_block="bp", dfa_bn_updates=updates), torch.Generator().manual_seed(1))
    algo.begin_phase(next(p for p in algo.schedule() if p.name == "dfa"))
    algo.train_mode()
    algo.train_step(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    tracked = [int(block[3].num_batches_tracked) for block in model.blocks]
    assert tracked == [updates, updates, 1]  # the BP-trained last block is run once, as the prior study


# -- layer-wise read-outs --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "algorithm,model,params,names",
    [
        ("mf", "mlp:2x16", {}, ["layer1", "layer2"]),
        ("ff", "mlp:2x16", {"inference": "goodness"}, ["layer1", "layer2"]),
        ("cafo", "cnn3:2,4,8", {"variant": "rand"}, ["predictor1", "predictor2", "predictor3"]),
        ("noprop", "noprop:2,c2,h8", {}, ["block1", "block2"]),
    ],
)
def test_layer_local_algorithms_record_accuracy_per_layer(algorithm, model, params, names, one_thread):
    from bpfree.engine import Engine

    cfg = build_config({"algorithm": algorithm, "dataset": "mnist5k", "model": model, "epochs": 1, "batch_size": 500,
                        "checkpoint": False, "device": "cpu", "params": params})
    r = Engine(cfg).run()
    layers = r["layer_accuracy"]
    assert list(layers) == names
    for scores in layers.values():
        assert 0.0 <= scores["val"] <= 1.0 and 0.0 <= scores["test"] <= 1.0
    if algorithm == "mf":  # MF predicts from the last layer's projection: its read-out is the headline
        assert layers["layer2"]["test"] == pytest.approx(r["test_accuracy"])


def test_bp_has_no_layer_readouts_and_the_report_plots_layers(tmp_path, one_thread):
    from bpfree.report.plots import layer_accuracy_plot

    record = _record("mf", 0, 0.9, "mf0")
    record["layer_accuracy"] = {"layer1": {"val": 0.8, "test": 0.79}, "layer2": {"val": 0.9, "test": 0.9}}
    plot = layer_accuracy_plot(summarize([record, _record("bp", 0, 0.9, "bp0")]))
    assert plot.png().startswith(b"\x89PNG") and "layer" in plot.caption
