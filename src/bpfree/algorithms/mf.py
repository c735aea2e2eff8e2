"""Mono-Forward (Gong, Li & Abdulla 2025, arXiv 2501.09238).

Each hidden layer i has a projection matrix M_i (C x n_i). Its goodness scores G_i = a_i M_i^T are
trained with a local cross-entropy; the layer input a_{i-1} is detached, so the gradient of W_i is a
one-layer "mini-backprop" through M_i and the ReLU and nothing crosses layers. Prediction is
argmax G_L of the last layer ("BP-style"), or argmax of sum_i G_i as an option.

Schedules (``params.schedule``):
- ``simultaneous`` (default): one forward pass per batch updates every layer from its own loss.
- ``layerwise``: greedy stages, layer 1 to convergence, then layer 2, ... (as the prior study);
  earlier layers are frozen and recomputed without gradients; each stage has a fresh optimiser.

Deviations (declared):
- Stages stop early on the validation accuracy of the stage's own read-out and restore their best
  weights; the prior study stopped on local validation CE and kept the last epoch.
- No M_0 stage on raw pixels: it never affects prediction (prior-study report, B4).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from bpfree.algorithms import register
from bpfree.algorithms.base import Algorithm, Phase, SearchDim, make_optimizer


class MonoForwardParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: Literal["simultaneous", "layerwise"] = "simultaneous"
    prediction: Literal["last", "sum"] = "last"


@register
class MonoForward(Algorithm):
    name = "mf"
    uses_model_head = False
    paper = "Gong, Li & Abdulla 2025, Mono-Forward (arXiv 2501.09238)"
    deviations = (
        "stages stop early on validation accuracy and restore their best weights (prior study: local val CE, last epoch)",
        "no M_0 stage on raw pixels (it never affects prediction)",
    )
    Params = MonoForwardParams
    model_families = ("mlp",)
    search_space = (
        SearchDim("lr", "log", 1e-5, 1e-2),
        SearchDim("weight_decay", "log", 1e-7, 1e-3),
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        classes = self.spec.num_classes
        projections = nn.ModuleList(nn.Linear(n, classes, bias=False) for n in self.model.block_dims)
        self.aux["projections"] = projections.to(self.device)  # before the optimiser is built over them
        if self.params.schedule == "simultaneous":
            self.optimizers["all"] = make_optimizer(self._layer_parameters(range(len(self.model.blocks))), self.settings)
        self._layer = len(self.model.blocks) - 1

    def _layer_parameters(self, layers) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for i in layers:
            params += list(self.model.blocks[i].parameters()) + list(self.aux["projections"][i].parameters())
        return params

    def phases(self) -> list[Phase]:
        if self.params.schedule == "simultaneous":
            return [Phase("train", self.settings.epochs)]
        return [Phase(f"layer{i + 1}", self.settings.epochs) for i in range(len(self.model.blocks))]

    def begin_phase(self, phase: Phase) -> None:
        super().begin_phase(phase)
        if self.params.schedule == "layerwise":
            self._layer = int(phase.name.removeprefix("layer")) - 1
            self.optimizers = {phase.name: make_optimizer(self._layer_parameters([self._layer]), self.settings)}

    def end_training(self) -> None:
        super().end_training()
        self._layer = len(self.model.blocks) - 1

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks, projections = self.model.blocks, self.aux["projections"]
        h = x.flatten(1)
        if self.params.schedule == "layerwise":
            with torch.no_grad():  # frozen earlier layers: recomputed, never differentiated
                for block in blocks[: self._layer]:
                    h = block(h)
            losses = [F.cross_entropy(projections[self._layer](blocks[self._layer](h)), y)]
        else:
            losses = []
            for block, projection in zip(blocks, projections):
                a = block(h.detach())  # detached input: no gradient crosses layers
                losses.append(F.cross_entropy(projection(a), y))
                h = a
        loss = torch.stack(losses).sum()
        optimizer = next(iter(self.optimizers.values()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": losses[-1].detach(), "local_loss_sum": loss.detach()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        blocks, projections = self.model.blocks, self.aux["projections"]
        h = x.flatten(1)
        total = None
        for i in range(self._layer + 1):
            h = blocks[i](h)
            if self.phase is None and self.params.prediction == "sum":
                g = projections[i](h)
                total = g if total is None else total + g
        return total if total is not None else projections[self._layer](h)

    def layer_scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """G_i = a_i M_i^T of every layer's projection (each layer's own read-out)."""
        h, scores = x.flatten(1), {}
        for i, (block, projection) in enumerate(zip(self.model.blocks, self.aux["projections"])):
            h = block(h)
            scores[f"layer{i + 1}"] = projection(h)
        return scores

    def extra_state(self) -> dict:
        return {"layer": self._layer}

    def load_extra_state(self, state: dict) -> None:
        self._layer = state.get("layer", self._layer)
