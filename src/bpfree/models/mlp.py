"""Fully connected ReLU network: blocks of Linear+ReLU, then a Linear head."""

from __future__ import annotations

import torch
import torch.nn as nn

from bpfree.models import register_model


class MLP(nn.Module):
    """x (flattened) -> [Linear -> ReLU] * depth -> Linear head.

    PyTorch's default initialisation (Kaiming-uniform, a=sqrt(5)) unless the run asks for another
    scheme (``init``, applied by bpfree.models.build_model).
    """

    def __init__(self, input_dim: int, widths: list[int], num_classes: int) -> None:
        super().__init__()
        dims = [input_dim, *widths]
        self.widths = list(widths)
        self.input_dim = input_dim
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], num_classes)

    @property
    def block_dims(self) -> list[int]:
        """Width of each block's output."""
        return list(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def parse_mlp(args: str) -> list[int]:
    if not args:
        raise ValueError("missing shape")
    try:
        if "x" in args:
            depth, width = (int(v) for v in args.lower().split("x"))
            widths = [width] * depth
        else:
            widths = [int(v) for v in args.split(",")]
    except ValueError:
        raise ValueError("shape must be DEPTHxWIDTH or W1,W2,...") from None
    if not widths or any(w < 1 or w > 100_000 for w in widths) or len(widths) > 64:
        raise ValueError("depth must be 1..64 and widths 1..100000")
    return widths


register_model(
    "mlp",
    parse_mlp,
    lambda widths, data: MLP(data.input_dim, widths, data.num_classes),
    "mlp:DEPTHxWIDTH (e.g. mlp:2x1000) or mlp:W1,W2,...",
)
