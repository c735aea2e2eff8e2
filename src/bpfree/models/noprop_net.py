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

The image path, class embeddings, head, read-out rule and BP-twin ``forward`` are shared with the
NoProp-CT/FM network (:mod:`bpfree.models.noprop_parts`).

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
from bpfree.models.noprop_parts import ConvImagePath, LatentLabelModel, check_shared, parse_shared_token

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


class NoPropBlock(ConvImagePath):
    """û_θt(z_{t-1}, x) up to the final softmax·W_Embed: returns C logits."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, embed_dim: int, shape: NoPropShape) -> None:
        super().__init__(input_shape, shape.channels, shape.hidden, shape.dropout)
        h = shape.hidden
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

    def forward(self, x: torch.Tensor, z: torch.Tensor, masks: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        img = self.img_norm(self.image_features(x, masks))
        lab = F.relu(self.z_norm(self.z_fc(z)))
        lab = lab + self.res_norm2(self.res_fc2(F.relu(self.res_norm1(self.res_fc1(lab)))))
        f = torch.cat([img, lab], dim=-1)
        f = F.relu(self.fuse_norm1(self.fuse_fc1(f)))
        f = F.relu(self.fuse_norm2(self.fuse_fc2(f)))
        return self.out(f)


class NoPropNet(LatentLabelModel):
    """T NoProp-DT blocks, the final classifier ``head`` and the class embeddings ``embed``."""

    backprop_notes = (
        "BP twin of NoProp-DT: the T-block chain of Eq. 3 trained end to end by backpropagation through the sampled "
        "path (z_0 and the ε_t from the global RNG), as the paper's backprop baseline",
    )

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, shape: NoPropShape = NoPropShape()) -> None:
        super().__init__(input_shape, num_classes, shape.embed_dim)
        self.shape = shape
        self._build_embedding()
        self.blocks = nn.ModuleList(
            NoPropBlock(input_shape, num_classes, self.embed_dim, shape) for _ in range(shape.T)
        )
        self._build_head(shape.head_init)
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

    def denoise(self, t: int, x: torch.Tensor, z: torch.Tensor, masks=None) -> torch.Tensor:
        """Block t (1-based) predicts the clean label embedding û_θt(z_{t-1}, x)."""
        return self.to_embedding(self.blocks[t - 1](x, z, masks))

    def _run(
        self, x: torch.Tensor, z: torch.Tensor, noise: bool, generator: torch.Generator | None, logits: dict | None = None
    ) -> torch.Tensor:
        """Eq. 3 from z_0 = ``z`` to z_T; block t's logits go into ``logits`` (if given) as ``block{t}``."""
        for t in range(1, self.T + 1):
            block_logits = self.blocks[t - 1](x, z)
            if logits is not None:
                logits[f"block{t}"] = block_logits
            z = self.coef_a[t - 1] * self.to_embedding(block_logits) + self.coef_b[t - 1] * z
            if noise:
                eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z = z + math.sqrt(self.coef_c[t - 1]) * eps
        return z

    def chain(
        self, x: torch.Tensor, z: torch.Tensor, noise: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The inference chain from z_0 = ``z`` to z_T (paper Eq. 3); ε_t drawn from ``generator`` if ``noise``."""
        return self._run(x, z, noise, generator)

    def block_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Block t's class logits on the ``read_out`` chain (the same z_0 and noise), for t = 1..T."""
        z, generator = self.start(x)
        out: dict[str, torch.Tensor] = {}
        self._run(x, z, generator is not None, generator, out)
        return out


def parse_noprop(args: str) -> NoPropShape:
    if not args:
        return NoPropShape()
    tokens = [tok.strip().lower() for tok in args.split(",") if tok.strip()]
    values: dict = {}
    try:
        values["T"] = int(tokens[0])
        for tok in tokens[1:]:
            if tok in ("cosine", "linear"):  # before the shared tokens: "cosine" starts like cC
                values["schedule"] = tok
            elif not parse_shared_token(tok, values):
                raise ValueError
    except (ValueError, IndexError):
        raise ValueError("expected T then optional cC, hH, dD or onehot, pP, cosine, linear or rhead tokens") from None
    shape = NoPropShape(**values)
    if not 1 <= shape.T <= 1000:
        raise ValueError("T must be 1..1000")
    check_shared(shape.channels, shape.hidden, shape.embed_dim, shape.dropout)
    return shape


register_model(
    "noprop",
    parse_noprop,
    lambda shape, data: NoPropNet(data.input_shape, data.num_classes, shape),
    "noprop or noprop:T[,cC][,hH][,dD|onehot][,pP][,cosine|linear][,rhead] (e.g. noprop:10,c8,h64,onehot,p0.2,cosine)",
)
