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
