"""Cascaded Forward, CaFo (Zhao et al. 2023, arXiv 2303.09728), variants Rand and DFA.

The shared 3-block CNN (``cnn3``) is a cascade of blocks h_k = blk_k(h_{k-1}). Each block k gets
a linear predictor W_k (F_k x C, no bias) trained on the *detached* flattened block output; the
blocks themselves are never trained by the predictors. Inference sums the blocks' probability
vectors, sum_k softmax(h_k W_k) (sparsemax for the SL loss), and takes the argmax.

Variants (``params.variant``):
- ``rand``: the blocks keep their random initialisation and stay frozen. Their BatchNorm uses
  FIXED statistics, never the statistics of the batch being predicted (the official code
  normalised the test set with its own statistics: transductive). ``rand_bn``:
  ``calibrated`` (default) adds a one-epoch ``bn_calibration`` phase that runs the training data
  through the blocks in train mode (each BatchNorm normalises by its batch's statistics), sums on
  the device every BatchNorm input's per-channel batch mean and unbiased batch variance, and at the
  epoch's end sets the running statistics to their averages over the batches: the cumulative
  average of ``momentum=None`` (as ``torch.optim.swa_utils.update_bn``), without its host read of
  the batch count, so the step can be captured in a CUDA graph. The statistics are then frozen;
  their cost counts as training. ``identity`` keeps the initial running statistics (mean 0,
  variance 1), i.e. BN is the identity up to eps, as the prior study did. (The calibration phase's validation accuracy is
  that of the untrained, all-zero predictors: chance; it trains nothing that validation could judge.)
- ``dfa``: a first phase ``dfa`` trains the blocks by Direct Feedback Alignment (Noekland 2016).
  One forward pass through the blocks (each block's input detached), an auxiliary linear head
  (``aux.dfa_head``) on the last block's flattened output, the global error
  e = (softmax(q) - onehot(y)) / B (the gradient of the mean CE w.r.t. the logits), and fixed
  random feedback matrices B_k (C x F_k, Gaussian with unit-norm rows, drawn from the algorithm's
  generator) that carry e to EVERY block, the last included. Each block gets the local
  vector-Jacobian product of its own output w.r.t. its own parameters with the signal e B_k
  reshaped to the block's output shape; the head gets its true gradient. One forward and one
  local VJP per block, no backward across blocks. BN runs in train mode during this phase and
  its running statistics are the ones the frozen blocks use afterwards. The phase early-stops on
  the validation accuracy of the auxiliary head (``dfa_early_stopping``) and restores the best
  blocks. Then the blocks are frozen and the predictors trained as in Rand.

Predictor schedule (``params.schedule``):
- ``greedy`` (default, as the paper and the prior study): phases ``predictor1``, ``predictor2``,
  ``predictor3``. During phase k, ``predict`` is the final rule restricted to predictors 1..k
  (``phase_readout=cumulative``, default), so early stopping selects W_k for the ensemble that
  will actually be used; ``phase_readout=own`` reads out predictor k alone (prior study).
- ``simultaneous``: one phase ``predictors`` trains all predictors from one pass over the
  blocks per batch. With frozen blocks the predictors are independent, so this is the same
  objective at lower cost (no recomputation of blocks 1..k-1 in k separate phases).

Losses (``params.loss``), z = h W, y one-hot:
- ``ce``: mean cross-entropy, minimised with the run's optimiser and lr on mini-batches.
- ``sl``: the sparsemax loss -z_y + 1/2 sum_{j in S(z)} (z_j^2 - tau(z)^2) + 1/2, whose gradient
  w.r.t. z is sparsemax(z) - y (so w.r.t. W it is h (sparsemax(z) - y)^T); run's optimiser.
- ``mse``: with ``mse_solver=closed_form`` (default) W = (H^T H + ridge I)^-1 H^T Y over the
  training features. Each predictor phase then lasts exactly one epoch: every ``train_step``
  accumulates H^T H and H^T Y (float64) from its batch, and ``end_epoch`` solves the system
  (Cholesky for ridge > 0; for ridge = 0, the paper's default, the pseudo-inverse through a
  symmetric eigendecomposition), so the solve is timed and FLOP-counted as training and validation
  sees the solved W. ``end_epoch`` reports the exact training MSE (from the accumulators) as the
  epoch's loss. ``mse_solver=gradient`` minimises 1/2 ||z - y||^2 with the optimiser.

Feature computation: the engine feeds raw batches, so every predictor step recomputes the
frozen blocks under ``no_grad`` (honest cost, as the prior study; E7). Caching features across
epochs would save those forward passes on un-augmented data but would change the semantics under
random crop/flip augmentation (CIFAR), so it is not done.

Deviations (declared in ``deviations``, each with its switch where one exists) are listed below.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from bpfree.algorithms import register
from bpfree.algorithms.base import Algorithm, EpochClock, Phase, SearchDim, make_optimizer

# -- sparsemax (Martins & Astudillo 2016) --------------------------------------------------------


def sparsemax_with_threshold(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparsemax over the last dimension and its threshold tau (shape ``(..., 1)``).

    sparsemax(z) = max(z - tau, 0) with tau chosen so the result sums to 1: with z sorted in
    decreasing order, the support size is k(z) = max{k : 1 + k z_(k) > sum_{j<=k} z_(j)} and
    tau = (sum_{j<=k(z)} z_(j) - 1) / k(z). No host synchronisation.
    """
    z_sorted, _ = torch.sort(z, dim=-1, descending=True)
    cumsum = z_sorted.cumsum(dim=-1)
    ks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    support = (1 + ks * z_sorted) > cumsum  # true on a prefix of the sorted entries
    k_z = support.sum(dim=-1, keepdim=True)  # >= 1 always (k = 1 satisfies the inequality)
    tau = (cumsum.gather(-1, k_z - 1) - 1) / k_z.to(z.dtype)
    return torch.clamp(z - tau, min=0), tau


