"""NoProp-CT (Li, Teh & Pascanu 2025, arXiv 2503.24322): continuous-time NoProp, one network for all t.

Model: :mod:`bpfree.models.noprop_time` (``noprop-ct``): the t-conditioned network û_θ(z, x, t), the
class embeddings W_Embed, the classifier ``head`` and the learned schedule SNR(t) = exp(-γ(t)),
ᾱ(t) = sigmoid(-γ(t)), q(z_t | y) = N(√ᾱ(t) u_y, (1 - ᾱ(t)) I), SNR increasing in t.

Loss on a minibatch (spec §5.5), with t_i ~ U(0, 1) per example:

  L_CT = mean_i CE(head(z_{1,i}), y_i) + mean_i KL(q(z_0 | y_i) ‖ N(0, I))
         + (η/2) mean_i SNR'(t_i) ‖û_θ(z_{t_i,i}, x_i, t_i) - u_{y_i}‖²

with z_{t_i} ~ q(z_{t_i} | y_i) and z_1 ~ q(z_1 | y_i) drawn from their closed forms with the algorithm's
generator (no forward propagation through the solver: every example trains the network at one time
only) and SNR'(t) = -γ'(t) exp(-γ(t)) in closed form. One optimiser steps the network, the head, a
learned W_Embed and the schedule (γ0, γ1 and γ̄) together: the schedule gets its gradient through the
SNR' weights, the sampled z_t, the KL (through ᾱ(0)) and the CE (through ᾱ(1)).

Inference: z_0 (0 on the ``mean`` read-out, N(0, I) on ``sampled``), the model's fixed-step Euler or
Heun solve of dz/dt = (-γ'/2)(√ᾱ û_θ - ᾱ z) from t = 0 to 1, then the head (the BP twin's rule too).
The solver and its step count are part of the model spec (``noprop-ct:...,heun,s10``), so they are
recorded with the run (``model``) and its BP twin integrates with exactly the same solver.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from bpfree.algorithms import register
from bpfree.algorithms.base import Algorithm, SearchDim, make_optimizer
from bpfree.models.noprop_parts import kl_to_standard_normal, marginal_sample


class NoPropCTParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    eta: float = Field(1.0, gt=0, le=1e3, description="η, weight of the SNR'-weighted L2 term (paper CT: 1)")


@register
class NoPropCT(Algorithm):
    name = "noprop-ct"
    paper = "Li, Teh & Pascanu 2025, NoProp (arXiv 2503.24322), variant CT"
    deviations = (
        "inference ODE: the probability-flow (DDIM) ODE of the noising process with û_θ for u_y, "
        "dz/dt = (-γ'(t)/2)(√ᾱ û_θ - ᾱ z), integrated by fixed-step Euler or Heun (model spec); the paper's exact "
        "update was not retrieved (one community reimplementation uses dz/dt = (û - z)/(1 - ᾱ))",
        "solver steps are a model-spec option (default heun, 10 steps) where the paper reports 1000 inference steps",
        "learned schedule: γ̄ is a normalised positive-weight sum of a linear term and 16 sigmoids (monotone, "
        "γ̄(0) = 0, γ̄(1) = 1; VDM uses a 3-layer positive network), γ1 - γ0 = softplus(.) > 0 keeps SNR increasing, "
        "initial γ0 = -3, γ1 = 3 (model spec gG; the paper's values were not retrieved: with -7..7, DT's range, SNR' "
        "favours t ≈ 1 by e^14 and the low t where the image decides barely learns, see BENCHMARKS.md); SNR'(t) in "
        "closed form, not autograd",
        "the CE term reads the classifier on z_1 ~ q(z_1 | y) sampled from the schedule (as in the paper's loss; "
        "some reimplementations pass z_1 through the network first)",
        "time embedding angles 1000·t·10000^(-k/32) (DDPM's integer-step scale; the paper's scale was not retrieved)",
        "the network is CPU-sized (c=8, h=64 by default; model spec options) and its first fusion layer is applied "
        "per path (the same linear map), so a solve runs the image path once",
        "optimiser, lr and weight decay come from the run config (paper: Adam, 1e-3, 1e-3; see the configs)",
        "readout=mean (the default, the BP twin's rule alike) starts the ODE at z_0 = 0; readout=sampled at "
        "z_0 ~ N(0, I) from a fixed-seed generator reset at every predict call",
        "t, the noise and the dropout masks are drawn from the algorithm generator",
        "the head starts at the class embeddings (head.weight = W_Embed, bias 0; spec token rhead for PyTorch's "
        "init); the paper's head init is not known",
        "prototype class embeddings not implemented (one-hot fixed or learned orthogonal-init only); gradients "
        "reach a learned W_Embed also through the reparameterised samples z ~ q(z|y)",
    )
    Params = NoPropCTParams
    model_families = ("noprop-ct",)
    search_space = (
        SearchDim("lr", "log", 1e-4, 1e-2),
        SearchDim("weight_decay", "log", 1e-6, 1e-2),
        SearchDim("params.eta", "log", 1e-2, 10.0),
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.optimizers["model"] = make_optimizer(self.model.parameters(), self.settings)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        model, g = self.model, self.generator
        batch, d = x.shape[0], model.embed_dim
        t = torch.rand(batch, generator=g, device=g.device, dtype=x.dtype)
        eps = torch.randn(batch, d, generator=g, device=g.device, dtype=x.dtype)
        eps_1 = torch.randn(batch, d, generator=g, device=g.device, dtype=x.dtype)
        masks = model.net.draw_masks(batch, g, x.dtype)
        u = model.embed[y]

        gamma, rate = model.schedule.gamma_and_rate(t)
        z_t = marginal_sample(u, torch.sigmoid(-gamma).unsqueeze(-1), eps)
        snr_rate = -rate * torch.exp(-gamma)  # SNR'(t) >= 0
        sq = (model.predict_at(x, z_t, t, masks) - u).pow(2).sum(-1)
        l2 = 0.5 * self.params.eta * (snr_rate * sq).mean()

        gamma_clean, gamma_noisy = model.schedule.endpoints()  # γ(1), γ(0)
        z_1 = marginal_sample(u, torch.sigmoid(-gamma_clean), eps_1)
        ce = F.cross_entropy(model.head(z_1), y)
        kl = kl_to_standard_normal(u, torch.sigmoid(-gamma_noisy)).mean()

        loss = l2 + ce + kl
        optimizer = self.optimizers["model"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach(), "l2": l2.detach(), "mse": sq.detach().mean(), "ce": ce.detach(), "kl": kl.detach()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model's read-out (config ``readout``: z_0 = 0 or sampled), then the solver and the head."""
        with torch.no_grad():
            return self.model.read_out(x)
