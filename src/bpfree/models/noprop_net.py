"""The NoProp-DT network (Li, Teh & Pascanu 2025, arXiv 2503.24322, Fig. 6), scaled for CPU.

T independent blocks û_θt(z_{t-1}, x), each with its OWN image embedding, plus a final linear
classifier p̂_θout(y | z_T) = softmax(head(z_T)) and the class embeddings W_Embed (C x d).

One block (paper Fig. 6, DT; widths scaled by the spec's channel base ``c`` and hidden width ``h``;
the paper's MNIST/CIFAR block is c = 32 (32/64/128 channels) and h = 256):

- image path: conv3x3(c) -> ReLU -> maxpool2 -> dropout -> conv3x3(2c) -> ReLU -> dropout ->
  conv3x3(4c) -> ReLU -> maxpool2 -> dropout -> flatten -> Linear(h) -> LayerNorm
- label path: z -> Linear(h) -> LayerNorm -> ReLU, plus a residual branch
  Linear(h) -> LayerNorm -> ReLU -> Linear(h) -> LayerNorm added by a skip connection
- fusion: concat(image, label) -> [Linear(h) -> LayerNorm -> ReLU] x 2 -> Linear(C logits)

The block returns the C logits; the predicted clean embedding is û = softmax(logits) · W_Embed
(paper; :meth:`NoPropNet.denoise`), a convex combination of the class embeddings.

Deviations from Fig. 6, declared:
- LayerNorm where the paper has BatchNorm. LayerNorm is per sample (no batch statistics, no
  running-stat buffers, same in train and eval), so the T blocks can be stacked and run under
  ``torch.func.vmap`` with exactly the numbers of the per-block loop. The BP twin uses the same.
- Channels and hidden width are a CPU-sized default (c = 8, h = 64) instead of 32 and 256; both
  are spec options (``noprop:10,c32,h256`` is the paper's size).
- Dropout (p = 0.2 as in the paper) is elementwise. A block's forward takes optional explicit
  keep-masks so an algorithm can draw them from its own generator; this is what makes the
  sequential and the vmap'd training give identical numbers. Without masks it uses ``F.dropout``.

Class embeddings (spec option): ``onehot`` (default; W_Embed = I, fixed, a buffer, d = C) or
``d<D>`` (learned, orthogonally initialised C x D parameter). The paper's third option, prototype
embeddings (d = image size, initialised from class images), is not implemented.

Final classifier: ``head`` = Linear(d, C), initialised to the class embeddings (weight = W_Embed,
bias = 0), i.e. it starts as the nearest-embedding read-out logits_k = u_k · z_T. With PyTorch's
random init (spec token ``rhead``) the head on the simplex-bounded z_T maps classes to random
slots, and BP through the chain barely learns in the few steps of a small data set (figures in
BENCHMARKS.md, "Quick configs"); the paper's head init is not known.

Noise schedule (part of the model, so NoProp and its BP twin share it): ᾱ_0..ᾱ_T increasing
towards the clean label, cosine ᾱ_t = cos²(π/2 (1 - t/T)) by default (spec token ``linear`` for
ᾱ_t = t/T), squashed affinely into [1e-3, 1 - 1e-3]; q(z_t | y) = N(√ᾱ_t u_y, (1 - ᾱ_t) I).
The inference chain (:meth:`NoPropNet.chain`, paper Eq. 3) is
z_t = a_t û_θt(z_{t-1}, x) + b_t z_{t-1} + √c_t ε_t with the Gaussian-posterior coefficients of
:func:`posterior_coefficients`.

Read-out at test time (:meth:`NoPropNet.read_out`, config ``readout``), one rule for NoProp and its
BP twin: ``mean`` (z_0 = 0, no noise) or ``sampled`` (z_0 and the ε_t drawn, from a fixed seed).

The BP twin, ``forward(x)``: the same chain trained end to end by backpropagation through the
sampled path ("BPTT on the sampled paths of an SDE resembling NoProp-DT", the paper's backprop
baseline as described by DiffusionBlocks Table 6). In training mode z_0 ~ N(0, I) and the ε_t are
drawn (global RNG, like dropout); in eval mode it reads out by the run's ``readout`` rule. The logits
are head(z_T); BP minimises their cross-entropy, so gradients cross all blocks (and reach a
learned W_Embed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bpfree.models import register_model

ALPHA_BAR_CLIP = 1e-3  # ᾱ_t spans [clip, 1 - clip]: SNR(0) > 0 and SNR(T) finite


def alpha_bar_schedule(T: int, kind: str = "cosine", clip: float = ALPHA_BAR_CLIP) -> torch.Tensor:
    """ᾱ_0..ᾱ_T (float64), strictly increasing towards the clean label, from clip to 1 - clip.

    cosine: ᾱ_t = clip + (1 - 2 clip) cos²(π/2 (1 - t/T)); linear: clip + (1 - 2 clip) t/T. The
    affine squash (rather than clamping) keeps the schedule strictly monotone for any T.
    """
    t = torch.arange(T + 1, dtype=torch.float64)
    if kind == "cosine":
        shape = torch.cos(0.5 * math.pi * (1.0 - t / T)) ** 2
    elif kind == "linear":
        shape = t / T
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return clip + (1.0 - 2.0 * clip) * shape


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t)."""
    return alpha_bar / (1.0 - alpha_bar)