def sparsemax(z: torch.Tensor) -> torch.Tensor:
    return sparsemax_with_threshold(z)[0]


class _SparsemaxLoss(torch.autograd.Function):
    """Per-sample sparsemax loss with the exact gradient sparsemax(z) - y w.r.t. z."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        p, tau = sparsemax_with_threshold(z)
        # sum_{j in S} (z_j^2 - tau^2) = sum_j p_j (z_j + tau), since p_j = z_j - tau on S, 0 off S.
        loss = -(z * target).sum(-1) + 0.5 * (p * (z + tau)).sum(-1) + 0.5
        ctx.save_for_backward(p, target)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        p, target = ctx.saved_tensors
        return grad_output.unsqueeze(-1) * (p - target), None


def sparsemax_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean sparsemax loss over the batch; ``y`` holds class indices."""
    target = F.one_hot(y, z.shape[-1]).to(z.dtype)
    return _SparsemaxLoss.apply(z, target).mean()


# -- fixed random feedback for DFA ---------------------------------------------------------------


class FixedFeedback(nn.Module):
    """The DFA feedback matrices B_k (C x F_k), kept as buffers: fixed, saved with the weights."""

    def __init__(self, matrices: list[torch.Tensor]) -> None:
        super().__init__()
        for i, matrix in enumerate(matrices):
            self.register_buffer(f"b{i}", matrix)

    def __getitem__(self, index: int) -> torch.Tensor:
        return getattr(self, f"b{index}")


