"""Training and inference FLOPs counted by ``torch.utils.flop_counter`` on the steps actually run.

The first step of every distinct kind (phase, batch size) runs under
``FlopCounterMode``; every later step of the same kind adds the same count. Steps of one kind run
identical operators on identically shaped tensors, so the total equals counting every step, at the
cost of one instrumented step per kind. Only operators with FLOP formulas count (matmul, conv,
attention), at 2 FLOPs per multiply-accumulate; element-wise work is not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

T = TypeVar("T")


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """torch's formula, with the weight gradient of a grouped convolution counted once, not ``groups`` times.

    The stock formula ignores ``groups`` for grad_weight (it treats every input channel as feeding
    every output channel); stacked per-block convolutions (NoProp's vmap'd blocks) are grouped.
    """
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    total = conv_backward_flop(*args, output_mask, out_val=out_shape)  # the registered wrapper takes out_val
    if not output_mask[1] or groups == 1:
        return total
    grad_weight = conv_backward_flop(*args, [False, True, False], out_val=out_shape)
    return total - grad_weight + grad_weight // groups


_CUSTOM_FORMULAS = {torch.ops.aten.convolution_backward: _conv_backward_flop}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_CUSTOM_FORMULAS)


class FlopLedger:
    """Training or evaluation FLOPs: each kind of step is counted once, then multiplied by its count."""

    def __init__(self, total: int = 0, per_kind: dict[str, int] | None = None) -> None:
        self.total = total
        self._per_step: dict[Hashable, int] = {}
        self.per_kind = dict(per_kind or {})  # readable summary: kind -> FLOPs per step

    def knows(self, kind: Hashable) -> bool:
        return kind in self._per_step

    def add(self, kind: Hashable) -> None:
        """One more step of a kind already counted."""
        self.total += self._per_step[kind]

    def add_counted(self, kind: Hashable, flops: int) -> None:
        """A step counted by the caller (work that is counted every time it runs)."""
        self._per_step[kind] = flops
        self.per_kind[kind_label(kind)] = flops
        self.total += flops

    def run(self, kind: Hashable, fn: Callable[[], T]) -> T:
        """Run ``fn`` (one step), counting its FLOPs the first time this kind is seen."""
        if kind in self._per_step:
            self.add(kind)
            return fn()
        out, flops = run_counted(fn)
        self.add_counted(kind, flops)
        return out


def kind_label(kind: Hashable) -> str:
    """``("train", 128)`` -> ``"train/128"``: a readable, JSON-friendly key."""
    if isinstance(kind, tuple):
        return "/".join(str(part) for part in kind)
    return str(kind)


def run_counted(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn`` under the FLOP counter; returns its result and the FLOPs counted."""
    with flop_counter() as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def count_flops(fn: Callable[[], Any]) -> int:
    return run_counted(fn)[1]
