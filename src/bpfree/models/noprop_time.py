"""The NoProp-CT and NoProp-FM network (Li, Teh & Pascanu 2025, arXiv 2503.24322, Fig. 6 with a time
input), scaled for CPU: ONE network for every t in [0, 1], its ODE solver, and (CT) its learned schedule.

Spec families ``noprop-ct`` and ``noprop-fm`` (one class, :class:`NoPropTimeNet`, ``kind`` ct or fm).

The network (paper Fig. 6 for CT/FM; widths scaled by ``c`` and ``h``; the paper's MNIST/CIFAR size is
c = 32 (32/64/128 channels) and h = 256):

- image path: conv3x3(c) -> ReLU -> maxpool2 -> dropout -> conv3x3(2c) -> ReLU -> dropout ->
  conv3x3(4c) -> ReLU -> maxpool2 -> dropout -> flatten -> Linear(h) -> ReLU (shared with DT up to
  the Linear: :class:`bpfree.models.noprop_parts.ConvImagePath`)
- z path: Linear(h) -> ReLU
- time path: t -> sinusoidal embedding (dimension 64, angles 1000·t·10000^(-k/32) as for DDPM's
  integer time steps) -> Linear(h) -> ReLU
- fusion: concat(image, z, time) -> [Linear(h) -> ReLU] x 2 -> Linear(out)

CT: out = C logits and the prediction is û = softmax(logits) · W_Embed (the clean label embedding, as in
DT). FM: out = d and the output is the vector field v_θ(z, x, t) itself.

The first fusion Linear on the concatenation is computed as the sum of its three column blocks applied to
each path (the same map): the image term depends only on x and the time term only on t, so a solve
computes the image path once per input and the time path once per grid point, and each solver step runs
only the z path and the fusion. NoProp's inference and the BP twin share this.

CT noise schedule (:class:`LearnedSchedule`, VDM-style, Kingma et al. 2021, as NoProp's Appendix B):
SNR(t) = exp(-γ(t)), γ(t) = γ0 + (γ1 - γ0)(1 - γ̄(t)), so ᾱ(t) = sigmoid(-γ(t)) and
q(z_t | y) = N(√ᾱ(t) u_y, (1 - ᾱ(t)) I), with SNR increasing in t (t = 1 is the clean end). γ̄ is a
small monotone network with γ̄(0) = 0 and γ̄(1) = 1 (see the class), γ0 and γ1 are learned too; all of
it is trained jointly with the network. Its time derivative has a closed form (no autograd needed).

Inference (``chain``): integrate dz/dt = f(z, x, t) from t = 0 to 1 in ``steps`` fixed steps of Euler
or Heun (explicit trapezoid), then the head reads z_1:

- CT: the probability-flow ODE of the noising process with û in place of u_y,
  dz/dt = (-γ'(t)/2) (√ᾱ(t) û_θ(z, x, t) - ᾱ(t) z). With û = u_y it carries q(z_0 | y) onto q(z_t | y)
  exactly (the DDIM ODE written in t).
- FM: dz/dt = v_θ(z, x, t).

The BP twin, ``forward(x)``: z_0 ~ N(0, I) (global RNG) in training, then the same fixed-step solver,
then the head; backprop runs through the unrolled solver steps (not the adjoint method). Eval reads out
by the run's ``readout`` rule (``mean``: z_0 = 0; ``sampled``: z_0 ~ N(0, I) from a fixed seed); the ODE
itself is deterministic.

Spec: ``noprop-ct`` or ``noprop-ct:TOKENS`` (same for ``noprop-fm``), tokens cC, hH, dD or onehot,
pP, rhead as for DT, plus ``euler`` or ``heun`` and ``sN`` (solver steps; default heun, 10), and for CT
``gG`` (the schedule's initial log-SNR range -G..G; default 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bpfree.models import register_model
from bpfree.models.noprop_parts import ConvImagePath, LatentLabelModel, check_shared, parse_shared_token

TIME_DIM = 64  # sinusoidal time embedding (paper Fig. 6, CT/FM)
TIME_SCALE = 1000.0  # t in [0, 1] scaled as DDPM's integer steps, so the embedding's frequencies span [0, 1]
GAMMA_CLEAN, GAMMA_NOISY = -3.0, 3.0  # initial γ0 = γ(1) and γ1 = γ(0): SNR from e^-3 to e^3 (see LearnedSchedule)
SOLVERS = ("euler", "heun")


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class LearnedSchedule(nn.Module):
    """SNR(t) = exp(-γ(t)), γ(t) = γ0 + (γ1 - γ0)(1 - γ̄(t)), all parameters learned.

    γ̄(t) = (g(t) - g(0)) / (g(1) - g(0)) with g(t) = a t + Σ_j w_j sigmoid(v_j t + b_j), where a, w_j,
    v_j are softplus of free parameters: g is strictly increasing, so γ̄ is monotone with γ̄(0) = 0,
    γ̄(1) = 1 (a positive-weight network as in VDM's learned schedule). γ1 - γ0 = softplus(span) > 0 keeps
    SNR increasing in t whatever the optimiser does. Initialised close to γ̄(t) = t (a linear log-SNR)
    from -``gamma_noisy`` to -``gamma_clean``: by default -3 to 3 (spec token gG for -G to G). The paper's
    initial values were not retrieved; with -7 to 7 (the range of DT's schedule) the SNR' weights favour
    t ≈ 1 by e^14 and the low t, where only the image can tell the class, barely learns (measurements in
    BENCHMARKS.md).
    """

    def __init__(self, width: int = 16, gamma_clean: float = GAMMA_CLEAN, gamma_noisy: float = GAMMA_NOISY) -> None:
        super().__init__()
        self.gamma0 = nn.Parameter(torch.tensor(gamma_clean))
        self.span = nn.Parameter(torch.tensor(_inverse_softplus(gamma_noisy - gamma_clean)))
        self.linear = nn.Parameter(torch.tensor(1.0))
        self.slopes = nn.Parameter(torch.randn(width))
        self.offsets = nn.Parameter(torch.randn(width))
        self.weights = nn.Parameter(torch.full((width,), -3.0))

    def _g(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """g(t), g'(t) and g(1) - g(0)."""
        a, v, w = F.softplus(self.linear), F.softplus(self.slopes), F.softplus(self.weights)
        s = torch.sigmoid(t.unsqueeze(-1) * v + self.offsets)
        g = a * t + (s * w).sum(-1)
        dg = a + (s * (1.0 - s) * v * w).sum(-1)
        rise = a + (w * (torch.sigmoid(v + self.offsets) - torch.sigmoid(self.offsets))).sum()
        return g, dg, rise

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ0, γ1) = (γ(1), γ(0)): the clean and the noisy end."""
        return self.gamma0, self.gamma0 + F.softplus(self.span)

    def gamma_bar(self, t: torch.Tensor) -> torch.Tensor:
        g, _, rise = self._g(t)
        g0 = (F.softplus(self.weights) * torch.sigmoid(self.offsets)).sum()
        return (g - g0) / rise

    def gamma_and_rate(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """γ(t) and dγ/dt (closed form), elementwise over t."""
        g, dg, rise = self._g(t)
        g0 = (F.softplus(self.weights) * torch.sigmoid(self.offsets)).sum()
        span = F.softplus(self.span)
        gamma = self.gamma0 + span * (1.0 - (g - g0) / rise)
        return gamma, -span * dg / rise

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-self.gamma_and_rate(t)[0])


@dataclass(frozen=True)
class NoPropTimeShape:
    kind: str = "ct"  # "ct" (û-prediction, learned schedule) or "fm" (flow matching)
    channels: int = 8  # c: the image path has c, 2c, 4c channels
    hidden: int = 64  # h
    embed_dim: int | None = None  # None: one-hot (d = C), fixed; else learned d x C
    dropout: float = 0.2
    solver: str = "heun"
    steps: int = 10
    gamma: float = GAMMA_NOISY  # CT: the initial schedule spans log-SNR from -gamma (t = 0) to +gamma (t = 1)
    head_init: str = "embed"  # "embed": head.weight = W_Embed, bias 0; "random": PyTorch default


class TimeConditionedNet(ConvImagePath):
    """The one network of CT/FM: f(z, x, t) -> ``out_dim`` outputs (CT: C logits; FM: d velocities)."""

    freqs: torch.Tensor  # a buffer: the sinusoidal embedding's angular frequencies, scaled

    def __init__(self, input_shape: tuple[int, int, int], embed_dim: int, out_dim: int, shape: NoPropTimeShape) -> None:
        super().__init__(input_shape, shape.channels, shape.hidden, shape.dropout)
        h = shape.hidden
        self.hidden = h
        self.z_fc = nn.Linear(embed_dim, h)
        self.time_fc = nn.Linear(TIME_DIM, h)
        self.fuse_fc1 = nn.Linear(3 * h, h)  # on concat(image, z, time): applied as three column blocks
        self.fuse_fc2 = nn.Linear(h, h)
        self.out = nn.Linear(h, out_dim)
        half = TIME_DIM // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", TIME_SCALE * freqs, persistent=False)

    def image_term(self, x: torch.Tensor, masks: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The image path's share of the first fusion layer, with its bias: depends on x only."""
        h = self.hidden
        image = F.relu(self.image_features(x, masks))
        return F.linear(image, self.fuse_fc1.weight[:, :h], self.fuse_fc1.bias)

    def time_term(self, t: torch.Tensor) -> torch.Tensor:
        """The time path's share of the first fusion layer (t of any shape; one row per element)."""
        angles = t.unsqueeze(-1) * self.freqs
        embedding = torch.cat([angles.sin(), angles.cos()], dim=-1)
        return F.linear(F.relu(self.time_fc(embedding)), self.fuse_fc1.weight[:, 2 * self.hidden :])

    def output(self, image_term: torch.Tensor, z: torch.Tensor, time_term: torch.Tensor) -> torch.Tensor:
        h = self.hidden
        z_term = F.linear(F.relu(self.z_fc(z)), self.fuse_fc1.weight[:, h : 2 * h])
        f = F.relu(image_term + z_term + time_term)
        return self.out(F.relu(self.fuse_fc2(f)))

    def forward(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, masks: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        return self.output(self.image_term(x, masks), z, self.time_term(t))


class NoPropTimeNet(LatentLabelModel):
    """NoProp-CT/FM: the t-conditioned network (``blocks[0]``), the class embeddings, the head, the
    solver, and for CT the learned noise schedule."""

    grid: torch.Tensor  # a buffer: the solver's time points 0, 1/steps, ..., 1

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, shape: NoPropTimeShape) -> None:
        super().__init__(input_shape, num_classes, shape.embed_dim)
        if shape.kind not in ("ct", "fm") or shape.solver not in SOLVERS:
            raise ValueError(f"unknown kind {shape.kind!r} or solver {shape.solver!r}")
        self.shape = shape
        self.kind = shape.kind
        self._build_embedding()
        out_dim = num_classes if shape.kind == "ct" else self.embed_dim
        # One trainable stage (``blocks`` as every model exposes it): the network for every t.
        self.blocks = nn.ModuleList([TimeConditionedNet(input_shape, self.embed_dim, out_dim, shape)])
        self.schedule = LearnedSchedule(gamma_clean=-shape.gamma, gamma_noisy=shape.gamma) if shape.kind == "ct" else None
        self._build_head(shape.head_init)
        self.register_buffer("grid", torch.linspace(0.0, 1.0, shape.steps + 1), persistent=False)
        self.backprop_notes = (
            f"BP twin of NoProp-{shape.kind.upper()}: the same network trained by backpropagation through the unrolled "
            f"fixed-step {shape.solver} solver ({shape.steps} steps, z_0 ~ N(0, I) from the global RNG), not the adjoint "
            "method of the paper's baseline (same gradients up to discretisation; memory grows with the steps)",
        )

    @property
    def net(self) -> TimeConditionedNet:
        return self.blocks[0]  # type: ignore[return-value]

    @property
    def steps(self) -> int:
        return self.shape.steps

    # -- one evaluation -------------------------------------------------------------------------
    def _output(self, image_term: torch.Tensor, z: torch.Tensor, time_term: torch.Tensor) -> torch.Tensor:
        """CT: û = softmax(logits) · W_Embed; FM: the vector field v."""
        out = self.net.output(image_term, z, time_term)
        return self.to_embedding(out) if self.kind == "ct" else out

    def predict_at(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, masks: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The network at per-example times ``t`` (shape [B]): CT û_θ(z, x, t), FM v_θ(z, x, t)."""
        return self._output(self.net.image_term(x, masks), z, self.net.time_term(t))

    # -- the ODE --------------------------------------------------------------------------------
    def _coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """CT: (-γ'(t)/2, √ᾱ(t), ᾱ(t)) elementwise over t; FM: None."""
        if self.schedule is None:
            return None
        gamma, rate = self.schedule.gamma_and_rate(t)
        alpha_bar = torch.sigmoid(-gamma)
        return -0.5 * rate, alpha_bar.sqrt(), alpha_bar

    def _field(self, image_term: torch.Tensor, z: torch.Tensor, time_term: torch.Tensor, coef) -> torch.Tensor:
        out = self._output(image_term, z, time_term)
        if coef is None:
            return out
        rate, sqrt_ab, alpha_bar = coef
        return rate * (sqrt_ab * out - alpha_bar * z)

    def velocity(self, image_term: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """dz/dt at a time t (a 0-dim tensor), given :meth:`TimeConditionedNet.image_term` of the inputs."""
        return self._field(image_term, z, self.net.time_term(t), self._coefficients(t))

    def chain(self, x: torch.Tensor, z: torch.Tensor, noise: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Integrate from t = 0 (z_0 = ``z``) to t = 1 with the spec's fixed-step solver (the ODE has no noise)."""
        del noise, generator
        image = self.net.image_term(x)
        grid = self.grid
        times = self.net.time_term(grid)  # [steps + 1, h]: the time path once per grid point
        coef = self._coefficients(grid)
        dt = 1.0 / self.steps

        def field(k: int, zk: torch.Tensor) -> torch.Tensor:
            return self._field(image, zk, times[k], None if coef is None else tuple(c[k] for c in coef))

        for k in range(self.steps):
            f0 = field(k, z)
            if self.shape.solver == "euler":
                z = z + dt * f0
            else:  # Heun: Euler predictor, trapezoid corrector
                f1 = field(k + 1, z + dt * f0)
                z = z + (0.5 * dt) * (f0 + f1)
        return z


def parse_noprop_time(kind: str, args: str) -> NoPropTimeShape:
    values: dict = {"kind": kind}
    try:
        for tok in (tok.strip().lower() for tok in args.split(",") if tok.strip()):
            if tok in SOLVERS:  # before the shared tokens: "heun" starts like hH
                values["solver"] = tok
            elif tok[0] == "s":
                values["steps"] = int(tok[1:])
            elif tok[0] == "g" and kind == "ct":
                values["gamma"] = float(tok[1:])
            elif not parse_shared_token(tok, values):
                raise ValueError
    except (ValueError, IndexError):
        raise ValueError("expected optional cC, hH, dD or onehot, pP, euler or heun, sN or rhead tokens") from None
    shape = NoPropTimeShape(**values)
    check_shared(shape.channels, shape.hidden, shape.embed_dim, shape.dropout)
    if not 1 <= shape.steps <= 10_000:
        raise ValueError("solver steps must be 1..10000")
    if not 0.5 <= shape.gamma <= 20.0:
        raise ValueError("the initial log-SNR bound gG must be in [0.5, 20]")
    return shape


def _parser(kind: str):
    return lambda args: parse_noprop_time(kind, args)


for _kind in ("ct", "fm"):
    register_model(
        f"noprop-{_kind}",
        _parser(_kind),
        lambda shape, data: NoPropTimeNet(data.input_shape, data.num_classes, shape),
        f"noprop-{_kind} or noprop-{_kind}:TOKENS, comma-separated, any of cC, hH, dD or onehot, pP, euler or heun, sN"
        f"{', gG' if _kind == 'ct' else ''}, rhead (e.g. noprop-{_kind}:c8,h64,heun,s10)",
    )
