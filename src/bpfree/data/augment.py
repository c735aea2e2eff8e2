"""Batched augmentation on tensors (no PIL, no per-sample Python)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """RandomCrop(size, padding, reflect) + RandomHorizontalFlip for a whole N×C×H×W batch."""
    n, c, h, w = x.shape
    device = x.device
    padded = F.pad(x, (padding, padding, padding, padding), mode="reflect")
    gen_device = generator.device
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device).to(device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device).to(device)
    flip = torch.rand(n, generator=generator, device=gen_device).to(device) < 0.5
    rows = dy[:, None] + torch.arange(h, device=device)[None, :]  # n×h
    cols = dx[:, None] + torch.arange(w, device=device)[None, :]  # n×w
    # Flipping = reading the columns of the crop in reverse order.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
