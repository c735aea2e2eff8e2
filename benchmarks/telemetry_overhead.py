"""The telemetry sampler's overhead on epoch time: the same training epochs with the sampler on and off.

One process trains one config (its first phase) epoch after epoch through the engine's own loop
(``bpfree.loop.train_epoch``, timed window, captured steps on CUDA); epochs come in pairs, one with
a running sampler and one without, the order alternating from pair to pair, so drifts of a shared
machine hit both alike. Reported: the median epoch time of each mode and the median and quartiles
of the per-pair ratios (on/off). It also times one sample on the calling thread, which bounds the
sampler's own CPU use whatever the noise: cost of a sample / interval. ``--calibrate`` runs the
same pairs with the sampler off in both epochs (an A/A test): the spread of those ratios is the
noise floor of the machine, below which an overhead cannot be told apart.

    PYTHONPATH=src python benchmarks/telemetry_overhead.py --model mlp:2x1000 --pairs 30 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bpfree.build import build_run
from bpfree.capture import CapturedStep
from bpfree.config import build_config
from bpfree.loop import epoch_clock, train_epoch
from bpfree.meters.cpu import flush_denormal_scope
from bpfree.meters.environment import cpu_model
from bpfree.meters.flops import FlopLedger
from bpfree.meters.memory import MemoryMeter
from bpfree.meters.telemetry import TelemetrySampler


def sample_cost_s(device: torch.device, interval_s: float, calls: int, folder: Path) -> float:
    """Seconds of one sample (every source this machine has), timed on the calling thread."""
    sampler = TelemetrySampler(folder / "cost.csv", device, interval_s)
    sampler._open_sources()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            sampler._sample()
        return (time.perf_counter() - start) / calls
    finally:
        sampler._close_sources()


def measure(args: argparse.Namespace, folder: Path) -> dict[str, list[float]]:
    cfg = build_config({"algorithm": args.algorithm, "model": args.model, "dataset": args.dataset, "batch_size": args.batch_size,
                        "epochs": 2 * args.pairs + 1, "patience": None, "device": args.device, "checkpoint": False, "seed": 0})
    parts = build_run(cfg)
    algorithm, data, device = parts.algorithm, parts.data, parts.device
    captured = CapturedStep.for_run(parts)
    memory = MemoryMeter(device)
    phase = algorithm.schedule()[0]
    algorithm.begin_phase(phase)
    if captured is not None:
        captured.begin_phase(phase.name)
    n_train = data.train_x.shape[0]
    times: dict[str, list[float]] = {"off": [], "on": []}
    for epoch in range(2 * args.pairs + 1):
        clock = epoch_clock(phase, min(epoch, phase.epochs - 1), epoch, n_train, cfg.batch_size, cfg.drop_last)
        pair, second = divmod(epoch - 1, 2)
        order = ("off", "on") if pair % 2 == 0 else ("on", "off")
        mode = "warm-up" if epoch == 0 else order[second]  # the warm-up epoch counts FLOPs and (on CUDA) captures
        sampler = TelemetrySampler(folder / "telemetry.csv", device, args.interval) if mode == "on" and not args.calibrate else None
        if sampler is not None:
            sampler.start()
            sampler.mark("train", phase.name, epoch, flush=True)  # as the engine marks an epoch's start
        try:
            outcome = train_epoch(algorithm, data, clock, parts.data_generator, flops=FlopLedger() if epoch == 0 else None,
                                  memory=memory, autocast=parts.autocast, step=captured, drop_last=cfg.drop_last)
        finally:
            if sampler is not None:
                sampler.stop()
        if mode != "warm-up":
            times[mode].append(outcome.seconds)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", default="bp")
    parser.add_argument("--model", default="mlp:2x1000")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=30, help="pairs of epochs (one on, one off; the order alternates)")
    parser.add_argument("--interval", type=float, default=0.1, help="telemetry_interval_s when on")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--sample-calls", type=int, default=2000)
    parser.add_argument("--calibrate", action="store_true", help="the sampler off in both epochs of a pair: the noise floor")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, flush_denormal_scope(True):
        times = measure(args, Path(tmp))
        device = torch.device("cuda" if args.device == "cuda" else "cpu")
        per_sample = sample_cost_s(device, args.interval, args.sample_calls, Path(tmp))
    ratios = [on / off for on, off in zip(times["on"], times["off"])]
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    low, _, high = statistics.quantiles(ratios, n=4)
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch thread(s), device {args.device}")
    what = "A/A calibration: sampler off in both epochs" if args.calibrate else f"interval {args.interval} s"
    print(f"config: {args.algorithm} {args.model} {args.dataset} batch {args.batch_size}; {args.pairs} pairs of epochs, {what}")
    print(f"median epoch time: off {off:.4f} s, on {on:.4f} s ({100 * (on / off - 1):+.2f}%)")
    print(f"per-pair on/off: median {statistics.median(ratios):.4f} (quartiles {low:.4f} to {high:.4f}); on slower in {sum(r > 1 for r in ratios)} of {len(ratios)} pairs")
    print(f"one sample: {1e6 * per_sample:.0f} µs on the calling thread = {100 * per_sample / args.interval:.3f}% of one core at this interval")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
