"""NoProp (Li, Teh & Pascanu 2025, arXiv 2503.24322): discrete-time variant NoProp-DT.

Model: :mod:`bpfree.models.noprop_net` (T blocks û_θt(z_{t-1}, x), classifier ``head``, class
embeddings ``embed`` = W_Embed, and the noise schedule ᾱ_0..ᾱ_T, which the model owns so that the
BP twin shares it). Notation (spec §5): q(z_t | y) = N(√ᾱ_t u_y, (1 - ᾱ_t) I) with
ᾱ_0 ≈ 0 < ... < ᾱ_T ≈ 1 and SNR(t) = ᾱ_t / (1 - ᾱ_t) increasing in t.

Loss of block t on a minibatch (paper Algorithm 1):

  L_t = (T·η/2) (SNR(t) - SNR(t-1)) · mean_i ‖û_θt(z_{t-1,i}, x_i) - u_{y_i}‖²
        + mean_i CE(head(z_{T,i}), y_i) + mean_i KL(q(z_0 | y_i) ‖ N(0, I))

with z_{t-1} ~ q(z_{t-1} | y) and z_T ~ q(z_T | y) drawn directly from their closed forms with the
algorithm's generator: no forward propagation through earlier blocks, and no gradient crosses
blocks (block t sees only sampled z, never another block's output). Every block has its own
optimiser; the head and a learned W_Embed share one ("out"). L_t updates θ_t, head and W_Embed.

How the paper's loop "for t = 1..T: for each minibatch: step on L_t" maps onto engine steps
(``params.loop``):
- ``joint`` (default): one engine step, on one minibatch, (1) gives every block t one step on its
  own L_t (independent noise per block; only L_t's L2 term depends on θ_t), then (2) gives the
  shared head/W_Embed T steps, the t-th on L_t (CE on a fresh z_T sample + KL, plus block t's L2
  gradient w.r.t. W_Embed computed in (1)). Per engine epoch every block and the head get exactly
  the number of updates of one paper epoch, at the FLOP cost of one BP epoch of the same network.
  Differences from the paper's order: the T block steps of a minibatch are taken with the same
  W_Embed (the paper updates it between blocks), and the head's T steps reuse one minibatch's
  labels with fresh noise (the paper's come from T different minibatches). Equal in expectation.
- ``paper``: Algorithm 1's order exactly. Engine epoch k trains only block t = (k mod T) + 1 for
  one pass over the data (each step on L_t updates θ_t, head and W_Embed), so T engine epochs are
  one paper epoch. Validation and early stopping still run per engine epoch.

Parallel training (``params.parallel``, joint loop): the T blocks' parameters are stacked into
[T, ...] tensors (the blocks' own parameters become views of them, so the model, its state dict and
the BP twin are unchanged) and one ``torch.func.vmap`` of ``functional_call`` computes all T
forward/backward passes as batched (grouped) operators. A single elementwise optimiser (Adam,
AdamW, SGD) on the stacked tensors is exactly T independent per-block optimisers with one step
count. ``parallel: false`` (default) loops over the blocks, calling backward per block so that only
one block's activations are alive at a time (NoProp's memory advantage); ``parallel: true`` keeps
all T blocks' activations alive at once (speed for memory: fewer, larger kernels; see BENCHMARKS.md).
Both give the same numbers for the same seed (same noise and dropout masks, drawn from the algorithm
generator in the same order). The FLOP meter counts a grouped convolution's weight gradient once, so
parallel and sequential steps count the same FLOPs.

Inference (paper Eq. 3, spec §5.7): z_0 ~ N(0, I), then for t = 1..T
  z_t = a_t û_θt(z_{t-1}, x) + b_t z_{t-1} + √c_t ε_t
(:meth:`NoPropNet.chain`), and the class scores are head(z_T). The run's ``readout`` (config field,
shared with the BP twin) picks this sampled path or the mean path (z_0 = 0, no noise); results record
the test accuracy under both (``test_accuracy_by_readout``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.func import functional_call, vmap

from bpfree.algorithms import register
from bpfree.algorithms.base import Algorithm, EpochClock, SearchDim, make_optimizer
from bpfree.models.noprop_net import snr
from bpfree.models.noprop_parts import kl_to_standard_normal


class NoPropParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["dt"] = "dt"  # ct / fm would plug in here (one shared network with a time input)
    eta: float = Field(0.1, gt=0, le=1e3, description="η, weight of the SNR-difference L2 term (paper MNIST: 0.1)")
    loop: Literal["joint", "paper"] = "joint"
    parallel: bool = Field(
        False, description="loop=joint: train the T blocks as one vmap'd call over stacked weights (speed for memory)"
    )


@register
class NoProp(Algorithm):
    name = "noprop"
    paper = "Li, Teh & Pascanu 2025, NoProp (arXiv 2503.24322), variant DT"
    deviations = (
        "loop=joint (default): per minibatch every block takes one step on its own L_t, then the shared head/W_Embed "
        "take T steps (one per L_t) reusing that minibatch's labels with fresh z_T noise; the paper loops 'for t: for "
        "minibatch' (loop=paper reproduces that order, one block per engine epoch)",
        "loop=joint: the T block steps of a minibatch see the same W_Embed (the paper updates it between blocks)",
        "blocks use LayerNorm instead of BatchNorm and CPU-sized widths (c=8, h=64 by default; model spec options)",
        "optimiser, lr and weight decay come from the run config (paper: AdamW, 1e-3, 1e-3; see configs/quick)",
        "cosine schedule ᾱ_t = cos²(π/2 (1 - t/T)) squashed into [1e-3, 1 - 1e-3] "
        "(the paper's exact formula was not retrieved)",
        "readout=sampled: inference noise (z_0 and ε_t) comes from a fixed-seed generator reset at every predict call, "
        "so evaluation is deterministic and does not consume training randomness; readout=mean (the default, and the "
        "BP twin's rule alike) uses z_0 = 0 and no noise instead of the paper's sampled chain",
        "the head starts at the class embeddings (head.weight = W_Embed, bias 0; spec token rhead for PyTorch's "
        "init); the paper's head init is not known",
        "dropout masks are drawn from the algorithm generator (so parallel and sequential runs agree)",
        "prototype class embeddings not implemented (one-hot fixed or learned orthogonal-init only)",
        "gradients reach a learned W_Embed also through the reparameterised samples z ~ q(z|y)",
    )
    Params = NoPropParams
    model_families = ("noprop",)
    search_space = (
        SearchDim("lr", "log", 1e-4, 1e-2),
        SearchDim("weight_decay", "log", 1e-6, 1e-2),
        SearchDim("params.eta", "log", 1e-2, 1.0),
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model, p = self.model, self.params
        self.T = model.T
        self.d = model.embed_dim
        device = model.embed.device
        ab = model.alpha_bar
        s = snr(ab)
        weights = 0.5 * self.T * p.eta * (s[1:] - s[:-1])  # block t at index t-1
        self._w = weights.tolist()
        self._sqrt_ab = ab.sqrt().tolist()
        self._sqrt_1mab = (1.0 - ab).sqrt().tolist()
        self._kl_ab0 = float(ab[0])
        # Stacked versions for the parallel path, shaped [T, 1, 1] to broadcast over (batch, d).
        dt = model.embed.dtype
        self._w_stack = weights.to(device=device, dtype=dt)
        self._sqrt_ab_prev = ab[:-1].sqrt().to(device=device, dtype=dt).view(-1, 1, 1)
        self._sqrt_1mab_prev = (1.0 - ab[:-1]).sqrt().to(device=device, dtype=dt).view(-1, 1, 1)

        self.parallel = p.parallel and p.loop == "joint"
        self._stacked: dict[str, torch.Tensor] = {}
        if self.parallel:
            self._stack_block_parameters()
            self.optimizers["blocks"] = make_optimizer(list(self._stacked.values()), self.settings)
        else:
            for t, block in enumerate(model.blocks, start=1):
                self.optimizers[f"block{t}"] = make_optimizer(block.parameters(), self.settings)
        out_params = list(model.head.parameters())
        if model.embedding_learned:
            out_params.append(model.embed)
        self.optimizers["out"] = make_optimizer(out_params, self.settings)

        self._paper_block = 1  # loop=paper: the block this epoch trains (set by begin_epoch)

    # -- parallel storage -------------------------------------------------------------------------
    def _stack_block_parameters(self) -> None:
        """Move the T blocks' parameters into stacked [T, ...] leaf tensors; the blocks keep views."""
        blocks = self.model.blocks
        if any(True for _ in blocks[0].buffers()):
            raise ValueError("parallel NoProp needs blocks without buffers (no BatchNorm)")
        per_block = [dict(b.named_parameters()) for b in blocks]
        for name in per_block[0]:
            stacked = torch.stack([pb[name].detach() for pb in per_block]).requires_grad_(True)
            for t, pb in enumerate(per_block):
                pb[name].data = stacked.data[t]  # shares storage: optimiser steps on `stacked` move the block
            self._stacked[name] = stacked

    # -- randomness -----------------------------------------------------------------------------
    def _draw(self, n_blocks: int, batch: int, like: torch.Tensor):
        """Noise for z_{t-1} and for z_T (each n_blocks x B x d), and dropout keep-masks per site."""
        g = self.generator
        eps = torch.randn(n_blocks, batch, self.d, generator=g, device=g.device, dtype=like.dtype)
        eps_T = torch.randn(n_blocks, batch, self.d, generator=g, device=g.device, dtype=like.dtype)
        masks = self.model.blocks[0].draw_masks(batch, g, like.dtype, leading=(n_blocks,))
        return eps, eps_T, masks

    # -- losses ---------------------------------------------------------------------------------
    def _block_loss(self, t: int, x, y, eps_t, masks_t) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted and raw L2 term of block t (1-based) on z_{t-1} ~ q(z_{t-1} | y)."""
        model = self.model
        u = model.embed[y]
        z = self._sqrt_ab[t - 1] * u + self._sqrt_1mab[t - 1] * eps_t
        u_hat = model.denoise(t, x, z, masks_t)
        sq = (u_hat - u).pow(2).sum(-1).mean()
        return self._w[t - 1] * sq, sq

    def _out_loss(self, y, eps_T) -> tuple[torch.Tensor, torch.Tensor]:
        """CE of the classifier on z_T ~ q(z_T | y), and the KL term."""
        model = self.model
        u = model.embed[y]
        z_T = self._sqrt_ab[self.T] * u + self._sqrt_1mab[self.T] * eps_T
        ce = F.cross_entropy(model.head(z_T), y)
        kl = kl_to_standard_normal(u, self._kl_ab0).mean()
        return ce, kl

    def _parallel_block_losses(self, x, y, eps, masks, embed) -> tuple[torch.Tensor, torch.Tensor]:
        """All T blocks' weighted and raw L2 terms in one vmap'd call; ``embed`` is C x d or T x C x d."""
        template = self.model.blocks[0]
        u = embed[..., y, :]  # [B, d] or [T, B, d]
        z = self._sqrt_ab_prev * u + self._sqrt_1mab_prev * eps  # [T, B, d]
        if masks is None:
            logits = vmap(lambda prm, zt: functional_call(template, prm, (x, zt)))(self._stacked, z)
        else:
            logits = vmap(lambda prm, zt, mt: functional_call(template, prm, (x, zt, mt)))(self._stacked, z, masks)
        u_hat = torch.softmax(logits, dim=-1) @ embed  # [T, B, d]
        sq = (u_hat - u).pow(2).sum(-1).mean(-1)  # [T]
        return self._w_stack * sq, sq

    # -- learning -------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)  # idle parameters keep grad None: no momentum/decay drift
        if self.params.loop == "paper":
            return self._paper_step(x, y, self._paper_block)
        model, T = self.model, self.T
        learned = model.embedding_learned
        eps, eps_T, masks = self._draw(T, x.shape[0], x)
        # 1. Every block t takes one step on its own L2 term. The gradient each block's term gives a
        #    learned W_Embed is kept per block (g_embed[t]) for the T shared steps below.
        if self.parallel:
            embed = model.embed
            if learned:  # one copy per block, so the backward keeps each block's W_Embed gradient apart
                embed = embed.detach().expand(T, *embed.shape).clone().requires_grad_(True)
            weighted, sq = self._parallel_block_losses(x, y, eps, masks, embed)
            weighted.sum().backward()
            g_embed = embed.grad if learned else None
            l2, mse = weighted.detach().mean(), sq.detach().mean()
        else:
            grads = []
            l2 = torch.zeros((), device=x.device, dtype=x.dtype)
            mse = torch.zeros((), device=x.device, dtype=x.dtype)
            for t in range(1, T + 1):  # backward per block: one block's activations alive at a time
                masks_t = None if masks is None else tuple(m[t - 1] for m in masks)
                weighted, sq = self._block_loss(t, x, y, eps[t - 1], masks_t)
                weighted.backward()
                if learned:
                    grads.append(model.embed.grad)
                    model.embed.grad = None
                l2 = l2 + weighted.detach() / T
                mse = mse + sq.detach() / T
            g_embed = torch.stack(grads) if learned else None
        for key, opt in self.optimizers.items():
            if key != "out":
                opt.step()
        # 2. The shared head (and W_Embed) take T steps, the t-th on block t's loss L_t: CE on a fresh
        #    z_T ~ q(z_T | y) + KL (+ block t's L2 gradient for W_Embed), as the paper's loop does.
        out_opt = self.optimizers["out"]
        ce_sum = torch.zeros((), device=x.device, dtype=x.dtype)
        for t in range(1, T + 1):
            out_opt.zero_grad(set_to_none=True)
            ce, kl = self._out_loss(y, eps_T[t - 1])
            (ce + kl).backward()
            if learned:
                model.embed.grad += g_embed[t - 1]
            out_opt.step()
            ce_sum = ce_sum + ce.detach()
        ce = ce_sum / T
        kl = kl.detach()
        return {"loss": l2 + ce + kl, "l2": l2, "mse": mse, "ce": ce, "kl": kl}

    def capture_key(self) -> int:
        """loop=paper: each block's step is a different computation, so a graph of its own."""
        return self._paper_block if self.params.loop == "paper" else 0

    def begin_epoch(self, clock: EpochClock) -> None:
        # loop=paper: engine epoch k trains block (k mod T) + 1, so T engine epochs are one paper epoch.
        self._paper_block = clock.epoch % self.T + 1

    def current_block(self) -> int:
        """loop=paper: the block (1-based) this epoch trains."""
        return self._paper_block

    def _paper_step(self, x: torch.Tensor, y: torch.Tensor, t: int) -> dict[str, torch.Tensor]:
        eps, eps_T, masks = self._draw(1, x.shape[0], x)
        masks_t = None if masks is None else tuple(m[0] for m in masks)
        weighted, sq = self._block_loss(t, x, y, eps[0], masks_t)
        ce, kl = self._out_loss(y, eps_T[0])
        (weighted + ce + kl).backward()
        self.optimizers[f"block{t}"].step()
        self.optimizers["out"].step()
        l2, ce, kl = weighted.detach(), ce.detach(), kl.detach()
        return {"loss": l2 + ce + kl, "l2": l2, "mse": sq.detach(), "ce": ce, "kl": kl}

    # -- inference ------------------------------------------------------------------------------
    def layer_scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each block's class logits along the model's read-out chain (block t sees z_{t-1} of that chain)."""
        return self.model.block_logits(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model's read-out (config ``readout``: mean or sampled path), the rule its BP twin uses too."""
        with torch.no_grad():
            return self.model.read_out(x)

