"""What every NoProp model shares (Li, Teh & Pascanu 2025, arXiv 2503.24322): DT (:mod:`noprop_net`),
CT and FM (:mod:`noprop_time`).

- :class:`ConvImagePath`: the image path of paper Fig. 6, conv3x3(c) -> ReLU -> maxpool2 -> dropout ->
  conv3x3(2c) -> ReLU -> dropout -> conv3x3(4c) -> ReLU -> maxpool2 -> dropout -> flatten -> Linear(h).
  What follows the Linear differs (DT: a norm; CT/FM: ReLU), so each network adds its own. Dropout takes
  optional explicit boolean keep-masks, so an algorithm can draw them from its own generator.
- :class:`LatentLabelModel`: the class embeddings W_Embed (one-hot, fixed, or learned with orthogonal
  init), the classifier ``head`` p̂_θout(y | z_end) = softmax(head(z_end)) initialised to the embeddings,
  the test-time read-out rule (``mean``: z_0 = 0; ``sampled``: z_0 ~ N(0, I) from a fixed seed), and the
  BP twin's ``forward``: the model's inference chain from z_0 to z_end, then the head.
- :func:`kl_to_standard_normal`, :func:`marginal_sample`: the closed forms of q(z_t | y).
- :func:`parse_shared_token`: the spec tokens every NoProp family accepts (cC, hH, dD | onehot, pP, rhead).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def kl_to_standard_normal(u: torch.Tensor, alpha_bar_0: float | torch.Tensor) -> torch.Tensor:
    """KL(N(√ā u, (1-ā) I) ‖ N(0, I)) per row of u, closed form (ā a number, or a tensor that broadcasts)."""
    d = u.shape[-1]
    a = alpha_bar_0
    log_noise = torch.log1p(-a) if isinstance(a, torch.Tensor) else math.log(1.0 - a)
    return 0.5 * (d * (1.0 - a) + a * u.pow(2).sum(-1) - d - d * log_noise)


def marginal_sample(u: torch.Tensor, alpha_bar: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
    """z ~ q(z_t | y) = N(√ᾱ_t u_y, (1 - ᾱ_t) I), reparameterised by ``eps`` (ᾱ_t a number or a column)."""
    if isinstance(alpha_bar, torch.Tensor):
        return alpha_bar.sqrt() * u + (1.0 - alpha_bar).sqrt() * eps
    return math.sqrt(alpha_bar) * u + math.sqrt(1.0 - alpha_bar) * eps


class ConvImagePath(nn.Module):
    """Fig. 6's image path up to its Linear(h) (no activation or norm after it: the caller adds one)."""

    def __init__(self, input_shape: tuple[int, int, int], channels: int, hidden: int, dropout: float) -> None:
        super().__init__()
        c_in, height, width = input_shape
        c = channels
        self.p = dropout
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * c, 4 * c, 3, padding=1)
        h2, w2 = height // 2, width // 2
        h4, w4 = h2 // 2, w2 // 2
        # Shapes of the three dropout sites (without the batch dimension), for explicit masks.
        self.mask_shapes = ((c, h2, w2), (2 * c, h2, w2), (4 * c, h4, w4))
        self.img_fc = nn.Linear(4 * c * h4 * w4, hidden)

    def _drop(self, a: torch.Tensor, masks: tuple[torch.Tensor, ...] | None, i: int) -> torch.Tensor:
        if masks is not None:  # boolean keep-masks drawn by the caller
            return a * masks[i] * (1.0 / (1.0 - self.p))
        return F.dropout(a, self.p, self.training)

    def image_features(self, x: torch.Tensor, masks: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        a = F.max_pool2d(F.relu(self.conv1(x)), 2)
        a = self._drop(a, masks, 0)
        a = self._drop(F.relu(self.conv2(a)), masks, 1)
        a = F.max_pool2d(F.relu(self.conv3(a)), 2)
        a = self._drop(a, masks, 2)
        return self.img_fc(a.flatten(-3))

    def draw_masks(self, batch: int, generator: torch.Generator, dtype: torch.dtype, leading: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...] | None:
        """Boolean keep-masks (1 byte per element) for the three dropout sites, or None without dropout."""
        if self.p <= 0 or not self.training:
            return None
        keep = 1.0 - self.p
        return tuple(
            torch.rand(*leading, batch, *shape, generator=generator, device=generator.device, dtype=dtype) < keep
            for shape in self.mask_shapes
        )


class LatentLabelModel(nn.Module):
    """Class embeddings, classifier head, read-out rule and BP-twin forward of a NoProp model.

    A subclass builds its networks, calls :meth:`_build_embedding` and :meth:`_build_head` (in the order
    that fixes its parameter initialisation) and implements :meth:`chain`, the inference chain from
    z_0 to the final latent.
    """

    READOUTS = ("mean", "sampled")
    # How backprop trains this model as the BP twin (listed with BP's deviations in the twin's record).
    backprop_notes: tuple[str, ...] = ()

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, embed_dim: int | None) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.embed_dim = num_classes if embed_dim is None else embed_dim
        self.embedding_learned = embed_dim is not None
        # Test-time read-out of the chain (``read_out``); set per run from the config's ``readout``.
        self.readout = "mean"
        self.readout_seed = 7_919

    def _build_embedding(self) -> None:
        """W_Embed: one-hot (identity, a buffer, d = C) or learned, orthogonally initialised C x d."""
        if self.embedding_learned:
            w = torch.empty(self.num_classes, self.embed_dim)
            nn.init.orthogonal_(w)
            self.embed = nn.Parameter(w)
        else:
            self.register_buffer("embed", torch.eye(self.num_classes))

    def _build_head(self, head_init: str) -> None:
        """``head`` = Linear(d, C); "embed": weight = W_Embed, bias 0 (the nearest-embedding logits u_k · z)."""
        self.head = nn.Linear(self.embed_dim, self.num_classes)  # p̂_θout(y | z_end) = softmax(head(z_end))
        if head_init == "embed":
            with torch.no_grad():
                self.head.weight.copy_(self.embed)
                self.head.bias.zero_()

    def to_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """û = softmax(logits) · W_Embed, a convex combination of the class embeddings."""
        return torch.softmax(logits, dim=-1) @ self.embed

    def chain(self, x: torch.Tensor, z: torch.Tensor, noise: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """The inference chain from z_0 = ``z`` to the final latent (noise, if the chain has any, from ``generator``)."""
        raise NotImplementedError

    def start(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Generator | None]:
        """z_0 by the ``readout`` rule, and the generator the chain's noise comes from (None: the mean path).

        ``mean``: z_0 = 0 and no noise. ``sampled``: z_0 ~ N(0, I) from a generator reset to
        ``readout_seed`` at every call, so evaluation is deterministic and consumes no training randomness.
        """
        shape = (x.shape[0], self.embed_dim)
        if self.readout == "sampled":
            generator = torch.Generator(device=x.device).manual_seed(self.readout_seed)
            return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype), generator
        return x.new_zeros(shape), None

    def read_out(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores at test time by the ``readout`` rule, the same for a NoProp algorithm and its BP twin."""
        z, generator = self.start(x)
        return self.head(self.chain(x, z, noise=generator is not None, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The BP twin: the chain end to end from z_0 ~ N(0, I) (global RNG, like dropout) in training,
        ``read_out`` in eval; then the head."""
        if not self.training:
            return self.read_out(x)
        z = torch.randn((x.shape[0], self.embed_dim), device=x.device, dtype=x.dtype)
        return self.head(self.chain(x, z, noise=True))


def parse_shared_token(tok: str, values: dict[str, Any]) -> bool:
    """Read one of the tokens every NoProp spec accepts into ``values``; False if ``tok`` is not one.

    onehot | dD (embedding), rhead (PyTorch's head init), cC (channel base), hH (hidden width),
    pP (dropout). A family checks its own named tokens first (``cosine`` and ``heun`` start like cC, hH).
    Raises ValueError on a malformed number.
    """
    if tok == "onehot":
        values["embed_dim"] = None
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
        return False
    return True


def check_shared(channels: int, hidden: int, embed_dim: int | None, dropout: float) -> None:
    """Ranges of the shared options; ValueError names the first one out of range."""
    if not 1 <= channels <= 1024 or not 1 <= hidden <= 65536:
        raise ValueError("channels 1..1024 and hidden width 1..65536")
    if embed_dim is not None and not 1 <= embed_dim <= 65536:
        raise ValueError("embedding dimension 1..65536")
    if not 0.0 <= dropout < 1.0:
        raise ValueError("dropout must be in [0, 1)")