def feedback_matrix(classes: int, features: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    device = generator.device
    if kind == "gaussian":
        m = torch.randn(classes, features, generator=generator, device=device)
    else:  # uniform in [-1, 1]
        m = torch.rand(classes, features, generator=generator, device=device) * 2 - 1
    return m / m.norm(dim=1, keepdim=True)  # each row (one class's direction) has unit L2 norm


# -- the algorithm ---------------------------------------------------------------------------------


class CaFoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["rand", "dfa"] = "rand"
    loss: Literal["ce", "mse", "sl"] = "ce"
    schedule: Literal["greedy", "simultaneous"] = "greedy"
    # What ``predict`` reads out during greedy phase k: predictors 1..k summed, or predictor k alone.
    phase_readout: Literal["cumulative", "own"] = "cumulative"
    # Inference: sum of per-block probabilities (softmax; sparsemax for sl), or of raw logits (prior study).
    aggregation: Literal["probs", "logits"] = "probs"
    predictor_bias: bool = False  # the paper's predictors have no bias; the prior study's have one
    mse_solver: Literal["closed_form", "gradient"] = "closed_form"
    ridge: float = Field(0.0, ge=0.0, description="lambda in (H^T H + lambda I)^-1 H^T Y; 0 = pseudo-inverse")
    rand_bn: Literal["calibrated", "identity"] = "calibrated"
    dfa_epochs: int = Field(10, ge=1, le=100_000)
    dfa_lr: float | None = Field(None, gt=0, le=10, description="block lr in the dfa phase; null = run lr")
    dfa_weight_decay: float | None = Field(None, ge=0, le=1, description="null = run weight_decay")
    dfa_feedback: Literal["gaussian", "uniform"] = "gaussian"
    dfa_last_block: Literal["dfa", "bp"] = "dfa"  # bp = the prior study's hybrid (last block by BP via the head)
    dfa_error: Literal["mean", "sum"] = "mean"  # sum = per-sample error not divided by B (prior study)
    dfa_early_stopping: bool = True
    dfa_bn_updates: Literal[1, 2] = Field(
        1, description="BatchNorm running-stat updates per batch in DFA-trained blocks (2: the prior study's recomputed forward)"
    )


@register
class CascadedForward(Algorithm):
    name = "cafo"
    uses_model_head = False
    paper = "Zhao et al. 2023, Cascaded Forward (arXiv 2303.09728); DFA: Noekland 2016"
    deviations = (
        "gradient-trained predictors (ce, sl, mse with mse_solver=gradient) use mini-batches and the run's "
        "optimiser/lr, zero init (paper: full-batch GD, fixed step 0.01, all-ones init; zero and all-ones init "
        "give identical softmax/sparsemax outputs and gradients)",
        "each phase early-stops on validation accuracy and restores its best weights; greedy phase k is judged "
        "on predictors 1..k summed (phase_readout=own: predictor k alone) (paper: fixed 5000 epochs; prior "
        "study: predictor k's validation CE, last-epoch weights)",
        "rand blocks use fixed BN statistics calibrated once on the training data (rand_bn=calibrated; "
        "rand_bn=identity is the prior study's) instead of the official code's per-batch statistics, which "
        "normalised the test set with its own statistics (transductive)",
        "dfa: pure DFA on every block with e = (softmax - onehot)/B, one forward and one local VJP per block "
        "(prior study: last block by BP through the aux head, dfa_last_block=bp; error not divided by B, "
        "dfa_error=sum; a wasted full backward)",
        "dfa phase early-stops on the aux head's validation accuracy and restores the best blocks "
        "(dfa_early_stopping=false: fixed dfa_epochs, as the prior study)",
        "dfa: BatchNorm running statistics of a DFA-trained block are updated once per batch (the prior study's "
        "recomputed forward updated them twice: dfa_bn_updates=2)",
        "closed-form mse accumulates H^T H and H^T Y in float64 over one epoch of mini-batches and solves at "
        "its last batch; ridge=0 uses an eigendecomposition pseudo-inverse (paper: whole training set as one "
        "tensor, inverse with pinv fallback)",
        "the shared cnn3 uses BatchNorm eps 1e-5 (paper 1e-4); the model's BP head is unused by CaFo",
    )
    Params = CaFoParams
    model_families = ("cnn3",)
    # Prior study §3.3 (predictor lr/wd; block lr/wd for DFA). Epoch counts are not tuned per
    # algorithm here: every algorithm gets the same epoch budget. The dfa_* dimensions only act
    # when params.variant=dfa.
    search_space = (
        SearchDim("lr", "log", 2e-4, 5e-3),
        SearchDim("weight_decay", "log", 1e-7, 1e-4),
        SearchDim("params.dfa_lr", "log", 2e-5, 5e-4),
        SearchDim("params.dfa_weight_decay", "log", 1e-7, 1e-4),
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p = self.params
        classes = self.spec.num_classes
        self.num_blocks = len(self.model.blocks)
        dims = list(self.model.block_dims)
        predictors = nn.ModuleList(nn.Linear(d, classes, bias=p.predictor_bias) for d in dims)
        for predictor in predictors:  # zero init: same outputs/gradients as the paper's all-ones for CE/SL
            nn.init.zeros_(predictor.weight)
            if predictor.bias is not None:
                nn.init.zeros_(predictor.bias)
        self.aux["predictors"] = predictors.to(self._device)
        if p.variant == "dfa":
            head = nn.Linear(dims[-1], classes)
            nn.init.zeros_(head.bias)
            self.aux["dfa_head"] = head.to(self._device)
            self.aux["feedback"] = FixedFeedback(
                [feedback_matrix(classes, d, p.dfa_feedback, self.generator) for d in dims]
            ).to(self._device)
        self.closed_form = p.loss == "mse" and p.mse_solver == "closed_form"
        self._mode = "final"  # calibrate | dfa | predictors | final
        self._active: list[int] = list(range(self.num_blocks))  # predictors trained in this phase
        self._readout: list[int] = list(range(self.num_blocks))  # predictors summed by predict
        self._bn_momentum = {id(m): m.momentum for m in self._batchnorms()}
        self._samples = 0  # training samples of the current epoch (closed form: the solve's n)
        self._reset_accumulators()
        # bn_calibration: per BatchNorm, the sums over batches of its input's per-channel batch mean and
        # unbiased batch variance, and the batch count, all on the device (set as running statistics by end_epoch)
        self._bn_mean_sums: dict[int, torch.Tensor] = {}
        self._bn_var_sums: dict[int, torch.Tensor] = {}
        self._bn_batches = torch.zeros((), dtype=torch.long, device=self._device)
        self._bn_hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def _device(self) -> torch.device:
        return self.device

    def _batchnorms(self) -> list[nn.modules.batchnorm._BatchNorm]:
        return [m for m in self.model.blocks.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _calibrated_batchnorms(self) -> list[nn.modules.batchnorm._BatchNorm]:
        return [m for m in self._batchnorms() if m.track_running_stats]

    # -- schedule -------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        p = self.params
        phases: list[Phase] = []
        if p.variant == "rand" and p.rand_bn == "calibrated":
            phases.append(Phase("bn_calibration", 1, early_stopping=False))
        if p.variant == "dfa":
            phases.append(Phase("dfa", p.dfa_epochs, early_stopping=p.dfa_early_stopping))
        epochs = 1 if self.closed_form else self.settings.epochs
        if p.schedule == "simultaneous":
            phases.append(Phase("predictors", epochs))
        else:
            phases += [Phase(f"predictor{k + 1}", epochs) for k in range(self.num_blocks)]
        return phases

    def begin_phase(self, phase: Phase) -> None:
        super().begin_phase(phase)
        self._stop_calibration()
        self.optimizers = {}
        self._reset_accumulators()
        if phase.name == "bn_calibration":
            self._mode = "calibrate"
            self._start_calibration()
            self._active, self._readout = [], list(range(self.num_blocks))
            return
        if phase.name == "dfa":
            self._mode = "dfa"
            params = list(self.model.blocks.parameters()) + list(self.aux["dfa_head"].parameters())
            self.optimizers["dfa"] = make_optimizer(
                params, self.settings, lr=self.params.dfa_lr, weight_decay=self.params.dfa_weight_decay
            )
            return
        self._mode = "predictors"
        self._reset_accumulators()  # allocated for this phase's predictors at its first epoch
        if phase.name == "predictors":
            self._active = list(range(self.num_blocks))
            self._readout = list(range(self.num_blocks))
        else:
            k = int(phase.name.removeprefix("predictor")) - 1
            self._active = [k]
            self._readout = [k] if self.params.phase_readout == "own" else list(range(k + 1))
        if not self.closed_form:
            params = [q for k in self._active for q in self.aux["predictors"][k].parameters()]
            self.optimizers[phase.name] = make_optimizer(params, self.settings)

    def begin_epoch(self, clock: EpochClock) -> None:
        if self._mode == "calibrate":
            for acc in [*self._bn_mean_sums.values(), *self._bn_var_sums.values(), self._bn_batches]:
                acc.zero_()  # in place: a captured step keeps adding into the same tensors
        if self._mode == "predictors" and self.closed_form:
            self._samples = clock.samples
            if not self._gram:
                self._allocate_accumulators()
            for acc in [*self._gram.values(), *self._hty.values(), self._yty]:
                acc.zero_()  # in place: a captured step keeps accumulating into the same tensors

    def end_epoch(self) -> dict[str, torch.Tensor]:
        if self._mode == "calibrate":
            self._set_calibrated_statistics()
            return {}
        if self._mode != "predictors" or not self.closed_form:
            return {}
        mse = self._solve().float()
        return {"loss": mse, "train_mse": mse}

    def end_training(self) -> None:
        super().end_training()
        self._stop_calibration()
        self._mode = "final"
        self._active, self._readout = [], list(range(self.num_blocks))
        self._reset_accumulators()

    # -- BatchNorm calibration (rand_bn=calibrated) -----------------------------------------------
    def _start_calibration(self) -> None:
        """Reset every BatchNorm's running statistics and sum its input's batch statistics from now on."""
        for i, bn in enumerate(self._calibrated_batchnorms()):
            bn.reset_running_stats()
            bn.momentum = 0.0  # normalise by the batch; the running statistics stay put until end_epoch sets them
            self._bn_mean_sums[i] = torch.zeros_like(bn.running_mean)
            self._bn_var_sums[i] = torch.zeros_like(bn.running_var)
            self._bn_hooks.append(bn.register_forward_pre_hook(functools.partial(self._sum_batch_statistics, i)))

    def _sum_batch_statistics(self, index: int, bn: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        """Forward pre-hook of BatchNorm ``index``: add its input's per-channel batch mean and unbiased variance."""
        if not bn.training:  # evaluation passes read the running statistics; they add nothing
            return
        h = inputs[0].detach().float()
        var, mean = torch.var_mean(h, dim=[0, *range(2, h.dim())], correction=1)
        self._bn_mean_sums[index].add_(mean)
        self._bn_var_sums[index].add_(var)

    def _set_calibrated_statistics(self) -> None:
        """Running statistics = the averages over the epoch's batches (torch's ``momentum=None`` rule)."""
        with torch.no_grad():
            for i, bn in enumerate(self._calibrated_batchnorms()):
                bn.running_mean.copy_(self._bn_mean_sums[i] / self._bn_batches)
                bn.running_var.copy_(self._bn_var_sums[i] / self._bn_batches)
                bn.num_batches_tracked.copy_(self._bn_batches)

    def _stop_calibration(self) -> None:
        for handle in self._bn_hooks:
            handle.remove()
        self._bn_hooks = []
        self._bn_mean_sums, self._bn_var_sums = {}, {}
        for bn in self._batchnorms():
            bn.momentum = self._bn_momentum[id(bn)]

    # -- modes ----------------------------------------------------------------------------------
    def train_mode(self) -> None:
        self.modules().train()
        self.model.head.eval()  # BP's head: unused by CaFo
        if self._mode not in ("calibrate", "dfa"):
            self.model.blocks.eval()  # frozen blocks: fixed BN statistics, never batch statistics

    # -- features and read-out ------------------------------------------------------------------
    def _features(self, x: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """Flattened outputs of blocks 0..upto (inclusive)."""
        feats = []
        h = x
        for i in range(upto + 1):
            h = self.model.blocks[i](h)
            feats.append(h.flatten(1))
        return feats

    def _block_scores(self, z: torch.Tensor) -> torch.Tensor:
        if self.params.aggregation == "logits":
            return z
        return sparsemax(z) if self.params.loss == "sl" else torch.softmax(z, dim=-1)

    def layer_scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each predictor alone on its own block's features."""
        feats = self._features(x, self.num_blocks - 1)
        predictors: nn.ModuleList = self.aux["predictors"]  # type: ignore[assignment]
        return {f"predictor{k + 1}": predictors[k](feats[k]) for k in range(len(predictors))}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "dfa":
            h = x
            for block in self.model.blocks:
                h = block(h)
            return self.aux["dfa_head"](h.flatten(1))
        feats = self._features(x, max(self._readout))
        predictors = self.aux["predictors"]
        return torch.stack([self._block_scores(predictors[k](feats[k])) for k in self._readout]).sum(0)

    # -- learning -------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._mode == "calibrate":
            with torch.no_grad():
                self._features(x, self.num_blocks - 1)  # the BatchNorm pre-hooks sum this batch's statistics
            self._bn_batches.add_(1)
            return {"loss": torch.zeros((), device=x.device)}
        if self._mode == "dfa":
            return self._dfa_step(x, y)
        with torch.no_grad():  # frozen blocks, recomputed every batch (see module docstring)
            feats = self._features(x, max(self._active))
        if self.closed_form:
            return self._accumulate_step(feats, y)
        return self._predictor_step(feats, y)

    def _local_loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.params.loss == "ce":
            return F.cross_entropy(z, y)
        if self.params.loss == "sl":
            return sparsemax_loss(z, y)
        target = F.one_hot(y, z.shape[-1]).to(z.dtype)
        return 0.5 * (z - target).pow(2).sum(-1).mean()

    def _predictor_step(self, feats: list[torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        predictors = self.aux["predictors"]
        losses = [self._local_loss(predictors[k](feats[k]), y) for k in self._active]
        loss = torch.stack(losses).sum()
        optimizer = self.optimizers[self.phase.name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    def _dfa_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.params
        outputs, inputs = [], []
        h = x
        for block in self.model.blocks:
            inputs.append(h.detach())
            h = block(h.detach())  # detached input: the block's graph is its own, nothing crosses blocks
            outputs.append(h)
        last_by_bp = p.dfa_last_block == "bp"
        if p.dfa_bn_updates == 2:  # the prior study recomputed each DFA block's forward in train mode
            with torch.no_grad():
                dfa_blocks = len(outputs) - 1 if last_by_bp else len(outputs)
                for block, block_input in zip(list(self.model.blocks)[:dfa_blocks], inputs):
                    block(block_input)  # same batch statistics; only BN's running statistics move again
        head_input = outputs[-1].flatten(1)
        q = self.aux["dfa_head"](head_input if last_by_bp else head_input.detach())
        loss = F.cross_entropy(q, y)
        with torch.no_grad():
            e = torch.softmax(q, dim=-1) - F.one_hot(y, q.shape[-1]).to(q.dtype)
            if p.dfa_error == "mean":
                e = e / x.shape[0]  # the gradient of the mean CE w.r.t. the logits
        roots, signals = [loss], [None]  # the head: its true gradient
        feedback = self.aux["feedback"]
        for k, out in enumerate(outputs):
            if last_by_bp and k == len(outputs) - 1:
                continue
            roots.append(out)
            signals.append((e @ feedback[k]).view_as(out))  # e B_k, reshaped to the block's output
        optimizer = self.optimizers["dfa"]
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(roots, signals)  # disjoint graphs: one local VJP per block
        optimizer.step()
        return {"loss": loss.detach()}

    # -- closed-form least squares --------------------------------------------------------------
    def _reset_accumulators(self) -> None:
        self._gram: dict[int, torch.Tensor] = {}
        self._hty: dict[int, torch.Tensor] = {}
        self._yty: torch.Tensor | None = None

    def _allocate_accumulators(self) -> None:
        """Zeroed H^T H, H^T Y and Y^T Y for the active predictors, before the epoch's first step."""
        extra = 1 if self.params.predictor_bias else 0
        classes, device = self.spec.num_classes, self._device
        dims = list(self.model.block_dims)
        self._gram = {k: torch.zeros(dims[k] + extra, dims[k] + extra, dtype=torch.float64, device=device) for k in self._active}
        self._hty = {k: torch.zeros(dims[k] + extra, classes, dtype=torch.float64, device=device) for k in self._active}
        self._yty = torch.zeros((), dtype=torch.float64, device=device)

    def _design(self, h: torch.Tensor) -> torch.Tensor:
        h = h.double()
        if self.params.predictor_bias:
            h = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)
        return h

    def _accumulate_step(self, feats: list[torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        target = F.one_hot(y, self.spec.num_classes).double()
        for k in self._active:
            h = self._design(feats[k])
            self._gram[k].addmm_(h.T, h)
            self._hty[k].addmm_(h.T, target)
        self._yty.add_((target * target).sum())
        return {"loss": torch.zeros((), device=y.device)}  # the epoch's loss comes from end_epoch

    def _solve(self) -> torch.Tensor:
        """Solve every active predictor; returns their summed training MSE (1/2 ||HW - Y||^2 / n)."""
        total = torch.zeros((), dtype=torch.float64, device=self._device)
        n = self._samples
        with torch.no_grad():
            for k in self._active:
                w = ridge_solve(self._gram[k], self._hty[k], self.params.ridge)
                predictor = self.aux["predictors"][k]
                if predictor.bias is not None:
                    predictor.weight.copy_(w[:-1].T.to(predictor.weight.dtype))
                    predictor.bias.copy_(w[-1].to(predictor.bias.dtype))
                else:
                    predictor.weight.copy_(w.T.to(predictor.weight.dtype))
                # ||HW - Y||^2 = tr(Y^T Y) - 2 tr(W^T H^T Y) + tr(W^T H^T H W)
                sse = self._yty - 2 * (w * self._hty[k]).sum() + (w * (self._gram[k] @ w)).sum()
                total = total + 0.5 * sse / n
        return total


def ridge_solve(gram: torch.Tensor, hty: torch.Tensor, ridge: float) -> torch.Tensor:
    """W = (G + ridge I)^-1 H^T Y; for ridge = 0 the minimum-norm least-squares solution pinv(G) H^T Y."""
    if ridge > 0:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        factor, _ = torch.linalg.cholesky_ex(gram + ridge * eye)
        return torch.cholesky_solve(hty, factor)
    evals, evecs = torch.linalg.eigh(gram)
    tol = evals.abs().max() * gram.shape[0] * torch.finfo(gram.dtype).eps
    inv = torch.where(evals > tol, 1.0 / evals.clamp_min(torch.finfo(gram.dtype).tiny), torch.zeros_like(evals))
    return evecs @ (inv.unsqueeze(1) * (evecs.T @ hty))
