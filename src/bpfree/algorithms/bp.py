"""Backpropagation: the baseline every BP-free method is measured against.

The model's blocks and head are trained end to end with cross-entropy, using exactly the module
objects the BP-free twin trains, so "same architecture" holds by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bpfree.algorithms import register
from bpfree.algorithms.base import Algorithm, make_optimizer


@register
class Backprop(Algorithm):
    name = "bp"
    paper = "Rumelhart, Hinton & Williams 1986"
    model_families = ("*",)  # BP trains any registered architecture end to end

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # A model whose forward runs a procedure of its own (NoProp's chain, an ODE solver) says how
        # backprop trains it; the run's record lists that with BP's deviations.
        self.deviations = (*type(self).deviations, *getattr(self.model, "backprop_notes", ()))
        self.optimizers["model"] = make_optimizer(self.model.parameters(), self.settings)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = F.cross_entropy(self.model(x), y)
        optimizer = self.optimizers["model"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
