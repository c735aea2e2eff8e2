"""NoProp-DT: throughput of sequential vs parallel (vmap'd) block training, and the memory of one
training step of NoProp against one BP step on the same network.

    python benchmarks/noprop_parallel.py [--model noprop:10,c4,h64] [--batch 128] [--steps 10]
                                         [--device auto|cpu|cuda] [--threads N]

Rows (same weights, same synthetic MNIST-shaped batch):
- ``noprop seq``: loop=joint, parallel=false: T block steps one after another, backward per block.
- ``noprop par``: loop=joint, parallel=true: the T blocks as one vmap'd call over stacked weights.
- ``noprop 1blk``: loop=paper: one block (plus head) per step, the paper's inner loop.
- ``bp``: the BP twin, the whole chain forward and backward.

Columns:
- samples/s of training steps (after warm-up), and the speed-up of ``par`` over ``seq``.
- activation memory: the peak, over the step, of the bytes of tensors saved for backward and still
  alive (``torch.autograd.graph.saved_tensors_hooks``; storages deduplicated; parameters and the
  input batch excluded). Device independent: the memory that backward needs kept.
- step peak: the peak of all allocator bytes during the step above the level before it; on CUDA
  ``torch.cuda.max_memory_allocated``, on CPU the running sum of the profiler's per-event
  allocation balance (``profile_memory=True``; an op's internal temporaries are netted). Both
  include the gradients and temporaries the step creates (optimiser state exists after warm-up).
- GFLOP/step counted by the engine's FLOP counter (``bpfree.meters.flops``), whose grouped-convolution
  backward formula counts the weight gradient once (torch's stock formula counts it ``groups`` times).
The ratio columns are relative to BP.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from bpfree.algorithms import algorithm_names, get_algorithm
from bpfree.algorithms.base import NoParams, TrainSettings
from bpfree.data import DataSpec
from bpfree.meters.flops import count_flops
from bpfree.models import build_model


class ActivationMeter:
    """Live bytes of tensors saved for backward (deduplicated by storage), and their peak."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.current = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or storage.nbytes() == 0:
            return tensor
        return _Saved(self, tensor, ptr, storage.nbytes())

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Saved:
    __slots__ = ("meter", "tensor", "ptr")

    def __init__(self, meter: ActivationMeter, tensor: torch.Tensor, ptr: int, nbytes: int) -> None:
        self.meter, self.tensor, self.ptr = meter, tensor, ptr
        entry = meter.live.get(ptr)
        if entry is None:
            meter.live[ptr] = [1, nbytes]
            meter.current += nbytes
            meter.peak = max(meter.peak, meter.current)
        else:
            entry[0] += 1

    def __del__(self) -> None:
        entry = self.meter.live.get(self.ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.meter.current -= entry[1]
            del self.meter.live[self.ptr]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_peak_bytes(fn, device: torch.device) -> int | None:
    """Peak allocator bytes during ``fn`` above the level at its start."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        # Each event's own allocations minus frees (ops net their internal temporaries), in time order.
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        level = peak = 0
        for e in events:
            level += e.self_cpu_memory_usage
            peak = max(peak, level)
        return peak
    except Exception:  # noqa: BLE001 - the profiler is optional here
        return None


def build(kind: str, model_spec: str, spec: DataSpec, settings: TrainSettings, device: torch.device):
    torch.manual_seed(0)
    model = build_model(model_spec, spec).to(device)
    generator = torch.Generator(device=device).manual_seed(1)
    if kind == "bp":
        algorithm = get_algorithm("bp")(model, spec, settings, NoParams(), generator)
    else:
        noprop = get_algorithm("noprop")
        params = {"seq": {"parallel": False}, "par": {"parallel": True}, "1blk": {"loop": "paper"}}[kind]
        algorithm = noprop(model, spec, settings, noprop.Params(**params), generator)
    algorithm.train_mode()
    return algorithm


def measure(kinds: list[str], args, spec: DataSpec, device: torch.device) -> dict[str, dict]:
    settings = TrainSettings(1, args.batch, 1e-3, 1e-3, "adamw")
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(args.batch, *spec.input_shape, generator=g, device=device)
    y = torch.randint(0, spec.num_classes, (args.batch,), generator=g, device=device)
    algorithms = {kind: build(kind, args.model, spec, settings, device) for kind in kinds}
    steps = {kind: (lambda a=a: a.train_step(x, y)) for kind, a in algorithms.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    # Timing: the kinds take turns, `repeats` times, so load changes on a shared machine hit all alike.
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind, step in steps.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            rates[kind].append(args.steps * args.batch / (time.perf_counter() - start))
    rows = {}
    for kind, algorithm in algorithms.items():
        exclude = {p.untyped_storage().data_ptr() for p in algorithm.modules().parameters()}
        exclude |= {b.untyped_storage().data_ptr() for b in algorithm.modules().buffers()}
        exclude |= {t.untyped_storage().data_ptr() for t in getattr(algorithm, "_stacked", {}).values()}
        meter = ActivationMeter(exclude | {x.untyped_storage().data_ptr()})
        with meter.hooks():
            steps[kind]()
        rows[kind] = {
            "samples_per_s": statistics.median(rates[kind]),
            "spread": (min(rates[kind]), max(rates[kind])),
            "activation_bytes": meter.peak,
            "step_peak_bytes": step_peak_bytes(steps[kind], device),
            "flops": count_flops(steps[kind]),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="noprop:10,c4,h64")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--kinds", default="seq,par,1blk,bp")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    algorithm_names()
    spec = DataSpec("synthetic-mnist", (1, 28, 28), 10, n_train=60_000, n_val=0, n_test=0, augment=False)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"model {args.model}, batch {args.batch}, median of {args.repeats} x {args.steps} steps, {where}, "
        f"torch {torch.__version__}"
    )
    rows = measure(args.kinds.split(","), args, spec, device)
    bp = rows.get("bp")
    mib = 2**20
    header = (
        f"{'step':<12}{'samples/s':>11}{'(min-max)':>14}{'act. MiB':>10}{'vs BP':>7}{'step peak MiB':>15}{'vs BP':>7}"
        f"{'GFLOP/step':>12}"
    )
    print(header)
    print("-" * len(header))
    for kind, r in rows.items():
        act_ratio = f"{r['activation_bytes'] / bp['activation_bytes']:.2f}" if bp else "-"
        peak = r["step_peak_bytes"]
        peak_s = f"{peak / mib:.1f}" if peak is not None else "n/a"
        peak_ratio = f"{peak / bp['step_peak_bytes']:.2f}" if bp and peak and bp["step_peak_bytes"] else "-"
        name = {"seq": "noprop seq", "par": "noprop par", "1blk": "noprop 1blk"}.get(kind, kind)
        low, high = r["spread"]
        spread = f"({low:.0f}-{high:.0f})"
        print(
            f"{name:<12}{r['samples_per_s']:>11.1f}{spread:>14}{r['activation_bytes'] / mib:>10.2f}{act_ratio:>7}"
            f"{peak_s:>15}{peak_ratio:>7}{r['flops'] / 1e9:>12.2f}"
        )
    if "seq" in rows and "par" in rows:
        print(f"parallel speed-up over sequential: {rows['par']['samples_per_s'] / rows['seq']['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
