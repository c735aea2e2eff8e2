"""What watching a run costs: the work the live history, log lines and trackers add per epoch and
per step, against the epoch they watch.

    python benchmarks/watch_overhead.py [--config quick/mf_mnist5k.yaml] [--epochs 4] [--repeats 200]

Trains the config (default: MF on ``mlp:2x1000``, mnist5k, batch 128, CPU) with its history and a
text log line per epoch, and reads the mean epoch wall time (training window + validation) from
the result. Then it times, in the same process:

- ``epoch row, training thread``: :meth:`bpfree.live.RunWatch.on_epoch` on a real curve row: the
  row built and queued. After the timed training window; the only per-epoch cost the training
  thread pays.
- ``epoch row, writer thread``: what the writer then does with it (:meth:`RunWatch._write`): the
  history append (one write + fsync), the text log line (to /dev/null) and a tracker's queue put;
  wall time and the thread's CPU time (an fsync waits for the disk without using a core).
- ``step event``: the engine's per-step callback into :meth:`~bpfree.live.RunWatch.on_step` (a
  dict built, one attribute stored), times the epoch's steps. Inside the timed window.

Prints a Markdown table: each cost in microseconds and as a share of the mean epoch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bpfree.cli import LineLog
from bpfree.config import load_config
from bpfree.live import RunWatch
from bpfree.runner import execute


def _timed(function, repeats: int) -> float:
    """Median seconds of one call over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quick/mf_mnist5k.yaml")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null:
        cfg = load_config(Path(args.config), {"epochs": args.epochs, "output": Path(tmp) / "runs", "device": "cpu"},
                          ["patience=null"])
        lines = LineLog(stream=null)
        run_dir, result = execute(cfg, on_event=lines)
        curves = result["curves"]
        epoch_s = statistics.mean(c["epoch_time_s"] + c["eval_time_s"] for c in curves[1:] or curves)
        steps = -(-3500 // cfg.batch_size) if cfg.dataset == "mnist5k" else None

        watch = RunWatch(Path(tmp), "bench", "bench run", checkpoint=True, heartbeat_s=0)
        queued: list = []
        watch.start(total_epochs=10**6, resumed=False, listeners=[lines, queued.append])
        counter = iter(range(1, 10**9))
        row = curves[-1]

        def epoch_event() -> None:
            watch.on_epoch({"event": "epoch", "phase": row["phase"], "epoch": 1, "epochs_run": next(counter), "total_epochs": 10**6, "curve": row})

        training_thread = _timed(epoch_event, args.repeats)
        watch.end("completed")
        sample = queued[-2]  # an epoch row as the writer received it
        writer = RunWatch(Path(tmp) / "writer", "bench", "bench run", checkpoint=True, heartbeat_s=0)
        writer.listeners = [lines, queued.append]
        (Path(tmp) / "writer").mkdir()
        cpu_before = time.thread_time()
        writer_wall = _timed(lambda: writer._write(sample), args.repeats)  # noqa: SLF001 - what the writer thread does per row
        writer_cpu = (time.thread_time() - cpu_before) / args.repeats

        def one_step() -> None:  # what the engine's on_step does per step (loop.train_epoch calls it)
            watch.on_step({"event": "step", "phase": "train", "step": 3, "steps": 28, "epochs_run": 0, "total_epochs": 10})

        step = _timed(one_step, args.repeats * 50)

    per_epoch_steps = step * (steps or 0)
    threads = f" --threads {args.threads}" if args.threads else ""
    print(f"Command: `python benchmarks/watch_overhead.py --config {args.config} --epochs {args.epochs}{threads}`  ")
    print(f"Run: {cfg.algorithm} {cfg.model} {cfg.dataset}, batch {cfg.batch_size}, CPU ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}); "
          f"mean epoch (training window + validation) {epoch_s:.3f} s over {len(curves[1:] or curves)} epochs; "
          f"{steps} steps per epoch; median of {args.repeats} calls.\n")
    print("| cost | where | µs per epoch | % of the epoch |")
    print("|---|---|---:|---:|")
    print(f"| epoch row built and queued | training thread, after the timed window | {training_thread * 1e6:.0f} | {training_thread / epoch_s:.3%} |")
    print(f"| step event × {steps} steps ({step * 1e6:.2f} µs each) | training thread, inside the timed window | {per_epoch_steps * 1e6:.1f} | {per_epoch_steps / epoch_s:.4%} |")
    print(f"| **training thread, total** | | **{(training_thread + per_epoch_steps) * 1e6:.0f}** | **{(training_thread + per_epoch_steps) / epoch_s:.3%}** |")
    print(f"| history append + fsync, log line, tracker queue: wall | writer thread | {writer_wall * 1e6:.0f} | {writer_wall / epoch_s:.3%} |")
    print(f"| the same: CPU time | writer thread | {writer_cpu * 1e6:.0f} | {writer_cpu / epoch_s:.3%} |")
    del run_dir


if __name__ == "__main__":
    main()
