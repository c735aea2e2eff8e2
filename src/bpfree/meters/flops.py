"""Training and inference FLOPs counted by ``torch.utils.flop_counter`` on the steps actually run.

The first step of every distinct kind (phase, batch size, algorithm key) runs under
``FlopCounterMode``; every later step of the same kind adds the same count. Steps of one kind run
identical operators on identically shaped tensors, so the total equals counting every step, at the
cost of one instrumented step per kind. Only operators with FLOP formulas count (matmul, conv,
attention), at 2 FLOPs per multiply-accumulate; element-wise work is not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


class FlopLedger:
    def __init__(self, total: int = 0, per_kind: dict[str, int] | None = None) -> None:
        self.total = total
        self._per_step: dict[Hashable, int] = {}
        self.per_kind = dict(per_kind or {})  # readable summary: kind -> FLOPs per step

    def run(self, kind: Hashable, fn: Callable[[], T]) -> T:
        """Run ``fn`` (one step), counting its FLOPs the first time this kind is seen."""
        if kind in self._per_step:
            self.total += self._per_step[kind]
            return fn()
        with FlopCounterMode(display=False) as counter:
            out = fn()
        flops = int(counter.get_total_flops())
        self._per_step[kind] = flops
        self.per_kind[str(kind)] = flops
        self.total += flops
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
