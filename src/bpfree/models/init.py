"""Weight initialisation schemes, chosen per run (``init`` in the run config) and recorded in the result.

``default``: PyTorch's own per-module initialisation (Linear and Conv: Kaiming-uniform with a=sqrt(5),
i.e. U(+-1/sqrt(fan_in)), biases U(+-1/sqrt(fan_in))).

``prior``: the prior study's scheme (BeyondBackpropagation, prior-study.md sections 1.4, 1.5), by layer type:

- every Linear and Conv inside ``model.blocks``: Kaiming-uniform with the ReLU gain, U(+-sqrt(6/fan_in)),
  and zero bias (MF_MLP hidden layers and CaFo_CNN convolutions);
- the BP head ``model.head``: N(0, 0.01) weights (std 0.01) and zero bias (MF_MLP's ``output_layer``);
  a model whose head is part of its algorithm (NoProp's head starting at the class embeddings,
  ``head_init == "embed"``) keeps its own head initialisation;
- BatchNorm: PyTorch defaults (gamma 1, beta 0), as in the prior study;
- Forward-Forward (``algorithm="ff"``): the prior study's FF_MLP (after loeweX) instead draws every
  hidden Linear from N(0, 1/sqrt(out_features)) (std) with zero bias (prior-study.md section 1.3).

The prior study's BP baselines for FF used PyTorch's defaults; under ``prior`` bpfree's BP twin gets
the general scheme above, so the twin's init matches its MF/CaFo counterparts rather than that one.

Auxiliary parts that algorithms attach beside the model (MF projections, CaFo predictors, FF's
classifier) are not covered: they keep each algorithm's own initialisation.
"""

from __future__ import annotations

import torch
import torch.nn as nn

INIT_SCHEMES = ("default", "prior")
PRIOR_HEAD_STD = 0.01


def _kaiming_relu_zero_bias(module: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
    nn.init.kaiming_uniform_(module.weight, a=0.0, mode="fan_in", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def apply_init(model: nn.Module, scheme: str, algorithm: str | None = None) -> nn.Module:
    """Re-initialise ``model`` in place by ``scheme`` for ``algorithm`` (see the module docstring)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    if scheme == "default":
        return model
    with torch.no_grad():
        blocks: nn.Module = model.blocks  # type: ignore[assignment]
        for module in blocks.modules():
            if algorithm == "ff" and isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=1.0 / module.weight.shape[0] ** 0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                _kaiming_relu_zero_bias(module)
        head = getattr(model, "head", None)
        own_head = getattr(getattr(model, "shape", None), "head_init", None) == "embed"
        if isinstance(head, nn.Linear) and not own_head:
            nn.init.normal_(head.weight, mean=0.0, std=PRIOR_HEAD_STD)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
    return model
