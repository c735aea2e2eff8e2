"""NoProp-DT against its BP twin as the chain deepens: epoch time and peak memory for T blocks.

    python benchmarks/noprop_depth.py [--depths 2 5 10 20] [--shape c32,h256] [--dataset mnist]
                                      [--batch 128] [--epochs 2] [--device auto] [--parallel/--sequential]
                                      [--plot noprop_depth.png | --no-plot] [--jsonl rows.jsonl]

NoProp's claims: blocks train independently (so in parallel), with less memory, scaling better with
depth than backprop through the whole chain. Each row trains NoProp-DT (``loop: joint``; the T blocks
in one vmap'd, captured step with ``--parallel``) and BP on the identical ``noprop:T,...`` network
through ``bpfree.bench.measure`` (the engine's own loop: median epoch after a warm-up epoch; peak
memory of the training windows; no energy windows). Prints the markdown table row by row as each
depth finishes (``--jsonl`` also appends each row as one JSON line), then writes a plot of both
against T.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

from bpfree.bench import BenchCase, measure
from bpfree.escape import markdown
from bpfree.fileio import append_line

HEADER = [
    "| T | model | NoProp epoch s | BP epoch s | time vs BP | NoProp peak MiB | BP peak MiB | memory vs BP |",
    "|---:|---|---:|---:|---:|---:|---:|---:|",
]


def sweep(depths: list[int], shape: str, dataset: str, batch: int, epochs: int, device: str, parallel: bool) -> Iterator[dict]:
    """One row per depth, yielded as soon as it is measured."""
    for depth in depths:
        model = f"noprop:{depth},{shape}" if shape else f"noprop:{depth}"
        case = BenchCase("NoProp-DT", "noprop", model, batch, {"parallel": parallel})
        noprop = measure(case, dataset, epochs, device, measure_energy=False)
        bp = measure(BenchCase("BP", "bp", model, batch), dataset, epochs, device, measure_energy=False)
        yield {"T": depth, "model": model, "parallel": parallel, "noprop": noprop, "bp": bp}


def row_line(r: dict) -> str:
    n, b = r["noprop"], r["bp"]
    nm, bm = n["peak_memory_bytes"] or 0, b["peak_memory_bytes"] or 0
    return (
        f"| {r['T']} | {markdown(r['model'])} | {n['epoch_s']:.3f} | {b['epoch_s']:.3f} | {n['epoch_s'] / b['epoch_s']:.2f}× | "
        f"{nm / 2**20:.0f} | {bm / 2**20:.0f} | {nm / bm if bm else float('nan'):.2f}× |"
    )


def table(rows: list[dict]) -> str:
    return "\n".join(HEADER + [row_line(r) for r in rows])


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [r["T"] for r in rows]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (("noprop", "NoProp-DT"), ("bp", "BP twin")):
        ax_time.plot(depths, [r[key]["epoch_s"] for r in rows], marker="o", label=label)
        ax_mem.plot(depths, [(r[key]["peak_memory_bytes"] or 0) / 2**20 for r in rows], marker="o", label=label)
    ax_time.set(xlabel="blocks T", ylabel="epoch time (s)")
    ax_mem.set(xlabel="blocks T", ylabel="peak memory (MiB)")
    ax_time.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 5, 10, 20])
    parser.add_argument("--shape", default="c32,h256", help="noprop spec options after T (paper size: c32,h256)")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up epoch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--plot", default="noprop_depth.png")
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="write no plot")
    parser.add_argument("--jsonl", default=None, help="append each row to this file as one JSON line, as it finishes")
    args = parser.parse_args()
    print(f"NoProp-DT vs BP twin by depth ({args.dataset}, batch {args.batch}, {args.device}, "
          f"{'parallel' if args.parallel else 'sequential'} blocks)\n")
    print("\n".join(HEADER), flush=True)
    rows = []
    for row in sweep(args.depths, args.shape, args.dataset, args.batch, args.epochs, args.device, args.parallel):
        rows.append(row)
        print(row_line(row), flush=True)
        if args.jsonl:
            append_line(args.jsonl, json.dumps(row, allow_nan=False))
    if args.plot and rows:
        plot(rows, args.plot, f"NoProp-DT vs BP by depth ({rows[0]['noprop']['device']})")
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
