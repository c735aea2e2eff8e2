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
