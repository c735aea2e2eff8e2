"""NoProp-FM (Li, Teh & Pascanu 2025, arXiv 2503.24322): NoProp by flow matching, one network for all t.

Model: :mod:`bpfree.models.noprop_time` (``noprop-fm``): the t-conditioned network v_θ(z, x, t) (a vector
field in the embedding space), the class embeddings W_Embed and the classifier ``head``.

Loss on a minibatch (spec §5.5, standard conditional flow matching with a straight path), with
t_i ~ U(0, 1) and z_{0,i} ~ N(0, I) per example:

  z_t = t·u_y + (1 - t)·z_0,   L_FM = mean_i ‖v_θ(z_{t_i,i}, x_i, t_i) - (u_{y_i} - z_{0,i})‖²

plus, when the class embeddings are learned (they would otherwise collapse: equal embeddings make the
target predictable from z_t alone), the classification term on the extrapolated endpoint
ẑ_1 = z_t + (1 - t)·v_θ: mean_i CE(head(ẑ_{1,i}), y_i) (``params.classify``). Every example trains the
network at one time only; nothing is propagated through the solver. One optimiser steps the network,
the head and a learned W_Embed.

Inference: z_0 (0 on the ``mean`` read-out, N(0, I) on ``sampled``), the model's fixed-step Euler or
Heun solve of dz/dt = v_θ(z, x, t) from t = 0 to 1, then the head (the BP twin's rule too). Without the
classification term the head keeps its initialisation at the class embeddings, logits_k = u_k · z_1:
the nearest class embedding for one-hot (equal-norm) embeddings.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from bpfree.algorithms import register
from bpfree.algorithms.base import Algorithm, SearchDim, make_optimizer


class NoPropFMParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    classify: Literal["auto", "on", "off"] = Field(
        "auto",
        description="CE of the head on the extrapolated endpoint z_t + (1 - t) v: auto = when the embeddings are "
        "learned or the head starts random (rhead), as the head must then learn to read z_1",
    )


@register
class NoPropFM(Algorithm):
    name = "noprop-fm"
    paper = "Li, Teh & Pascanu 2025, NoProp (arXiv 2503.24322), variant FM"
    deviations = (
        "the network's last layer outputs the d-dimensional vector field v_θ directly (Fig. 6's CT/FM network ends "
        "in FC(C); with one-hot embeddings d = C, so only learned embeddings change its width)",
        "classify=auto: the CE term on the extrapolated endpoint is used when the embeddings are learned (the paper) "
        "and also when the head starts random (rhead), since an untrained random head cannot read z_1; without it "
        "the head stays at the class embeddings (nearest-embedding read-out for one-hot embeddings)",
        "the flow-matching term is the plain squared error summed over the embedding dimensions, unweighted "
        "(the paper's exact FM loss and its weights were not retrieved)",
        "solver steps are a model-spec option (default heun, 10 steps); the paper's FM step count was not retrieved",
        "time embedding angles 1000·t·10000^(-k/32) (DDPM's integer-step scale; the paper's scale was not retrieved)",
        "the network is CPU-sized (c=8, h=64 by default; model spec options) and its first fusion layer is applied "
        "per path (the same linear map), so a solve runs the image path once",
        "optimiser, lr and weight decay come from the run config (paper, as for CT: Adam, 1e-3, 1e-3)",
        "readout=mean (the default, the BP twin's rule alike) starts the ODE at z_0 = 0; readout=sampled at "
        "z_0 ~ N(0, I) from a fixed-seed generator reset at every predict call",
        "t, z_0 and the dropout masks are drawn from the algorithm generator",
        "the head starts at the class embeddings (head.weight = W_Embed, bias 0; spec token rhead for PyTorch's init)",
        "prototype class embeddings not implemented (one-hot fixed or learned orthogonal-init only)",
    )
    Params = NoPropFMParams
    model_families = ("noprop-fm",)
    search_space = (
        SearchDim("lr", "log", 1e-4, 1e-2),
        SearchDim("weight_decay", "log", 1e-6, 1e-2),
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model = self.model
        mode = self.params.classify
        self.classify = mode == "on" or (mode == "auto" and (model.embedding_learned or model.shape.head_init != "embed"))
        self.optimizers["model"] = make_optimizer(model.parameters(), self.settings)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        model, g = self.model, self.generator
        batch, d = x.shape[0], model.embed_dim
        t = torch.rand(batch, generator=g, device=g.device, dtype=x.dtype)
        z_0 = torch.randn(batch, d, generator=g, device=g.device, dtype=x.dtype)
        masks = model.net.draw_masks(batch, g, x.dtype)
        u = model.embed[y]
        s = t.unsqueeze(-1)
        z_t = s * u + (1.0 - s) * z_0
        v = model.predict_at(x, z_t, t, masks)
        fm = (v - (u - z_0)).pow(2).sum(-1).mean()
        out = {"fm": fm.detach()}
        loss = fm
        if self.classify:  # fixed per run: the step's operators never depend on data
            ce = F.cross_entropy(model.head(z_t + (1.0 - s) * v), y)
            loss = loss + ce
            out["ce"] = ce.detach()
        optimizer = self.optimizers["model"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach(), **out}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model's read-out (config ``readout``: z_0 = 0 or sampled), then the solver and the head."""
        with torch.no_grad():
            return self.model.read_out(x)
