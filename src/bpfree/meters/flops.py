"""Training and inference FLOPs counted by ``torch.utils.flop_counter`` on the steps actually run.

The first step of every distinct kind (phase, batch size) runs under
``FlopCounterMode``; every later step of the same kind adds the same count. Steps of one kind run
identical operators on identically shaped tensors, so the total equals counting every step, at the
cost of one instrumented step per kind. Only operators with FLOP formulas count (matmul, conv,
attention, and the dense linear algebra below), at 2 FLOPs per multiply-accumulate; element-wise
work is not counted. Compute-heavy operators met without a formula are listed (``uncounted_ops``)
instead of silently counting as zero.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
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


# Dense linear algebra. Counts follow Golub & Van Loan, "Matrix Computations", 4th ed. (2013), whose
# "flop" is one floating-point add, subtract, multiply or divide (so 2 per multiply-accumulate, as
# torch's matmul formulas). Leading batch dimensions multiply the count.
#   symmetric eigendecomposition, tridiagonalisation + symmetric QR (Alg. 8.3.3 and the table of
#   section 8.3): 9 n^3 with eigenvectors, 4/3 n^3 eigenvalues only
#   Cholesky (Alg. 4.2.1): n^3 / 3
#   LU with partial pivoting (Alg. 3.4.1): 2/3 n^3
#   triangular solve (section 3.1.2): n^2 per right-hand side
#   inverse via LU (section 3.4.9): 2 n^3
#   SVD, Golub-Reinsch (table of section 8.6.3), m >= n: 4 m n^2 - 4/3 n^3 values only,
#   4 m^2 n + 8 m n^2 + 9 n^3 with U and V (economy U: 4 m n^2 + 8 m n^2 + 9 n^3 is used for
#   full_matrices=False, U being m x n)
def _batch(shape) -> int:
    return math.prod(shape[:-2]) if len(shape) > 2 else 1


def eigh_flops(n: int, eigenvectors: bool = True) -> int:
    return round(9 * n**3) if eigenvectors else round(4 * n**3 / 3)


def _eigh_flop(a_shape, uplo="L", compute_v=True, *args, out_shape=None, **kwargs) -> int:
    return _batch(a_shape) * eigh_flops(a_shape[-1], bool(compute_v))


def _cholesky_flop(a_shape, *args, out_shape=None, **kwargs) -> int:
    return _batch(a_shape) * round(a_shape[-1] ** 3 / 3)


def _rhs(b_shape, n: int) -> int:
    return 1 if len(b_shape) == 1 else b_shape[-1] if b_shape[-2] == n else b_shape[-2]


def _cholesky_solve_flop(b_shape, l_shape, *args, out_shape=None, **kwargs) -> int:
    n = l_shape[-1]  # two triangular solves
    return max(_batch(b_shape), _batch(l_shape)) * 2 * n * n * _rhs(b_shape, n)


def _solve_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    n = a_shape[-1]  # LU factorisation, then two triangular solves
    batch = max(_batch(a_shape), _batch(b_shape) if len(b_shape) > 2 else 1)
    return batch * (round(2 * n**3 / 3) + 2 * n * n * _rhs(b_shape, n))


def _solve_triangular_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    n = a_shape[-1]
    return max(_batch(a_shape), _batch(b_shape)) * n * n * _rhs(b_shape, n)


def _triangular_solve_flop(b_shape, a_shape, *args, out_shape=None, **kwargs) -> int:
    return _solve_triangular_flop(a_shape, b_shape)


def _lu_factor_flop(a_shape, *args, out_shape=None, **kwargs) -> int:
    return _batch(a_shape) * round(2 * a_shape[-1] ** 3 / 3)


def _lu_solve_flop(lu_shape, pivots_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return _solve_triangular_flop(lu_shape, b_shape) * 2


def _inv_flop(a_shape, *args, out_shape=None, **kwargs) -> int:
    return _batch(a_shape) * 2 * a_shape[-1] ** 3


def _svd_flop(a_shape, full_matrices=True, compute_uv=True, *args, out_shape=None, **kwargs) -> int:
    m, n = max(a_shape[-2:]), min(a_shape[-2:])
    if not compute_uv:
        return _batch(a_shape) * round(4 * m * n * n - 4 * n**3 / 3)
    u_cost = 4 * m * m * n if full_matrices else 4 * m * n * n
    return _batch(a_shape) * (u_cost + 8 * m * n * n + 9 * n**3)


aten = torch.ops.aten
_CUSTOM_FORMULAS = {
    aten.convolution_backward: _conv_backward_flop,
    aten._linalg_eigh: _eigh_flop,
    aten.linalg_cholesky_ex: _cholesky_flop,
    aten.cholesky_solve: _cholesky_solve_flop,
    aten._linalg_solve_ex: _solve_flop,
    aten.linalg_solve_triangular: _solve_triangular_flop,
    aten.triangular_solve: _triangular_solve_flop,
    aten.linalg_lu_factor_ex: _lu_factor_flop,
    aten.linalg_lu_solve: _lu_solve_flop,
    aten.linalg_inv_ex: _inv_flop,
    aten._linalg_svd: _svd_flop,
}

# Operators whose cost grows faster than their input size (matrix products, factorisations,
# transforms, convolutions). Met without a formula, they are listed as uncounted; element-wise,
# reduction, normalisation, indexing and view operators cost O(size) and are not listed.
_HEAVY_OP = re.compile(
    r"^_*(linalg_|cholesky|triangular_solve|lu_|lu$|svd|eig|qr|geqrf|ormqr|orgqr|lstsq|inverse|det$|slogdet|logdet"
    r"|matrix_exp|matrix_power|pinverse|fft_|fft|conv|slow_conv|thnn_conv|mkldnn_conv|cudnn_conv|miopen_conv"
    r"|mv$|addmv|dot$|vdot|ger$|outer|addbmm|addr$|int_mm|cdist|kron|scaled_dot_product|native_multi_head"
    r"|trilinear|bilinear|tensordot|einsum|chain_matmul|matmul|mm$|bmm|addmm|baddbmm|flash_attention|efficient_attention)"
)


def is_compute_heavy(op_name: str) -> bool:
    return "check_errors" not in op_name and bool(_HEAVY_OP.match(op_name))


class _UncountedOps(TorchDispatchMode):
    """Records compute-heavy operators that the FLOP counter has no formula for."""

    def __init__(self, registry) -> None:
        super().__init__()
        self.registry = registry
        self.seen: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet not in self.registry:
            name = packet.__name__
            if is_compute_heavy(name):
                self.seen[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


class CountingMode:
    """FLOP counting plus the list of compute-heavy operators it could not count."""

    def __init__(self) -> None:
        self.counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FORMULAS)
        self.recorder = _UncountedOps(self.counter.flop_registry)

    def __enter__(self) -> CountingMode:
        self.counter.__enter__()
        self.recorder.__enter__()  # inner: sees every operator before the counter does
        return self

    def __exit__(self, *exc) -> None:
        self.recorder.__exit__(*exc)
        self.counter.__exit__(*exc)

    def get_total_flops(self) -> int:
        return int(self.counter.get_total_flops())

    @property
    def uncounted_ops(self) -> dict[str, int]:
        return dict(self.recorder.seen)


def flop_counter() -> CountingMode:
    return CountingMode()


class FlopLedger:
    def __init__(self, total: int = 0, per_kind: dict[str, int] | None = None,
                 uncounted_ops: dict[str, int] | None = None) -> None:
        self.total = total
        self._per_step: dict[Hashable, int] = {}
        self.per_kind = dict(per_kind or {})  # readable summary: kind -> FLOPs per step
        # operator -> calls met in the instrumented steps without a FLOP formula (not in ``total``);
        # the caller's dict itself, so ledgers can share one
        self.uncounted_ops = {} if uncounted_ops is None else uncounted_ops

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
        out, flops = run_counted(fn, self.uncounted_ops)
        self.add_counted(kind, flops)
        return out


def kind_label(kind: Hashable) -> str:
    """``("train", 128)`` -> ``"train/128"``: a readable, JSON-friendly key."""
    if isinstance(kind, tuple):
        return "/".join(str(part) for part in kind)
    return str(kind)


def run_counted(fn: Callable[[], T], uncounted: dict[str, int] | None = None) -> tuple[T, int]:
    """Run ``fn`` under the FLOP counter; returns its result and the FLOPs counted.

    Compute-heavy operators met without a formula are added to ``uncounted`` (name -> calls).
    """
    with flop_counter() as counter:
        out = fn()
    if uncounted is not None:
        for name, calls in counter.uncounted_ops.items():
            uncounted[name] = uncounted.get(name, 0) + calls
    return out, counter.get_total_flops()


def count_flops(fn: Callable[[], Any]) -> int:
    return run_counted(fn)[1]


def count_flops_detailed(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of ``fn`` and the compute-heavy operators it ran that have no formula (name -> calls)."""
    uncounted: dict[str, int] = {}
    _, flops = run_counted(fn, uncounted)
    return flops, uncounted
