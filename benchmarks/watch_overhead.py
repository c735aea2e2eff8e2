"""What watching a run costs: the per-epoch and per-step work of the live history, log lines and
trackers, against the epoch it watches.

    python benchmarks/watch_overhead.py [--config quick/mf_mnist5k.yaml] [--epochs 4] [--repeats 200]

Trains the config (default: MF on ``mlp:2x1000``, mnist5k, batch 128, CPU) with its history and a
text log line per epoch, and reads the mean epoch wall time (training window + validation) from
the result. Then it times, in the same process, what a run adds per epoch:

- ``epoch row``: :meth:`bpfree.live.RunWatch.on_epoch` on a real curve row: the history append
  (one write + fsync), the text log line (to /dev/null) and a tracker's queue put. Outside the
  timed training window, on the training thread.
- ``step event``: the engine's per-step callback into :meth:`~bpfree.live.RunWatch.on_step` (a
  dict built, one attribute stored), times the epoch's steps. Inside the timed window.
- ``heartbeat``: one heartbeat row (append + fsync + line), written by its own thread at most once
  per heartbeat interval (60 s); shown per row, not per epoch.

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
        epoch_row = _timed(lambda: watch.on_epoch({"event": "epoch", "phase": row["phase"], "epoch": 1, "epochs_run": next(counter),
                                                   "total_epochs": 10**6, "curve": row}), args.repeats)
        heartbeat = _timed(lambda: watch._emit(watch._heartbeat_row()), args.repeats)  # noqa: SLF001 - the row the thread writes

        def one_step() -> None:  # what the engine's on_step does per step (loop.train_epoch calls it)
            watch.on_step({"event": "step", "phase": "train", "step": 3, "steps": 28, "epochs_run": 0, "total_epochs": 10})

        step = _timed(one_step, args.repeats * 50)
        watch.end("completed")

    per_epoch_steps = step * (steps or 0)
    print(f"Command: `python benchmarks/watch_overhead.py --config {args.config} --epochs {args.epochs}`  ")
    print(f"Run: {cfg.algorithm} {cfg.model} {cfg.dataset}, batch {cfg.batch_size}, CPU ({torch.get_num_threads()} threads); "
          f"mean epoch (training window + validation) {epoch_s:.3f} s over {len(curves[1:] or curves)} epochs; "
          f"{steps} steps per epoch; median of {args.repeats} calls.\n")
    print("| cost | where | µs | per epoch, % of the epoch |")
    print("|---|---|---:|---:|")
    print(f"| epoch row (history append + fsync, log line, tracker queue) | after the timed window | {epoch_row * 1e6:.0f} | {epoch_row / epoch_s:.3%} |")
    print(f"| step event × {steps} steps | inside the timed window | {step * 1e6:.2f} per step | {per_epoch_steps / epoch_s:.4%} |")
    print(f"| heartbeat row (at most one per 60 s) | heartbeat thread | {heartbeat * 1e6:.0f} | — |")
    print(f"| **total per epoch** | | {(epoch_row + per_epoch_steps) * 1e6:.0f} | **{(epoch_row + per_epoch_steps) / epoch_s:.3%}** |")
    del run_dir


if __name__ == "__main__":
    main()