def posterior_coefficients(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a_t, b_t, c_t for t = 1..T (index t-1): q(z_t | z_{t-1}, u_y) = N(a_t u_y + b_t z_{t-1}, c_t I).

    With α_{t-1} = ᾱ_{t-1} / ᾱ_t: a_t = √ᾱ_t (1 - α_{t-1}) / (1 - ᾱ_{t-1}),
    b_t = √α_{t-1} (1 - ᾱ_t) / (1 - ᾱ_{t-1}), c_t = (1 - ᾱ_t)(1 - α_{t-1}) / (1 - ᾱ_{t-1}).
    """
    ab_prev, ab = alpha_bar[:-1], alpha_bar[1:]
    alpha_prev = ab_prev / ab
    a = ab.sqrt() * (1.0 - alpha_prev) / (1.0 - ab_prev)
    b = alpha_prev.sqrt() * (1.0 - ab) / (1.0 - ab_prev)
    c = (1.0 - ab) * (1.0 - alpha_prev) / (1.0 - ab_prev)
    return a, b, c


@dataclass(frozen=True)
class NoPropShape:
    T: int = 10  # number of blocks
    channels: int = 8  # c: the image path has c, 2c, 4c channels
    hidden: int = 64  # h
    embed_dim: int | None = None  # None: one-hot (d = C), fixed; else learned d x C
    dropout: float = 0.2
    schedule: str = "cosine"  # or "linear"
    head_init: str = "embed"  # "embed": head.weight = W_Embed, bias 0; "random": PyTorch default


class NoPropBlock(nn.Module):
    """û_θt(z_{t-1}, x) up to the final softmax·W_Embed: returns C logits."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, embed_dim: int, shape: NoPropShape) -> None:
        super().__init__()
        c_in, height, width = input_shape
        c, h = shape.channels, shape.hidden
        self.p = shape.dropout
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * c, 4 * c, 3, padding=1)
        h2, w2 = height // 2, width // 2
        h4, w4 = h2 // 2, w2 // 2
        # Shapes of the three dropout sites (without the batch dimension), for explicit masks.
        self.mask_shapes = ((c, h2, w2), (2 * c, h2, w2), (4 * c, h4, w4))
        self.img_fc = nn.Linear(4 * c * h4 * w4, h)
        self.img_norm = nn.LayerNorm(h)
        self.z_fc = nn.Linear(embed_dim, h)
        self.z_norm = nn.LayerNorm(h)
        self.res_fc1 = nn.Linear(h, h)
        self.res_norm1 = nn.LayerNorm(h)
        self.res_fc2 = nn.Linear(h, h)
        self.res_norm2 = nn.LayerNorm(h)
        self.fuse_fc1 = nn.Linear(2 * h, h)
        self.fuse_norm1 = nn.LayerNorm(h)
        self.fuse_fc2 = nn.Linear(h, h)
        self.fuse_norm2 = nn.LayerNorm(h)
        self.out = nn.Linear(h, num_classes)

    def _drop(self, a: torch.Tensor, masks: tuple[torch.Tensor, ...] | None, i: int) -> torch.Tensor:
        if masks is not None:  # boolean keep-masks drawn by the caller
            return a * masks[i] * (1.0 / (1.0 - self.p))
        return F.dropout(a, self.p, self.training)

    def forward(self, x: torch.Tensor, z: torch.Tensor, masks: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        a = F.max_pool2d(F.relu(self.conv1(x)), 2)
        a = self._drop(a, masks, 0)
        a = self._drop(F.relu(self.conv2(a)), masks, 1)
        a = F.max_pool2d(F.relu(self.conv3(a)), 2)
        a = self._drop(a, masks, 2)
        img = self.img_norm(self.img_fc(a.flatten(-3)))
        lab = F.relu(self.z_norm(self.z_fc(z)))
        lab = lab + self.res_norm2(self.res_fc2(F.relu(self.res_norm1(self.res_fc1(lab)))))
        f = torch.cat([img, lab], dim=-1)
        f = F.relu(self.fuse_norm1(self.fuse_fc1(f)))
        f = F.relu(self.fuse_norm2(self.fuse_fc2(f)))
        return self.out(f)


class NoPropNet(nn.Module):
    """T NoProp-DT blocks, the final classifier ``head`` and the class embeddings ``embed``."""

    READOUTS = ("mean", "sampled")

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, shape: NoPropShape = NoPropShape()) -> None:
        super().__init__()
        self.shape = shape
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.embed_dim = num_classes if shape.embed_dim is None else shape.embed_dim
        self.embedding_learned = shape.embed_dim is not None
        if self.embedding_learned:
            w = torch.empty(num_classes, self.embed_dim)
            nn.init.orthogonal_(w)
            self.embed = nn.Parameter(w)
        else:
            self.register_buffer("embed", torch.eye(num_classes))
        self.blocks = nn.ModuleList(
            NoPropBlock(input_shape, num_classes, self.embed_dim, shape) for _ in range(shape.T)
        )
        self.head = nn.Linear(self.embed_dim, num_classes)  # p̂_θout(y | z_T) = softmax(head(z_T))
        if shape.head_init == "embed":  # start as the nearest-embedding read-out: logits_k = u_k · z_T
            with torch.no_grad():
                self.head.weight.copy_(self.embed)
                self.head.bias.zero_()
        # Test-time read-out of the chain (``read_out``); set per run from the config's ``readout``.
        self.readout = "mean"
        self.readout_seed = 7_919
        # The noise schedule is fixed by the spec (not a parameter, not in the state dict).
        self.alpha_bar = alpha_bar_schedule(shape.T, shape.schedule)
        a, b, c = posterior_coefficients(self.alpha_bar)
        self.coef_a, self.coef_b, self.coef_c = a.tolist(), b.tolist(), c.tolist()

    @property
    def T(self) -> int:
        return len(self.blocks)

    @property
    def dropout(self) -> float:
        return self.shape.dropout

    def to_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """û = softmax(logits) · W_Embed."""
        return torch.softmax(logits, dim=-1) @ self.embed

    def denoise(self, t: int, x: torch.Tensor, z: torch.Tensor, masks=None) -> torch.Tensor:
        """Block t (1-based) predicts the clean label embedding û_θt(z_{t-1}, x)."""
        return self.to_embedding(self.blocks[t - 1](x, z, masks))

    def chain(
        self, x: torch.Tensor, z: torch.Tensor, noise: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The inference chain from z_0 = ``z`` to z_T (paper Eq. 3); ε_t drawn from ``generator`` if ``noise``."""
        for t in range(1, self.T + 1):
            z = self.coef_a[t - 1] * self.denoise(t, x, z) + self.coef_b[t - 1] * z
            if noise:
                eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z = z + math.sqrt(self.coef_c[t - 1]) * eps
        return z

    def read_out(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores at test time by the model's ``readout`` rule, the same for NoProp and its BP twin.

        ``mean``: z_0 = 0 and no noise (the chain's mean path). ``sampled``: z_0 ~ N(0, I) and the ε_t of
        Eq. 3, drawn from a generator reset to ``readout_seed`` at every call, so evaluation is
        deterministic and consumes no training randomness.
        """
        shape = (x.shape[0], self.embed_dim)
        if self.readout == "sampled":
            generator = torch.Generator(device=x.device).manual_seed(self.readout_seed)
            z = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
            return self.head(self.chain(x, z, noise=True, generator=generator))
        return self.head(self.chain(x, x.new_zeros(shape), noise=False))

    def block_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Block t's class logits on the ``read_out`` chain (the same z_0 and noise), for t = 1..T."""
        shape = (x.shape[0], self.embed_dim)
        generator = None
        if self.readout == "sampled":
            generator = torch.Generator(device=x.device).manual_seed(self.readout_seed)
            z = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            z = x.new_zeros(shape)
        out = {}
        for t in range(1, self.T + 1):
            logits = self.blocks[t - 1](x, z)
            out[f"block{t}"] = logits
            z = self.coef_a[t - 1] * self.to_embedding(logits) + self.coef_b[t - 1] * z
            if generator is not None:
                eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z = z + math.sqrt(self.coef_c[t - 1]) * eps
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The BP twin: the chain end to end (sampled path in training; ``read_out`` in eval), then the head."""
        if not self.training:
            return self.read_out(x)
        shape = (x.shape[0], self.embed_dim)
        z = torch.randn(shape, device=x.device, dtype=x.dtype)
        return self.head(self.chain(x, z, noise=True))


def parse_noprop(args: str) -> NoPropShape:
    if not args:
        return NoPropShape()
    tokens = [tok.strip().lower() for tok in args.split(",") if tok.strip()]
    values: dict = {}
    try:
        values["T"] = int(tokens[0])
        for tok in tokens[1:]:
            if tok == "onehot":
                values["embed_dim"] = None
            elif tok in ("cosine", "linear"):
                values["schedule"] = tok
            elif tok == "rhead":
                values["head_init"] = "random"
            elif tok[0] == "c":
                values["channels"] = int(tok[1:])
            elif tok[0] == "h":
                values["hidden"] = int(tok[1:])
            elif tok[0] == "d":
                values["embed_dim"] = int(tok[1:])
            elif tok[0] == "p":
                values["dropout"] = float(tok[1:])
            else:
                raise ValueError
    except (ValueError, IndexError):
        raise ValueError("expected T then optional cC, hH, dD or onehot, pP, cosine, linear or rhead tokens") from None
    shape = NoPropShape(**values)
    if not 1 <= shape.T <= 1000:
        raise ValueError("T must be 1..1000")
    if not 1 <= shape.channels <= 1024 or not 1 <= shape.hidden <= 65536:
        raise ValueError("channels 1..1024 and hidden width 1..65536")
    if shape.embed_dim is not None and not 1 <= shape.embed_dim <= 65536:
        raise ValueError("embedding dimension 1..65536")
    if not 0.0 <= shape.dropout < 1.0:
        raise ValueError("dropout must be in [0, 1)")
    return shape


register_model(
    "noprop",
    parse_noprop,
    lambda shape, data: NoPropNet(data.input_shape, data.num_classes, shape),
    "noprop or noprop:T[,cC][,hH][,dD|onehot][,pP][,cosine|linear][,rhead] (e.g. noprop:10,c8,h64,onehot,p0.2,cosine)",
)
