"""Forward-Forward (Hinton 2022, arXiv 2212.13345), supervised, on the shared MLP.

Every hidden layer l of the model's ``blocks`` (Linear + ReLU) is trained by its own logistic loss
on its *goodness* G_l = sum_j h_j^2 of the post-ReLU activity h, with threshold theta_l (default:
the layer width, which matches the RMS normalisation below):

    L_l = mean over the 2B stacked rows of  softplus(-(G+ - theta))  (positives)
                                         or softplus(  G- - theta )  (negatives),

i.e. BCE-with-logits on G - theta. The model's ``head`` is never used; FF's extras live in ``aux``.

Data. The first C entries of the flattened (dataset-standardised) image are overwritten by a one-hot
label. The "off" value is the sample's own darkest value and the "on" value its brightest. Why:
standardisation is affine, so for an MNIST digit (raw minimum 0, maximum 1) the overlay is loeweX's
0/1 in raw pixels, and pezeshki's "max value" on-level; it needs no knowledge of the
dataset's mean/std; and the label is as salient as a stroke pixel, whereas 0/1 in standardised
units would make "off" brighter than the background. The neutral label (softmax-head inference)
puts off + (on - off)/C in all C entries, loeweX's 1/C. A positive is the image with its true
label, a negative the same image with a wrong label drawn uniformly from the C - 1 others as
(y + U{1..C-1}) mod C (never the true label, no retries, no sync). Positives and negatives are
stacked into one 2B batch. The overlaid input and every layer's activity are RMS-normalised,
z / (sqrt(mean z^2) + 1e-8), before they feed the next layer, and the next layer receives a
*detached* copy, so no gradient crosses layers.

Schedules (``params.schedule``):
- ``simultaneous`` (default, Hinton / loeweX): every layer learns on every batch; one summed loss.
- ``layerwise``: one phase per layer, earlier layers frozen and recomputed without gradients; each
  phase has a fresh optimiser.

Inference (``params.inference``):
- ``goodness``: overlay every candidate label (one batched pass of C*B rows) and accumulate the
  goodness of layers 2..L (layer 1 sees the label pixels directly; a one-layer net uses layer 1);
  scores are B x C.
- ``softmax``: one pass with the neutral label; a bias-free, zero-initialised linear classifier on
  the concatenated normalised activities of layers 2..L, trained jointly with CE on the *detached*
  activities of neutral-label inputs (never labelled inputs, so no label leaks), with its own lr and
  weight decay in a second parameter group. It is trained only when it is the inference rule (or
  ``train_head`` says so).

In a layer-wise phase k, ``predict`` uses layers 1..k only: goodness of layers 2..k (layer 1 when
k = 1); the softmax head reads layers 2..k (a slice of its weight; the rest stays zero), and phase 1,
having no layer 2, is validated by layer 1's goodness and does not train the head.

Peer normalisation (loeweX): a running mean r (momentum 0.9, initial 0.5) of each unit's mean
activity on positives; the penalty mean_j (mean_k r_k - r_j)^2, weight 0.03, gets its gradient
through the current batch's mean. Linear LR cooldown (loeweX): lr for 1-based epoch e of the
phase's E configured epochs is lr0 while e <= E/2, then lr0 * 2 (1 + E - e) / E (a run that stops
early may never reach it); the epoch comes from the engine's epoch clock (``begin_epoch``).

Defaults follow loeweX (the reference's suggested FF defaults): simultaneous schedule, theta = width,
peer normalisation, full-grad ReLU, cooldown, and the softmax head for inference, which is one
pass instead of C and was at least as accurate in our mnist5k runs (goodness: params.inference).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bpfree.algorithms import register
from bpfree.algorithms.base import Algorithm, EpochClock, Phase, SearchDim, make_optimizer, set_lr

EPS = 1e-8


class ForwardForwardParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: Literal["simultaneous", "layerwise"] = "simultaneous"
    inference: Literal["goodness", "softmax"] = "softmax"
    threshold: float | None = Field(None, gt=0, description="goodness threshold; null = the layer's width")
    peer_norm_weight: float = Field(0.03, ge=0, description="peer-normalisation penalty weight; 0 disables")
    peer_norm_momentum: float = Field(0.9, ge=0, lt=1)
    full_grad_relu: bool = Field(True, description="straight-through ReLU: identity in the backward pass (loeweX)")
    lr_cooldown: bool = Field(True, description="linear LR cooldown over the second half of the epochs")
    goodness_first_layer: bool = Field(False, description="goodness inference also sums layer 1 (pezeshki)")
    head_lr: float = Field(1e-2, gt=0, le=10, description="softmax head learning rate")
    head_weight_decay: float = Field(3e-3, ge=0, le=1, description="softmax head weight decay")
    train_head: bool | None = Field(None, description="train the softmax head; null = only when inference is softmax")
    overlay: Literal["sample_range", "prior"] = Field(
        "sample_range",
        description="label pixel values: each sample's own min (off) and max (on), or the prior study's 0.0 / 1.0 "
        "(written into the standardised image)",
    )

    @model_validator(mode="after")
    def _head_for_softmax(self) -> ForwardForwardParams:
        if self.inference == "softmax" and self.train_head is False:
            raise ValueError("inference 'softmax' needs the head trained (train_head true or null)")
        return self


class _FullGradReLU(torch.autograd.Function):
    """ReLU forward, identity backward (loeweX's ``ReLU_full_grad``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


class _RunningMeans(nn.Module):
    """Per-layer running mean of each unit's activity on positives (peer normalisation)."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        for i, width in enumerate(widths):
            self.register_buffer(f"layer{i}", torch.full((width,), 0.5))

    def get(self, i: int) -> torch.Tensor:
        return getattr(self, f"layer{i}")


def _rms_normalise(z: torch.Tensor) -> torch.Tensor:
    rms = torch.linalg.vector_norm(z, dim=1, keepdim=True) * (1.0 / math.sqrt(z.shape[1]))
    return z / (rms + EPS)


@register
class ForwardForward(Algorithm):
    name = "ff"
    uses_model_head = False
    paper = "Hinton 2022, The Forward-Forward Algorithm (arXiv 2212.13345)"
    deviations = (
        "the shared model's init by the run's `init`: default = PyTorch Kaiming-uniform; `init: prior` = loeweX's and "
        "the prior study's N(0, 1/sqrt(out)) weights, zero biases",
        "label overlay (params.overlay): sample_range (default) writes each sample's own min (off) / max (on) into the "
        "C label pixels of the standardised image; loeweX writes 0/1 into raw [0, 1] pixels, the prior study 0/1 into "
        "standardised ones (overlay: prior); the neutral label is off + (on - off)/C either way",
        "straight-through 'full-grad' ReLU in the backward pass, as loeweX (params.full_grad_relu=false: plain ReLU)",
        "peer normalisation, weight 0.03, momentum 0.9, as loeweX (params.peer_norm_weight=0 disables)",
        "each layer's loss is the mean over the 2B stacked rows (loeweX's BCE): half of E_pos + E_neg, an LR scale",
        "phases stop by the run's stopping rule (monitor, min_delta, restore; default: validation accuracy of the "
        "phase's inference rule, best weights restored; the prior study: accuracy, min_delta 0.01 pp, best restored)",
        "layerwise + softmax: phase k's head reads layers 2..k; phase 1 is validated by layer-1 goodness",
        "RMS normalisation acts on the dataset-standardised image (loeweX: raw [0, 1] pixels)",
    )
    Params = ForwardForwardParams
    model_families = ("mlp",)
    search_space = (
        SearchDim("lr", "log", 2e-4, 5e-3),
        SearchDim("weight_decay", "log", 1e-4, 1e-3),
        SearchDim("params.head_lr", "log", 2e-3, 5e-2),
        SearchDim("params.head_weight_decay", "log", 1e-3, 1e-2),
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p = self.params
        blocks = self.model.blocks
        self._linears: list[nn.Linear] = [block[0] for block in blocks]
        if not all(isinstance(lin, nn.Linear) for lin in self._linears):
            raise TypeError("ff trains MLP blocks of Linear + ReLU")
        self._widths = [lin.out_features for lin in self._linears]
        self._depth = len(self._widths)
        self._classes = self.spec.num_classes
        if self._linears[0].in_features < self._classes:
            raise ValueError("ff overlays the label on the first C inputs; the input is smaller than C")
        self._thresholds = [float(w) if p.threshold is None else float(p.threshold) for w in self._widths]
        device = self._linears[0].weight.device
        self._arange = torch.arange(self._classes, device=device)
        if p.peer_norm_weight > 0:
            self.aux["peer"] = _RunningMeans(self._widths).to(device)
        self._train_head = p.inference == "softmax" if p.train_head is None else p.train_head
        if self._train_head:
            features = sum(self._widths[1:]) if self._depth > 1 else self._widths[0]
            head = nn.Linear(features, self._classes, bias=False).to(device)
            nn.init.zeros_(head.weight)
            self.aux["head"] = head
        self._layer = self._depth - 1  # the last layer trained (layer-wise phase), 0-based
        if p.schedule == "simultaneous":
            self.optimizers["ff"] = self._make_optimizer(range(self._depth), head=self._train_head)

    # -- schedule -------------------------------------------------------------------------------
    def _make_optimizer(self, layers, head: bool) -> torch.optim.Optimizer:
        params = [q for i in layers for q in self._linears[i].parameters()]
        groups: list[dict] = [{"params": params}]
        if head:
            head_params = list(self.aux["head"].parameters())
            head_wd = self.params.head_weight_decay
            groups.append({"params": head_params, "lr": self.params.head_lr, "weight_decay": head_wd})
        return make_optimizer(groups, self.settings)

    def phases(self) -> list[Phase]:
        if self.params.schedule == "simultaneous":
            return [Phase("train", self.settings.epochs)]
        return [Phase(f"layer{i + 1}", self.settings.epochs) for i in range(self._depth)]

    def begin_phase(self, phase: Phase) -> None:
        super().begin_phase(phase)
        if self.params.schedule == "layerwise":
            self._layer = int(phase.name.removeprefix("layer")) - 1
            head = self._train_head and self._head_reads(self._layer)
            self.optimizers = {phase.name: self._make_optimizer([self._layer], head=head)}

    def begin_epoch(self, clock: EpochClock) -> None:
        if self.params.lr_cooldown:  # linear cooldown over the second half of the phase's epochs
            e, total = clock.epoch + 1, clock.phase.epochs
            factor = 1.0 if e <= total / 2 else max(0.0, 2.0 * (1 + total - e) / total)
            for optimizer in self.optimizers.values():
                set_lr(optimizer, factor)

    def end_training(self) -> None:
        super().end_training()
        self._layer = self._depth - 1

    # -- inputs ---------------------------------------------------------------------------------
    def _label_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Off and on - off values for the label pixels, shape B x 1 (per sample, or the prior study's 0 and 1)."""
        if self.params.overlay == "prior":
            zero = x.new_zeros(x.shape[0], 1)
            return zero, zero + 1.0
        low, high = torch.aminmax(x, dim=1, keepdim=True)
        return low, high - low

    def _overlay(self, x: torch.Tensor, labels: torch.Tensor, copies: int) -> torch.Tensor:
        """``copies`` stacked copies of flattened x (copies*B x D), label ``labels`` (copies*B) overlaid, normalised."""
        c = self._classes
        low, span = self._label_levels(x)
        z = x.repeat(copies, 1)
        on = (labels.unsqueeze(1) == self._arange).to(x.dtype)  # copies*B x C
        z[:, :c] = low.repeat(copies, 1) + span.repeat(copies, 1) * on
        return _rms_normalise(z)

    def _neutral(self, x: torch.Tensor) -> torch.Tensor:
        low, span = self._label_levels(x)
        z = x.clone()
        z[:, : self._classes] = low + span * (1.0 / self._classes)
        return _rms_normalise(z)

    def _negative_labels(self, y: torch.Tensor) -> torch.Tensor:
        offset = torch.randint(1, self._classes, y.shape, generator=self.generator, device=y.device)
        return (y + offset) % self._classes

    def _relu(self, pre: torch.Tensor) -> torch.Tensor:
        return _FullGradReLU.apply(pre) if self.params.full_grad_relu else F.relu(pre)

    def _head_reads(self, top: int) -> bool:
        """Whether a net of layers 0..top has features for the head (layers 2.., or layer 1 alone)."""
        return self._depth == 1 or top >= 1

    def _readout_layers(self, top: int) -> list[int]:
        """0-based layers whose output the inference rule reads, for a network of layers 0..top."""
        if top == 0 or self.params.goodness_first_layer:
            return list(range(top + 1))
        return list(range(1, top + 1))

    # -- learning -------------------------------------------------------------------------------
    def _layer_loss(self, i: int, h: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        goodness = h.square().sum(dim=1)
        theta = self._thresholds[i]
        ff = (F.softplus(theta - goodness[:batch]).sum() + F.softplus(goodness[batch:] - theta).sum()) / (2 * batch)
        if "peer" not in self.aux:
            return ff, None
        running = self.aux["peer"].get(i)
        m = self.params.peer_norm_momentum
        updated = running * m + h[:batch].mean(dim=0) * (1.0 - m)
        peer = (updated.mean() - updated).square().mean()
        with torch.no_grad():
            running.copy_(updated)
        return ff, peer

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.flatten(1)
        batch = x.shape[0]
        labels = torch.cat([y, self._negative_labels(y)])
        z = self._overlay(x, labels, 2)  # positives first, then negatives
        layers = range(self._depth) if self.params.schedule == "simultaneous" else [self._layer]
        first = layers[0]
        if first > 0:
            with torch.no_grad():  # frozen earlier layers: recomputed, never differentiated
                for i in range(first):
                    z = _rms_normalise(F.relu(self._linears[i](z)))
        ff_losses, peer_losses = [], []
        for i in layers:
            h = self._relu(self._linears[i](z))
            ff, peer = self._layer_loss(i, h, batch)
            ff_losses.append(ff)
            if peer is not None:
                peer_losses.append(peer)
            if i < layers[-1]:
                z = _rms_normalise(h.detach())  # the next layer's input: normalised, detached
        ff_loss = torch.stack(ff_losses).sum()
        loss = ff_loss
        out: dict[str, torch.Tensor] = {"ff_loss": ff_loss.detach()}
        if peer_losses:
            peer_loss = torch.stack(peer_losses).sum()
            loss = loss + self.params.peer_norm_weight * peer_loss
            out["peer_loss"] = peer_loss.detach()
        if self._train_head and self._head_reads(layers[-1]):
            head_loss = F.cross_entropy(self._head_logits(x, layers[-1]), y)
            loss = loss + head_loss  # the head's parameters are disjoint from the layers'
            out["head_loss"] = head_loss.detach()

        optimizer = next(iter(self.optimizers.values()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        out["loss"] = loss.detach()
        return out

    # -- inference ------------------------------------------------------------------------------
    def head_features(self, x: torch.Tensor, top: int) -> torch.Tensor:
        """The softmax head's input: normalised activities of layers 2..top+1 for neutral-label x.

        Computed without gradients (the features are detached); it takes no label, so none can leak.
        """
        with torch.no_grad():
            z = self._neutral(x)
            features = []
            read = range(1, top + 1) if self._depth > 1 else range(1)
            for i in range(top + 1):
                z = _rms_normalise(F.relu(self._linears[i](z)))
                if i in read:
                    features.append(z)
            return torch.cat(features, dim=1) if len(features) > 1 else features[0]

    def _head_logits(self, x: torch.Tensor, top: int) -> torch.Tensor:
        features = self.head_features(x, top)
        return F.linear(features, self.aux["head"].weight[:, : features.shape[1]])

    def goodness_scores(self, x: torch.Tensor, top: int | None = None) -> torch.Tensor:
        """B x C accumulated goodness for every candidate label, in one pass of C*B rows."""
        top = self._depth - 1 if top is None else top
        x = x.flatten(1)
        batch, c = x.shape[0], self._classes
        candidates = self._arange.repeat_interleave(batch)  # label c for rows c*B .. (c+1)*B - 1
        z = self._overlay(x, candidates, c)
        read = self._readout_layers(top)
        total = torch.zeros(c * batch, device=x.device, dtype=x.dtype)
        for i in range(top + 1):
            h = F.relu(self._linears[i](z))
            if i in read:
                total = total + h.square().sum(dim=1)
            if i < top:
                z = _rms_normalise(h)
        return total.view(c, batch).t()

    def layer_scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each layer's own goodness for every candidate label (B x C), in one pass of C*B rows."""
        x = x.flatten(1)
        batch, c = x.shape[0], self._classes
        z = self._overlay(x, self._arange.repeat_interleave(batch), c)
        scores = {}
        for i in range(self._depth):
            h = F.relu(self._linears[i](z))
            scores[f"layer{i + 1}"] = h.square().sum(dim=1).view(c, batch).t()
            z = _rms_normalise(h)
        return scores

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        top = self._layer if self.phase is not None else self._depth - 1
        if self.params.inference == "softmax" and self._head_reads(top):
            return self._head_logits(x.flatten(1), top)
        return self.goodness_scores(x, top)

    def extra_state(self) -> dict:
        return {"layer": self._layer}

    def load_extra_state(self, state: dict) -> None:
        self._layer = state.get("layer", self._layer)
