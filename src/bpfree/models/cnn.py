"""The 3-block CNN of CaFo (Zhao et al. 2023) and the prior study.

Each block is Conv3x3 (stride 1, pad 1, no bias) -> ReLU -> MaxPool 2x2 -> BatchNorm2d, with
32, 128, 512 channels (32 * 4**i). The conv has no bias because BatchNorm follows. BP's head is
one Linear on the flattened last block.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bpfree.models import register_model

CHANNELS = (32, 128, 512)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.BatchNorm2d(c_out),
    )


class CNN3(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, channels: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        c, h, w = input_shape
        self.input_shape = input_shape
        dims = [c, *channels]
        self.blocks = nn.ModuleList(conv_block(a, b) for a, b in zip(dims[:-1], dims[1:]))
        shapes = []
        for ch in channels:
            h, w = h // 2, w // 2
            shapes.append((ch, h, w))
        self.block_shapes: list[tuple[int, int, int]] = shapes
        self.head = nn.Linear(self.block_dims[-1], num_classes)

    @property
    def block_dims(self) -> list[int]:
        """Flattened size of each block's output."""
        return [c * h * w for c, h, w in self.block_shapes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.blocks:
            h = block(h)
        return self.head(h.flatten(1))


def parse_cnn3(args: str) -> tuple[int, ...]:
    if not args:
        return CHANNELS
    try:
        channels = tuple(int(v) for v in args.split(","))
    except ValueError:
        raise ValueError("channels must be integers, e.g. cnn3:32,128,512") from None
    if len(channels) != 3 or any(c < 1 or c > 4096 for c in channels):
        raise ValueError("exactly 3 channel counts in 1..4096")
    return channels


register_model(
    "cnn3",
    parse_cnn3,
    lambda channels, data: CNN3(data.input_shape, data.num_classes, channels),
    "cnn3 or cnn3:C1,C2,C3",
)
